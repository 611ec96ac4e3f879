// The tap queue over io_uring, on a real tap and a real ring: guest frames leave in one
// submission per burst and their cookies come back; a write the tap refuses is counted and its
// buffer returned (never left in flight); the host->guest side still lands frames in guest
// buffers; --tap-io picks the queue; the ring and its fd go with the queue.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NativeBuffer } from '../../src/sys/libc.js';
import { pollReadable } from '../../src/sys/xsk.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { DescriptorChain } from '../../src/virtio/descriptor-chain.js';
import { TapPort, TapQueue, resolveTapIo } from '../../src/ports/tap.js';
import { UringQueue } from '../../src/ports/uring-queue.js';
import { openHostQueue } from '../../src/ports/open-queue.js';
import { PortCount, RxFrames, RX_OK, TX_POSTED } from '../../src/ports/host-queue.js';
import { CleanupStack, disableIpv6, uniqueIfName } from '../support/netdev.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf, GUEST_MAC, HOST_MAC } from '../support/frames.js';
import { startBackend, tempDir } from '../support/backend.js';

const HDR = 12;
const FORMAT = { headerLength: HDR, mergeable: false, maxFrame: HDR + 1518 };
const cleanup = new CleanupStack();
let port: TapPort;
let q: UringQueue;
let host: PacketSocket;
const mem = new NativeBuffer(1 << 20);
const guest = new GuestMemory([{ gpa: 0, size: 1 << 20, uva: mem.address, hostAddress: mem.address }]);
const chain = new DescriptorChain(64);

function tapFd(): number {
  return (port.queueConfig(0) as { fd: number }).fd;
}

beforeAll(() => {
  const tap = uniqueIfName('vxuq');
  port = TapPort.open(tap, 1, { io: 'uring' });
  cleanup.push(`tap ${tap}`, () => port.close());
  disableIpv6(tap);
  q = UringQueue.open(tapFd());
  cleanup.push('uring queue', () => q.close());
  q.start('tx', guest, FORMAT);
  q.start('rx', guest, FORMAT);
  host = PacketSocket.open(tap);
  cleanup.push('host socket', () => host.close());
});

afterAll(async () => {
  await cleanup.run();
  mem.free();
});

/** Describes [at, at+total) of `mem` as one chain cut at `cuts` (offsets from `at`), readable or writable. */
function chainOver(at: number, total: number, cuts: number[], writable = false): DescriptorChain {
  const edges = [0, ...cuts, total];
  chain.reset();
  for (let i = 0; i + 1 < edges.length; i++) {
    chain.region[i] = 0;
    chain.offset[i] = at + edges[i]!;
    chain.gpa[i] = at + edges[i]!;
    chain.length[i] = edges[i + 1]! - edges[i]!;
  }
  chain.head = 0;
  chain.count = edges.length - 1;
  chain.readableCount = writable ? 0 : chain.count;
  chain.readableBytes = writable ? 0 : total;
  chain.writableBytes = writable ? total : 0;
  return chain;
}

/** Lays [vnet header][frame] at `at` and posts it as a chain cut at `cuts`. */
function post(cookie: number, at: number, frame: Uint8Array, cuts: number[], header = new Uint8Array(HDR)): number {
  mem.bytes.set(header, at);
  mem.bytes.set(frame, at + HDR);
  return q.postTx(cookie, chainOver(at, HDR + frame.length, cuts));
}

/** Collects until a call returns frames (waiting on the queue's eventfd between tries) or 2 s pass. */
function collectSome(frames: RxFrames, max: number): number {
  const deadline = Date.now() + 2000;
  let n = 0;
  while (n === 0 && Date.now() < deadline) {
    n = q.collectRx(max, frames);
    if (n === 0) pollReadable(q.fd, 100);
  }
  return n;
}

function collectAll(): number[] {
  const out = new Int32Array(512);
  const n = q.collectTx(out.length, out);
  return [...out.subarray(0, n)];
}

