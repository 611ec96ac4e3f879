import { VxError } from '../errors.js';
import { closeFd, SysError } from '../sys/libc.js';
import type { UnixSocket } from '../sys/unix-socket.js';
import { logger, type Logger } from '../log.js';
import { GuestMemory, GuestMemoryError, type RegionInfo } from '../memory/guest-memory.js';
import { MemoryTable, MemoryTableError } from './memory-table.js';
import { VringTable, VringError } from './vring-table.js';
import { LogMapping, LogBaseError } from './log-base.js';
import { StateTransfer, DeviceStateError, STATE_NOFD, type TransferRecord } from './device-state.js';
import { logBytesFor, type LogInfo } from '../memory/dirty-log.js';
import { MessageReader, ProtocolError, type Message } from './message-reader.js';
import { BackendRefusal, type VhostUserBackend } from './backend.js';
import {
  Request, ProtocolFeature, requestName, encodeMessage, u64Payload, vringStatePayload, hasBit,
  F_PROTOCOL_FEATURES, FLAG_VERSION, FLAG_VERSION_MASK, FLAG_REPLY, FLAG_NEED_REPLY, VRING_INDEX_MASK,
  VRING_NOFD_MASK, MAX_MEM_REGIONS, MEMORY_REGION_SIZE, VRING_ADDR_SIZE, F_LOG_ALL, LOG_DESC_SIZE,
  DEVICE_STATE_PARAMS_SIZE, bit, type MemoryRegionDesc, type VringAddr,
} from './protocol.js';

export type RequestErrorCode =
  | 'bad-version' | 'unsupported-request' | 'bad-payload-size' | 'bad-fd-count' | 'feature-not-negotiated'
  | 'unoffered-features' | 'bad-region-count' | 'no-free-mem-slot' | 'no-such-region' | 'bad-fd-word';

/**
 * A request the session refuses; the code names the rule, the message the values (logged with
 * the device name). The frontend broke the protocol, so reconnecting and asking again does not help.
 */
export class RequestError extends VxError {
  constructor(code: RequestErrorCode, message: string, opts: { cause?: unknown } = {}) {
    super(code, message, opts);
  }
}

type Range = readonly [number, number];
interface HandlerSpec {
  /** Payload size bounds [min, max]. */
  size: Range;
  /** Attached fd count bounds [min, max]. */
  fds: Range;
  /** The request always has a reply (so REPLY_ACK does not add one). */
  replies?: boolean;
  /** The request has a reply once this protocol feature is negotiated (SET_LOG_BASE with LOG_SHMFD). */
  repliesWith?: ProtocolFeature;
  /**
   * The reply that means failure, for a replying request whose reply has one: a refusal is
   * answered with it instead of closing the connection (without it, the frontend would take
   * whatever we answer for success, so a refusal must hang up).
   */
  failReply?: Uint8Array;
  /** Only valid once this protocol feature has been negotiated. */
  protocolFeature?: ProtocolFeature;
  run(s: Session, m: Message, v: DataView): Uint8Array | void;
}

/** End of the highest guest region (0 without memory): what a dirty log must cover. */
const regionsEnd = (infos: readonly RegionInfo[]): number => infos.reduce((end, r) => Math.max(end, r.gpa + r.size), 0);

const u64 = (v: DataView, off = 0) => Number(v.getBigUint64(off, true));

function readRegion(v: DataView, off: number): MemoryRegionDesc {
  return { gpa: u64(v, off), size: u64(v, off + 8), uva: u64(v, off + 16), mmapOffset: u64(v, off + 24) };
}

function readVringAddr(v: DataView): VringAddr {
  return { index: v.getUint32(0, true), flags: v.getUint32(4, true), descUser: u64(v, 8), usedUser: u64(v, 16), availUser: u64(v, 24), logGuest: u64(v, 32) };
}

/**
 * One table for every request: size, fd count and feature gate are checked here, before any
 * handler runs (the rust-vmm dispatcher shape). Vring index checks live in the VringTable, once.
 */
