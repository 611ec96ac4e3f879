// The frontend's side of the migration dirty log: a memfd QEMU would hand over with
// SET_LOG_BASE, mapped here too so a test reads the bits the backend sets (one per 4 KiB page,
// "log[page / 8] |= 1 << page % 8") and clears them between rounds, as QEMU's sync does.
import { memfdCreate, SharedMapping, closeFd } from '../../../src/sys/libc.js';
import { logBytesFor, VHOST_LOG_PAGE } from '../../../src/memory/dirty-log.js';

/** A range of guest-physical memory. */
export interface GuestRange {
  gpa: number;
  len: number;
}

export class GuestLog {
  private readonly bits: Uint8Array;
  private closed = false;

  private constructor(readonly fd: number, readonly size: number, private readonly mapping: SharedMapping) {
    this.bits = new Uint8Array(mapping.buffer);
  }

  /** A log covering guest memory [0, memBytes), all clean. */
  static create(memBytes: number): GuestLog {
    const size = logBytesFor(memBytes);
    const fd = memfdCreate('vx-test-dirty-log', size);
    try {
      return new GuestLog(fd, size, new SharedMapping(fd, size, 0));
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  /** Page numbers whose bit is set. */
  dirtyPages(): Set<number> {
    const out = new Set<number>();
    for (let b = 0; b < this.size; b++) {
      const v = Atomics.load(this.bits, b);
      if (v === 0) continue;
      for (let k = 0; k < 8; k++) if (v & (1 << k)) out.add(b * 8 + k);
    }
    return out;
  }

  isDirty(gpa: number): boolean {
    const p = Math.floor(gpa / VHOST_LOG_PAGE);
    return (Atomics.load(this.bits, p >> 3) & (1 << (p & 7))) !== 0;
  }

  /** Clears every bit (QEMU's sync: read and clear). */
  clear(): void {
    for (let b = 0; b < this.size; b++) Atomics.store(this.bits, b, 0);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.mapping.unmap();
    closeFd(this.fd);
  }
}
