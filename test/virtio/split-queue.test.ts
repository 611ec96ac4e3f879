import koffi from 'koffi';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { makeMemoryFixture, MiB, HI, type MemoryFixture } from '../support/memory-fixture.js';
import {
  DescriptorChain,
  MAX_INDIRECT_ENTRIES,
  SplitQueue,
  VirtqueueError,
  vringNeedEvent,
  type VirtqueueErrorCode,
} from '../../src/virtio/split-queue.js';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverQueue } from '../support/frontend/driver-queue.js';

const QSIZE = 256;


let fx: MemoryFixture;
beforeAll(() => {
  fx = makeMemoryFixture('vq-test');
});
afterAll(() => fx?.release());

function newPair(opts: { eventIdx?: boolean; startIdx?: number; size?: number; indirectDesc?: boolean } = {}) {
  const eventIdx = opts.eventIdx ?? false;
  const size = opts.size ?? QSIZE;
  const drv = new DriverQueue(fx.driverMem, 0, size, { eventIdx, startIdx: opts.startIdx });
  const dev = new SplitQueue(fx.deviceMem, drv.layout, { eventIdx, name: 'test:q0', indirectDesc: opts.indirectDesc });
  if (opts.startIdx !== undefined) {
    dev.lastAvailIdx = opts.startIdx & 0xffff;
    dev.usedIdx = opts.startIdx & 0xffff;
  }
  return { drv, dev };
}

/** Fills a guest buffer through the driver's mapping. */
function fill(gpa: number, len: number, seed: number): void {
  const b = fx.driverMem.slice(gpa, len);
  for (let i = 0; i < len; i++) b[i] = (seed + i * 7) & 0xff;
}

function expectCode(fn: () => unknown, code: VirtqueueErrorCode): VirtqueueError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(VirtqueueError);
    expect((e as VirtqueueError).code).toBe(code);
    return e as VirtqueueError;
  }
  throw new Error(`expected VirtqueueError(${code}), nothing was thrown`);
}

const BUF_A = 0x20000; // buffers in region 0 (rings live at 0..0x2000)
const BUF_B = HI + 0x1000; // buffers in region 1
const TABLES = 0x80000; // indirect tables

describe('SplitQueue construction', () => {
  it('refuses queue sizes that are not a power of 2 in 1..32768', () => {
    const base = { descGpa: 0, availGpa: 0x1000, usedGpa: 0x2000 };
    for (const size of [0, 3, 100, 65536, 1.5, -4]) {
      expectCode(() => new SplitQueue(fx.deviceMem, { ...base, size }, { eventIdx: false, name: 'q' }), 'bad-queue-size');
    }
    expect(new SplitQueue(fx.deviceMem, { ...base, size: 1 }, { eventIdx: false, name: 'q' }).size).toBe(1);
  });

  it('refuses rings outside guest memory or straddling a region end', () => {
    const ok = { size: 256, descGpa: 0, availGpa: 0x1000, usedGpa: 0x2000 };
    expectCode(() => new SplitQueue(fx.deviceMem, { ...ok, descGpa: 2 * MiB }, { eventIdx: false, name: 'q' }), 'ring-outside-memory');
    expectCode(() => new SplitQueue(fx.deviceMem, { ...ok, descGpa: MiB - 16 * 128 }, { eventIdx: false, name: 'q' }), 'ring-outside-memory');
    expectCode(() => new SplitQueue(fx.deviceMem, { ...ok, availGpa: MiB - 6 - 2 * 256 + 2 }, { eventIdx: false, name: 'q' }), 'ring-outside-memory');
    expectCode(() => new SplitQueue(fx.deviceMem, { ...ok, usedGpa: HI + MiB - 8 }, { eventIdx: false, name: 'q' }), 'ring-outside-memory');
    // Each ring in a different region is fine.
    expect(() => new SplitQueue(fx.deviceMem, { ...ok, usedGpa: HI }, { eventIdx: false, name: 'q' })).not.toThrow();
  });

  it('refuses misaligned rings', () => {
    const ok = { size: 256, descGpa: 0, availGpa: 0x1000, usedGpa: 0x2000 };
    expectCode(() => new SplitQueue(fx.deviceMem, { ...ok, descGpa: 8 }, { eventIdx: false, name: 'q' }), 'misaligned-ring');
    expectCode(() => new SplitQueue(fx.deviceMem, { ...ok, availGpa: 0x1001 }, { eventIdx: false, name: 'q' }), 'misaligned-ring');
    expectCode(() => new SplitQueue(fx.deviceMem, { ...ok, usedGpa: 0x2002 }, { eventIdx: false, name: 'q' }), 'misaligned-ring');
    // Aligned in guest-physical terms but at an odd place in our mapping (a region whose mmap
    // offset is odd): avail->idx and used->idx could not be accessed as atomic u16s.
    const r0 = fx.deviceMem.regions[0]!;
    const odd = new GuestMemory([{ gpa: 0, size: 0x4000, uva: r0.uva + 1, hostAddress: r0.hostAddress + 1 }]);
    expectCode(() => new SplitQueue(odd, { size: 256, descGpa: 0x10, availGpa: 0x1010, usedGpa: 0x2010 }, { eventIdx: false, name: 'q' }), 'odd-host-address');
    // Only the used ring's region is odd.
    const split = new GuestMemory([
      { gpa: 0, size: 0x4000, uva: r0.uva, hostAddress: r0.hostAddress },
      { gpa: 0x10000, size: 0x4000, uva: r0.uva + 0x8001, hostAddress: r0.hostAddress + 0x8001 },
    ]);
    expect(() => new SplitQueue(split, { size: 256, descGpa: 0, availGpa: 0x1000, usedGpa: 0x2000 }, { eventIdx: false, name: 'q' })).not.toThrow();
    expectCode(() => new SplitQueue(split, { size: 256, descGpa: 0, availGpa: 0x1000, usedGpa: 0x10000 }, { eventIdx: false, name: 'q' }), 'odd-host-address');
    // Only the avail ring's region is odd: the avail ring is checked on its own.
    expectCode(() => new SplitQueue(split, { size: 256, descGpa: 0, availGpa: 0x10000, usedGpa: 0x2000 }, { eventIdx: false, name: 'q' }), 'odd-host-address');
  });

  it('starts usedIdx from used->idx in guest memory (resuming a ring)', () => {
    const drv = new DriverQueue(fx.driverMem, 0, QSIZE, { eventIdx: false, startIdx: 1234 });
    const dev = new SplitQueue(fx.deviceMem, drv.layout, { eventIdx: false, name: 'q' });
    expect(dev.usedIdx).toBe(1234);
    expect(dev.lastAvailIdx).toBe(0);
  });
});

