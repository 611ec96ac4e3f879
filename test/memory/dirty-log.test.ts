// The dirty log (src/memory/dirty-log.ts) over a real MAP_SHARED memfd mapping, as QEMU shares it:
// which bits a mark sets, what it refuses, and that marks survive a reader clearing the log
// concurrently from another thread (as QEMU's log sync does with an atomic exchange).
import { describe, test, expect, afterEach } from 'vitest';
import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { memfdCreate, SharedMapping, closeFd } from '../../src/sys/libc.js';
import { DirtyLog, VHOST_LOG_PAGE, logCoverage, logBytesFor } from '../../src/memory/dirty-log.js';

const PAGE = VHOST_LOG_PAGE;
const cleanups: (() => void)[] = [];

afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

/** A log of `size` bytes at `offset` into a memfd mapping, with guard bytes around it. */
function makeLog(size: number, offset = 64): { log: DirtyLog; bytes: Uint8Array; offset: number; mapping: SharedMapping } {
  const total = Math.ceil((offset + size + 64) / 4096) * 4096;
  const fd = memfdCreate('vx-dirty-log-test', total);
  const mapping = new SharedMapping(fd, total, 0);
  cleanups.push(() => { mapping.unmap(); closeFd(fd); });
  const log = new DirtyLog({ hostAddress: mapping.address + offset, size });
  return { log, bytes: new Uint8Array(mapping.buffer), offset, mapping };
}

/** Pages whose bit is set, read from the raw bytes. */
function setPages(bytes: Uint8Array, offset: number, size: number): number[] {
  const out: number[] = [];
  for (let b = 0; b < size; b++) for (let i = 0; i < 8; i++) if (bytes[offset + b]! & (1 << i)) out.push(b * 8 + i);
  return out;
}

function pagesOf(gpa: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) out.push(p);
  return out;
}

describe('DirtyLog marking', () => {
  test('a write inside one page sets that page\'s bit only; a write crossing a page boundary sets both', () => {
    const { log, bytes, offset } = makeLog(16);
    expect(log.mark(5 * PAGE + 100, 8)).toBe(true);
    expect(setPages(bytes, offset, 16)).toEqual([5]);
    expect(log.mark(2 * PAGE - 1, 2)).toBe(true);
    expect(setPages(bytes, offset, 16)).toEqual([1, 2, 5]);
  });

  test('a range crossing bytes of the log sets the partial head and tail bytes and every byte between', () => {
    const { log, bytes, offset } = makeLog(16);
    // Pages 6..29: head byte 0 (bits 6-7), bytes 1-2 whole, tail byte 3 (bits 0-5).
    log.mark(6 * PAGE + 1, 24 * PAGE - 2);
    expect(setPages(bytes, offset, 16)).toEqual(pagesOf(6 * PAGE + 1, 24 * PAGE - 2));
    expect([...bytes.subarray(offset, offset + 5)]).toEqual([0xc0, 0xff, 0xff, 0x3f, 0]);
  });

  test('random ranges set exactly the pages they touch (reference: one bit per page, page = addr / 4096)', () => {
    const size = 64;
    const { log, bytes, offset } = makeLog(size);
    let seed = 12345;
    const rnd = (n: number) => { seed = (seed * 1103515245 + 12345) >>> 0; return seed % n; };
    for (let round = 0; round < 500; round++) {
      bytes.fill(0, offset, offset + size);
      const gpa = rnd(logCoverage(size) - 1);
      const len = 1 + rnd(Math.min(logCoverage(size) - gpa, 40 * PAGE));
      expect(log.mark(gpa, len)).toBe(true);
      expect(setPages(bytes, offset, size)).toEqual(pagesOf(gpa, len));
    }
  });

  test('length 0 marks nothing', () => {
    const { log, bytes, offset } = makeLog(8);
    expect(log.mark(3 * PAGE, 0)).toBe(true);
    expect(setPages(bytes, offset, 8)).toEqual([]);
  });

  test('log size covers 8 pages per byte; logBytesFor rounds up to the byte holding the last address', () => {
    expect(logCoverage(1)).toBe(8 * PAGE);
    expect(logBytesFor(0)).toBe(0);
    expect(logBytesFor(1)).toBe(1);
    expect(logBytesFor(8 * PAGE)).toBe(1);
    expect(logBytesFor(8 * PAGE + 1)).toBe(2);
    expect(logBytesFor(2 ** 30)).toBe(2 ** 30 / PAGE / 8);
  });
});

