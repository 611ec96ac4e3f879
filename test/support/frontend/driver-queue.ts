import type { GuestMemory } from '../../../src/memory/guest-memory.js';

/**
 * The driver (guest) side of a split virtqueue, for the TypeScript test frontend: what the
 * Linux virtio_ring driver does, over a GuestMemory that maps the frontend's own memfd.
 *
 * Layout inside `mem` at baseGpa: descriptor table (16-byte aligned), avail ring right after
 * it, used ring at the next 4096-byte boundary (the legacy layout).
 *
 * Publishing is explicit: add()/addIndirect() write descriptors and avail ring entries but
 * not avail->idx; publish() makes everything added so far visible to the device at once
 * (one index store per batch, like the kernel's kick batching). Then needsKick() says whether
 * the device asked to be kicked for what was published since the previous needsKick().
 *
 * The driver trusts its own bookkeeping (free list, tokens) and keeps it in JS, never
 * reading it back from shared memory; the raw writers exist so fuzz tests can corrupt the
 * shared structures behind its back (after which only the raw API makes sense).
 */

export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;
export const AVAIL_F_NO_INTERRUPT = 1;
export const USED_F_NO_NOTIFY = 1;

export interface DriverBuffer {
  gpa: number;
  len: number;
  writable: boolean;
}

export interface RawDescriptor {
  addr: number;
  len: number;
  flags: number;
  next: number;
}

export interface UsedElement {
  head: number;
  len: number;
  token: unknown;
}

export interface DriverQueueOptions {
  eventIdx: boolean;
  /** Initial avail/used index (to exercise u16 wrap-around); the device must be given the same base. */
  startIdx?: number;
}

function alignUp(v: number, a: number): number {
  return Math.ceil(v / a) * a;
}

function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

export class DriverQueue {
  readonly layout: { size: number; descGpa: number; availGpa: number; usedGpa: number };
  readonly eventIdx: boolean;
  numFree: number;

  private readonly mem: GuestMemory;
  private readonly size: number;
  private readonly mask: number;
  private readonly view: DataView;
  private readonly descOff: number;
  private readonly availOff: number;
  private readonly usedOff: number;
  /** Free list and chain links, mirrored in JS (the shared table is not trusted for this). */
  private readonly nextFree: Int32Array;
  private readonly chainLength: Int32Array;
  private readonly tokens: unknown[];
  private freeHead = 0;
  /** avail->idx including unpublished adds. */
  private availShadow: number;
  private publishedAvail: number;
  private kickCheckedAvail: number;
  private lastUsed: number;
  private availFlags = 0;

  static bytesNeeded(size: number): number {
    return alignUp(DriverQueue.usedOffset(size) + 6 + 8 * size, 16);
  }

  private static usedOffset(size: number): number {
    return alignUp(16 * size + 6 + 2 * size, 4096);
  }

