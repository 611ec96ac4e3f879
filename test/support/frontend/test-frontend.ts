// The project's own vhost-user frontend + virtio-net driver, over a memfd it shares with the
// backend. Fast enough for unit, fuzz and bench use; it plays "the guest" without QEMU.
import { setTimeout as sleep } from 'node:timers/promises';
import { UnixSocket } from '../../../src/sys/unix-socket.js';
import { memfdCreate, SharedMapping, eventfdCreate, eventfdSignal, eventfdDrain, closeFd, pipe, raw, NativeBuffer, setNonBlocking, lastErrno, Errno } from '../../../src/sys/libc.js';
import { GuestMemory } from '../../../src/memory/guest-memory.js';
import {
  Request, ProtocolFeature, FLAG_VERSION, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, bit, hasBit,
  encodeMessage, decodeHeader, u64Payload, vringStatePayload, vringAddrPayload, memTablePayload, F_PROTOCOL_FEATURES,
  logDescPayload, VRING_F_LOG, F_LOG_ALL, type VringAddr,
} from '../../../src/vhost-user/protocol.js';
import { NetFeature as F } from '../../../src/net/features.js';
import { DriverQueue, type DriverBuffer } from './driver-queue.js';
import { GuestLog, type GuestRange } from './guest-log.js';

export interface FrontendOptions {
  queuePairs?: number;
  queueSize?: number;
  memBytes?: number;
  /** Virtio features to ack (masked with what the backend offers). */
  features?: bigint;
  /** Start the rings (default true). */
  start?: boolean;
  /** Protocol features to negotiate besides the default set (masked with what the backend offers). */
  protocolFeatures?: bigint;
  connectTimeoutMs?: number;
  /**
   * 'slots' (default): every RX chain is one 2 KiB slot, refilled by receive(). 'manual': RX
   * queues get only what postRx() posts (custom chains, e.g. small or page-crossing segments).
   */
  rxFill?: 'slots' | 'manual';
}

export const DEFAULT_FEATURES = [F.VERSION_1, F.MRG_RXBUF, F.RING_EVENT_IDX, F.RING_INDIRECT_DESC, F.MQ, F.CSUM, F.GUEST_CSUM]
  .reduce((m, b) => m | bit(b), bit(F_PROTOCOL_FEATURES));

const SLOT = 2048;
const PAGE = 4096;
const BIG = 68 * 1024;
const HDR = 12;

export class FrontendError extends Error {}

/** Adds the 4 KiB page numbers [r.gpa, r.gpa + r.len) touches. */
export function addPages(into: Set<number>, r: GuestRange): Set<number> {
  if (r.len <= 0) return into;
  for (let p = Math.floor(r.gpa / PAGE); p <= Math.floor((r.gpa + r.len - 1) / PAGE); p++) into.add(p);
  return into;
}

interface PairState {
  rx: DriverQueue;
  tx: DriverQueue;
  kick: [number, number];
  call: [number, number];
  txFree: number[];
  rxSlots: number;
  /** Tokens of postTx chains the device has returned, not yet taken by takeTxDone. */
  ownTxDone: object[];
}

/** A vhost-user frontend that drives a virtio-net device the way a guest driver would. */
export class TestFrontend {
  readonly sock: UnixSocket;
  readonly memfd: number;
  readonly mapping: SharedMapping;
  readonly mem: GuestMemory;
  readonly pairs: PairState[] = [];
  features = 0n;
  protocolFeatures = 0n;
  private nextFree: number;
  private readonly rxBase: number[] = [];
  private readonly txBase: number[] = [];
  /** One large TX buffer per pair, for frames over a slot (offload requests up to 64 KiB). */
  private readonly bigTx: number[] = [];
  private closed = false;

