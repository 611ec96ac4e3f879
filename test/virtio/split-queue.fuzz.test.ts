import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestMemory, type RegionInfo } from '../../src/memory/guest-memory.js';
import { makeMemoryFixture, MiB, HI, type MemoryFixture } from '../support/memory-fixture.js';
import { DescriptorChain, MAX_INDIRECT_ENTRIES, SplitQueue, VirtqueueError } from '../../src/virtio/split-queue.js';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverQueue } from '../support/frontend/driver-queue.js';

/**
 * Time-bounded fuzz of SplitQueue.pop over real shared memory. Reproduce a failure with
 * VQ_FUZZ_SEED=<seed printed below>; VQ_FUZZ_MS sets the budget (default 5000 ms in total).
 *
 * Phase 1 (single thread): random descriptor tables, indirect tables and avail rings; each
 *   pop is compared with an independent reference walker written from the spec rules (same
 *   outcome, same reason, same segments) and every segment is checked against the regions.
 * Phase 2 (racing writer): a worker thread scribbles over the rings and tables while we pop,
 *   the case "read every field once" exists for; only the memory-safety properties are
 *   checked (there is no single right answer while the guest is mid-write).
 */

const TOTAL_MS = Number(process.env.VQ_FUZZ_MS ?? 5000);
const SEED = Number(process.env.VQ_FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
const MAX_SEGMENTS = 64;

// xorshift32: tiny, seedable, good enough to explore.
function rng(seed: number) {
  let s = seed || 0x9e3779b9;
  const next = (): number => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
  return {
    u32: next,
    below: (n: number) => next() % n,
    chance: (p: number) => next() / 2 ** 32 < p,
    pick<T>(xs: readonly T[]): T {
      return xs[next() % xs.length]!;
    },
  };
}
type Rng = ReturnType<typeof rng>;


let fx: MemoryFixture;
beforeAll(() => {
  fx = makeMemoryFixture('vq-fuzz');
  console.log(`split-queue fuzz seed ${SEED} (reproduce with VQ_FUZZ_SEED=${SEED})`);
});
afterAll(() => fx?.release());

// ---------- reference walker (independent of SplitQueue; BigInt addresses, own region lookup) ----------

type RefResult =
  | { kind: 'empty' }
  | { kind: 'error'; reason: string; consumed: boolean }
  | { kind: 'chain'; head: number; segs: [number, number, boolean][] };

function refRegion(regions: readonly RegionInfo[], addr: bigint, len: bigint): boolean {
  return regions.some((r) => addr >= BigInt(r.gpa) && addr + (len === 0n ? 1n : len) <= BigInt(r.gpa) + BigInt(r.size));
}

function refPop(
  mem: GuestMemory,
  q: { descGpa: number; availGpa: number; size: number; last: number; indirect: boolean },
  maxSegments: number,
): RefResult {
  const u16 = (gpa: number) => {
    const b = mem.slice(gpa, 2);
    return b[0]! | (b[1]! << 8);
  };
  const u32 = (gpa: number) => {
    const b = mem.slice(gpa, 4);
    return (b[0]! | (b[1]! << 8) | (b[2]! << 16) | (b[3]! << 24)) >>> 0;
  };
  const availIdx = u16(q.availGpa + 2);
  const n = (availIdx - q.last + 0x10000) % 0x10000;
  if (n > q.size) return { kind: 'error', reason: 'avail-idx-jump', consumed: false };
  if (n === 0) return { kind: 'empty' };
  const head = u16(q.availGpa + 4 + 2 * (q.last % q.size));
  if (head >= q.size) return { kind: 'error', reason: 'head-out-of-range', consumed: true };
  const err = (reason: string): RefResult => ({ kind: 'error', reason, consumed: true });

  let tableGpa = q.descGpa;
  let entries = q.size;
  let nested = false;
  let i = head;
  let hops = 0;
  let total = 0n;
  let sawWrite = false;
  const segs: [number, number, boolean][] = [];
  for (;;) {
    hops++;
    if (hops > entries) return err('chain-loop');
    const d = tableGpa + 16 * i;
    const addr = BigInt(u32(d)) + (BigInt(u32(d + 4)) << 32n);
    const len = u32(d + 8);
    const flags = u16(d + 12);
    const next = u16(d + 14);
    if (flags & DESC_F_INDIRECT) {
      if (!q.indirect) return err('indirect-not-negotiated');
      if (nested) return err('indirect-nested');
      if (flags & DESC_F_NEXT) return err('indirect-next');
      if (len === 0 || len % 16 !== 0 || len / 16 > MAX_INDIRECT_ENTRIES) return err('bad-indirect-len');
      if (addr >= 1n << 52n) return err('addr-too-large');
      if (!refRegion(mem.regions, addr, BigInt(len))) return err('addr-outside-memory');
      tableGpa = Number(addr);
      entries = len / 16;
      nested = true;
      i = 0;
      hops = 0;
      continue;
    }
    const w = (flags & DESC_F_WRITE) !== 0;
    if (!w && sawWrite) return err('write-before-read');
    if (w) sawWrite = true;
    if (len > 0) {
      if (addr >= 1n << 52n) return err('addr-too-large');
      if (!refRegion(mem.regions, addr, BigInt(len))) return err('addr-outside-memory');
      total += BigInt(len);
      if (total > 0xffffffffn) return err('chain-too-large');
      if (segs.length >= maxSegments) return err('chain-too-long');
      segs.push([Number(addr), len, w]);
    }
    if (!(flags & DESC_F_NEXT)) break;
    if (next >= entries) return err('desc-out-of-range');
    i = next;
  }
  return { kind: 'chain', head, segs };
}

// ---------- invariants every returned chain must satisfy, whatever the guest did ----------

function checkChainSafe(mem: GuestMemory, c: DescriptorChain, size: number): void {
  if (!(c.head >= 0 && c.head < size)) throw new Error(`head ${c.head} outside queue of ${size}`);
  if (c.count > c.maxSegments || c.readableCount > c.count) throw new Error('bad counts');
  let rb = 0;
  let wb = 0;
  for (let i = 0; i < c.count; i++) {
    const len = c.length[i]!;
    const gpa = c.gpa[i]!;
    const r = mem.regions[c.region[i]!];
    if (!r) throw new Error(`segment ${i} names region ${c.region[i]}`);
    if (!(len > 0 && gpa >= r.gpa && gpa + len <= r.gpa + r.size)) {
      throw new Error(`segment ${i} [0x${gpa.toString(16)}, +${len}) is outside region ${c.region[i]}`);
    }
    if (c.offset[i] !== gpa - r.gpa) throw new Error(`segment ${i} offset does not match its gpa`);
    const w = i >= c.readableCount;
    if (w) wb += len;
    else rb += len;
  }
  if (rb !== c.readableBytes || wb !== c.writableBytes || rb + wb > 0xffffffff) throw new Error('byte totals wrong');
}

// ---------- random guest state ----------

const TABLE_AREAS: [number, number][] = [
  [0x10000, 0x80000], // region 0, above the rings
  [HI, HI + MiB],
];

function randAddr(r: Rng, tables: number[]): number {
  switch (r.below(10)) {
    case 0:
      return r.below(MiB);
    case 1:
      return HI + r.below(MiB);
    case 2:
      return r.pick([MiB, HI + MiB, HI, 0]) - r.below(64);
    case 3:
      return r.u32();
    case 4:
      return r.u32() * 2 ** 32 + r.u32(); // may exceed 2^53: rounded, still a "garbage" address
    case 5:
      return r.pick([2 ** 52 - 1, 2 ** 52, 2 ** 52 - 16, 2 ** 64 - 2 ** 12]);
    default:
      return tables.length > 0 && r.chance(0.7) ? r.pick(tables) : r.below(MiB);
  }
}

function randLen(r: Rng): number {
  switch (r.below(8)) {
    case 0:
      return 0;
    case 1:
      return 1 + r.below(64);
    case 2:
      return 16 * (1 + r.below(8));
    case 3:
      return r.below(MiB + 1);
    case 4:
      return 0xffffffff - r.below(16);
    case 5:
      return r.pick([MiB, 16 * MAX_INDIRECT_ENTRIES, 16 * MAX_INDIRECT_ENTRIES + 16, 17]);
    default:
      return 1 + r.below(2048);
  }
}

function randFlags(r: Rng): number {
  if (r.chance(0.05)) return r.below(0x10000);
  // NEXT often, WRITE sometimes, INDIRECT rarely.
  return (r.chance(0.6) ? DESC_F_NEXT : 0) | (r.chance(0.35) ? DESC_F_WRITE : 0) | (r.chance(0.12) ? DESC_F_INDIRECT : 0);
}

function writeRawDesc(mem: GuestMemory, gpa: number, addr: number, len: number, flags: number, next: number): void {
  const b = mem.slice(gpa, 16);
  const v = new DataView(b.buffer, b.byteOffset, 16);
  v.setUint32(0, addr % 2 ** 32 >>> 0, true);
  v.setUint32(4, Math.floor(addr / 2 ** 32) >>> 0, true);
  v.setUint32(8, len >>> 0, true);
  v.setUint16(12, flags, true);
  v.setUint16(14, next, true);
}

describe('split-queue fuzz', () => {
  it('pop on random descriptor tables only ever throws VirtqueueError, matches the reference walker, stays inside guest memory', () => {
    const r = rng(SEED);
    const deadline = performance.now() + TOTAL_MS * 0.7;
    const chain = new DescriptorChain(MAX_SEGMENTS);
    const outcomes = new Map<string, number>();
    let pops = 0;
    let iterations = 0;
    let maxPopMs = 0;
    const note = (k: string) => outcomes.set(k, (outcomes.get(k) ?? 0) + 1);

    while (performance.now() < deadline) {
      iterations++;
      const size = 1 << r.below(9); // 1..256
      const eventIdx = r.chance(0.5);
      const indirect = r.chance(0.9);
      const drv = new DriverQueue(fx.driverMem, 0, size, { eventIdx });
      const dev = new SplitQueue(fx.deviceMem, drv.layout, { eventIdx, name: `fuzz${iterations}`, indirectDesc: indirect });
      const last = r.chance(0.3) ? 0xffff - r.below(4) : r.below(0x10000);
      dev.lastAvailIdx = last;

      // A few indirect tables of random content at random places.
      const tables: number[] = [];
      for (let t = r.below(4); t > 0; t--) {
        const [lo, hi] = r.pick(TABLE_AREAS);
        const entries = 1 + r.below(r.chance(0.1) ? 600 : 16);
        const gpa = lo + 16 * r.below((hi - lo) / 16 - entries);
        tables.push(gpa);
        for (let e = 0; e < entries; e++) {
          const next = r.chance(0.8) ? r.below(entries + 1) : r.below(0x10000);
          writeRawDesc(fx.driverMem, gpa + 16 * e, randAddr(r, tables), randLen(r), randFlags(r), next);
        }
      }

      if (r.chance(0.3)) {
        // Mostly valid chains built by the driver, then a few corrupted bytes.
        const drv2 = new DriverQueue(fx.driverMem, 0, size, { eventIdx, startIdx: last });
        while (drv2.numFree > 0) {
          const n = 1 + r.below(Math.min(4, drv2.numFree));
          const bufs = Array.from({ length: n }, (_, k) => ({ gpa: r.chance(0.5) ? 0x20000 + 512 * r.below(1024) : HI + 512 * r.below(2048), len: 1 + r.below(512), writable: k >= n / 2 }));
          if (r.chance(0.3)) drv2.addIndirect(bufs, 0x90000 + 0x1000 * r.below(64));
          else drv2.add(bufs);
        }
        drv2.publish();
        const a = drv2.availIdx;
        const areas = [
          [0, 16 * size],
          [0x90000, 0x90000 + 0x40000],
        ] as const;
        for (let k = r.below(6); k > 0; k--) {
          const [lo, hi] = r.pick(areas);
          fx.driverMem.regions[0]!.bytes[lo + r.below(hi - lo)] = r.u32() & 0xff;
        }
        if (r.chance(0.1)) drv2.setAvailIdx(a + r.below(3));
      } else {
        for (let s = 0; s < size; s++) {
          const next = r.chance(0.85) ? r.below(size) : r.below(0x10000);
          drv.writeDescriptor(s, { addr: randAddr(r, tables), len: randLen(r), flags: randFlags(r), next });
        }
        for (let s = 0; s < size; s++) drv.writeAvailRing(s, r.chance(0.9) ? r.below(size) : r.below(0x10000));
        drv.setAvailIdx(r.chance(0.9) ? last + r.below(size + 1) : r.below(0x10000));
      }

      for (let p = 0; p < size + 2; p++) {
        if (r.chance(0.3)) {
          // The TX path's look-ahead reads the same hostile entries: it must neither throw nor take any.
          const at = dev.lastAvailIdx;
          dev.prefetchFrames(1 + r.below(size + 4), r.below(24));
          expect(dev.lastAvailIdx).toBe(at);
          note('prefetched');
        }
        const ref = refPop(fx.driverMem, { descGpa: drv.layout.descGpa, availGpa: drv.layout.availGpa, size, last: dev.lastAvailIdx, indirect }, MAX_SEGMENTS);
        const before = dev.lastAvailIdx;
        let got: boolean;
        const t0 = performance.now();
        try {
          got = dev.pop(chain);
        } catch (e) {
          const dt = performance.now() - t0;
          if (dt > maxPopMs) maxPopMs = dt;
          pops++;
          if (!(e instanceof VirtqueueError)) throw new Error(`seed ${SEED}: pop threw a non-VirtqueueError: ${String(e)}`);
          note(e.code);
          if (ref.kind !== 'error' || ref.reason !== e.code) {
            throw new Error(`seed ${SEED} iteration ${iterations}: pop refused with ${e.code} (${e.message}); reference says ${JSON.stringify(ref)}`);
          }
          const consumed = dev.lastAvailIdx !== before;
          expect(consumed, `seed ${SEED}: slot consumption for ${e.code}`).toBe(ref.consumed);
          if (!consumed) break; // avail-idx-jump: the ring is unusable until reset
          if (e.head >= 0) dev.pushUsed(e.head, 0);
          continue;
        }
        const dt = performance.now() - t0;
        if (dt > maxPopMs) maxPopMs = dt;
        pops++;
        if (!got) {
          if (ref.kind !== 'empty') throw new Error(`seed ${SEED} iteration ${iterations}: pop saw an empty ring; reference says ${JSON.stringify(ref)}`);
          note('empty');
          break;
        }
        checkChainSafe(fx.deviceMem, chain, size);
        if (ref.kind !== 'chain') throw new Error(`seed ${SEED} iteration ${iterations}: pop returned a chain; reference says ${JSON.stringify(ref)}`);
        const segs: [number, number, boolean][] = [];
        for (let i = 0; i < chain.count; i++) segs.push([chain.gpa[i]!, chain.length[i]!, i >= chain.readableCount]);
        expect(chain.head).toBe(ref.head);
        expect(segs).toEqual(ref.segs);
        note('ok');
        dev.pushUsed(chain.head, chain.writableBytes);
        if (r.chance(0.05)) dev.rewind(1);
      }
      dev.flushUsed();
      dev.needsNotify();
    }

    const summary = [...outcomes.entries()].sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k}=${v}`).join(' ');
    console.log(`split-queue fuzz phase 1: ${iterations} tables, ${pops} pops, slowest pop ${maxPopMs.toFixed(2)} ms; ${summary}`);
    // The fuzz must actually reach both successes and the refusal rules, or it tests nothing.
    expect(outcomes.get('ok') ?? 0).toBeGreaterThan(0);
    expect(outcomes.size).toBeGreaterThan(8);
    // Walks are bounded by construction (hop counts); this only catches a gross regression.
    expect(maxPopMs).toBeLessThan(1000);
  });

  it('pop stays inside guest memory while another thread rewrites the rings and tables', async () => {
    const r = rng(SEED ^ 0x5a5a5a5a);
    const size = 64;
    const drv = new DriverQueue(fx.driverMem, 0, size, { eventIdx: true });
    const dev = new SplitQueue(fx.deviceMem, drv.layout, { eventIdx: true, name: 'race' });
    const chain = new DescriptorChain(MAX_SEGMENTS);
    // Plausible starting content so the race produces successes as well as refusals.
    for (let s = 0; s < size; s++) {
      const ind = r.chance(0.3);
      drv.writeDescriptor(s, {
        addr: ind ? 0x90000 + 0x100 * s : r.chance(0.5) ? 0x20000 + 256 * s : HI + 256 * s,
        len: ind ? 16 * (1 + r.below(8)) : 1 + r.below(256),
        flags: ind ? DESC_F_INDIRECT : r.chance(0.5) ? DESC_F_NEXT : 0,
        next: r.below(size),
      });
      for (let e = 0; e < 8; e++) writeRawDesc(fx.driverMem, 0x90000 + 0x100 * s + 16 * e, 0x20000 + 64 * e, 64, e < 7 ? DESC_F_NEXT : DESC_F_WRITE, e + 1);
    }
    const stop = new SharedArrayBuffer(4);
    const drvRegion = fx.driverMem.regions[0]!;
    // The worker scribbles (through the frontend's mapping) over the descriptor table, the avail
    // ring entries and the indirect tables, but not avail->idx, which we steer ourselves.
    const worker = new Worker(
      `
      const { workerData, parentPort } = require('node:worker_threads');
      const { base, koffiPath, stop, seed, size, descBytes, availRing, availRingBytes, tables, tableBytes } = workerData;
      const koffi = require(koffiPath);
      const bytes = new Uint8Array(koffi.view(base, 0x100000));
      const view = new DataView(bytes.buffer);
      const flag = new Int32Array(stop);
      let s = seed >>> 0 || 1;
      const rnd = () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s; };
      let writes = 0;
      parentPort.postMessage('started');
      // Mostly plausible field values (so chains sometimes validate), some raw garbage bytes.
      while (Atomics.load(flag, 0) === 0) {
        for (let k = 0; k < 256; k++) {
          const x = rnd();
          switch (x & 7) {
            case 0: view.setUint16(availRing + 2 * (rnd() % size), rnd() % (size + 1), true); break;
            case 1: bytes[availRing + (rnd() % availRingBytes)] = rnd() & 0xff; break;
            case 2: bytes[tables + (rnd() % tableBytes)] = rnd() & 0xff; break;
            case 3: bytes[rnd() % descBytes] = rnd() & 0xff; break;
            default: {
              const inTable = (x & 8) !== 0;
              const d = inTable ? tables + 16 * (rnd() % (tableBytes / 16)) : 16 * (rnd() % size);
              const f = rnd() & 3;
              if (f === 0) { view.setUint32(d, 0x20000 + (rnd() % 0xc0000), true); view.setUint32(d + 4, rnd() & 1, true); }
              else if (f === 1) view.setUint32(d + 8, rnd() % 4096, true);
              else if (f === 2) view.setUint16(d + 12, rnd() % 8, true);
              else view.setUint16(d + 14, rnd() % (inTable ? 9 : size + 1), true);
            }
          }
          writes++;
        }
      }
      parentPort.postMessage(writes);
      `,
      {
        eval: true,
        workerData: {
          base: drvRegion.hostAddress,
          koffiPath: createRequire(import.meta.url).resolve('koffi'),
          stop,
          seed: SEED,
          size,
          descBytes: 16 * size,
          availRing: drv.layout.availGpa + 4,
          availRingBytes: 2 * size,
          tables: 0x90000,
          tableBytes: 0x100 * size,
        },
      },
    );
    let writes = 0;
    const done = new Promise<void>((resolve, reject) => {
      worker.on('message', (m) => {
        if (typeof m === 'number') writes = m;
      });
      worker.on('error', reject);
      worker.on('exit', () => resolve());
    });
    const outcomes = new Map<string, number>();
    let pops = 0;
    // From here on the worker may be writing into the mapping: it must be stopped before
    // afterAll unmaps it, whatever happens.
    try {
      await new Promise<void>((resolve, reject) => {
        worker.once('message', () => resolve());
        worker.once('error', reject);
      });
      const deadline = performance.now() + TOTAL_MS * 0.3;
      while (performance.now() < deadline) {
        drv.setAvailIdx(dev.lastAvailIdx + 1 + r.below(size));
        for (let p = 0; p < size; p++) {
          pops++;
          try {
            if (!dev.pop(chain)) break;
            checkChainSafe(fx.deviceMem, chain, size);
            outcomes.set('ok', (outcomes.get('ok') ?? 0) + 1);
            dev.pushUsed(chain.head, 0);
          } catch (e) {
            if (!(e instanceof VirtqueueError)) throw new Error(`seed ${SEED}: racing pop threw ${String(e)}`);
            outcomes.set(e.code, (outcomes.get(e.code) ?? 0) + 1);
            if (e.head >= 0) dev.pushUsed(e.head, 0);
          }
        }
        dev.flushUsed();
        dev.needsNotify();
      }
    } finally {
      Atomics.store(new Int32Array(stop), 0, 1);
      // Let it report its write count and exit; terminate() is the backstop.
      await Promise.race([done.catch(() => undefined), new Promise((res) => setTimeout(res, 2000))]);
      await worker.terminate();
    }
    const summary = [...outcomes.entries()].sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k}=${v}`).join(' ');
    console.log(`split-queue fuzz phase 2 (racing writer, ${writes} guest byte writes): ${pops} pops; ${summary}`);
    expect(outcomes.get('ok') ?? 0).toBeGreaterThan(0);
    expect(writes).toBeGreaterThan(0);
  });
});