const handlers: Partial<Record<Request, HandlerSpec>> = {
  [Request.GET_FEATURES]: { size: [0, 0], fds: [0, 0], replies: true, run: (s) => u64Payload(s.offeredFeatures()) },
  [Request.SET_FEATURES]: { size: [8, 8], fds: [0, 0], run: (s, _m, v) => s.setFeatures(v.getBigUint64(0, true)) },
  [Request.GET_PROTOCOL_FEATURES]: { size: [0, 0], fds: [0, 0], replies: true, run: (s) => u64Payload(s.offeredProtocolFeatures()) },
  [Request.SET_PROTOCOL_FEATURES]: { size: [8, 8], fds: [0, 0], run: (s, _m, v) => s.setProtocolFeatures(v.getBigUint64(0, true)) },
  [Request.SET_OWNER]: { size: [0, 0], fds: [0, 0], run: (s) => { s.owned = true; } },
  [Request.RESET_OWNER]: { size: [0, 0], fds: [0, 0], run: (s) => s.resetDevice('RESET_OWNER') },
  [Request.RESET_DEVICE]: { size: [0, 0], fds: [0, 0], protocolFeature: ProtocolFeature.RESET_DEVICE, run: (s) => s.resetDevice('RESET_DEVICE') },
  [Request.GET_QUEUE_NUM]: { size: [0, 0], fds: [0, 0], replies: true, protocolFeature: ProtocolFeature.MQ, run: (s) => u64Payload(s.backend.maxQueuePairs()) },
  [Request.SET_MEM_TABLE]: { size: [8, 8 + MAX_MEM_REGIONS * MEMORY_REGION_SIZE], fds: [1, MAX_MEM_REGIONS], run: (s, m, v) => s.setMemTable(m, v) },
  [Request.GET_MAX_MEM_SLOTS]: { size: [0, 0], fds: [0, 0], replies: true, protocolFeature: ProtocolFeature.CONFIGURE_MEM_SLOTS, run: () => u64Payload(MAX_MEM_REGIONS) },
  [Request.ADD_MEM_REG]: { size: [8 + MEMORY_REGION_SIZE, 8 + MEMORY_REGION_SIZE], fds: [1, 1], protocolFeature: ProtocolFeature.CONFIGURE_MEM_SLOTS, run: (s, m, v) => s.addMemRegion(readRegion(v, 8), m.fds.shift()!) },
  [Request.REM_MEM_REG]: { size: [8 + MEMORY_REGION_SIZE, 8 + MEMORY_REGION_SIZE], fds: [0, 1], protocolFeature: ProtocolFeature.CONFIGURE_MEM_SLOTS, run: (s, _m, v) => s.remMemRegion(readRegion(v, 8)) },
  [Request.SET_VRING_NUM]: { size: [8, 8], fds: [0, 0], run: (s, _m, v) => s.vrings.setNum(v.getUint32(0, true), v.getUint32(4, true)) },
  [Request.SET_VRING_ADDR]: { size: [VRING_ADDR_SIZE, VRING_ADDR_SIZE], fds: [0, 0], run: (s, _m, v) => s.vrings.setAddr(readVringAddr(v)) },
  [Request.SET_VRING_BASE]: { size: [8, 8], fds: [0, 0], run: (s, _m, v) => s.vrings.setBase(v.getUint32(0, true), v.getUint32(4, true)) },
  [Request.GET_VRING_BASE]: { size: [8, 8], fds: [0, 0], replies: true, run: (s, _m, v) => { const i = v.getUint32(0, true); return vringStatePayload(i, s.vrings.getBase(i)); } },
  [Request.SET_VRING_KICK]: { size: [8, 8], fds: [0, 1], run: (s, m, v) => s.setVringFd('kick', v, m) },
  [Request.SET_VRING_CALL]: { size: [8, 8], fds: [0, 1], run: (s, m, v) => s.setVringFd('call', v, m) },
  [Request.SET_VRING_ERR]: { size: [8, 8], fds: [0, 1], run: (s, m, v) => s.setVringFd('err', v, m) },
  [Request.SET_VRING_ENABLE]: { size: [8, 8], fds: [0, 0], run: (s, _m, v) => s.setVringEnable(v.getUint32(0, true), v.getUint32(4, true)) },
  [Request.NET_SET_MTU]: { size: [8, 8], fds: [0, 0], protocolFeature: ProtocolFeature.NET_MTU, run: (s, _m, v) => s.backend.setMtu(u64(v)) },
  [Request.SEND_RARP]: { size: [8, 8], fds: [0, 0], protocolFeature: ProtocolFeature.RARP, run: (s, m) => s.backend.sendRarp(m.payload.slice(0, 6)) },
  // No failReply: QEMU reads the reply without looking at it, so a failure must hang up (the
  // migration then fails) rather than let the frontend believe we log.
  [Request.SET_LOG_BASE]: {
    size: [LOG_DESC_SIZE, LOG_DESC_SIZE], fds: [1, 1], protocolFeature: ProtocolFeature.LOG_SHMFD, repliesWith: ProtocolFeature.LOG_SHMFD,
    run: (s, m, v) => s.setLogBase({ size: u64(v), offset: u64(v, 8) }, m.fds.shift()!),
  },
  // "an optional message with an eventfd ... to inform the front-end that the log has been
  // modified": QEMU reads the log on its own schedule, so we never signal it (the fd is closed).
  [Request.SET_LOG_FD]: { size: [0, 0], fds: [1, 1], protocolFeature: ProtocolFeature.LOG_SHMFD, run: () => undefined },
  [Request.SET_DEVICE_STATE_FD]: {
    size: [DEVICE_STATE_PARAMS_SIZE, DEVICE_STATE_PARAMS_SIZE], fds: [1, 1], replies: true, protocolFeature: ProtocolFeature.DEVICE_STATE,
    // "Bits 0-7 are 0 on success, and non-zero on error. Bit 8 is the invalid FD flag": set always,
    // we return no fd ("The back-end must not both indicate an error and return a file descriptor").
    failReply: u64Payload(STATE_NOFD | 1),
    run: (s, m, v) => s.setDeviceStateFd(v.getUint32(0, true), v.getUint32(4, true), m.fds.shift()!),
  },
  // "0 is success, any non-zero value is an error."
  [Request.CHECK_DEVICE_STATE]: { size: [0, 0], fds: [0, 0], replies: true, protocolFeature: ProtocolFeature.DEVICE_STATE, failReply: u64Payload(1), run: (s) => s.checkDeviceState() },
};