  private constructor(sock: UnixSocket, readonly opts: Required<FrontendOptions>) {
    this.sock = sock;
    this.memfd = memfdCreate('vhost-xdp-test-frontend', opts.memBytes);
    this.mapping = new SharedMapping(this.memfd, opts.memBytes, 0);
    this.mem = new GuestMemory([{ gpa: 0, size: opts.memBytes, uva: this.mapping.address, hostAddress: this.mapping.address }]);
    this.nextFree = 0;
  }

  /** Connects to a backend listening on `path` (retrying until it listens) and sets the device up. */
  static async connect(path: string, options: FrontendOptions = {}): Promise<TestFrontend> {
    const opts: Required<FrontendOptions> = {
      queuePairs: options.queuePairs ?? 1, queueSize: options.queueSize ?? 256, memBytes: options.memBytes ?? 32 << 20,
      features: options.features ?? DEFAULT_FEATURES, start: options.start ?? true, connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      protocolFeatures: options.protocolFeatures ?? 0n, rxFill: options.rxFill ?? 'slots',
    };
    const deadline = Date.now() + opts.connectTimeoutMs;
    let sock: UnixSocket | null = null;
    while (!sock) {
      try {
        sock = UnixSocket.connect(path);
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await sleep(50);
      }
    }
    const fe = new TestFrontend(sock, opts);
    try {
      if (opts.start) await fe.setup();
    } catch (e) {
      fe.close();
      throw e;
    }
    return fe;
  }

  /** Reserves guest memory the frontend will not hand out again (buffers a test lays out itself). */
  alloc(bytes: number, align = 4096): number {
    const at = Math.ceil(this.nextFree / align) * align;
    if (at + bytes > this.opts.memBytes) throw new FrontendError('test frontend memory exhausted');
    this.nextFree = at + bytes;
    return at;
  }

  // ---- raw protocol access (also used by the fuzzer) ----

  sendRaw(request: number, flags: number, payload: Uint8Array, fds: number[] = []): void {
    this.sock.send(encodeMessage(request, flags, payload), fds);
  }

  /** Reads one reply; null on timeout; throws when the backend hung up. */
  async readReply(timeoutMs = 3000): Promise<{ request: number; flags: number; payload: Uint8Array } | null> {
    const head = new Uint8Array(HEADER_SIZE);
    let got = 0;
    const deadline = Date.now() + timeoutMs;
    while (got < HEADER_SIZE) {
      const r = this.sock.recv(head, got, HEADER_SIZE - got);
      for (const fd of r.fds) closeFd(fd);
      if (r.n === 0) throw new FrontendError('backend closed the connection');
      if (r.n > 0) { got += r.n; continue; }
      if (Date.now() > deadline) return null;
      await sleep(1);
    }
    const h = decodeHeader(head);
    if (h.size > 4096) throw new FrontendError(`reply of ${h.size} bytes`);
    const payload = new Uint8Array(h.size);
    got = 0;
    while (got < h.size) {
      const r = this.sock.recv(payload, got, h.size - got);
      if (r.n === 0) throw new FrontendError('backend closed the connection');
      if (r.n > 0) { got += r.n; continue; }
      if (Date.now() > deadline) return null;
      await sleep(1);
    }
    return { request: h.request, flags: h.flags, payload };
  }

  private get replyAck(): boolean {
    return hasBit(this.protocolFeatures, ProtocolFeature.REPLY_ACK);
  }

  /** Sends a request; for GET-style requests returns the reply payload; for others waits for the ack when REPLY_ACK is on. */
  async request(request: Request, payload: Uint8Array = new Uint8Array(0), fds: number[] = [], expectReply = false): Promise<Uint8Array | null> {
    const ack = !expectReply && this.replyAck;
    this.sendRaw(request, FLAG_VERSION | (ack ? FLAG_NEED_REPLY : 0), payload, fds);
    if (!expectReply && !ack) return null;
    const r = await this.readReply();
    if (!r) throw new FrontendError(`no reply to ${Request[request]}`);
    if (r.request !== request || !(r.flags & FLAG_REPLY)) throw new FrontendError(`reply to ${Request[request]} has request ${r.request} flags ${r.flags}`);
    if (ack) {
      const status = new DataView(r.payload.buffer).getBigUint64(0, true);
      if (status !== 0n) throw new FrontendError(`${Request[request]} refused by the backend (status ${status})`);
      return null;
    }
    return r.payload;
  }