describe('tap queue over io_uring', () => {
  it('a burst of guest frames leaves in one submission, in order, and every cookie comes back', () => {
    host.drain();
    const frames: Uint8Array[] = [];
    const layouts = [[], [HDR], [5], [HDR, HDR + 20], [1, 2, 3, HDR, HDR + 1]];
    for (let i = 0; i < 40; i++) {
      const f = udpFrame(9000 + i, 64 + (i % 9) * 150);
      frames.push(f);
      expect(post(100 + i, i * 4096, f, layouts[i % layouts.length]!)).toBe(TX_POSTED);
    }
    expect(q.txInFlight).toBe(40);
    q.flushTx();
    expect(collectAll().sort((a, b) => a - b)).toEqual(frames.map((_, i) => 100 + i));
    expect(q.txInFlight).toBe(0);
    const got = host.recvAll(40, 3000, (g) => seqOf(g) !== null && seqOf(g)! >= 9000);
    expect(got.map((g) => seqOf(g))).toEqual(frames.map((_, i) => 9000 + i));
    got.forEach((g, i) => expect(Buffer.from(g).equals(Buffer.from(frames[i]!))).toBe(true));
  });

  it('a write the tap refuses is counted under its reason and its cookie comes back; the next frames still go', () => {
    host.drain();
    const refusedBefore = q.counts[PortCount.txDropRefused]!;
    // A GSO type the tap does not know: the kernel refuses the write (EINVAL).
    const badHeader = new Uint8Array(HDR);
    badHeader[1] = 0x55;
    expect(post(1, 0, udpFrame(9100, 200), [], badHeader)).toBe(TX_POSTED);
    expect(post(2, 4096, udpFrame(9101, 200), [])).toBe(TX_POSTED);
    q.flushTx();
    expect(collectAll().sort()).toEqual([1, 2]);
    expect(q.txInFlight).toBe(0);
    expect(q.counts[PortCount.txDropRefused]! - refusedBefore).toBe(1);
    const got = host.recvAll(1, 2000, (g) => seqOf(g) === 9101 || seqOf(g) === 9100);
    expect(got.map((g) => seqOf(g))).toEqual([9101]);
  });

  it('more frames than submission slots: the surplus is refused as busy (posted again later), nothing is lost', () => {
    host.drain();
    let posted = 0;
    let st = TX_POSTED;
    for (; posted < 300; posted++) {
      st = post(posted, (posted % 200) * 4096, udpFrame(20000 + posted, 60), []);
      if (st !== TX_POSTED) break;
    }
    expect(posted).toBe(256);
    q.flushTx();
    expect(collectAll().length).toBe(256);
    expect(post(999, 0, udpFrame(21000, 60), [])).toBe(TX_POSTED);
    q.flushTx();
    expect(collectAll()).toEqual([999]);
  });

  it('standing reads: the eventfd wakes when the host writes, and frames land in posted buffers in posting order', () => {
    const frames = new RxFrames(64);
    const base = 512 * 1024;
    for (let i = 0; i < 64; i++) {
      expect(q.wantsRx()).toBe(true);
      expect(q.postRx(50 + i, chainOver(base + i * 4096, 2048, [], true))).toBe(true);
    }
    // Submits the reads; what the kernel queued on the tap before (IPv6 chatter at link-up) may come first.
    q.collectRx(64, frames);
    for (let i = 0; i < 40; i++) host.send(udpFrame(3000 + i, 60 + i * 10, 2000, HOST_MAC, GUEST_MAC));
    expect(pollReadable(q.fd, 2000)).toBe(true);
    const cookies: number[] = [];
    const seqs: number[] = [];
    const deadline = Date.now() + 3000;
    while (seqs.length < 40 && Date.now() < deadline) {
      const n = q.collectRx(64, frames);
      for (let i = 0; i < n; i++) {
        expect(frames.status[i]).toBe(RX_OK);
        expect(frames.buffers[i]).toBe(1);
        cookies.push(frames.cookie[i]!);
        const at = base + (frames.cookie[i]! - 50) * 4096;
        const seq = seqOf(mem.bytes.slice(at + HDR, at + frames.length[i]!));
        if (seq === null) continue;
        expect(frames.length[i]).toBe(HDR + udpFrame(seq, 60 + (seq - 3000) * 10).length);
        seqs.push(seq);
      }
      if (n === 0) pollReadable(q.fd, 100);
    }
    // In the order the host sent them, in the buffers in the order they were posted.
    expect(seqs).toEqual(Array.from({ length: 40 }, (_, i) => 3000 + i));
    expect(cookies).toEqual(Array.from({ length: cookies.length }, (_, i) => 50 + i));
    // 24 reads are still in the kernel: cancelRx takes them out before the buffers go back.
    q.cancelRx();
    expect(q.collectRx(8, frames)).toBe(0);
    host.send(udpFrame(3999, 80, 2000, HOST_MAC, GUEST_MAC));
    expect(pollReadable(q.fd, 200)).toBe(false);
    mem.bytes.fill(0, base, base + 64 * 4096);
    // Nothing was written into the forgotten buffers; the frame waits in the tap for the next read.
    expect(mem.bytes.subarray(base, base + 64 * 4096).every((b) => b === 0)).toBe(true);
    expect(q.postRx(200, chainOver(base, 2048, [], true))).toBe(true);
    expect(collectSome(frames, 8)).toBe(1);
    expect(frames.cookie[0]).toBe(200);
    expect(seqOf(mem.bytes.slice(base + HDR, base + frames.length[0]!))).toBe(3999);
    q.cancelRx();
  });

  it('a burst filled from the ring leaves the eventfd set; the call that finds it short clears it, and the next frame wakes it', () => {
    const frames = new RxFrames(64);
    const base = 512 * 1024;
    const cq = (q as unknown as { rx: { cqReady(): number } }).rx;
    for (let i = 0; i < 32; i++) expect(q.postRx(300 + i, chainOver(base + i * 4096, 2048, [], true))).toBe(true);
    q.collectRx(64, frames); // submits the reads
    for (let i = 0; i < 16; i++) host.send(udpFrame(4000 + i, 80, 2000, HOST_MAC, GUEST_MAC));
    // Completions are posted as the worker enters the kernel (COOP_TASKRUN): the polls do that.
    const deadline = Date.now() + 3000;
    while (cq.cqReady() < 16 && Date.now() < deadline) pollReadable(q.fd, 10);
    expect(cq.cqReady()).toBeGreaterThanOrEqual(16);
    const seqs: number[] = [];
    const take = (n: number): void => {
      for (let i = 0; i < n; i++) {
        const at = base + (frames.cookie[i]! - 300) * 4096;
        const seq = seqOf(mem.bytes.slice(at + HDR, at + frames.length[i]!));
        if (seq !== null) seqs.push(seq);
      }
    };
    // Full bursts: the eventfd is not read, so it stays set (a wake-up to spare, none lost).
    for (let k = 0; k < 4; k++) {
      const n = q.collectRx(4, frames);
      expect(n).toBe(4);
      expect(frames.hostEmpty).toBe(false);
      take(n);
      expect(pollReadable(q.fd, 0)).toBe(true);
    }
    while (seqs.length < 16) {
      const n = q.collectRx(4, frames);
      if (n === 0) break;
      take(n);
    }
    expect(seqs).toEqual(Array.from({ length: 16 }, (_, i) => 4000 + i));
    // Short of a burst with reads still in the kernel: cleared before the ring was read.
    expect(q.collectRx(4, frames)).toBe(0);
    expect(frames.hostEmpty).toBe(true);
    expect(pollReadable(q.fd, 0)).toBe(false);
    host.send(udpFrame(4100, 80, 2000, HOST_MAC, GUEST_MAC));
    expect(pollReadable(q.fd, 2000)).toBe(true);
    expect(collectSome(frames, 4)).toBe(1);
    seqs.length = 0;
    take(1);
    expect(seqs).toEqual([4100]);
    q.cancelRx();
  });

  it('mergeable buffers smaller than the largest frame: readv over several buffers, woken through the ring', () => {
    const frames = new RxFrames(8);
    const base = 768 * 1024;
    port.setMtu(4000);
    q.start('rx', guest, { headerLength: HDR, mergeable: true, maxFrame: HDR + 4018 });
    for (let i = 0; i < 8; i++) expect(q.postRx(300 + i, chainOver(base + i * 4096, 1024, [], true))).toBe(true);
    const big = udpFrame(4242, 3000, 2000, HOST_MAC, GUEST_MAC);
    host.send(big);
    expect(pollReadable(q.fd, 2000)).toBe(true);
    let found = -1;
    let first = 0;
    const deadline = Date.now() + 2000;
    while (found < 0 && Date.now() < deadline) {
      const n = q.collectRx(8, frames);
      for (let i = 0; i < n && found < 0; i++) {
        // Link-up chatter may come first; the big frame is the one of its length (checked byte for byte below).
        if (frames.status[i] === RX_OK && frames.length[i] === HDR + big.length) found = i;
        else first += frames.buffers[i]!;
      }
      if (n === 0) pollReadable(q.fd, 100);
    }
    expect(found).toBeGreaterThanOrEqual(0);
    expect(frames.buffers[found]).toBe(3);
    expect(frames.length[found]).toBe(HDR + big.length);
    const got = new Uint8Array(big.length);
    for (let i = 0, off = 0; off < HDR + big.length; i++, off += 1024) {
      const take = Math.min(1024, HDR + big.length - off);
      const chunk = mem.bytes.subarray(base + (first + i) * 4096, base + (first + i) * 4096 + take);
      for (let j = 0; j < take; j++) if (off + j >= HDR) got[off + j - HDR] = chunk[j]!;
    }
    expect(Buffer.from(got).equals(Buffer.from(big))).toBe(true);
    q.cancelRx();
    q.start('rx', guest, FORMAT);
  });

  it('cancelTx hands back what is still in flight and leaves the queue empty', () => {
    expect(post(7, 0, udpFrame(9200, 80), [])).toBe(TX_POSTED);
    const out = new Int32Array(8);
    expect(q.cancelTx(out)).toBe(1);
    expect(out[0]).toBe(7);
    expect(q.txInFlight).toBe(0);
    expect(collectAll()).toEqual([]);
  });
});