describe('DirtyLog bounds', () => {
  test('a range past the log\'s end is refused and counted, and nothing is written (not even the part that fits)', () => {
    const size = 8;
    const { log, bytes, offset } = makeLog(size);
    const end = logCoverage(size);
    expect(log.mark(end - 1, 1)).toBe(true);
    expect(log.refused).toBe(0);
    bytes.fill(0, offset, offset + size);
    expect(log.mark(end - 1, 2)).toBe(false);
    expect(log.mark(end, 1)).toBe(false);
    expect(log.mark(2 ** 60, 1)).toBe(false);
    expect(log.refused).toBe(3);
    // Neither the log nor the guard bytes after it changed.
    expect(bytes.subarray(offset, offset + size + 64).every((b) => b === 0)).toBe(true);
  });

  test('negative, NaN and non-finite addresses or lengths are refused', () => {
    const { log } = makeLog(8);
    expect(log.mark(-1, 1)).toBe(false);
    expect(log.mark(Number.NaN, 1)).toBe(false);
    expect(log.mark(0, -5)).toBe(false);
    expect(log.mark(0, Number.POSITIVE_INFINITY)).toBe(false);
    expect(log.refused).toBe(4);
  });

  test('the bytes before the log are never touched by a mark at guest address 0', () => {
    const { log, bytes, offset } = makeLog(8, 100);
    log.mark(0, 8 * 8 * PAGE);
    expect(bytes.subarray(0, offset).every((b) => b === 0)).toBe(true);
    expect([...bytes.subarray(offset, offset + 8)]).toEqual(new Array(8).fill(0xff));
  });
});

describe('DirtyLog used ring (VHOST_VRING_F_LOG)', () => {
  test('without the flag used-ring writes are not logged; with it they are logged at log_guest_addr + offset', () => {
    const { log, bytes, offset } = makeLog(16);
    expect(log.markUsed({ logUsed: false, logGuestAddr: 3 * PAGE }, 0, 64)).toBe(true);
    expect(setPages(bytes, offset, 16)).toEqual([]);
    // used->idx at offset 2, an element crossing into the next page.
    log.markUsed({ logUsed: true, logGuestAddr: 10 * PAGE }, 2, 2);
    log.markUsed({ logUsed: true, logGuestAddr: 10 * PAGE }, PAGE - 4, 8);
    expect(setPages(bytes, offset, 16)).toEqual([10, 11]);
  });

  test('a used ring logged past the log\'s end is refused and counted', () => {
    const { log } = makeLog(1);
    expect(log.markUsed({ logUsed: true, logGuestAddr: 8 * PAGE }, 0, 4)).toBe(false);
    expect(log.refused).toBe(1);
  });
});

/**
 * Threads over one log, as in production: datapath workers marking (each its own DirtyLog over
 * the mapping, built from LogInfo) and QEMU exchanging words with 0. Runs `rounds` rounds; in each,
 * marker k marks the pages p with p % markers === k once, and the round counts pages that
 * neither the reader saw nor the log still holds.
 */
