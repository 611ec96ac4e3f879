import fs from 'node:fs';
import os from 'node:os';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestMemory, type RegionInfo } from '../../src/memory/guest-memory.js';
import { SharedMapping, NativeBuffer, closeFd, memfdCreate } from '../../src/sys/libc.js';
import { pollReadable, kickTx, TxRing, RxRing } from '../../src/sys/xsk.js';
import { readU64, writeU64 } from '../../src/sys/u64.js';
import { xdpQuery } from '../../src/sys/bpf/xdp.js';
import { listMapIds, listProgIds, mapInfo } from '../../src/sys/bpf/info.js';
import { SplitQueue } from '../../src/virtio/split-queue.js';
import { XskPort } from '../../src/ports/xsk.js';
import { XskQueue } from '../../src/ports/xsk-queue.js';
import { RxPath } from '../../src/net/rx-path.js';
import { TxPath } from '../../src/net/tx-path.js';
import { C, COUNTERS } from '../../src/net/stats.js';
import type { PathContext } from '../../src/net/queue-path.js';
import type { FrameFormat } from '../../src/net/frame-format.js';
import { DriverQueue } from '../support/frontend/driver-queue.js';
import { CleanupStack, disableIpv6, linkExists, uniqueIfName } from '../support/netdev.js';
import { PacketSocket, buildUdpFrame, checkPatternPayload, parseUdpFrame, patternPayload } from '../support/packet-socket.js';

const MiB = 1 << 20;
const HDR = 12;
const QSIZE = 256;
const RX_RING_GPA = 0x200000;
const TX_RING_GPA = 0x210000;
const POISON = 0xaa;
/** The paths' frame layout: 12-byte header, one buffer per frame, no header requests allowed. */
const FORMAT: FrameFormat = { eventIdx: false, headerLength: HDR, mergeable: false, maxFrame: HDR + 1518, txOffloads: 0 };

/** A memfd "guest" mapped twice (driver view and device view), as QEMU and the backend do. */
interface Guest {
  drv: GuestMemory;
  dev: GuestMemory;
  region: RegionInfo;
  release(): void;
}

function makeGuest(size: number): Guest {
  const fd = memfdCreate('xsk-test-guest', size);
  const a = new SharedMapping(fd, size, 0);
  const b = new SharedMapping(fd, size, 0);
  new Uint8Array(a.buffer).fill(POISON);
  const region = { gpa: 0, size, uva: a.address, hostAddress: b.address };
  return {
    drv: new GuestMemory([{ gpa: 0, size, uva: a.address, hostAddress: a.address }]),
    dev: new GuestMemory([region]),
    region,
    release() { a.unmap(); b.unmap(); closeFd(fd); },
  };
}

function frameFor(seq: number, payloadLen: number): Uint8Array {
  return buildUdpFrame({
    srcMac: '02:00:00:00:00:01', dstMac: '02:00:00:00:00:02', srcIp: '10.9.0.1', dstIp: '10.9.0.2',
    srcPort: 4000, dstPort: 5000, payload: patternPayload(seq, payloadLen),
  });
}

interface RigOptions { pinLimitBytes?: number; pairs?: number }

/** One xsk port with a guest behind it, the paths driven directly by the test. */
class Rig {
  readonly stats = new Float64Array(COUNTERS.length);
  readonly guest: Guest;
  readonly port: XskPort;
  readonly xq: XskQueue;
  readonly rxDrv: DriverQueue;
  readonly txDrv: DriverQueue;
  readonly rx: RxPath;
  readonly tx: TxPath;
  readonly broken: string[] = [];