describe('tap I/O selection (--tap-io)', () => {
  it('rw is readv/writev; uring and auto take io_uring on this host', () => {
    expect(resolveTapIo('rw', 'x').mode).toBe('rw');
    expect(resolveTapIo('uring', 'x').mode).toBe('uring');
    expect(resolveTapIo('auto', 'x').mode).toBe('uring');
  });

  it('where the host refuses io_uring, auto falls back to readv/writev and says why; uring is refused at start', () => {
    const refused = () => ({ ok: false as const, code: 'EPERM', reason: 'io_uring_setup (8 entries): EPERM' });
    expect(resolveTapIo('auto', 'x', refused)).toEqual({ mode: 'rw', reason: 'io_uring_setup (8 entries): EPERM' });
    expect(() => resolveTapIo('uring', 'x', refused)).toThrow(expect.objectContaining({ code: 'tap-io-unavailable' }));
  });

  it('a queue opened for rw is the readv/writev queue; for uring, the ring queue', () => {
    const fd = tapFd();
    const rw = openHostQueue({ kind: 'tap', fd, ifname: port.ifname, io: 'rw' });
    const ur = openHostQueue({ kind: 'tap', fd, ifname: port.ifname, io: 'uring' });
    try {
      expect(rw).toBeInstanceOf(TapQueue);
      expect(rw).not.toBeInstanceOf(UringQueue);
      expect(ur).toBeInstanceOf(UringQueue);
    } finally {
      rw.close?.();
      ur.close?.();
    }
  });

  it('closing the queue closes its ring: the io_uring fd and the ring mappings are gone', () => {
    const ringMaps = (): number => fs.readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.includes('[io_uring]')).length;
    const before = ringMaps();
    const uq = UringQueue.open(tapFd());
    const ringFd = (uq as unknown as { rx: { fd: number } }).rx.fd;
    expect(fs.readlinkSync(`/proc/self/fd/${ringFd}`)).toBe('anon_inode:[io_uring]');
    expect(ringMaps()).toBeGreaterThan(before);
    uq.close();
    expect(fs.existsSync(`/proc/self/fd/${ringFd}`)).toBe(false);
    expect(ringMaps()).toBe(before);
  });

  it('serve --tap-io rw uses readv/writev and status says so; the default is io_uring', async () => {
    for (const [args, mode] of [[['--tap-io', 'rw'], 'rw'], [[], 'uring']] as const) {
      const dir = tempDir('tapio');
      const tap = uniqueIfName('vxti');
      const be = await startBackend(['--socket', path.join(dir, 'dev.sock'), '--port', `tap:${tap}`, '--name', 'tapio', ...args], { dir });
      try {
        const st = await be.call('status');
        expect(st.devices[0].port.io.mode).toBe(mode);
        if (mode === 'rw') expect(st.devices[0].port.io.reason).toMatch(/asked for/);
      } finally {
        await be.stop();
      }
    }
  });

  it('serve --tap-io takes only uring, rw or auto', async () => {
    const dir = tempDir('tapio');
    await expect(startBackend(['--socket', path.join(dir, 'dev.sock'), '--port', `tap:${uniqueIfName('vxti')}`, '--tap-io', 'aio'], { dir })).rejects.toThrow(/tap-io|Choices/);
  });
});