describe('SplitQueue pop: valid chains', () => {
  let drv: DriverQueue;
  let dev: SplitQueue;
  const chain = new DescriptorChain();
  beforeEach(() => ({ drv, dev } = newPair()));

  it('returns false on an empty ring and sees nothing before publish()', () => {
    expect(dev.pop(chain)).toBe(false);
    drv.add([{ gpa: BUF_A, len: 64, writable: false }]);
    expect(dev.availableCount()).toBe(0);
    expect(dev.pop(chain)).toBe(false);
    drv.publish();
    expect(dev.availableCount()).toBe(1);
    expect(dev.pop(chain)).toBe(true);
    expect(dev.pop(chain)).toBe(false);
  });

  it('maps a direct readable chain to the device-side host address and region offset', () => {
    fill(BUF_A, 100, 1);
    const head = drv.add([{ gpa: BUF_A, len: 100, writable: false }])!;
    drv.publish();
    expect(dev.pop(chain)).toBe(true);
    expect(chain.head).toBe(head);
    expect(chain.count).toBe(1);
    expect(chain.readableCount).toBe(1);
    expect(chain.readableBytes).toBe(100);
    expect(chain.writableBytes).toBe(0);
    const devRegion = fx.deviceMem.regions[0]!;
    expect(chain.gpa[0]).toBe(BUF_A);
    expect(chain.region[0]).toBe(0);
    expect(chain.offset[0]).toBe(BUF_A);
    const host0 = devRegion.hostAddress + chain.offset[0]!;
    expect(host0).not.toBe(fx.driverMem.regions[0]!.hostAddress + BUF_A);
    const seen = new Uint8Array(koffi.view(host0, 100));
    expect(Buffer.from(seen)).toEqual(Buffer.from(fx.driverMem.slice(BUF_A, 100)));
  });

  it('walks a mixed chain across both regions: readable first, writable after, device writes reach the driver', () => {
    fill(BUF_A, 12, 9);
    const bufs = [
      { gpa: BUF_A, len: 12, writable: false },
      { gpa: BUF_B, len: 300, writable: false },
      { gpa: BUF_A + 0x1000, len: 1500, writable: true },
      { gpa: BUF_B + 0x10000, len: 2048, writable: true },
    ];
    const head = drv.add(bufs, 'tok')!;
    drv.publish();
    expect(drv.numFree).toBe(QSIZE - 4);
    expect(dev.pop(chain)).toBe(true);
    expect(chain.head).toBe(head);
    expect(chain.count).toBe(4);
    expect(chain.readableCount).toBe(2);
    expect(chain.readableBytes).toBe(312);
    expect(chain.writableBytes).toBe(3548);
    for (let i = 0; i < 4; i++) {
      const b = bufs[i]!;
      const r = fx.deviceMem.find(b.gpa, b.len);
      expect(chain.gpa[i]).toBe(b.gpa);
      expect(chain.length[i]).toBe(b.len);
      expect(i >= chain.readableCount).toBe(b.writable);
      expect(chain.region[i]).toBe(r);
      expect(chain.offset[i]).toBe(b.gpa - fx.deviceMem.regions[r]!.gpa);
    }
    // Device writes through host addresses (what readv would do) ...
    for (let i = 2; i < 4; i++) new Uint8Array(koffi.view(fx.deviceMem.regions[chain.region[i]!]!.hostAddress + chain.offset[i]!, chain.length[i]!)).fill(0xa0 + i);
    // ... and through the region views (JS access without re-translation).
    fx.deviceMem.regions[chain.region[3]!]!.bytes[chain.offset[3]! + 5] = 0x55;
    dev.pushUsed(chain.head, 1500 + 2048);
    dev.flushUsed();
    const used = drv.pollUsed()!;
    expect(used).toEqual({ head, len: 3548, token: 'tok' });
    expect(drv.numFree).toBe(QSIZE);
    expect(fx.driverMem.slice(BUF_A + 0x1000, 1500).every((v) => v === 0xa2)).toBe(true);
    const b3 = fx.driverMem.slice(BUF_B + 0x10000, 2048);
    expect(b3[5]).toBe(0x55);
    expect(b3[0]).toBe(0xa3);
    expect(b3[2047]).toBe(0xa3);
  });

  it('walks an indirect table; its descriptors chain relative to the table', () => {
    const bufs = [
      { gpa: BUF_B, len: 12, writable: false },
      { gpa: BUF_A, len: 64, writable: false },
      { gpa: BUF_B + 0x8000, len: 4096, writable: true },
    ];
    const head = drv.addIndirect(bufs, HI + 0x40000, 7)!;
    drv.publish();
    expect(drv.numFree).toBe(QSIZE - 1);
    expect(dev.pop(chain)).toBe(true);
    expect(chain.head).toBe(head);
    expect(chain.count).toBe(3);
    expect(chain.readableCount).toBe(2);
    expect(Array.from(chain.gpa.subarray(0, 3))).toEqual(bufs.map((b) => b.gpa));
    expect(Array.from(chain.length.subarray(0, 3))).toEqual(bufs.map((b) => b.len));
    dev.pushUsed(head, 4096);
    dev.flushUsed();
    expect(drv.pollUsed()).toEqual({ head, len: 4096, token: 7 });
    expect(drv.numFree).toBe(QSIZE);
  });

  it('accepts an indirect descriptor as the last element of a direct chain', () => {
    const tv = fx.driverMem.regions[0]!.view;
    // indirect table with one writable buffer
    tv.setUint32(TABLES, BUF_A, true);
    tv.setUint32(TABLES + 4, 0, true);
    tv.setUint32(TABLES + 8, 256, true);
    tv.setUint16(TABLES + 12, DESC_F_WRITE, true);
    drv.writeDescriptor(5, { addr: BUF_B, len: 10, flags: DESC_F_NEXT, next: 6 });
    drv.writeDescriptor(6, { addr: TABLES, len: 16, flags: DESC_F_INDIRECT, next: 0 });
    drv.writeAvailRing(0, 5);
    drv.setAvailIdx(1);
    expect(dev.pop(chain)).toBe(true);
    expect(chain.count).toBe(2);
    expect(chain.readableCount).toBe(1);
    expect(chain.readableCount).toBe(1); // segment 1 is writable
    expect(chain.gpa[1]).toBe(BUF_A);
  });

  it('allows zero-length buffers (even with a bogus address) and leaves them out of the segments', () => {
    drv.add([
      { gpa: BUF_A, len: 10, writable: false },
      { gpa: 0xdead_0000_0000, len: 0, writable: false },
      { gpa: BUF_A + 64, len: 20, writable: true },
      { gpa: 2 ** 60, len: 0, writable: true },
    ]);
    drv.publish();
    expect(dev.pop(chain)).toBe(true);
    expect(chain.count).toBe(2);
    expect(chain.readableCount).toBe(1);
    expect(chain.readableBytes).toBe(10);
    expect(chain.writableBytes).toBe(20);
  });

  it('takes one-descriptor chains (the common case) with the same results as longer ones', () => {
    // A lone zero-length descriptor: an empty chain, its bogus address never looked at.
    drv.add([{ gpa: 2 ** 60, len: 0, writable: false }]);
    drv.add([{ gpa: BUF_A + 8, len: 100, writable: true }]);
    drv.add([{ gpa: BUF_A + 16, len: 76, writable: false }]);
    drv.publish();
    expect(dev.pop(chain)).toBe(true);
    expect([chain.count, chain.readableCount, chain.readableBytes, chain.writableBytes]).toEqual([0, 0, 0, 0]);
    expect(dev.pop(chain)).toBe(true);
    expect([chain.count, chain.readableCount, chain.readableBytes, chain.writableBytes]).toEqual([1, 0, 0, 100]);
    expect([chain.gpa[0], chain.readableCount, chain.length[0]]).toEqual([BUF_A + 8, 0, 100]);
    expect(dev.pop(chain)).toBe(true);
    expect([chain.count, chain.readableCount, chain.readableBytes, chain.writableBytes]).toEqual([1, 1, 76, 0]);
    const r = fx.deviceMem.regions[chain.region[0]!]!;
    expect(chain.offset[0]).toBe(BUF_A + 16 - r.gpa);
  });

  it('reuses the same chain object without allocation growth across many pops', () => {
    for (let round = 0; round < 4; round++) {
      for (let i = 0; i < QSIZE; i++) expect(drv.add([{ gpa: BUF_A + 64 * i, len: 64, writable: true }], i)).not.toBeNull();
      expect(drv.add([{ gpa: BUF_A, len: 1, writable: true }])).toBeNull();
      drv.publish();
      let n = 0;
      while (dev.pop(chain)) {
        expect(chain.gpa[0]).toBe(BUF_A + 64 * n);
        dev.pushUsed(chain.head, 64);
        n++;
      }
      expect(n).toBe(QSIZE);
      dev.flushUsed();
      let m = 0;
      while (drv.pollUsed()) m++;
      expect(m).toBe(QSIZE);
    }
  });
});