  constructor(mem: GuestMemory, baseGpa: number, size: number, opts: DriverQueueOptions) {
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new RangeError(`queue size ${size} is not a power of 2 in 1..32768`);
    }
    if (baseGpa % 4096 !== 0) throw new RangeError('baseGpa must be 4096-aligned');
    const total = DriverQueue.bytesNeeded(size);
    const region = mem.regionFor(baseGpa, total);
    const off = baseGpa - region.gpa;
    region.bytes.fill(0, off, off + total);
    this.mem = mem;
    this.view = region.view;
    this.size = size;
    this.mask = size - 1;
    this.eventIdx = opts.eventIdx;
    this.descOff = off;
    this.availOff = off + 16 * size;
    this.usedOff = off + DriverQueue.usedOffset(size);
    this.layout = {
      size,
      descGpa: baseGpa,
      availGpa: baseGpa + 16 * size,
      usedGpa: baseGpa + DriverQueue.usedOffset(size),
    };
    this.nextFree = new Int32Array(size);
    for (let i = 0; i < size; i++) this.nextFree[i] = i + 1 < size ? i + 1 : -1;
    this.chainLength = new Int32Array(size);
    this.tokens = new Array<unknown>(size).fill(undefined);
    this.numFree = size;
    const start = (opts.startIdx ?? 0) & 0xffff;
    this.availShadow = this.publishedAvail = this.kickCheckedAvail = this.lastUsed = start;
    this.view.setUint16(this.availOff + 2, start, true);
    this.view.setUint16(this.usedOff + 2, start, true);
    // With EVENT_IDX, ask for an interrupt on the first used element (used_event = start).
    if (this.eventIdx) this.setUsedEvent(start);
  }

  /**
   * Chains `buffers` through free descriptors in the given order (put readable ones first; the
   * order is not fixed up, so tests can build invalid chains) and queues the head in the avail
   * ring. Returns the head, or null when there are not enough free descriptors. Not visible to
   * the device until publish().
   */
  add(buffers: readonly DriverBuffer[], token?: unknown): number | null {
    const n = buffers.length;
    if (n === 0) throw new RangeError('a chain needs at least one buffer');
    if (n > this.numFree) return null;
    const head = this.freeHead;
    let idx = head;
    for (let i = 0; i < n; i++) {
      const b = buffers[i]!;
      const nxt = this.nextFree[idx]!;
      const last = i === n - 1;
      this.writeDescriptor(idx, {
        addr: b.gpa,
        len: b.len,
        flags: (last ? 0 : DESC_F_NEXT) | (b.writable ? DESC_F_WRITE : 0),
        next: last ? 0 : nxt,
      });
      if (!last) idx = nxt;
    }
    this.freeHead = this.nextFree[idx]!;
    this.numFree -= n;
    this.chainLength[head] = n;
    this.tokens[head] = token;
    this.queueHead(head);
    return head;
  }

  /**
   * Writes `buffers` as an indirect table at tableGpa (16 bytes each, chained with NEXT) and
   * queues one descriptor pointing at it. The table memory stays the caller's until pollUsed
   * returns this head.
   */
  addIndirect(buffers: readonly DriverBuffer[], tableGpa: number, token?: unknown): number | null {
    const n = buffers.length;
    if (n === 0) throw new RangeError('an indirect table needs at least one buffer');
    if (this.numFree < 1) return null;
    const table = this.mem.slice(tableGpa, 16 * n);
    const tv = new DataView(table.buffer, table.byteOffset, table.byteLength);
    for (let i = 0; i < n; i++) {
      const b = buffers[i]!;
      const last = i === n - 1;
      writeDesc(tv, 16 * i, {
        addr: b.gpa,
        len: b.len,
        flags: (last ? 0 : DESC_F_NEXT) | (b.writable ? DESC_F_WRITE : 0),
        next: last ? 0 : i + 1,
      });
    }
    const head = this.freeHead;
    this.freeHead = this.nextFree[head]!;
    this.numFree -= 1;
    this.writeDescriptor(head, { addr: tableGpa, len: 16 * n, flags: DESC_F_INDIRECT, next: 0 });
    this.chainLength[head] = 1;
    this.tokens[head] = token;
    this.queueHead(head);
    return head;
  }

  private queueHead(head: number): void {
    this.writeAvailRing(this.availShadow & this.mask, head);
    this.availShadow = (this.availShadow + 1) & 0xffff;
  }

  /** Makes every chain added so far visible to the device (writes avail->idx). */
  publish(): void {
    // Ring entries were stored before this index store; x86 keeps stores in order.
    this.view.setUint16(this.availOff + 2, this.availShadow, true);
    this.publishedAvail = this.availShadow;
  }

  /** Chains added but not yet published. */
  get unpublished(): number {
    return (this.availShadow - this.publishedAvail) & 0xffff;
  }

  /** Should the device be kicked for what was published since the last needsKick()? */
  needsKick(): boolean {
    Atomics.add(fenceCell, 0, 0); // avail->idx store before reading the device's suppression state
    const old = this.kickCheckedAvail;
    const now = this.publishedAvail;
    this.kickCheckedAvail = now;
    if (this.eventIdx) return needEvent(this.readAvailEvent(), now, old);
    return (this.view.getUint16(this.usedOff, true) & USED_F_NO_NOTIFY) === 0;
  }

  /** Used elements the device published that we have not consumed. */
  usedPending(): number {
    return (this.view.getUint16(this.usedOff + 2, true) - this.lastUsed) & 0xffff;
  }

  /**
   * Consumes one used element and frees its descriptors. Throws if the device returned a head
   * that is not an outstanding chain (a device bug the tests must see).
   */
  pollUsed(): UsedElement | null {
    if (this.usedPending() === 0) return null;
    const off = this.usedOff + 4 + 8 * (this.lastUsed & this.mask);
    const head = this.view.getUint32(off, true);
    const len = this.view.getUint32(off + 4, true);
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    if (head >= this.size || this.chainLength[head] === 0) {
      throw new Error(`device returned head ${head}, which is not an outstanding chain`);
    }
    const n = this.chainLength[head]!;
    let tail = head;
    for (let i = 1; i < n; i++) tail = this.nextFree[tail]!;
    this.nextFree[tail] = this.freeHead;
    this.freeHead = head;
    this.numFree += n;
    this.chainLength[head] = 0;
    const token = this.tokens[head];
    this.tokens[head] = undefined;
    if (this.eventIdx && this.interruptsWanted) this.setUsedEvent(this.lastUsed);
    return { head, len, token };
  }

  private interruptsWanted = true;

  /** Stops used-buffer notifications (NO_INTERRUPT flag; with EVENT_IDX, used_event is left behind). */
  disableInterrupts(): void {
    this.interruptsWanted = false;
    if (!this.eventIdx) this.setAvailFlags(this.availFlags | AVAIL_F_NO_INTERRUPT);
  }

  /**
   * Re-enables used-buffer notifications for the next used element. Returns true when nothing
   * is pending (safe to sleep until the call eventfd fires), false when the caller should poll
   * again first (a used element raced the enable).
   */
  enableInterrupts(): boolean {
    this.interruptsWanted = true;
    if (this.eventIdx) this.setUsedEvent(this.lastUsed);
    else this.setAvailFlags(this.availFlags & ~AVAIL_F_NO_INTERRUPT);
    Atomics.add(fenceCell, 0, 0);
    return this.usedPending() === 0;
  }

  // ---- raw access (fuzzing, crafted tests) ----

  writeDescriptor(index: number, d: RawDescriptor): void {
    if (!(index >= 0 && index < this.size)) throw new RangeError(`descriptor index ${index} >= ${this.size}`);
    writeDesc(this.view, this.descOff + 16 * index, d);
  }

  readDescriptor(index: number): RawDescriptor {
    const o = this.descOff + 16 * index;
    return {
      addr: this.view.getUint32(o, true) + this.view.getUint32(o + 4, true) * 2 ** 32,
      len: this.view.getUint32(o + 8, true),
      flags: this.view.getUint16(o + 12, true),
      next: this.view.getUint16(o + 14, true),
    };
  }

  /** Writes avail->idx directly (does not touch the driver's shadow). */
  setAvailIdx(n: number): void {
    this.view.setUint16(this.availOff + 2, n & 0xffff, true);
  }

  readAvailIdx(): number {
    return this.view.getUint16(this.availOff + 2, true);
  }

  writeAvailRing(slot: number, head: number): void {
    if (!(slot >= 0 && slot < this.size)) throw new RangeError(`avail slot ${slot} >= ${this.size}`);
    this.view.setUint16(this.availOff + 4 + 2 * slot, head & 0xffff, true);
  }

  setAvailFlags(flags: number): void {
    this.availFlags = flags & 0xffff;
    this.view.setUint16(this.availOff, this.availFlags, true);
  }

  /** used_event (avail ring tail): with EVENT_IDX, interrupt when used->idx passes this. */
  setUsedEvent(idx: number): void {
    this.view.setUint16(this.availOff + 4 + 2 * this.size, idx & 0xffff, true);
  }

  readUsedEvent(): number {
    return this.view.getUint16(this.availOff + 4 + 2 * this.size, true);
  }

  /** avail_event (used ring tail), written by the device. */
  readAvailEvent(): number {
    return this.view.getUint16(this.usedOff + 4 + 8 * this.size, true);
  }

  readUsedFlags(): number {
    return this.view.getUint16(this.usedOff, true);
  }

  readUsedIdx(): number {
    return this.view.getUint16(this.usedOff + 2, true);
  }

  /** Raw used element at slot (no bookkeeping). */
  readUsedRing(slot: number): { id: number; len: number } {
    const off = this.usedOff + 4 + 8 * (slot & this.mask);
    return { id: this.view.getUint32(off, true), len: this.view.getUint32(off + 4, true) };
  }

  /** Driver-side avail index including unpublished adds. */
  get availIdx(): number {
    return this.availShadow;
  }

  /** Next used index the driver will consume. */
  get lastUsedIdx(): number {
    return this.lastUsed;
  }
}

const fenceCell = new Int32Array(new SharedArrayBuffer(4));

function writeDesc(view: DataView, off: number, d: RawDescriptor): void {
  const addr = d.addr;
  view.setUint32(off, addr % 2 ** 32 >>> 0, true);
  view.setUint32(off + 4, Math.floor(addr / 2 ** 32) >>> 0, true);
  view.setUint32(off + 8, d.len >>> 0, true);
  view.setUint16(off + 12, d.flags & 0xffff, true);
  view.setUint16(off + 14, d.next & 0xffff, true);
}