  private async getU64(request: Request): Promise<bigint> {
    const p = await this.request(request, new Uint8Array(0), [], true);
    return new DataView(p!.buffer).getBigUint64(0, true);
  }

  // ---- device setup as a guest driver + QEMU would do it ----

  async setup(): Promise<void> {
    await this.negotiate();
    await this.start();
  }

  /** What QEMU sends when it connects: features and protocol features offered, owner. */
  async negotiate(): Promise<void> {
    const { queuePairs } = this.opts;
    const offered = await this.getU64(Request.GET_FEATURES);
    this.features = offered & this.opts.features;
    if (hasBit(offered, F_PROTOCOL_FEATURES)) {
      const proto = await this.getU64(Request.GET_PROTOCOL_FEATURES);
      const want = proto & (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.NET_MTU) | bit(ProtocolFeature.RESET_DEVICE) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) | this.opts.protocolFeatures);
      // REPLY_ACK applies from the next request on, not to the one that negotiates it.
      await this.request(Request.SET_PROTOCOL_FEATURES, u64Payload(want));
      this.protocolFeatures = want;
      if (hasBit(this.protocolFeatures, ProtocolFeature.MQ)) {
        const max = Number(await this.getU64(Request.GET_QUEUE_NUM));
        if (max < queuePairs) throw new FrontendError(`backend offers ${max} queue pairs, ${queuePairs} wanted`);
      }
    }
    await this.request(Request.SET_OWNER);
  }

  /**
   * What the guest driver's DRIVER_OK makes QEMU send: features acked, memory, every ring new and
   * started from 0 (again: a driver that reset the device; resumeRings continues the old ones).
   */
  async start(): Promise<void> {
    const { queuePairs, queueSize } = this.opts;
    await this.request(Request.SET_FEATURES, u64Payload(this.features));
    await this.request(Request.SET_MEM_TABLE, memTablePayload([{ gpa: 0, size: this.opts.memBytes, uva: this.mapping.address, mmapOffset: 0 }]), [this.memfd]);
    const eventIdx = hasBit(this.features, F.RING_EVENT_IDX);
    for (let p = 0; p < queuePairs; p++) {
      const rx = new DriverQueue(this.mem, this.alloc(DriverQueue.bytesNeeded(queueSize)), queueSize, { eventIdx });
      const tx = new DriverQueue(this.mem, this.alloc(DriverQueue.bytesNeeded(queueSize)), queueSize, { eventIdx });
      this.rxBase[p] = this.alloc(queueSize * SLOT);
      this.txBase[p] = this.alloc(queueSize * SLOT);
      this.bigTx[p] = this.alloc(BIG);
      const st: PairState = { rx, tx, kick: [eventfdCreate(), eventfdCreate()], call: [eventfdCreate(), eventfdCreate()], txFree: Array.from({ length: queueSize }, (_, i) => i), rxSlots: 0, ownTxDone: [] };
      // A second start is a driver that reset the device: its old rings are forgotten.
      const old = this.pairs[p];
      if (old) for (const fd of [...old.kick, ...old.call]) closeFd(fd);
      this.pairs[p] = st;
      this.bigBusy.delete(p);
      this.fillRx(p);
      for (const k of [0, 1] as const) {
        const index = 2 * p + k;
        const l = (k === 0 ? rx : tx).layout;
        this.vringAddrs[index] = { index, flags: 0, descUser: this.mapping.address + l.descGpa, usedUser: this.mapping.address + l.usedGpa, availUser: this.mapping.address + l.availGpa, logGuest: 0 };
        await this.startRing(index, 0);
      }
    }
  }

  /** SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE for a ring whose queue and addresses exist. */
  private async startRing(index: number, base: number): Promise<void> {
    const st = this.pair(index >> 1);
    const k = (index & 1) as 0 | 1;
    await this.request(Request.SET_VRING_NUM, vringStatePayload(index, this.opts.queueSize));
    await this.request(Request.SET_VRING_BASE, vringStatePayload(index, base));
    await this.request(Request.SET_VRING_ADDR, vringAddrPayload(this.vringAddrs[index]!));
    await this.request(Request.SET_VRING_CALL, u64Payload(index), [st.call[k]]);
    await this.request(Request.SET_VRING_KICK, u64Payload(index), [st.kick[k]]);
    if (hasBit(this.features, F_PROTOCOL_FEATURES)) await this.request(Request.SET_VRING_ENABLE, vringStatePayload(index, 1));
  }

  /** GET_VRING_BASE on every ring, as QEMU stops the device (VM stop, migration switch-over); returns the bases by vring index. */
  async stopRings(): Promise<number[]> {
    const bases: number[] = [];
    for (let i = 0; i < 2 * this.pairs.length; i++) bases.push(await this.getVringBase(i));
    return bases;
  }

  /** Starts the same rings again from the bases stopRings returned (VM continued, migration cancelled). */
  async resumeRings(bases: readonly number[]): Promise<void> {
    for (let i = 0; i < bases.length; i++) await this.startRing(i, bases[i]!);
  }

  private pair(p: number): PairState {
    const st = this.pairs[p];
    if (!st) throw new FrontendError(`no queue pair ${p}`);
    return st;
  }

  /** Posts receive buffers (one 2 KiB slot each) until the RX queue is full ('slots' mode; 'manual' posts nothing). */
  fillRx(p: number): number {
    const st = this.pair(p);
    if (this.opts.rxFill === 'manual') return 0;
    let n = 0;
    while (st.rx.numFree > 0) {
      const slot = st.rxSlots++ % this.opts.queueSize;
      const gpa = this.rxBase[p]! + slot * SLOT;
      if (st.rx.add([{ gpa, len: SLOT, writable: true }], gpa) === null) break;
      n++;
    }
    if (n > 0) {
      st.rx.publish();
      if (st.rx.needsKick()) eventfdSignal(st.kick[0]);
    }
    return n;
  }

  /**
   * Posts receive chains laid out by the caller (writable segments, in order) and kicks; returns
   * how many fit. receive() reads and records them like the slots.
   */
  postRx(p: number, chains: readonly (readonly DriverBuffer[])[]): number {
    const st = this.pair(p);
    let n = 0;
    for (const segs of chains) {
      const own = segs.map((b) => ({ gpa: b.gpa, len: b.len, writable: true }));
      if (st.rx.add(own, own) === null) break;
      n++;
    }
    if (n > 0) {
      st.rx.publish();
      if (st.rx.needsKick()) eventfdSignal(st.kick[0]);
    }
    return n;
  }

  /** The first `len` bytes of an RX chain (token: a slot's gpa, or the segments postRx posted), as guest ranges. */
  private rxRanges(token: unknown, len: number): GuestRange[] {
    const segs: readonly { gpa: number; len: number }[] = typeof token === 'number' ? [{ gpa: token, len: SLOT }] : token as DriverBuffer[];
    const out: GuestRange[] = [];
    for (let i = 0; i < segs.length && len > 0; i++) {
      const take = Math.min(segs[i]!.len, len);
      out.push({ gpa: segs[i]!.gpa, len: take });
      len -= take;
    }
    if (len > 0) throw new FrontendError(`device reported ${len} bytes more than the chain holds`);
    return out;
  }

  private gather(ranges: readonly GuestRange[]): Uint8Array {
    const out = new Uint8Array(ranges.reduce((a, r) => a + r.len, 0));
    let at = 0;
    for (const r of ranges) { out.set(this.mem.slice(r.gpa, r.len), at); at += r.len; }
    return out;
  }

  /**
   * While non-null, receive() appends the guest ranges the device reported written (the first
   * `len` bytes of every used RX chain, whoever called receive()): what a dirty log must cover.
   */
  rxWrites: GuestRange[] | null = null;

  private reclaimTx(st: PairState): void {
    for (let u = st.tx.pollUsed(); u; u = st.tx.pollUsed()) {
      if (typeof u.token === 'object' && u.token !== null) {
        st.ownTxDone.push(u.token);
        continue;
      }
      const token = u.token as number;
      if (token < 0) this.bigBusy.delete(-1 - token);
      else st.txFree.push(token);
    }
  }

  /**
   * Queues frames on a TX queue, each behind a virtio-net header (zeroed, or `header` copied
   * over its start); returns how many fit.
   */
  transmit(p: number, frames: Uint8Array[], header?: Uint8Array): number {
    const st = this.pair(p);
    this.reclaimTx(st);
    let n = 0;
    for (const f of frames) {
      if (f.length + HDR > SLOT) throw new FrontendError(`frame of ${f.length} bytes exceeds a ${SLOT}-byte slot`);
      const slot = st.txFree.pop();
      if (slot === undefined) break;
      const gpa = this.txBase[p]! + slot * SLOT;
      const buf = this.mem.slice(gpa, HDR + f.length);
      buf.fill(0, 0, HDR);
      if (header) buf.set(header.subarray(0, HDR), 0);
      buf.set(f, HDR);
      if (st.tx.add([{ gpa, len: HDR + f.length, writable: false }], slot) === null) {
        st.txFree.push(slot);
        break;
      }
      n++;
    }
    if (n > 0) {
      st.tx.publish();
      if (st.tx.needsKick()) eventfdSignal(st.kick[1]);
    }
    return n;
  }

  /**
   * Sends one frame of any size up to 68 KiB from the pair's large buffer (one descriptor).
   * Only one may be in flight: it waits until the device returned the previous one.
   */
  async transmitLarge(p: number, frame: Uint8Array, timeoutMs = 3000): Promise<void> {
    const st = this.pair(p);
    if (frame.length + HDR > BIG) throw new FrontendError(`frame of ${frame.length} bytes exceeds ${BIG}`);
    const deadline = Date.now() + timeoutMs;
    for (this.reclaimTx(st); this.bigBusy.has(p); this.reclaimTx(st)) {
      if (Date.now() > deadline) throw new FrontendError('the device did not return the large TX buffer');
      await sleep(1);
    }
    const gpa = this.bigTx[p]!;
    const buf = this.mem.slice(gpa, HDR + frame.length);
    buf.fill(0, 0, HDR);
    buf.set(frame, HDR);
    if (st.tx.add([{ gpa, len: HDR + frame.length, writable: false }], -1 - p) === null) throw new FrontendError('TX queue full');
    this.bigBusy.add(p);
    st.tx.publish();
    if (st.tx.needsKick()) eventfdSignal(st.kick[1]);
  }

  /**
   * Queues TX chains the caller laid out itself in memory it alloc()ed, virtio-net header
   * included (e.g. many 64 KiB GSO frames in flight, which the slots and the one large buffer
   * cannot hold); each chain comes back through takeTxDone as its token. Returns how many fit.
   */
  postTx(p: number, chains: readonly { segs: readonly { gpa: number; len: number }[]; token: object }[]): number {
    const st = this.pair(p);
    this.reclaimTx(st);
    let n = 0;
    for (const c of chains) {
      if (st.tx.add(c.segs.map((b) => ({ gpa: b.gpa, len: b.len, writable: false })), c.token) === null) break;
      n++;
    }
    if (n > 0) {
      st.tx.publish();
      if (st.tx.needsKick()) eventfdSignal(st.kick[1]);
    }
    return n;
  }

  /** Tokens of postTx chains the device has handed back since the last call. */
  takeTxDone(p: number): object[] {
    const st = this.pair(p);
    this.reclaimTx(st);
    return st.ownTxDone.splice(0);
  }

  private readonly bigBusy = new Set<number>();
  /** SET_VRING_ADDR as sent at setup, per vring index. */
  readonly vringAddrs: VringAddr[] = [];

  // ---- live migration, as QEMU drives it ----

  /** The guest-physical address of vring `index`'s used ring. */
  usedGpa(index: number): number {
    return this.vringAddrs[index]!.usedUser - this.mapping.address;
  }

  /** SET_LOG_BASE with `fd` (the backend gets a copy); returns the reply's payload (with LOG_SHMFD every SET_LOG_BASE has one). */
  async setLogBase(fd: number, size: number, offset = 0): Promise<Uint8Array> {
    this.sendRaw(Request.SET_LOG_BASE, FLAG_VERSION, logDescPayload(size, offset), [fd]);
    const r = await this.readReply();
    if (!r) throw new FrontendError('no reply to SET_LOG_BASE');
    if (r.request !== Request.SET_LOG_BASE || !(r.flags & FLAG_REPLY)) throw new FrontendError(`reply to SET_LOG_BASE has request ${r.request}`);
    return r.payload;
  }

  /** Re-sends vring `index`'s addresses with VHOST_VRING_F_LOG set or clear (QEMU does so when logging starts and stops). */
  async setVringLog(index: number, on: boolean, logGuest = this.usedGpa(index)): Promise<void> {
    const a = this.vringAddrs[index];
    if (!a) throw new FrontendError(`vring ${index} has no addresses`);
    await this.request(Request.SET_VRING_ADDR, vringAddrPayload({ ...a, flags: on ? 1 << VRING_F_LOG : 0, logGuest: on ? logGuest : 0 }));
  }

  async setFeatures(features: bigint): Promise<void> {
    await this.request(Request.SET_FEATURES, u64Payload(features));
    this.features = features;
  }

  /**
   * Starts dirty logging the way QEMU does when a migration starts: a log memfd of its own
   * (mapped here to read the bits) through SET_LOG_BASE, VHOST_VRING_F_LOG on every vring
   * (logged at its used ring's gpa), then LOG_ALL (unless `logAll` is false: a log the backend
   * holds but must not write yet). Needs LOG_SHMFD negotiated.
   */
  async startDirtyLog(opts: { logAll?: boolean } = {}): Promise<GuestLog> {
    const log = GuestLog.create(this.opts.memBytes);
    try {
      await this.setLogBase(log.fd, log.size);
      for (let i = 0; i < this.vringAddrs.length; i++) await this.setVringLog(i, true);
      if (opts.logAll ?? true) await this.setLogAll(true);
    } catch (e) {
      log.close();
      throw e;
    }
    return log;
  }

  /** SET_FEATURES with LOG_ALL set or clear (the rings keep running). */
  async setLogAll(on: boolean): Promise<void> {
    await this.setFeatures(on ? this.features | bit(F_LOG_ALL) : this.features & ~bit(F_LOG_ALL));
  }

  /** Pages the driver itself writes: descriptor tables, avail rings, TX buffers (not the device's). */
  driverPages(): Set<number> {
    const pages = new Set<number>();
    for (let p = 0; p < this.pairs.length; p++) {
      for (const q of [this.pairs[p]!.rx, this.pairs[p]!.tx]) addPages(pages, { gpa: q.layout.descGpa, len: q.layout.usedGpa - q.layout.descGpa });
      addPages(pages, { gpa: this.txBase[p]!, len: this.opts.queueSize * SLOT });
      addPages(pages, { gpa: this.bigTx[p]!, len: BIG });
    }
    return pages;
  }

  /** The used ring of vring `index` as a guest range (flags, idx, ring, avail_event). */
  usedRing(index: number): GuestRange {
    return { gpa: this.usedGpa(index), len: 6 + 8 * this.opts.queueSize };
  }

  /** A copy of all guest memory (to see afterwards which pages changed). */
  snapshot(): Uint8Array {
    return this.mem.slice(0, this.opts.memBytes).slice();
  }

  /** Pages whose bytes differ from `before` (a snapshot()). */
  changedPages(before: Uint8Array): Set<number> {
    const now = this.mem.slice(0, this.opts.memBytes);
    const out = new Set<number>();
    const a = new BigUint64Array(before.buffer, before.byteOffset, before.length / 8);
    const b = new BigUint64Array(now.buffer, now.byteOffset, now.length / 8);
    const perPage = PAGE / 8;
    for (let pg = 0; pg < a.length / perPage; pg++) {
      for (let i = pg * perPage; i < (pg + 1) * perPage; i++) if (a[i] !== b[i]) { out.add(pg); break; }
    }
    return out;
  }

  /** SET_DEVICE_STATE_FD with `fd`; returns the reply's u64 (bits 0-7 status, bit 8 no fd). */
  async setDeviceStateFd(direction: number, phase: number, fd: number): Promise<bigint> {
    const b = new Uint8Array(8);
    const v = new DataView(b.buffer);
    v.setUint32(0, direction, true);
    v.setUint32(4, phase, true);
    const p = await this.request(Request.SET_DEVICE_STATE_FD, b, [fd], true);
    return new DataView(p!.buffer, p!.byteOffset).getBigUint64(0, true);
  }

  async checkDeviceState(): Promise<bigint> {
    const p = await this.request(Request.CHECK_DEVICE_STATE, new Uint8Array(0), [], true);
    return new DataView(p!.buffer, p!.byteOffset).getBigUint64(0, true);
  }

  /** The source side: SAVE over a pipe, read to EOF, then CHECK_DEVICE_STATE (as QEMU's vhost_save_backend_state). */
  async saveDeviceState(timeoutMs = 5000): Promise<{ reply: bigint; state: Uint8Array; check: bigint }> {
    const [r, w] = pipe();
    try {
      const reply = await this.setDeviceStateFd(0, 0, w);
      closeFd(w);
      const state = reply === 0x100n ? await readToEof(r, timeoutMs) : new Uint8Array(0);
      return { reply, state, check: await this.checkDeviceState() };
    } finally {
      closeFd(r);
      closeFd(w);
    }
  }

  /**
   * The destination side: LOAD over a pipe, write `state` and close (unless `keepOpen`), then
   * CHECK_DEVICE_STATE. `written` is how much the backend took before it closed its end.
   */
  async loadDeviceState(state: Uint8Array, opts: { keepOpen?: boolean; timeoutMs?: number } = {}): Promise<{ reply: bigint; written: number; check: bigint }> {
    const [r, w] = pipe();
    let wfd = w;
    try {
      const reply = await this.setDeviceStateFd(1, 0, r);
      closeFd(r);
      const written = reply === 0x100n ? await writeAll(w, state, opts.timeoutMs ?? 5000) : 0;
      if (!opts.keepOpen) { closeFd(w); wfd = -1; }
      return { reply, written, check: await this.checkDeviceState() };
    } finally {
      closeFd(r);
      closeFd(wfd);
    }
  }

  /** TX buffers the device has not yet returned. */
  txInFlight(p: number): number {
    const st = this.pair(p);
    this.reclaimTx(st);
    return this.opts.queueSize - st.txFree.length;
  }

  /** Frames the device delivered on RX queue p (header stripped; mergeable chains joined). Refills buffers. */
  receive(p: number): Uint8Array[] {
    const st = this.pair(p);
    eventfdDrain(st.call[0]);
    const frames: Uint8Array[] = [];
    for (;;) {
      const u = st.rx.pollUsed();
      if (!u) break;
      const firstRanges = this.rxRanges(u.token, u.len);
      this.rxWrites?.push(...firstRanges);
      const first = this.gather(firstRanges);
      const numBuffers = first.length >= HDR ? new DataView(first.buffer).getUint16(10, true) : 1;
      const parts = [first.subarray(Math.min(HDR, first.length))];
      for (let i = 1; i < numBuffers; i++) {
        const more = st.rx.pollUsed();
        if (!more) throw new FrontendError(`frame announced ${numBuffers} buffers, device returned ${i}`);
        const ranges = this.rxRanges(more.token, more.len);
        this.rxWrites?.push(...ranges);
        parts.push(this.gather(ranges));
      }
      const total = parts.reduce((a, b) => a + b.length, 0);
      const frame = new Uint8Array(total);
      let off = 0;
      for (const part of parts) { frame.set(part, off); off += part.length; }
      frames.push(frame);
    }
    this.fillRx(p);
    return frames;
  }

  /**
   * Consumes RX queue p's used buffers without reading them (benches: what a guest that drops
   * every frame costs) and refills; returns how many buffers came back.
   */
  drainRx(p: number): number {
    const st = this.pair(p);
    let n = 0;
    for (let u = st.rx.pollUsed(); u; u = st.rx.pollUsed()) n++;
    if (n > 0) this.fillRx(p);
    return n;
  }

  /** Waits until `count` frames arrived on RX queue p (or the timeout); returns what arrived. */
  async waitForFrames(p: number, count: number, timeoutMs = 5000, filter?: (f: Uint8Array) => boolean): Promise<Uint8Array[]> {
    const out: Uint8Array[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < count && Date.now() < deadline) {
      for (const f of this.receive(p)) if (!filter || filter(f)) out.push(f);
      if (out.length < count) await sleep(2);
    }
    return out;
  }

  async resetDevice(): Promise<void> {
    await this.request(Request.RESET_DEVICE);
  }

  /** Stops a vring the way QEMU does on shutdown and returns the backend's last avail index. */
  async getVringBase(index: number): Promise<number> {
    const p = await this.request(Request.GET_VRING_BASE, vringStatePayload(index, 0), [], true);
    return new DataView(p!.buffer).getUint32(4, true);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.sock.close();
    for (const st of this.pairs) for (const fd of [...st.kick, ...st.call]) closeFd(fd);
    this.mapping.unmap();
    closeFd(this.memfd);
  }
}