  constructor(cleanup: CleanupStack, opts: RigOptions = {}) {
    const ifname = uniqueIfName('vxk');
    this.guest = makeGuest(4 * MiB);
    cleanup.push('guest memory', () => this.guest.release());
    this.port = XskPort.create(ifname, opts.pairs ?? 1, { ringSize: 512, pinLimitBytes: opts.pinLimitBytes });
    cleanup.push('xsk port', () => this.port.close());
    cleanup.link(ifname);
    disableIpv6(ifname);
    this.port.attachMemory([this.guest.region]);
    this.xq = new XskQueue(this.port.queueConfig(0));
    this.rxDrv = new DriverQueue(this.guest.drv, RX_RING_GPA, QSIZE, { eventIdx: false });
    this.txDrv = new DriverQueue(this.guest.drv, TX_RING_GPA, QSIZE, { eventIdx: false });
    const ctx: PathContext = { name: 'xsk-test', stats: this.stats, pair: 0, onBroken: (_i, why) => this.broken.push(why) };
    const rxq = new SplitQueue(this.guest.dev, this.rxDrv.layout, { eventIdx: false, name: 'xsk-test:rx0' });
    const txq = new SplitQueue(this.guest.dev, this.txDrv.layout, { eventIdx: false, name: 'xsk-test:tx0' });
    this.rx = new RxPath(rxq, 0, -1, ctx, this.xq, this.guest.dev, FORMAT);
    this.tx = new TxPath(txq, 1, -1, ctx, this.xq, this.guest.dev, FORMAT);
  }

  get ifname(): string { return this.port.ifname; }
  counter(c: number): number { return this.stats[c]!; }

  /** Runs the RX path until n used entries came back (or timeout); returns them. */
  collectRx(n: number, timeoutMs = 3000): { head: number; len: number; token: unknown }[] {
    const out: { head: number; len: number; token: unknown }[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < n && Date.now() < deadline) {
      this.rx.process(64);
      for (let u = this.rxDrv.pollUsed(); u; u = this.rxDrv.pollUsed()) out.push(u);
      if (out.length < n) pollReadable(this.xq.fd, 5);
    }
    return out;
  }

  /** Runs the TX path until n chains completed (or timeout). */
  completeTx(n: number, timeoutMs = 3000): { head: number; len: number; token: unknown }[] {
    const out: { head: number; len: number; token: unknown }[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < n && Date.now() < deadline) {
      this.tx.process(64, true);
      for (let u = this.txDrv.pollUsed(); u; u = this.txDrv.pollUsed()) out.push(u);
    }
    return out;
  }

  /** Bytes of guest memory through the driver's mapping. */
  read(gpa: number, len: number): Uint8Array {
    return this.guest.drv.slice(gpa, len);
  }

  write(gpa: number, data: Uint8Array): void {
    this.guest.drv.slice(gpa, data.length).set(data);
  }
}

/** Runs fn with a Rig of its own; everything pushed on `local` (the rig first) is undone after. */
async function withRig(opts: RigOptions, fn: (r: Rig, local: CleanupStack) => void | Promise<void>): Promise<void> {
  const local = new CleanupStack();
  try {
    await fn(new Rig(local, opts), local);
  } finally {
    await local.run();
  }
}

function udpPayloadSeq(frame: Uint8Array): number | null {
  const p = parseUdpFrame(frame);
  return p ? checkPatternPayload(p.payload) : null;
}

const cleanup = new CleanupStack();
let rig: Rig;
let host: PacketSocket;

beforeAll(() => {
  rig = new Rig(cleanup);
  host = PacketSocket.open(rig.ifname);
  cleanup.push('packet socket', () => host.close());
});
afterAll(async () => {
  await cleanup.run();
});