describe('SplitQueue prefetchFrames (the TX look-ahead)', () => {
  let drv: DriverQueue;
  let dev: SplitQueue;
  const chain = new DescriptorChain();
  beforeEach(() => ({ drv, dev } = newPair({ indirectDesc: true })));

  it('takes nothing: the chains it read pop afterwards, in order, unchanged', () => {
    const heads = [
      drv.add([{ gpa: BUF_A, len: 76, writable: false }])!, // header and frame in one buffer
      drv.add([{ gpa: BUF_A + 0x1000, len: 12, writable: false }, { gpa: BUF_B, len: 64, writable: false }])!, // header alone
      drv.addIndirect([{ gpa: BUF_A + 0x2000, len: 76, writable: false }], TABLES)!,
    ];
    drv.publish();
    dev.prefetchFrames(64, 12);
    expect(dev.lastAvailIdx).toBe(0);
    for (const h of heads) {
      expect(dev.pop(chain)).toBe(true);
      expect(chain.head).toBe(h);
    }
    expect(dev.pop(chain)).toBe(false);
  });

  it('reads at most `max` entries and nothing on an empty ring', () => {
    dev.prefetchFrames(64, 12);
    drv.add([{ gpa: BUF_A, len: 76, writable: false }]);
    drv.add([{ gpa: BUF_A + 0x800, len: 76, writable: false }]);
    drv.publish();
    dev.prefetchFrames(1, 12);
    dev.prefetchFrames(0, 12);
    expect(dev.availableCount()).toBe(2);
  });

  it('skips what pop() refuses without throwing; pop() then refuses it with the same code', () => {
    drv.writeDescriptor(0, { addr: 0xfff0_0000_0000, len: 76, flags: 0, next: 0 }); // outside guest memory
    drv.writeDescriptor(1, { addr: 2 ** 60, len: 76, flags: 0, next: 0 }); // beyond 2^52
    drv.writeDescriptor(2, { addr: BUF_A, len: 12, flags: DESC_F_NEXT, next: QSIZE + 3 }); // header alone, next out of range
    const slots = [QSIZE + 1, 0, 1, 2]; // the first is a head out of range
    slots.forEach((h, i) => drv.writeAvailRing(i, h));
    drv.setAvailIdx(slots.length);
    dev.prefetchFrames(64, 12);
    expect(dev.lastAvailIdx).toBe(0);
    for (const code of ['head-out-of-range', 'addr-outside-memory', 'addr-too-large', 'desc-out-of-range'] as const) {
      expectCode(() => dev.pop(chain), code);
    }
  });

  it('leaves an avail->idx jump for pop() to report', () => {
    drv.setAvailIdx(QSIZE + 5);
    dev.prefetchFrames(64, 12);
    expect(dev.lastAvailIdx).toBe(0);
    expectCode(() => dev.pop(chain), 'avail-idx-jump');
  });
});