/**
 * One vhost-user connection. Everything from the socket is untrusted: a bad request is
 * refused with a log line naming the device (and a REPLY_ACK failure where negotiated);
 * a request that cannot be answered safely closes the connection. Never throws to its caller.
 */
export class Session {
  readonly backend: VhostUserBackend;
  readonly log: Logger;
  owned = false;
  private features = 0n;
  private protoFeatures = 0n;
  private protoNegotiated = false;
  private readonly table = new MemoryTable();
  private memory: GuestMemory | null = null;
  /** The log of SET_LOG_BASE, and what the backend was last told to mark into. */
  private logMap: LogMapping | null = null;
  private logGiven: LogInfo | null = null;
  private transfer: StateTransfer | null = null;
  readonly vrings: VringTable;
  private readonly reader: MessageReader;
  private closed = false;
  /** Requests refused so far (for tests and stats). */
  refused = 0;

  /**
   * `refusals` counts refused requests by error code ('internal': not a VxError, our bug); the
   * endpoint passes one map for all its sessions so the counts outlive a frontend's connection.
   */
  constructor(readonly socket: UnixSocket, backend: VhostUserBackend, private readonly onClose: (s: Session, reason: string) => void,
    private readonly refusals = new Map<string, number>(), private readonly onTransfer: (r: TransferRecord) => void = () => {}) {
    this.backend = backend;
    this.log = logger(backend.name);
    this.reader = new MessageReader(socket);
    this.vrings = new VringTable(backend, this.log, () => this.memory);
  }