async function raceRounds(opts: { size: number; markers: number; reader: boolean; rounds: number }): Promise<{ missing: number; readerWords: number }> {
  const { size, markers, rounds } = opts;
  const { mapping } = makeLog(size, 0);
  // ctl: [0] round, [1] markers done, [2] stop, [3] words the reader took non-zero,
  // [4] pause asked (between rounds), [5] the reader is paused (holds no exchanged word).
  const ctl = new Int32Array(new SharedArrayBuffer(24));
  const seen = new Uint8Array(new SharedArrayBuffer(size));
  const koffiPath = createRequire(import.meta.url).resolve('koffi');
  const dirtyLogUrl = new URL('../../dist/src/memory/dirty-log.js', import.meta.url).href;
  const code = `
    const { parentPort, workerData: w } = require('node:worker_threads');
    const koffi = require(w.koffiPath);
    (async () => {
      const { DirtyLog } = await import(w.dirtyLogUrl);
      const ctl = w.ctl;
      parentPort.postMessage('ready');
      if (w.role === 'read') {
        // QEMU's log sync: exchange each 64-bit word with 0, keep what it held.
        const words = new BigInt64Array(koffi.view(w.address, w.size));
        const seen = new BigInt64Array(w.seen.buffer);
        while (Atomics.load(ctl, 2) === 0) {
          if (Atomics.load(ctl, 4) !== 0) {
            // Between passes every exchanged word is folded into seen: safe to count now.
            Atomics.store(ctl, 5, 1);
            Atomics.notify(ctl, 5);
            while (Atomics.load(ctl, 4) !== 0 && Atomics.load(ctl, 2) === 0) Atomics.wait(ctl, 4, 1, 50);
            Atomics.store(ctl, 5, 0);
            continue;
          }
          for (let i = 0; i < words.length; i++) {
            if (words[i] === 0n) continue;
            const v = Atomics.exchange(words, i, 0n);
            if (v !== 0n) { Atomics.or(seen, i, v); Atomics.add(ctl, 3, 1); }
          }
        }
        return;
      }
      const log = new DirtyLog({ hostAddress: w.address, size: w.size });
      const pages = w.size * 8;
      for (let r = 1; ; r++) {
        while (Atomics.load(ctl, 0) < r) { if (Atomics.load(ctl, 2)) return; Atomics.wait(ctl, 0, r - 1, 50); }
        for (let p = w.k; p < pages; p += w.markers) log.mark(p * 4096, 1);
        Atomics.add(ctl, 1, 1);
        Atomics.notify(ctl, 1);
      }
    })().catch((e) => { throw e; });
  `;
  const roles = [...Array.from({ length: markers }, (_, k) => ({ role: 'mark', k })), ...(opts.reader ? [{ role: 'read', k: -1 }] : [])];
  const workers = roles.map(({ role, k }) => new Worker(code, { eval: true, workerData: { koffiPath, dirtyLogUrl, ctl, seen, role, k, markers, address: mapping.address, size } }));
  try {
    await Promise.all(workers.map((w) => new Promise((resolve, reject) => { w.once('message', resolve); w.once('error', reject); })));
    const log = new Uint8Array(mapping.buffer, 0, size);
    let missing = 0;
    for (let r = 1; r <= rounds; r++) {
      // Between rounds only the reader runs, and the log is empty: no bit can move while we reset.
      log.fill(0);
      seen.fill(0);
      Atomics.store(ctl, 1, 0);
      Atomics.store(ctl, 4, 0);
      Atomics.notify(ctl, 4);
      // The reader's "paused" from the previous round must be gone before it counts again.
      while (opts.reader && Atomics.load(ctl, 5) !== 0) await new Promise((res) => setTimeout(res, 0));
      Atomics.store(ctl, 0, r);
      Atomics.notify(ctl, 0);
      while (Atomics.load(ctl, 1) < markers) await new Promise((res) => setTimeout(res, 0));
      if (opts.reader) {
        // The reader may hold a word it exchanged and not yet folded into seen: let it finish
        // its pass and stop, however long the scheduler keeps it off a core.
        Atomics.store(ctl, 4, 1);
        while (Atomics.load(ctl, 5) !== 1) await new Promise((res) => setTimeout(res, 0));
      }
      for (let b = 0; b < size; b++) if ((seen[b]! | Atomics.load(log, b)) !== 0xff) missing++;
    }
    return { missing, readerWords: Atomics.load(ctl, 3) };
  } finally {
    Atomics.store(ctl, 2, 1);
    Atomics.notify(ctl, 0);
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

describe('DirtyLog under concurrent threads', () => {
  test('two marking threads sharing every log byte lose no mark (a plain |= would: atomic bit sets)', async () => {
    const { missing } = await raceRounds({ size: 4096, markers: 2, reader: false, rounds: 40 });
    expect(missing).toBe(0);
  }, 60_000);

  test('no mark is lost while another thread reads and clears the log with atomic exchanges (as QEMU\'s log sync does)', async () => {
    const { missing, readerWords } = await raceRounds({ size: 4096, markers: 2, reader: true, rounds: 40 });
    expect(readerWords).toBeGreaterThan(0);
    expect(missing).toBe(0);
  }, 60_000);
});
