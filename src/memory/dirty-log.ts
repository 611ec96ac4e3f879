import koffi from 'koffi';
import { MAX_GUEST_ADDRESS } from './guest-memory.js';

// The dirty log of live migration (QEMU docs/interop/vhost-user.rst, "Migration"): one bit per
// 4 KiB page of guest-physical memory, "page = addr / VHOST_LOG_PAGE; log[page / 8] |= 1 <<
// page % 8", in a shared memory area the frontend hands over with SET_LOG_BASE. The frontend
// reads and clears it while we mark ("Use atomic operations, as the log may be concurrently
// manipulated"), so every bit is set with a locked read-modify-write, never a plain store.

/** Bytes of guest memory one log bit stands for (VHOST_LOG_PAGE). */
export const VHOST_LOG_PAGE = 0x1000;
const PAGES_PER_BYTE = 8;

/**
 * Where a mapped log is, as plain data: it can be posted to datapath workers, which build their
 * own DirtyLog over the same process-wide mapping (as RegionInfo does for GuestMemory).
 */
export interface LogInfo {
  /** Our virtual address of the first log byte (the byte for guest pages 0..7). */
  hostAddress: number;
  /** Bytes of log. */
  size: number;
}

/** How one ring's used-ring writes are logged (VringConfig carries these fields). */
export interface UsedRingLog {
  /** VHOST_VRING_F_LOG was set in SET_VRING_ADDR: used-ring writes are logged. */
  logUsed: boolean;
  /** log_guest_addr of SET_VRING_ADDR: the address the used ring's first byte is logged at. */
  logGuestAddr: number;
}

/** Guest-physical bytes a log of `size` bytes covers. */
export function logCoverage(size: number): number {
  return size * PAGES_PER_BYTE * VHOST_LOG_PAGE;
}

/** Log bytes needed to cover guest addresses [0, end). */
export function logBytesFor(end: number): number {
  return end <= 0 ? 0 : Math.floor((end - 1) / VHOST_LOG_PAGE / PAGES_PER_BYTE) + 1;
}

/**
 * The one place guest writes are marked. The datapath holds `DirtyLog | null` and checks it once
 * per burst: with logging off it costs that branch and nothing else.
 */
export class DirtyLog {
  readonly info: LogInfo;
  readonly size: number;
  /** Guest-physical bytes covered: marks at or beyond this address are refused. */
  readonly coverage: number;
  /** Marks refused because (part of) the range lies outside the log; nothing was written for them. */
  refused = 0;
  private readonly bits: Uint8Array;

  constructor(info: LogInfo) {
    this.info = { hostAddress: info.hostAddress, size: info.size };
    this.size = info.size;
    this.coverage = Math.min(logCoverage(info.size), MAX_GUEST_ADDRESS);
    // SAFETY: hostAddress..+size is a live MAP_SHARED mapping owned by the session that mapped
    // the log; the session hands out a new log (and the holder drops this one) before it unmaps.
    // Atomics work on this non-shared view: V8 emits locked instructions for Atomics.or.
    this.bits = new Uint8Array(koffi.view(info.hostAddress, info.size));
  }

  /**
   * Marks the pages of [gpa, gpa+len) dirty. Returns false (and counts) when the range is not
   * wholly inside the log, in which case no bit is set; len 0 marks nothing.
   */
  mark(gpa: number, len: number): boolean {
    if (!(gpa >= 0) || !(len >= 0) || gpa + len > this.coverage) {
      this.refused++;
      return false;
    }
    if (len === 0) return true;
    const first = Math.floor(gpa / VHOST_LOG_PAGE);
    const last = Math.floor((gpa + len - 1) / VHOST_LOG_PAGE);
    this.setPages(first, last);
    return true;
  }

  /**
   * Marks a write of `len` bytes at `offset` into a ring's used ring. Per the spec it is logged
   * at log_guest_addr + offset (not at the used ring's gpa), and only with VHOST_VRING_F_LOG.
   */
  markUsed(ring: UsedRingLog, offset: number, len: number): boolean {
    if (!ring.logUsed) return true;
    return this.mark(ring.logGuestAddr + offset, len);
  }

  /** Sets the bits of pages first..last (inclusive): partial head and tail bytes, whole bytes between. */
  private setPages(first: number, last: number): void {
    const b0 = Math.floor(first / PAGES_PER_BYTE);
    const b1 = Math.floor(last / PAGES_PER_BYTE);
    const headMask = (0xff << (first % PAGES_PER_BYTE)) & 0xff;
    const tailMask = 0xff >> (PAGES_PER_BYTE - 1 - (last % PAGES_PER_BYTE));
    if (b0 === b1) {
      Atomics.or(this.bits, b0, headMask & tailMask);
      return;
    }
    Atomics.or(this.bits, b0, headMask);
    for (let b = b0 + 1; b < b1; b++) Atomics.or(this.bits, b, 0xff);
    Atomics.or(this.bits, b1, tailMask);
  }

  /** Whether page p's bit is set (tests, diagnostics). */
  isDirty(gpa: number): boolean {
    const p = Math.floor(gpa / VHOST_LOG_PAGE);
    const b = Math.floor(p / PAGES_PER_BYTE);
    if (b >= this.size) return false;
    return (Atomics.load(this.bits, b) & (1 << (p % PAGES_PER_BYTE))) !== 0;
  }
}