describe('SplitQueue used ring', () => {
  it('pushUsed is invisible to the driver until flushUsed', () => {
    const { drv, dev } = newPair();
    const chain = new DescriptorChain();
    const h1 = drv.add([{ gpa: BUF_A, len: 8, writable: true }], 'a')!;
    const h2 = drv.add([{ gpa: BUF_A + 8, len: 8, writable: true }], 'b')!;
    drv.publish();
    expect(dev.pop(chain) && chain.head).toBe(h1);
    expect(dev.pop(chain) && chain.head).toBe(h2);
    dev.pushUsed(h2, 3); // out of order completion is allowed
    dev.pushUsed(h1, 4);
    expect(dev.unflushed).toBe(2);
    expect(drv.pollUsed()).toBeNull();
    dev.flushUsed();
    expect(drv.readUsedIdx()).toBe(2);
    expect(drv.pollUsed()).toEqual({ head: h2, len: 3, token: 'b' });
    expect(drv.pollUsed()).toEqual({ head: h1, len: 4, token: 'a' });
    expect(drv.pollUsed()).toBeNull();
  });

  it('refuses a head >= size or a len that is not a u32 (device-side bug)', () => {
    const { dev } = newPair();
    expectCode(() => dev.pushUsed(QSIZE, 0), 'bad-argument');
    expectCode(() => dev.pushUsed(-1, 0), 'bad-argument');
    expectCode(() => dev.pushUsed(0, 2 ** 32), 'bad-argument');
  });

  it('wraps avail and used indexes at 65536', () => {
    const { drv, dev } = newPair({ startIdx: 65530 });
    const chain = new DescriptorChain();
    let consumed = 0;
    for (let round = 0; round < 5; round++) {
      for (let i = 0; i < 3; i++) drv.add([{ gpa: BUF_A + 64 * i, len: 64, writable: true }], round * 10 + i);
      drv.publish();
      expect(dev.availableCount()).toBe(3);
      while (dev.pop(chain)) dev.pushUsed(chain.head, 64);
      dev.flushUsed();
      for (let i = 0; i < 3; i++) expect(drv.pollUsed()!.token).toBe(round * 10 + i);
      consumed += 3;
    }
    expect(dev.lastAvailIdx).toBe((65530 + consumed) & 0xffff);
    expect(dev.usedIdx).toBe((65530 + consumed) & 0xffff);
    expect(drv.readUsedIdx()).toBe(9);
  });
});