  /** Drains every whole message the socket has; call when it is readable. */
  onReadable(): void {
    try {
      for (;;) {
        if (this.closed) return;
        const m = this.reader.next();
        if (m === null) return;
        if (m === 'closed') return this.close('frontend closed the connection');
        this.handle(m);
      }
    } catch (e) {
      const why = e instanceof ProtocolError ? e.message : `socket error: ${(e as Error).message}`;
      this.log.warn(`closing connection: ${why}`);
      this.close(why);
    }
  }

  private handle(m: Message): void {
    const { request, flags } = m.header;
    const name = requestName(request);
    const spec = handlers[request as Request];
    const wantAck = (flags & FLAG_NEED_REPLY) !== 0 && this.hasProto(ProtocolFeature.REPLY_ACK);
    let reply: Uint8Array | void = undefined;
    let error: string | null = null;
    let code = '';
    try {
      if ((flags & FLAG_VERSION_MASK) !== FLAG_VERSION) throw new RequestError('bad-version', `unsupported version flags 0x${flags.toString(16)}`);
      if (!spec) throw new RequestError('unsupported-request', 'request not supported');
      if (m.payload.length < spec.size[0] || m.payload.length > spec.size[1]) {
        throw new RequestError('bad-payload-size', `payload of ${m.payload.length} bytes, expected ${spec.size[0]}..${spec.size[1]}`);
      }
      if (m.fds.length < spec.fds[0] || m.fds.length > spec.fds[1]) {
        throw new RequestError('bad-fd-count', `${m.fds.length} fds attached, expected ${spec.fds[0]}..${spec.fds[1]}`);
      }
      if (spec.protocolFeature !== undefined && !this.hasProto(spec.protocolFeature)) {
        throw new RequestError('feature-not-negotiated', `needs protocol feature ${ProtocolFeature[spec.protocolFeature]}, not negotiated`);
      }
      reply = spec.run(this, m, new DataView(m.payload.buffer, m.payload.byteOffset, m.payload.length));
    } catch (e) {
      error = (e as Error).message;
      code = e instanceof VxError ? e.code : 'internal';
      if (!(e instanceof RequestError || e instanceof GuestMemoryError || e instanceof MemoryTableError || e instanceof SysError || e instanceof BackendRefusal
        || e instanceof LogBaseError || e instanceof DeviceStateError || e instanceof VringError)) {
        this.log.error(`${name}: unexpected ${(e as Error).stack ?? e}`);
      }
    } finally {
      // Handlers take the fds they keep out of m.fds; whatever is left here is closed.
      for (const fd of m.fds) closeFd(fd);
      m.fds.length = 0;
    }
    const replies = spec !== undefined && (spec.replies === true || (spec.repliesWith !== undefined && this.hasProto(spec.repliesWith)));
    if (error !== null) {
      this.refused++;
      this.refusals.set(code, (this.refusals.get(code) ?? 0) + 1);
      this.log.warn(`refused ${name} (${code}): ${error}`);
      if (replies && spec.failReply && !this.closed) return this.send(request, spec.failReply);
      // A request whose reply the frontend waits for cannot be answered with garbage: hang up.
      if (replies) return this.close(`${name} failed: ${error}`);
      if (wantAck) this.send(request, u64Payload(1));
      return;
    }
    if (this.closed) return;
    if (replies && reply) this.send(request, reply);
    else if (wantAck) this.send(request, u64Payload(0));
  }