const pipeBuf = new NativeBuffer(65536);

/** Reads a non-blocking-capable fd to end of file (yielding to the event loop while it is empty). */
async function readToEof(fd: number, timeoutMs: number): Promise<Uint8Array> {
  setNonBlocking(fd);
  const parts: Uint8Array[] = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const n = raw.read(fd, pipeBuf.address, pipeBuf.size);
    if (n === 0) break;
    if (n > 0) { parts.push(pipeBuf.bytes.slice(0, n)); continue; }
    if (lastErrno() !== Errno.EAGAIN) throw new FrontendError(`read(state pipe): errno ${lastErrno()}`);
    if (Date.now() > deadline) throw new FrontendError('the backend did not close the state pipe');
    await sleep(1);
  }
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** Writes all of `bytes` (yielding while the pipe is full); stops early when the reader closed its end. */
async function writeAll(fd: number, bytes: Uint8Array, timeoutMs: number): Promise<number> {
  setNonBlocking(fd);
  let off = 0;
  const deadline = Date.now() + timeoutMs;
  while (off < bytes.length) {
    const n = Math.min(pipeBuf.size, bytes.length - off);
    pipeBuf.bytes.set(bytes.subarray(off, off + n), 0);
    const r = raw.write(fd, pipeBuf.address, n);
    if (r > 0) { off += r; continue; }
    const e = lastErrno();
    if (e === Errno.EPIPE) break;
    if (e !== Errno.EAGAIN) throw new FrontendError(`write(state pipe): errno ${e}`);
    if (Date.now() > deadline) throw new FrontendError('the backend stopped reading the state pipe');
    await sleep(1);
  }
  return off;
}