describe('xsk port: host → guest', () => {
  it('the kernel writes each frame straight into the guest buffer at +12, with no JS copy, and nothing outside it', () => {
    // 2048-byte buffers from gpa 0: the first sits at the very start of guest RAM, so its chunk
    // headroom lies in the UMEM's private gap, not before guest memory.
    const bufs: number[] = [];
    for (let i = 0; i < 32; i++) {
      const gpa = i * 2048;
      bufs.push(gpa);
      rig.rxDrv.add([{ gpa, len: 2048, writable: true }], gpa);
    }
    rig.rxDrv.publish();
    rig.rx.process(64); // posts the buffers to the fill ring
    expect(rig.rx.inFlight).toBe(32);
    const sizes = [64, 200, 1000, 1472];
    for (let s = 0; s < 32; s++) host.send(frameFor(s, sizes[s % sizes.length]!));
    const used = rig.collectRx(32);
    expect(used.length).toBe(32);
    const seen = new Set<number>();
    for (const u of used) {
      const gpa = u.token as number;
      const b = rig.read(gpa, 2048);
      expect(Array.from(b.subarray(0, HDR))).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
      const seq = udpPayloadSeq(b.slice(HDR, u.len));
      expect(seq).not.toBeNull();
      seen.add(seq!);
      // Everything after the frame in this buffer is untouched.
      expect(b.subarray(u.len).every((x) => x === POISON)).toBe(true);
    }
    expect(seen.size).toBe(32);
    expect(rig.counter(C.rxPackets)).toBe(32);
    expect(rig.counter(C.rxCopies)).toBe(0);
    expect(rig.broken).toEqual([]);
  });

  it('the kernel never writes past a guest buffer: frames longer than the port MTU allows are dropped, not truncated into it', () => {
    // Buffers exactly 12 + 1518 bytes (a Linux guest's small buffers); the links allow 2000.
    const base = 0x80000;
    const len = HDR + 1518;
    for (let i = 0; i < 4; i++) rig.rxDrv.add([{ gpa: base + i * 4096, len, writable: true }], base + i * 4096);
    rig.rxDrv.publish();
    rig.rx.process(64);
    const ifs = [rig.port.peer, rig.ifname];
    for (const n of ifs) spawnSync('ip', ['link', 'set', 'dev', n, 'mtu', '2000']);
    try {
      const before = rig.port.statistics(0)!.rxDropped;
      for (let s = 0; s < 4; s++) host.send(frameFor(1000 + s, 1600));
      const deadline = Date.now() + 2000;
      while (rig.port.statistics(0)!.rxDropped - before < 4 && Date.now() < deadline) pollReadable(rig.xq.fd, 10);
      expect(rig.port.statistics(0)!.rxDropped - before).toBe(4);
      expect(rig.collectRx(1, 200).length).toBe(0);
      for (let i = 0; i < 4; i++) expect(rig.read(base + i * 4096, 4096).every((x) => x === POISON)).toBe(true);
      // A frame that fits still lands in the same buffers.
      for (let s = 0; s < 4; s++) host.send(frameFor(2000 + s, 1476)); // 1518-byte frames
      const used = rig.collectRx(4);
      expect(used.map((u) => u.len)).toEqual([len, len, len, len]);
      for (const u of used) {
        const b = rig.read(u.token as number, 4096);
        expect(udpPayloadSeq(b.slice(HDR, u.len))).not.toBeNull();
        expect(b.subarray(len).every((x) => x === POISON)).toBe(true);
      }
    } finally {
      for (const n of ifs) spawnSync('ip', ['link', 'set', 'dev', n, 'mtu', '1500']);
    }
  });

  it('small and chained receive buffers take the bounce path, and every copy is counted', () => {
    const copies0 = rig.counter(C.rxCopies);
    const bytes0 = rig.counter(C.rxCopyBytes);
    const base = 0x100000;
    rig.rxDrv.add([{ gpa: base, len: 600, writable: true }], 'small');
    rig.rxDrv.add([{ gpa: base + 4096, len: 8, writable: true }, { gpa: base + 8192, len: 300, writable: true },
      { gpa: base + 12288, len: 300, writable: true }], 'chained');
    rig.rxDrv.add([{ gpa: base + 16384, len: 200, writable: true }], 'too-small');
    rig.rxDrv.publish();
    rig.rx.process(64);
    const frames = [frameFor(3000, 400), frameFor(3001, 500), frameFor(3002, 400)];
    for (const f of frames) host.send(f);
    const used = rig.collectRx(3);
    expect(used.map((u) => u.token)).toEqual(['small', 'chained', 'too-small']);
    const small = rig.read(base, 600);
    expect(used[0]!.len).toBe(HDR + frames[0]!.length);
    expect(small[10]).toBe(1);
    expect(udpPayloadSeq(small.slice(HDR, used[0]!.len))).toBe(3000);
    // The chained one: header split over the 8-byte segment and the next, frame after it.
    expect(used[1]!.len).toBe(HDR + frames[1]!.length);
    const joined = new Uint8Array(608);
    joined.set(rig.read(base + 4096, 8), 0);
    joined.set(rig.read(base + 8192, 300), 8);
    joined.set(rig.read(base + 12288, 300), 308);
    expect(joined[10]).toBe(1);
    expect(udpPayloadSeq(joined.slice(HDR, used[1]!.len))).toBe(3001);
    // 442 bytes do not fit 200: handed back empty and counted as dropped.
    expect(used[2]!.len).toBe(0);
    expect(rig.counter(C.rxDropOversize)).toBeGreaterThanOrEqual(1);
    expect(rig.counter(C.rxCopies) - copies0).toBe(2);
    expect(rig.counter(C.rxCopyBytes) - bytes0).toBe(frames[0]!.length + frames[1]!.length);
  });
});