  private send(request: number, payload: Uint8Array): void {
    try {
      this.socket.send(encodeMessage(request, FLAG_VERSION | FLAG_REPLY, payload));
    } catch (e) {
      this.log.warn(`reply to ${requestName(request)} failed: ${(e as Error).message}`);
      this.close('send failed');
    }
  }

  private hasProto(f: ProtocolFeature): boolean {
    return this.protoNegotiated && hasBit(this.protoFeatures, f);
  }

  /** The backend's features, plus VHOST_F_LOG_ALL when it takes a dirty log (the session does the protocol side). */
  offeredFeatures(): bigint {
    return this.backend.deviceFeatures() | (this.backend.dirtyLogChanged ? bit(F_LOG_ALL) : 0n);
  }

  /** The backend's protocol features, plus LOG_SHMFD and DEVICE_STATE when it has their hooks. */
  offeredProtocolFeatures(): bigint {
    const b = this.backend;
    return b.protocolFeatures() | (b.dirtyLogChanged ? bit(ProtocolFeature.LOG_SHMFD) : 0n)
      | (b.saveState && b.loadState ? bit(ProtocolFeature.DEVICE_STATE) : 0n);
  }

  /**
   * The spec: "To start/stop logging ... the front-end may send messages VHOST_USER_SET_FEATURES
   * with VHOST_F_LOG_ALL", while rings run; the backend accepts that bit changing at any time.
   */
  setFeatures(f: bigint): void {
    const offered = this.offeredFeatures();
    if ((f & ~offered) !== 0n) throw new RequestError('unoffered-features', `features 0x${f.toString(16)} include bits never offered (0x${(f & ~offered).toString(16)})`);
    this.backend.featuresAcked(f);
    const wasLogging = hasBit(this.features, F_LOG_ALL);
    this.features = f;
    // QEMU frees its log right after it turns LOG_ALL off (vhost_migration_log -> vhost_log_put)
    // and sends SET_LOG_BASE again before it logs again: a mapping kept past that point would
    // only hold the frontend's freed memory (a cancelled or failed migration's log).
    if (wasLogging && !hasBit(f, F_LOG_ALL)) this.dropLog();
    else this.updateDirtyLog();
  }

  setProtocolFeatures(f: bigint): void {
    const offered = this.offeredProtocolFeatures();
    if ((f & ~offered) !== 0n) throw new RequestError('unoffered-features', `protocol features 0x${f.toString(16)} include bits never offered`);
    this.protoFeatures = f;
    this.protoNegotiated = true;
  }

  setMemTable(m: Message, v: DataView): void {
    const n = v.getUint32(0, true);
    if (n < 1 || n > MAX_MEM_REGIONS) throw new RequestError('bad-region-count', `${n} memory regions (1..${MAX_MEM_REGIONS})`);
    if (m.fds.length !== n) throw new RequestError('bad-fd-count', `${n} regions but ${m.fds.length} fds`);
    if (m.payload.length < 8 + n * MEMORY_REGION_SIZE) throw new RequestError('bad-payload-size', `payload too short for ${n} regions`);
    const descs = Array.from({ length: n }, (_, i) => readRegion(v, 8 + i * MEMORY_REGION_SIZE));
    descs.forEach((d, i) => MemoryTable.validate(d, descs.slice(0, i)));
    const next = new MemoryTable();
    try {
      // add() owns each fd it is given (closes it on failure); the rest stay in m.fds.
      for (const d of descs) next.add(d, m.fds.shift()!);
    } catch (e) {
      next.clear();
      throw e;
    }
    this.replaceMemory(next);
  }