describe('SplitQueue rewind', () => {
  it('un-pops the last n chains, which pop again in order', () => {
    const { drv, dev } = newPair({ startIdx: 65534 });
    const chain = new DescriptorChain();
    const heads = [0, 1, 2, 3].map((i) => drv.add([{ gpa: BUF_A + 128 * i, len: 128, writable: true }])!);
    drv.publish();
    for (const h of heads.slice(0, 3)) expect(dev.pop(chain) && chain.head).toBe(h);
    dev.rewind(2);
    expect(dev.lastAvailIdx).toBe(65535);
    expect(dev.availableCount()).toBe(3);
    for (const h of heads.slice(1)) expect(dev.pop(chain) && chain.head).toBe(h);
    expect(dev.pop(chain)).toBe(false);
    expectCode(() => dev.rewind(QSIZE + 1), 'bad-argument');
  });
});

describe('notification suppression', () => {
  it('vringNeedEvent matches the spec formula, including wrap-around', () => {
    const ref = (e: number, n: number, o: number) => (n - e - 1 + 0x10000) % 0x10000 < (n - o + 0x10000) % 0x10000;
    const cases: [number, number, number, boolean][] = [
      [0, 1, 0, true],
      [1, 1, 0, false],
      [5, 10, 0, true],
      [10, 10, 0, false],
      [9, 10, 0, true],
      [65535, 2, 65530, true], // event just before the wrap, window crosses it
      [3, 2, 65530, false], // event past new
      [65529, 2, 65530, false], // event before the window
      [65530, 2, 65530, true], // event == old: the element at index old was just published
      [2, 2, 65530, false], // event == new: that element is not published yet
      [1, 2, 65530, true],
      [7, 7, 7, false], // nothing new
    ];
    for (const [e, n, o, want] of cases) {
      expect(vringNeedEvent(e, n, o), `e=${e} new=${n} old=${o}`).toBe(want);
      expect(ref(e, n, o)).toBe(want);
    }
    let s = 12345;
    for (let i = 0; i < 20000; i++) {
      s = (s * 1103515245 + 12345) >>> 0;
      const e = s & 0xffff;
      const n = (s >>> 8) & 0xffff;
      const o = (n - ((s >>> 3) & 0x3ff)) & 0xffff;
      expect(vringNeedEvent(e, n, o)).toBe(ref(e, n, o));
    }
  });

  it('device → driver without EVENT_IDX follows avail->flags NO_INTERRUPT', () => {
    const { drv, dev } = newPair();
    dev.pushUsed(0, 0);
    dev.flushUsed();
    expect(dev.needsNotify()).toBe(true);
    drv.disableInterrupts();
    expect(dev.needsNotify()).toBe(false);
    dev.pushUsed(1, 0);
    dev.flushUsed();
    expect(dev.needsNotify()).toBe(false);
    expect(drv.enableInterrupts()).toBe(false); // elements are pending: the driver polls, no interrupt needed
    expect(dev.needsNotify()).toBe(false); // nothing new since the last check
    dev.pushUsed(2, 0);
    dev.flushUsed();
    expect(dev.needsNotify()).toBe(true);
  });

  it('device → driver with EVENT_IDX: needsNotify == vring_need_event(used_event, new, old) on crafted indexes', () => {
    const { drv, dev } = newPair({ eventIdx: true });
    const ref = (e: number, n: number, o: number) => (n - e - 1 + 0x10000) % 0x10000 < (n - o + 0x10000) % 0x10000;
    // [old, count pushed, used_event]
    const cases: [number, number, number][] = [
      [0, 1, 0],
      [0, 1, 1],
      [100, 5, 104],
      [100, 5, 105],
      [100, 5, 99],
      [65533, 5, 65535],
      [65533, 5, 1],
      [65533, 5, 2],
      [65533, 5, 65533],
      [65535, 1, 65535],
      [65535, 1, 0],
      [65535, 200, 150],
    ];
    for (const [old, k, ev] of cases) {
      dev.usedIdx = old; // invalidates the "old" index: first check always notifies
      dev.flushUsed();
      expect(dev.needsNotify()).toBe(true);
      for (let i = 0; i < k; i++) dev.pushUsed(i % QSIZE, 0);
      dev.flushUsed();
      drv.setUsedEvent(ev);
      const now = (old + k) & 0xffff;
      expect(dev.needsNotify(), `old=${old} new=${now} used_event=${ev}`).toBe(ref(ev, now, old));
      // nothing published since: never notify again
      expect(dev.needsNotify()).toBe(false);
    }
  });

  it('device → driver with EVENT_IDX: the driver polling moves used_event so each batch notifies once', () => {
    const { drv, dev } = newPair({ eventIdx: true });
    const chain = new DescriptorChain();
    for (let i = 0; i < 8; i++) drv.add([{ gpa: BUF_A + 64 * i, len: 64, writable: true }]);
    drv.publish();
    expect(dev.needsNotify()).toBe(true); // first check after start
    dev.pop(chain);
    dev.pushUsed(chain.head, 1);
    dev.flushUsed();
    expect(dev.needsNotify()).toBe(true); // used_event 0 crossed
    // driver has not polled: used_event still 0, so more completions do not notify
    dev.pop(chain);
    dev.pushUsed(chain.head, 1);
    dev.flushUsed();
    expect(dev.needsNotify()).toBe(false);
    expect(drv.pollUsed()).not.toBeNull();
    expect(drv.pollUsed()).not.toBeNull(); // used_event := 2
    dev.pop(chain);
    dev.pushUsed(chain.head, 1);
    dev.flushUsed();
    expect(dev.needsNotify()).toBe(true);
    drv.disableInterrupts();
    drv.pollUsed(); // used_event stays at 2
    dev.pop(chain);
    dev.pushUsed(chain.head, 1);
    dev.flushUsed();
    expect(dev.needsNotify()).toBe(false);
  });

  it('driver → device without EVENT_IDX follows used->flags NO_NOTIFY', () => {
    const { drv, dev } = newPair();
    drv.add([{ gpa: BUF_A, len: 1, writable: false }]);
    drv.publish();
    expect(drv.needsKick()).toBe(true);
    dev.setKickNotification(false);
    expect(drv.readUsedFlags()).toBe(1);
    drv.add([{ gpa: BUF_A, len: 1, writable: false }]);
    drv.publish();
    expect(drv.needsKick()).toBe(false);
    dev.setKickNotification(true);
    expect(drv.readUsedFlags()).toBe(0);
    drv.add([{ gpa: BUF_A, len: 1, writable: false }]);
    drv.publish();
    expect(drv.needsKick()).toBe(true);
  });

  it('driver → device with EVENT_IDX: avail_event = lastAvailIdx on enable, kicks per vring_need_event, across the wrap', () => {
    const { drv, dev } = newPair({ eventIdx: true, startIdx: 65532 });
    const chain = new DescriptorChain();
    dev.setKickNotification(true);
    expect(drv.readAvailEvent()).toBe(65532);
    drv.add([{ gpa: BUF_A, len: 1, writable: false }]);
    drv.publish(); // 65532 → 65533 crosses avail_event 65532
    expect(drv.needsKick()).toBe(true);
    dev.setKickNotification(false); // device busy: avail_event stays behind
    drv.add([{ gpa: BUF_A, len: 1, writable: false }]);
    drv.publish();
    expect(drv.needsKick()).toBe(false);
    expect(dev.pop(chain)).toBe(true);
    expect(dev.pop(chain)).toBe(true);
    expect(dev.pop(chain)).toBe(false);
    dev.setKickNotification(true); // re-arm at lastAvailIdx 65534
    expect(drv.readAvailEvent()).toBe(65534);
    for (let i = 0; i < 3; i++) drv.add([{ gpa: BUF_A, len: 1, writable: false }]);
    drv.publish(); // 65534 → 1: window wraps and contains 65534
    expect(drv.needsKick()).toBe(true);
    drv.add([{ gpa: BUF_A, len: 1, writable: false }]);
    drv.publish();
    expect(drv.needsKick()).toBe(false);
  });
});