describe('xsk port: guest → host', () => {
  it('frames leave straight from guest TX buffers and their chains return when the completion ring says so', () => {
    host.drain();
    const copies0 = rig.counter(C.txCopies);
    const base = 0x180000;
    const n = 32;
    for (let i = 0; i < n; i++) {
      const f = frameFor(4000 + i, 64 + i * 40);
      const gpa = base + i * 4096;
      if (i % 2 === 0) {
        // Header and frame in one buffer (Linux with ANY_LAYOUT).
        rig.write(gpa, new Uint8Array(HDR));
        rig.write(gpa + HDR, f);
        rig.txDrv.add([{ gpa, len: HDR + f.length, writable: false }], i);
      } else {
        // A header-only buffer, then the frame.
        rig.write(gpa, new Uint8Array(HDR));
        rig.write(gpa + 2048, f);
        rig.txDrv.add([{ gpa, len: HDR, writable: false }, { gpa: gpa + 2048, len: f.length, writable: false }], i);
      }
    }
    rig.txDrv.publish();
    const done = rig.completeTx(n);
    expect(done.length).toBe(n);
    const got = host.recvAll(n, 3000, (f) => udpPayloadSeq(f) !== null);
    expect(got.map(udpPayloadSeq).sort((a, b) => a! - b!)).toEqual(Array.from({ length: n }, (_, i) => 4000 + i));
    expect(rig.counter(C.txCopies) - copies0).toBe(0);
    expect(rig.tx.inFlight).toBe(0);
  });

  it('multi-segment frames are gathered through a bounce chunk (counted); offload requests are refused', () => {
    host.drain();
    const copies0 = rig.counter(C.txCopies);
    const errs0 = rig.counter(C.txErrFrame);
    const base = 0x1c0000;
    const f = frameFor(5000, 300);
    rig.write(base, new Uint8Array(HDR));
    rig.write(base + 4096, f.subarray(0, 100));
    rig.write(base + 8192, f.subarray(100));
    rig.txDrv.add([{ gpa: base, len: HDR, writable: false }, { gpa: base + 4096, len: 100, writable: false },
      { gpa: base + 8192, len: f.length - 100, writable: false }], 'gathered');
    const csum = new Uint8Array(HDR);
    csum[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    rig.write(base + 16384, csum);
    rig.write(base + 16384 + HDR, frameFor(5001, 100));
    rig.txDrv.add([{ gpa: base + 16384, len: HDR + 142, writable: false }], 'csum');
    rig.txDrv.publish();
    expect(rig.completeTx(2).length).toBe(2);
    const got = host.recvAll(2, 200, (x) => udpPayloadSeq(x) !== null);
    expect(got.map(udpPayloadSeq)).toEqual([5000]);
    expect(rig.counter(C.txCopies) - copies0).toBe(1);
    expect(rig.counter(C.txErrFrame) - errs0).toBe(1);
  });
});

describe('xsk port: pinned memory and teardown', () => {
  it('over the pin limit the UMEM holds only private chunks and every frame is a counted copy', async () => {
    await withRig({ pinLimitBytes: 2 * MiB }, async (r, local) => {
      expect(r.port.umemInfo!.mode).toBe('bounce');
      expect(r.port.pinnedBytes).toBeLessThanOrEqual(2 * MiB);
      const ps = PacketSocket.open(r.ifname);
      local.push('packet socket', () => ps.close());
      r.rxDrv.add([{ gpa: 0, len: 2048, writable: true }], 0);
      r.rxDrv.publish();
      r.rx.process(64);
      ps.send(frameFor(6000, 100));
      const used = r.collectRx(1);
      expect(used.length).toBe(1);
      expect(udpPayloadSeq(r.read(0, used[0]!.len).slice(HDR))).toBe(6000);
      expect(r.counter(C.rxCopies)).toBe(1);
    });
  });

  it('pins the UMEM once per device while sockets are open, and close() leaves no veth, socket, program or map', async () => {
    await withRig({}, async (r) => {
      const info = r.port.umemInfo!;
      expect(info.mode).toBe('zero-copy');
      expect(r.port.pinnedBytes).toBe(info.length);
      const peerIndex = r.port.peerIndex;
      const progId = xdpQuery(peerIndex).drvProgId;
      expect(progId).toBeGreaterThan(0);
      const mapId = mapInfo(r.port.xskMapFd).id;
      const sockInode = fs.readlinkSync(`/proc/self/fd/${r.xq.fd}`);
      const txSockInode = fs.readlinkSync(`/proc/self/fd/${r.xq.cfg.txFd}`);
      const openSockets = (): string[] => fs.readdirSync('/proc/self/fd').map((f) => {
        try { return fs.readlinkSync(`/proc/self/fd/${f}`); } catch { return ''; }
      });
      expect(sockInode).toMatch(/^socket:/);
      expect(txSockInode).toMatch(/^socket:/);
      expect(txSockInode).not.toBe(sockInode);
      expect(openSockets()).toContain(sockInode);
      expect(openSockets()).toContain(txSockInode);
      r.rx.stop();
      r.tx.stop();
      r.port.releaseQueue(0);
      expect(r.port.pinnedBytes).toBe(0);
      r.port.close();
      expect(linkExists(r.ifname)).toBe(false);
      expect(linkExists(r.port.peer)).toBe(false);
      // The kernel frees programs and maps after an RCU grace period / from a work queue.
      const deadline = Date.now() + 3000;
      while ((listProgIds().includes(progId) || listMapIds().includes(mapId)) && Date.now() < deadline) {
        await new Promise((res) => setTimeout(res, 20));
      }
      expect(listProgIds()).not.toContain(progId);
      expect(listMapIds()).not.toContain(mapId);
      expect(openSockets()).not.toContain(sockInode);
      expect(openSockets()).not.toContain(txSockInode);
    });
  });
});

describe('xsk port: queue pairs', () => {
  it('each pair gets its own socket on its own queue, all sharing one UMEM (pinned once)', async () => {
    await withRig({ pairs: 2 }, async (r, local) => {
      const xq1 = new XskQueue(r.port.queueConfig(1));
      expect(xq1.fd).not.toBe(r.xq.fd);
      expect(r.port.pinnedBytes).toBe(r.port.umemInfo!.length);
      const drv1 = new DriverQueue(r.guest.drv, 0x220000, QSIZE, { eventIdx: false });
      const q1 = new SplitQueue(r.guest.dev, drv1.layout, { eventIdx: false, name: 'xsk-test:rx1' });
      const stats1 = new Float64Array(2 * COUNTERS.length);
      const rx1 = new RxPath(q1, 2, -1, { name: 'xsk-test', stats: stats1, pair: 1, onBroken: () => undefined }, xq1, r.guest.dev, FORMAT);
      for (let i = 0; i < 48; i++) {
        r.rxDrv.add([{ gpa: i * 2048, len: 2048, writable: true }], i * 2048);
        drv1.add([{ gpa: 0x100000 + i * 2048, len: 2048, writable: true }], 0x100000 + i * 2048);
      }
      r.rxDrv.publish();
      drv1.publish();
      r.rx.process(64);
      rx1.process(64);
      const ps = PacketSocket.open(r.ifname);
      local.push('packet socket', () => ps.close());
      // Different UDP ports hash to different host-side TX queues, i.e. different peer RX queues.
      for (let s = 0; s < 32; s++) {
        const f = buildUdpFrame({ srcMac: '02:00:00:00:00:01', dstMac: '02:00:00:00:00:02', srcIp: '10.9.0.1',
          dstIp: '10.9.0.2', srcPort: 10000 + s * 7, dstPort: 5000, payload: patternPayload(8000 + s, 64) });
        ps.send(f);
      }
      const seqs: number[] = [];
      let on0 = 0;
      let on1 = 0;
      const deadline = Date.now() + 3000;
      while (on0 + on1 < 32 && Date.now() < deadline) {
        r.rx.process(64);
        rx1.process(64);
        for (let u = r.rxDrv.pollUsed(); u; u = r.rxDrv.pollUsed(), on0++) seqs.push(udpPayloadSeq(r.read(u.token as number, u.len).slice(HDR))!);
        for (let u = drv1.pollUsed(); u; u = drv1.pollUsed(), on1++) seqs.push(udpPayloadSeq(r.read(u.token as number, u.len).slice(HDR))!);
      }
      expect(seqs.sort((a, b) => a - b)).toEqual(Array.from({ length: 32 }, (_, i) => 8000 + i));
      expect(on0).toBeGreaterThan(0);
      expect(on1).toBeGreaterThan(0);
      rx1.stop();
      r.port.releaseQueue(1);
      expect(r.port.pinnedBytes).toBe(r.port.umemInfo!.length); // pair 0 still holds the UMEM
      r.rx.stop();
      r.port.releaseQueue(0);
      expect(r.port.pinnedBytes).toBe(0);
    });
  });
});

describe('xsk port: transmit wakeups', () => {
  it('one TX wakeup may send a whole ring (XDP_MAX_TX_SKB_BUDGET, Linux 6.17+), not copy mode\'s default 32', () => {
    const [major, minor] = os.release().split('.').map(Number) as [number, number];
    const expected = major > 6 || (major === 6 && minor >= 17) ? 512 : 32;
    expect(rig.xq.cfg.txBudget).toBe(expected);
  });

  it('slot counters are rebased past 2^30 with frames in flight across the jump: none lost, both directions', async () => {
    await withRig({}, async (r, local) => {
      const ps = PacketSocket.open(r.ifname);
      local.push('packet socket', () => ps.close());
      // Nothing in flight yet: any counter value is a valid start (the port's two in-flight
      // tables and the RX path's table of posted chains).
      const near = 2 ** 30 - 10;
      const counters = [r.xq.rxTable, r.xq.txTable, r.rx] as unknown as { head: number; tail: number }[];
      for (const p of counters) p.head = p.tail = near;
      const n = 40;
      for (let i = 0; i < n; i++) r.rxDrv.add([{ gpa: i * 2048, len: 2048, writable: true }], i * 2048);
      r.rxDrv.publish();
      r.rx.process(64);
      for (let i = 0; i < n; i++) ps.send(frameFor(9300 + i, 100));
      const used = r.collectRx(n);
      expect(used.map((u) => udpPayloadSeq(r.read(u.token as number, u.len).slice(HDR))).sort((a, b) => a! - b!))
        .toEqual(Array.from({ length: n }, (_, i) => 9300 + i));
      for (let i = 0; i < n; i++) {
        const gpa = 0x180000 + i * 4096;
        const f = frameFor(9400 + i, 100);
        r.write(gpa, new Uint8Array(HDR));
        r.write(gpa + HDR, f);
        r.txDrv.add([{ gpa, len: HDR + f.length, writable: false }], i);
      }
      r.txDrv.publish();
      expect(r.completeTx(n).length).toBe(n);
      expect(ps.recvAll(n, 3000, (f) => (udpPayloadSeq(f) ?? 0) >= 9400).length).toBe(n);
      for (const p of counters) {
        expect(p.head).toBeLessThan(2 ** 30);
        expect(p.tail).toBe(p.head);
      }
      expect(r.broken).toEqual([]);
    });
  });

  it('one sendto sends as many frames as the budget allows: 100 frames, one wakeup', async () => {
    await withRig({}, async (r, local) => {
      const ps = PacketSocket.open(r.ifname);
      local.push('packet socket', () => ps.close());
      const gpa = 0x300000;
      const f = frameFor(9100, 64);
      r.write(gpa, f);
      const umemAddr = r.port.umemInfo!.regions[0]!.umemOffset + gpa;
      const tx = r.xq.tx;
      for (let i = 0; i < 100; i++) tx.push(umemAddr, f.length);
      tx.submit();
      kickTx(r.xq.cfg.txFd);
      const sent = 100 - tx.outstanding();
      expect(sent).toBe(Math.min(100, r.xq.cfg.txBudget));
      expect(ps.recvAll(sent, 3000, (g) => udpPayloadSeq(g) === 9100).length).toBe(sent);
    });
  });

  it('ring indexes wrap through 2^31 and 2^32 (free-running u32 in the kernel\'s format) without losing or reordering entries', () => {
    // A TX ring and an RX ring share the descriptor layout: one over the same memory plays the kernel.
    const mem = new NativeBuffer(4096);
    try {
      const layout = { address: mem.address, mapLength: 4096, entries: 64, offsets: { producer: 0, consumer: 64, flags: 128, desc: 256 } };
      for (const start of [2 ** 31 - 3, 2 ** 32 - 3]) {
        mem.view.setUint32(0, start, true);
        mem.view.setUint32(64, start, true);
        const tx = new TxRing(layout);
        const rx = new RxRing(layout);
        for (let round = 0; round < 3; round++) {
          expect(tx.free(64)).toBe(64);
          for (let i = 0; i < 5; i++) tx.push(0x1_0000_0000 + round * 100 + i, 60 + i);
          tx.submit();
          expect(rx.peek(64)).toBe(5);
          const first = rx.nextIndex;
          for (let i = 0; i < 5; i++) {
            expect(rx.base((first + i) | 0)).toBe(0x1_0000_0000 + round * 100 + i);
            expect(rx.len((first + i) | 0)).toBe(60 + i);
          }
          rx.release(5);
          expect(tx.outstanding()).toBe(0);
        }
        // The kernel sees the same u32 it always did.
        expect(mem.view.getUint32(0, true)).toBe((start + 15) % 2 ** 32);
      }
    } finally {
      mem.free();
    }
  });

  it('u64 fields round-trip through the split used for iovecs and ring descriptors', () => {
    const v = new DataView(new ArrayBuffer(8));
    for (const x of [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 0x7fff_ffff_f000, 2 ** 53 - 1]) {
      writeU64(v, 0, x);
      expect(v.getBigUint64(0, true)).toBe(BigInt(x));
      expect(readU64(v, 0)).toBe(x);
    }
  });
});

describe('xsk port: sustained 64-byte traffic', () => {
  // Frame rates of these paths: npm run bench -- xsk (through serve, beside DPDK's af_xdp PMD).
  it('thousands of 64-byte frames each way, buffers recycled as they complete, make no JS copy', async () => {
    await withRig({}, async (r, local) => {
      // Guest → host: 128 chains recycled as they complete.
      const f = frameFor(7000, 18); // 60-byte frame + padding → 64 with FCS
      const base = 0x100000;
      for (let i = 0; i < 128; i++) {
        r.write(base + i * 2048, new Uint8Array(HDR));
        r.write(base + i * 2048 + HDR, f);
      }
      const addTx = (i: number): void => { r.txDrv.add([{ gpa: base + i * 2048, len: HDR + f.length, writable: false }], i); };
      for (let i = 0; i < 128; i++) addTx(i);
      r.txDrv.publish();
      const TX_FRAMES = 5000;
      let sent = 0;
      const txGuard = Date.now() + 10_000; // a hang guard, not a measurement
      while (sent < TX_FRAMES && Date.now() < txGuard) {
        r.tx.process(64, false);
        for (let u = r.txDrv.pollUsed(); u; u = r.txDrv.pollUsed()) { sent++; addTx(u.token as number); }
        r.txDrv.publish();
      }
      expect(sent).toBeGreaterThanOrEqual(TX_FRAMES);

      // Host → guest: 32 frames per AF_PACKET round (the kernel runs the veth XDP redirect and
      // the copy into guest RAM inside that send), then the RX path delivers them and the
      // driver recycles 256 buffers.
      const rbase = 0x200000 + 0x40000;
      const addRx = (i: number): void => { r.rxDrv.add([{ gpa: rbase + i * 2048, len: 2048, writable: true }], i); };
      for (let i = 0; i < 255; i++) addRx(i);
      r.rxDrv.publish();
      r.rx.process(64);
      const ps = PacketSocket.open(r.ifname);
      local.push('packet socket', () => ps.close());
      const small = frameFor(7001, 18);
      let got = 0;
      for (let round = 0; round < 200; round++) {
        for (let k = 0; k < 32; k++) ps.send(small);
        r.rx.process(64);
        for (let u = r.rxDrv.pollUsed(); u; u = r.rxDrv.pollUsed()) { got++; addRx(u.token as number); }
        r.rxDrv.publish();
      }
      expect(got).toBeGreaterThan(0);
      expect(r.counter(C.rxCopies)).toBe(0);
    });
  });
});