  /**
   * Swaps guest memory under the rings: every running ring stops first (the datapath lets go of
   * the old regions), the backend gets the new table, `release` unmaps what went away, and each
   * ring starts again on its own (ring addresses are frontend addresses and are re-resolved; a
   * ring that no longer fits stays stopped and says why).
   */
  private swapMemory(infos: RegionInfo[], release: () => void): void {
    this.vrings.stopAll();
    this.memory = infos.length > 0 ? new GuestMemory(infos) : null;
    this.backend.memoryChanged(infos);
    release();
    this.log.info(`memory table: ${infos.length} region(s), ${(infos.reduce((a, r) => a + r.size, 0) / 2 ** 20).toFixed(0)} MiB`);
    const end = regionsEnd(infos);
    // QEMU grows the log before it adds memory; marks beyond a log that did not grow are refused and counted.
    if (this.logMap && this.logMap.info.size < logBytesFor(end)) this.log.warn(`dirty log of ${this.logMap.info.size} bytes does not cover guest memory up to 0x${end.toString(16)}`);
    this.vrings.restartAll();
  }

  private replaceMemory(next: MemoryTable): void {
    this.swapMemory(next.infos(), () => this.table.replaceWith(next));
  }

  addMemRegion(d: MemoryRegionDesc, fd: number): void {
    if (this.table.regionCount >= MAX_MEM_REGIONS) {
      closeFd(fd);
      throw new RequestError('no-free-mem-slot', `all ${MAX_MEM_REGIONS} memory slots are in use`);
    }
    try {
      MemoryTable.validate(d, this.table.descriptions);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
    const next = new MemoryTable();
    next.add(d, fd);
    this.swapMemory([...this.table.infos(), ...next.infos()], () => this.table.absorb(next));
  }

  remMemRegion(d: MemoryRegionDesc): void {
    const remaining = this.table.infos().filter((r) => !(r.gpa === d.gpa && r.size === d.size && r.uva === d.uva));
    if (remaining.length === this.table.regionCount) throw new RequestError('no-such-region', `no region at gpa 0x${d.gpa.toString(16)} size ${d.size}`);
    this.swapMemory(remaining, () => this.table.remove(d));
  }

  /**
   * SET_LOG_BASE: maps the new log, moves the backend onto it, then unmaps the old one. QEMU sends
   * it when logging starts and whenever guest memory outgrows the log, possibly while rings run.
   */
  setLogBase(d: { size: number; offset: number }, fd: number): Uint8Array {
    const next = LogMapping.map(d, fd, regionsEnd(this.table.infos()));
    const old = this.logMap;
    this.logMap = next;
    this.updateDirtyLog();
    old?.unmap();
    this.log.info(`dirty log: ${d.size} bytes at offset ${d.offset}`);
    // The spec lists SET_LOG_BASE among the requests with a reply (with LOG_SHMFD) without a body
    // format; QEMU only checks the request id. A u64 0 reads as success either way.
    return u64Payload(0);
  }

  /** Tells the backend where to mark: the log while LOG_ALL is acked and a log is mapped, else null. */
  private updateDirtyLog(): void {
    const want = hasBit(this.features, F_LOG_ALL) && this.logMap ? this.logMap.info : null;
    if (want === this.logGiven) return;
    this.backend.dirtyLogChanged?.(want);
    this.logGiven = want;
    this.log.info(want ? 'dirty logging on' : 'dirty logging off');
  }

  /** Unmaps the log after telling the backend to stop marking into it. */
  private dropLog(): void {
    const had = this.logMap;
    this.logMap = null;
    try {
      this.updateDirtyLog();
    } finally {
      had?.unmap();
    }
  }

  get logging(): boolean { return this.logGiven !== null; }

  /**
   * SET_DEVICE_STATE_FD: starts saving (source) or loading (destination) the backend's state over
   * the fd. "Migration phase ... 0: Stopped ... the vhost-user device is suspended": refused while
   * any ring runs. A new transfer replaces one still under way.
   */
  setDeviceStateFd(direction: number, phase: number, fd: number): Uint8Array {
    const running = this.vrings.firstRunning();
    if (running >= 0) {
      closeFd(fd);
      throw new DeviceStateError('device-not-suspended', `vring ${running} is running; state moves only while the device is suspended`);
    }
    this.transfer?.cancel('a new SET_DEVICE_STATE_FD');
    this.transfer = null;
    const b = this.backend;
    this.transfer = StateTransfer.begin(direction, phase, fd, {
      state: () => b.saveState!(),
      apply: (bytes) => b.loadState!(bytes),
      onDone: (r) => {
        this.log[r.ok ? 'info' : 'warn'](`device state ${r.direction}: ${r.bytes} bytes in ${r.ms} ms${r.ok ? '' : `, failed (${r.code}): ${r.reason}`}`);
        this.onTransfer(r);
      },
    });
    return u64Payload(STATE_NOFD);
  }

  /** CHECK_DEVICE_STATE: the result of the last transfer (its failure is a refusal with its code). */
  checkDeviceState(): Uint8Array {
    const t = this.transfer;
    this.transfer = null;
    if (!t) throw new DeviceStateError('no-transfer', 'no SET_DEVICE_STATE_FD to check');
    const r = t.finish();
    // The refusal carries the transfer's own code (the backend's, when loadState refused the state).
    if (!r.ok) throw new DeviceStateError(r.code ?? 'transfer-failed', `${r.direction}: ${r.reason ?? 'failed'}`);
    return u64Payload(0);
  }

  setVringFd(kind: 'kick' | 'call' | 'err', dv: DataView, m: Message): void {
    const word = u64(dv);
    const index = word & VRING_INDEX_MASK;
    const noFd = (word & VRING_NOFD_MASK) !== 0;
    if (word & ~(VRING_INDEX_MASK | VRING_NOFD_MASK)) throw new RequestError('bad-fd-word', `${kind} fd word 0x${word.toString(16)} has unknown bits`);
    if (noFd !== (m.fds.length === 0)) throw new RequestError('bad-fd-word', noFd ? 'invalid-fd flag set but an fd is attached' : 'no fd attached and invalid-fd flag clear');
    if (kind === 'kick') this.vrings.setKick(index, m.fds, this.protoNegotiated && hasBit(this.features, F_PROTOCOL_FEATURES));
    else if (kind === 'call') this.vrings.setCall(index, m.fds);
    else this.vrings.setErr(index, m.fds);
  }

  setVringEnable(index: number, enable: number): void {
    this.vrings.setEnable(index, enable, hasBit(this.features, F_PROTOCOL_FEATURES) || this.protoNegotiated);
  }

  /**
   * RESET_OWNER / RESET_DEVICE: the device goes back to its initial state, but the memory table
   * and the call/err fds stay. QEMU sends RESET_DEVICE on every vhost stop and afterwards sends
   * memory only as ADD/REM differences from what it already gave us, and err fds once per
   * connection: dropping them would leave the next start with no memory and no error channel.
   */
  resetDevice(reason: string): void {
    this.vrings.reset();
    this.features = 0n;
    // Logging starts again with a new SET_LOG_BASE; a state transfer is not device state and goes on.
    this.dropLog();
    this.backend.sessionReset(reason);
    // The backend dropped its view of guest memory with the reset; the table itself stays.
    if (this.memory) this.backend.memoryChanged(this.table.infos());
    this.log.info(`device reset (${reason})`);
  }

  /** Ends the session: stops rings, releases memory and fds, tells the owner. Idempotent. */
  close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.vrings.stopAll();
      this.features = 0n;
      this.dropLog();
      this.backend.sessionReset(reason);
    } catch (e) {
      this.log.error(`reset after disconnect: ${(e as Error).message}`);
    }
    this.logMap?.unmap();
    this.logMap = null;
    this.transfer?.cancel(`frontend gone: ${reason}`);
    this.transfer = null;
    this.vrings.closeFds();
    this.memory = null;
    this.table.clear();
    this.reader.dropFds();
    // The owner stops polling the fd before it is closed (a reused fd number must not fire).
    this.onClose(this, reason);
    this.socket.close();
  }

  get isClosed(): boolean { return this.closed; }
  get negotiatedFeatures(): bigint { return this.features; }
}