describe('pop refusals (each rule has its reason)', () => {
  let drv: DriverQueue;
  let dev: SplitQueue;
  const chain = new DescriptorChain();
  beforeEach(() => ({ drv, dev } = newPair()));

  /** Publishes `head` in the next avail slot and pops it, expecting `reason`. */
  function popExpect(head: number, reason: VirtqueueErrorCode, c = chain, q = dev): VirtqueueError {
    const slot = q.lastAvailIdx & (q.size - 1);
    drv.writeAvailRing(slot, head);
    drv.setAvailIdx(q.lastAvailIdx + 1);
    const before = q.lastAvailIdx;
    const err = expectCode(() => q.pop(c), reason);
    expect(q.lastAvailIdx).toBe((before + 1) & 0xffff); // the slot is consumed
    return err;
  }

  function writeTable(gpa: number, descs: { addr: number; len: number; flags: number; next: number }[]): void {
    const v = fx.driverMem.regions[fx.driverMem.find(gpa, 16 * descs.length)]!.view;
    const base = gpa - fx.driverMem.regions[fx.driverMem.find(gpa, 16)]!.gpa;
    descs.forEach((d, i) => {
      v.setUint32(base + 16 * i, d.addr % 2 ** 32, true);
      v.setUint32(base + 16 * i + 4, Math.floor(d.addr / 2 ** 32), true);
      v.setUint32(base + 16 * i + 8, d.len, true);
      v.setUint16(base + 16 * i + 12, d.flags, true);
      v.setUint16(base + 16 * i + 14, d.next, true);
    });
  }

  it('head-out-of-range: avail ring entry >= queue size', () => {
    const e = popExpect(QSIZE, 'head-out-of-range');
    expect(e.head).toBe(-1);
  });

  it('avail-idx-jump: avail->idx more than size ahead', () => {
    drv.setAvailIdx(QSIZE + 1);
    expectCode(() => dev.availableCount(), 'avail-idx-jump');
    expectCode(() => dev.pop(chain), 'avail-idx-jump');
    expect(dev.lastAvailIdx).toBe(0);
    drv.setAvailIdx(QSIZE); // exactly a full ring is fine
    expect(dev.availableCount()).toBe(QSIZE);
  });

  it('avail-idx-jump: avail->idx moving backwards', () => {
    dev.lastAvailIdx = 10;
    drv.setAvailIdx(9);
    expectCode(() => dev.pop(chain), 'avail-idx-jump');
  });

  it('desc-out-of-range: next >= queue size', () => {
    drv.writeDescriptor(0, { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: QSIZE });
    const e = popExpect(0, 'desc-out-of-range');
    expect(e.head).toBe(0);
  });

  it('chain-loop: a cycle in the descriptor table stops after size hops', () => {
    drv.writeDescriptor(0, { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: 1 });
    drv.writeDescriptor(1, { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: 0 });
    popExpect(0, 'chain-loop');
    drv.writeDescriptor(7, { addr: BUF_A, len: 0, flags: DESC_F_NEXT, next: 7 }); // self-loop of empty buffers
    popExpect(7, 'chain-loop');
  });

  it('chain-loop: a chain may use every descriptor once, not more', () => {
    for (let i = 0; i < QSIZE; i++) drv.writeDescriptor(i, { addr: BUF_A, len: 1, flags: i + 1 < QSIZE ? DESC_F_NEXT : 0, next: i + 1 });
    drv.writeAvailRing(0, 0);
    drv.setAvailIdx(1);
    expect(dev.pop(chain)).toBe(true);
    expect(chain.count).toBe(QSIZE);
    drv.writeDescriptor(QSIZE - 1, { addr: BUF_A, len: 1, flags: DESC_F_NEXT, next: 0 });
    popExpect(0, 'chain-loop');
  });

  it('chain-loop: a cycle inside an indirect table', () => {
    writeTable(TABLES, [
      { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: 1 },
      { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: 0 },
    ]);
    drv.writeDescriptor(0, { addr: TABLES, len: 32, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(0, 'chain-loop');
  });

  it('chain-too-long: more segments than the chain object holds', () => {
    const small = new DescriptorChain(2);
    drv.add([
      { gpa: BUF_A, len: 1, writable: false },
      { gpa: BUF_A, len: 0, writable: false }, // zero-length does not count
      { gpa: BUF_A, len: 1, writable: false },
    ]);
    drv.publish();
    expect(dev.pop(small)).toBe(true);
    drv.add([1, 2, 3].map((i) => ({ gpa: BUF_A + i, len: 1, writable: true })));
    drv.publish();
    expectCode(() => dev.pop(small), 'chain-too-long');
  });

  it('chain-too-large: total length above 2^32-1 (many descriptors over the same MiB)', () => {
    const n = 4097; // 4097 MiB > 4 GiB - 1
    writeTable(
      HI + 0x80000,
      Array.from({ length: n }, (_, i) => ({ addr: HI, len: MiB, flags: DESC_F_WRITE | (i + 1 < n ? DESC_F_NEXT : 0), next: i + 1 })),
    );
    drv.writeDescriptor(3, { addr: HI + 0x80000, len: 16 * n, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(3, 'chain-too-large', new DescriptorChain(8192));
    // 4095 MiB still fits
    writeTable(HI + 0x80000 + 16 * 4094, [{ addr: HI, len: MiB, flags: DESC_F_WRITE, next: 0 }]);
    drv.writeDescriptor(3, { addr: HI + 0x80000, len: 16 * 4095, flags: DESC_F_INDIRECT, next: 0 });
    drv.writeAvailRing(dev.lastAvailIdx & (QSIZE - 1), 3);
    drv.setAvailIdx(dev.lastAvailIdx + 1);
    const big = new DescriptorChain(8192);
    expect(dev.pop(big)).toBe(true);
    expect(big.writableBytes).toBe(4095 * MiB);
  });

  it('write-before-read: a readable descriptor after a writable one', () => {
    drv.add([
      { gpa: BUF_A, len: 8, writable: false },
      { gpa: BUF_A + 8, len: 8, writable: true },
      { gpa: BUF_A + 16, len: 8, writable: false },
    ]);
    drv.publish();
    expectCode(() => dev.pop(chain), 'write-before-read');
    // also inside an indirect table
    drv.addIndirect(
      [
        { gpa: BUF_A, len: 8, writable: true },
        { gpa: BUF_A + 16, len: 8, writable: false },
      ],
      TABLES,
    );
    drv.publish();
    expectCode(() => dev.pop(chain), 'write-before-read');
  });

  it('addr-outside-memory: buffers past a region, between regions, or straddling a region end', () => {
    drv.writeDescriptor(0, { addr: 2 * MiB, len: 1, flags: 0, next: 0 });
    popExpect(0, 'addr-outside-memory');
    drv.writeDescriptor(0, { addr: MiB - 8, len: 16, flags: 0, next: 0 });
    popExpect(0, 'addr-outside-memory');
    drv.writeDescriptor(0, { addr: HI - 1, len: 2, flags: DESC_F_WRITE, next: 0 });
    popExpect(0, 'addr-outside-memory');
    drv.writeDescriptor(0, { addr: HI + MiB - 1, len: 0xffffffff, flags: DESC_F_WRITE, next: 0 });
    popExpect(0, 'addr-outside-memory');
    drv.writeDescriptor(0, { addr: MiB - 8, len: 8, flags: 0, next: 0 }); // ends exactly at the region end: fine
    drv.writeAvailRing(dev.lastAvailIdx & (QSIZE - 1), 0);
    drv.setAvailIdx(dev.lastAvailIdx + 1);
    expect(dev.pop(chain)).toBe(true);
  });

  it('addr-outside-memory: a buffer spanning two adjacent regions is refused (one region per buffer)', () => {
    // Device memory whose two regions are contiguous in gpa space but separate mappings.
    const regs = fx.deviceMem.regions;
    const mem = new GuestMemory([
      { gpa: 0, size: MiB, uva: regs[0]!.uva, hostAddress: regs[0]!.hostAddress },
      { gpa: MiB, size: MiB, uva: regs[1]!.uva, hostAddress: regs[1]!.hostAddress },
    ]);
    const q = new SplitQueue(mem, drv.layout, { eventIdx: false, name: 'adjacent' });
    drv.writeDescriptor(0, { addr: MiB - 16, len: 32, flags: 0, next: 0 });
    popExpect(0, 'addr-outside-memory', chain, q);
    drv.writeDescriptor(0, { addr: MiB, len: 32, flags: 0, next: 0 });
    drv.writeAvailRing(q.lastAvailIdx & (QSIZE - 1), 0);
    drv.setAvailIdx(q.lastAvailIdx + 1);
    expect(q.pop(chain)).toBe(true);
    expect(chain.region[0]).toBe(1);
    expect(chain.offset[0]).toBe(0);
  });

  it('addr-too-large: addresses at or above 2^52', () => {
    drv.writeDescriptor(0, { addr: 2 ** 52, len: 1, flags: 0, next: 0 });
    popExpect(0, 'addr-too-large');
    drv.writeDescriptor(0, { addr: 2 ** 63, len: 1, flags: 0, next: 0 });
    popExpect(0, 'addr-too-large');
    drv.writeDescriptor(0, { addr: 2 ** 60, len: 16, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(0, 'addr-too-large');
  });

  it('indirect-nested: an INDIRECT descriptor inside an indirect table', () => {
    writeTable(TABLES, [
      { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: 1 },
      { addr: TABLES + 0x100, len: 16, flags: DESC_F_INDIRECT, next: 0 },
    ]);
    drv.writeDescriptor(0, { addr: TABLES, len: 32, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(0, 'indirect-nested');
  });

  it('indirect-next: INDIRECT together with NEXT', () => {
    writeTable(TABLES, [{ addr: BUF_A, len: 8, flags: 0, next: 0 }]);
    drv.writeDescriptor(0, { addr: TABLES, len: 16, flags: DESC_F_INDIRECT | DESC_F_NEXT, next: 1 });
    drv.writeDescriptor(1, { addr: BUF_A, len: 8, flags: 0, next: 0 });
    popExpect(0, 'indirect-next');
  });

  it('indirect-not-negotiated: INDIRECT without VIRTIO_RING_F_INDIRECT_DESC', () => {
    const q = new SplitQueue(fx.deviceMem, drv.layout, { eventIdx: false, name: 'noind', indirectDesc: false });
    writeTable(TABLES, [{ addr: BUF_A, len: 8, flags: 0, next: 0 }]);
    drv.writeDescriptor(0, { addr: TABLES, len: 16, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(0, 'indirect-not-negotiated', chain, q);
  });

  it('bad-indirect-len: zero, not a multiple of 16, or above the limit', () => {
    for (const len of [0, 8, 17, 16 * MAX_INDIRECT_ENTRIES + 16, 0xfffffff0]) {
      drv.writeDescriptor(0, { addr: TABLES, len, flags: DESC_F_INDIRECT, next: 0 });
      popExpect(0, 'bad-indirect-len');
    }
  });

  it('addr-outside-memory: an indirect table that leaves guest memory', () => {
    drv.writeDescriptor(0, { addr: MiB - 16, len: 32, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(0, 'addr-outside-memory');
    drv.writeDescriptor(0, { addr: 0x4000_0000, len: 16, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(0, 'addr-outside-memory');
  });

  it('desc-out-of-range: next inside an indirect table is bounded by its entry count, not the queue size', () => {
    writeTable(TABLES, [
      { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: 1 },
      { addr: BUF_A, len: 8, flags: DESC_F_NEXT, next: 2 }, // table has 2 entries
      { addr: BUF_A, len: 8, flags: 0, next: 0 },
    ]);
    drv.writeDescriptor(0, { addr: TABLES, len: 32, flags: DESC_F_INDIRECT, next: 0 });
    popExpect(0, 'desc-out-of-range');
    drv.writeDescriptor(0, { addr: TABLES, len: 48, flags: DESC_F_INDIRECT, next: 0 });
    drv.writeAvailRing(dev.lastAvailIdx & (QSIZE - 1), 0);
    drv.setAvailIdx(dev.lastAvailIdx + 1);
    expect(dev.pop(chain)).toBe(true);
    expect(chain.count).toBe(3);
  });

  it('a refused chain can be dropped with pushUsed(err.head, 0) and the queue keeps working', () => {
    drv.add([
      { gpa: BUF_A, len: 8, writable: true },
      { gpa: BUF_A, len: 8, writable: false },
    ], 'bad');
    drv.add([{ gpa: BUF_A, len: 8, writable: false }], 'good');
    drv.publish();
    const err = expectCode(() => dev.pop(chain), 'write-before-read');
    dev.pushUsed(err.head, 0);
    expect(dev.pop(chain)).toBe(true);
    dev.pushUsed(chain.head, 0);
    dev.flushUsed();
    expect(drv.pollUsed()!.token).toBe('bad');
    expect(drv.pollUsed()!.token).toBe('good');
    expect(drv.numFree).toBe(QSIZE);
  });
});
