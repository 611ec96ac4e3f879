import { GuestMemory, readAddress } from '../memory/guest-memory.js';
import { fullFence } from '../sys/fence.js';
import type { DirtyLog, UsedRingLog } from '../memory/dirty-log.js';
import { DescriptorChain } from './descriptor-chain.js';
import { VirtqueueError } from './errors.js';

export { DescriptorChain } from './descriptor-chain.js';
export { VirtqueueError } from './errors.js';
export type { VirtqueueErrorCode } from './errors.js';

/**
 * Descriptor flags (virtio 1.x 2.7.5). The walk uses the const enum: TypeScript inlines its
 * members as literals, while V8 loads an exported module constant from its cell (with a TDZ
 * check) on every use, a dozen instructions per descriptor that profiles of the TX path showed.
 */
const enum Desc { NEXT = 1, WRITE = 2, INDIRECT = 4 }
export const VIRTQ_DESC_F_NEXT = Desc.NEXT;
export const VIRTQ_DESC_F_WRITE = Desc.WRITE;
export const VIRTQ_DESC_F_INDIRECT = Desc.INDIRECT;
/** avail->flags: the driver does not want used-buffer notifications (ignored with EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** used->flags: the device does not want kicks (ignored with EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

export const MAX_QUEUE_SIZE = 32768;
/**
 * Largest indirect table we walk: 32768 entries (512 KiB), the largest queue size. Linux lets an
 * indirect table exceed the ring size, so the ring size is not the bound; the segment cap of the
 * DescriptorChain (default 1024) still limits what a chain may actually carry.
 */
export const MAX_INDIRECT_ENTRIES = 32768;

const U32_MAX = 0xffffffff;


export interface SplitQueueLayout {
  size: number;
  descGpa: number;
  availGpa: number;
  usedGpa: number;
}

export interface SplitQueueOptions {
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  eventIdx: boolean;
  /** For errors and logs, e.g. "dev0:rx0". */
  name: string;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated (default true). Without it INDIRECT is refused. */
  indirectDesc?: boolean;
}

/** Byte sizes of the three parts (spec 2.7: the event fields are always part of the layout). */
export function splitRingBytes(size: number): { desc: number; avail: number; used: number } {
  return { desc: 16 * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/**
 * virtio's vring_need_event: true when event_idx lies in [old, new), i.e. the entry at index
 * event_idx was among those published since the last check ("notify once you pass it"), all
 * in u16 arithmetic.
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

// Ring fields are little-endian. DataView accesses say so; the Atomics on avail->idx and
// used->idx go through a Uint16Array, which is host order.
if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error('vhost-xdp needs a little-endian host: virtqueue indices are accessed as native u16s');
}

/**
 * The device side of a virtio 1.x split virtqueue living in guest memory.
 *
 * Trust: the guest owns the descriptor table and avail ring and may change them at any time.
 * Every field is read exactly once into a local before it is checked, every buffer must lie
 * inside one guest memory region, and walks are bounded, so a hostile guest can make pop()
 * throw a VirtqueueError but never make it touch memory outside guest RAM or spin.
 *
 * Memory ordering: this runs in a single JS thread per queue, and V8 takes guest memory for
 * unshared, so plain DataView accesses promise no order between the two sides. The two
 * indices carry it: used->idx is published with Atomics.store, after the used element stores
 * (the smp_wmb of C implementations); avail->idx is read with Atomics.load, which the JIT may
 * neither cache nor move after the ring-entry reads it guards (the smp_rmb). The store→load
 * cases (flush then read used_event/flags; write avail_event then re-read avail->idx) get a
 * real fence (fullFence) inside needsNotify/setKickNotification.
 */
/** Segments kept when a used chain is walked again for the dirty log (as many as a chain may have). */
const MAX_LOG_SEGMENTS = 1024;

export class SplitQueue {
  readonly size: number;
  readonly name: string;
  readonly eventIdx: boolean;
  readonly indirectDesc: boolean;
  readonly layout: Readonly<SplitQueueLayout>;

  private readonly mem: GuestMemory;
  private readonly mask: number;
  // Views over exactly each ring, so ring offsets are small integers (an offset into a large
  // region is a double in V8, and every access then paid a float-to-int check).
  private readonly descView: DataView;
  private readonly availView: DataView;
  private readonly usedView: DataView;
  /**
   * avail->flags and avail->idx as u16 words, for Atomics.load. V8 believes this memory is not
   * shared (it is the guest's), so a DataView read of it may be merged with an earlier read or
   * scheduled after the ring-entry reads it guards; a sequentially consistent load is neither.
   */
  private readonly availHeader: Uint16Array;
  /** used->flags and used->idx, for the atomic publish of used->idx. */
  private readonly usedHeader: Uint16Array;

  private lastAvail = 0;
  /** Last avail->idx we read; entries in [lastAvail, shadowAvail) are known available. */
  private shadowAvail = 0;
  private used = 0;
  /** used->idx as last written by flushUsed. */
  private publishedUsed = 0;
  /** used idx at the last needsNotify (EVENT_IDX "old"); invalid until the first one. */
  private signalledUsed = 0;
  private signalledValid = false;
  /** The migration dirty log while logging is on (LOG_ALL acked and a log mapped), else null. */
  private log: DirtyLog | null = null;
  private usedLog: UsedRingLog = { logUsed: false, logGuestAddr: 0 };
  /** Scratch for re-walking a used chain to find the pages its bytes went to (logging only). */
  private logChain: DescriptorChain | null = null;
  /** Used entries whose chain could not be walked again for logging (a guest that broke it). */
  logMisses = 0;
  /** Where prefetchFrames leaves the bytes it read. */
  private prefetchSink = 0;

  constructor(mem: GuestMemory, layout: SplitQueueLayout, opts: SplitQueueOptions) {
    const { size, descGpa, availGpa, usedGpa } = layout;
    this.name = opts.name;
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new VirtqueueError('bad-queue-size', opts.name, `queue size ${size} is not a power of 2 in 1..${MAX_QUEUE_SIZE}`);
    }
    if (descGpa % 16 !== 0 || availGpa % 2 !== 0 || usedGpa % 4 !== 0) {
      throw new VirtqueueError(
        'misaligned-ring',
        opts.name,
        `rings must be aligned desc 16/avail 2/used 4: desc 0x${descGpa.toString(16)} avail 0x${availGpa.toString(16)} used 0x${usedGpa.toString(16)}`,
      );
    }
    const bytes = splitRingBytes(size);
    const place = (what: string, gpa: number, len: number): DataView => {
      const i = Number.isInteger(gpa) ? mem.find(gpa, len) : -1;
      if (i < 0) throw new VirtqueueError('ring-outside-memory', opts.name, `${what} ring 0x${gpa.toString(16)}+${len} is not inside one guest memory region`);
      const r = mem.regions[i]!;
      return new DataView(r.view.buffer, r.view.byteOffset + (gpa - r.gpa), len);
    };
    this.descView = place('descriptor', descGpa, bytes.desc);
    this.availView = place('avail', availGpa, bytes.avail);
    this.usedView = place('used', usedGpa, bytes.used);
    // The two indices that cross between the driver and us are accessed as atomic u16s, which
    // needs them at even host addresses; guest-physical alignment says nothing about an odd
    // region start in our mapping.
    for (const [what, gpa] of [['avail', availGpa], ['used', usedGpa]] as const) {
      if ((mem.translate(gpa, 4) & 1) !== 0) {
        throw new VirtqueueError('odd-host-address', opts.name, `${what} ring 0x${gpa.toString(16)} sits at an odd host address (its region's mmap offset is odd)`);
      }
    }
    this.availHeader = new Uint16Array(this.availView.buffer, this.availView.byteOffset, 2);
    this.usedHeader = new Uint16Array(this.usedView.buffer, this.usedView.byteOffset, 2);
    this.mem = mem;
    this.size = size;
    this.mask = size - 1;
    this.eventIdx = opts.eventIdx;
    this.indirectDesc = opts.indirectDesc ?? true;
    this.layout = Object.freeze({ size, descGpa, availGpa, usedGpa });
    // Resuming a ring (reconnect, migration): used->idx in guest memory is where we left off.
    this.used = this.publishedUsed = this.signalledUsed = this.usedView.getUint16(2, true);
  }

  /** Next avail ring index we will consume (SET_VRING_BASE / GET_VRING_BASE), u16. */
  get lastAvailIdx(): number {
    return this.lastAvail;
  }
  set lastAvailIdx(v: number) {
    this.lastAvail = this.shadowAvail = u16(v, this.name, 'lastAvailIdx');
  }

  /** Our shadow of used->idx (includes pushed but not yet flushed elements), u16. */
  get usedIdx(): number {
    return this.used;
  }
  set usedIdx(v: number) {
    this.used = this.publishedUsed = this.signalledUsed = u16(v, this.name, 'usedIdx');
    this.signalledValid = false;
  }

  /** Chains the driver has made available that we have not popped. Reads avail->idx. */
  availableCount(): number {
    const idx = Atomics.load(this.availHeader, 1);
    const n = (idx - this.lastAvail) & 0xffff;
    if (n > this.size) {
      throw new VirtqueueError('avail-idx-jump', this.name, `avail->idx ${idx} is ${n} ahead of last_avail_idx ${this.lastAvail} (queue size ${this.size})`);
    }
    this.shadowAvail = idx;
    return n;
  }

  /** Cheaper than availableCount() when chains are already known to be pending. */
  hasAvailable(): boolean {
    return this.lastAvail !== this.shadowAvail || this.availableCount() > 0;
  }

  /**
   * Reads one byte at the frame start (`skip` bytes in: past the vnet header) of up to `max` chains
   * the driver has made available, without taking them. The guest's core has just written those
   * lines; read one frame at a time they move to this core one miss after another, most of them
   * inside the kernel's copy (skb_store_bits for AF_XDP, copy_from_iter for a tap), which cannot
   * overlap them. Loads issued back to back here are independent, so the core has many misses in
   * flight at once and the walk and the kernel's copy then find the lines here. Measured on an
   * AMD EPYC VM: 1.80 -> 2.2 Mpps on the xsk port, 1.9 -> 2.46 on the tap (docs/benchmarks.md).
   *
   * Nothing here is trusted or kept: an entry that pop() would refuse is skipped (pop() reports
   * it), and every byte read lies inside a guest memory region. It never throws.
   */
  prefetchFrames(max: number, skip: number): void {
    const last = this.lastAvail;
    let n = (this.shadowAvail - last) & 0xffff;
    if (n < max) {
      try {
        n = this.availableCount();
      } catch (e) {
        if (e instanceof VirtqueueError) return; // avail-idx-jump: pop() reports it
        throw e;
      }
    }
    if (n > max) n = max;
    const { availView: a, descView: d, mask, size, mem } = this;
    let sink = 0;
    for (let i = 0; i < n; i++) {
      const head = a.getUint16(4 + 2 * ((last + i) & mask), true);
      if (head >= size) return;
      const off = head * 16;
      let addr = readAddress(d, off);
      const len = d.getUint32(off + 8, true);
      const flagsNext = d.getUint32(off + 12, true);
      if ((flagsNext & Desc.INDIRECT) !== 0) continue;
      let at = skip;
      if (len <= skip) {
        // The vnet header alone in its descriptor: the frame starts in the next one.
        const next = flagsNext >>> 16;
        if ((flagsNext & Desc.NEXT) === 0 || next >= size) continue;
        addr = readAddress(d, next * 16);
        at = 0;
      }
      if (addr < 0) continue;
      const r = mem.find(addr + at, 1);
      if (r < 0) continue;
      const reg = mem.regions[r]!;
      sink ^= reg.bytes[addr + at - reg.gpa]!;
    }
    // Kept, so the JIT cannot drop the loads as unused.
    this.prefetchSink = sink;
  }

  /**
   * Takes the next available chain into `chain`. Returns false when the ring is empty. Throws
   * VirtqueueError for a broken chain; the avail slot is consumed either way (see
   * VirtqueueError.head for dropping it).
   */
  pop(chain: DescriptorChain): boolean {
    const last = this.lastAvail;
    if (last === this.shadowAvail && this.availableCount() === 0) return false;
    const head = this.availView.getUint16(4 + 2 * (last & this.mask), true);
    this.lastAvail = (last + 1) & 0xffff;
    if (head >= this.size) {
      chain.reset();
      throw new VirtqueueError('head-out-of-range', this.name, `avail ring slot ${last & this.mask} holds head ${head} >= queue size ${this.size}`);
    }
    this.load(chain, head);
    return true;
  }

  /** Fills `chain` with the chain starting at descriptor `head` (< size), every bound checked. */
  private load(chain: DescriptorChain, head: number): void {
    chain.reset();
    chain.head = head;
    this.walk(chain, head);
  }

  private walk(chain: DescriptorChain, head: number): void {
    const mem = this.mem;
    const regions = mem.regions;
    const maxSegments = chain.maxSegments;
    const gpas = chain.gpa;
    const lengths = chain.length;
    const regionIdx = chain.region;
    const offsets = chain.offset;

    // Most chains are one plain descriptor (header and frame in one buffer): take it without the
    // loop's hop, order and sum bookkeeping, which cannot fail for a single segment.
    const d = this.descView;
    const off0 = head * 16;
    const flagsNext0 = d.getUint32(off0 + 12, true);
    if ((flagsNext0 & (Desc.NEXT | Desc.INDIRECT)) === 0) {
      const addr = readAddress(d, off0);
      const len = d.getUint32(off0 + 8, true);
      const writable = (flagsNext0 & Desc.WRITE) !== 0;
      // pop() left the chain empty: a zero-length buffer stays out of it.
      if (len === 0) return;
      if (addr < 0) throw this.fail('addr-too-large', `buffer address in descriptor ${head} is beyond 2^52`, head);
      const r = mem.find(addr, len);
      if (r < 0) throw this.fail('addr-outside-memory', `buffer 0x${addr.toString(16)}+${len} (descriptor ${head}) is not inside one guest memory region`, head);
      const reg = regions[r]!;
      const o = addr - reg.gpa;
      gpas[0] = addr;
      lengths[0] = len;
      regionIdx[0] = r;
      offsets[0] = o;
      chain.count = 1;
      if (writable) chain.writableBytes = len;
      else {
        chain.readableCount = 1;
        chain.readableBytes = len;
      }
      return;
    }

    let view = d;
    let base = 0;
    let entries = this.size;
    let inIndirect = false;
    let idx = head;
    let hops = 0;
    let count = 0;
    let readable = 0;
    let readableBytes = 0;
    let writableBytes = 0;
    let seenWritable = false;

    for (;;) {
      // Hop count, not a visited set: a chain longer than its table must revisit something.
      if (++hops > entries) {
        throw this.fail('chain-loop', `chain from head ${head} visits more than ${entries} descriptors${inIndirect ? ' of its indirect table' : ''}`, head);
      }
      const off = base + idx * 16;
      // Each field is read once; the guest may be rewriting them while we look.
      const addr = readAddress(view, off);
      const len = view.getUint32(off + 8, true);
      const flagsNext = view.getUint32(off + 12, true);
      const flags = flagsNext & 0xffff;
      const next = flagsNext >>> 16;

      if ((flags & Desc.INDIRECT) !== 0) {
        if (!this.indirectDesc) throw this.fail('indirect-not-negotiated', `descriptor ${idx} is INDIRECT but INDIRECT_DESC was not negotiated`, head);
        if (inIndirect) throw this.fail('indirect-nested', `indirect table of head ${head} holds another INDIRECT descriptor (${idx})`, head);
        if ((flags & Desc.NEXT) !== 0) throw this.fail('indirect-next', `descriptor ${idx} has both INDIRECT and NEXT`, head);
        if (len === 0 || (len & 15) !== 0 || len > 16 * MAX_INDIRECT_ENTRIES) {
          throw this.fail('bad-indirect-len', `indirect table length ${len} is not a non-zero multiple of 16 up to ${16 * MAX_INDIRECT_ENTRIES}`, head);
        }
        if (addr < 0) throw this.fail('addr-too-large', `indirect table address in descriptor ${idx} is beyond 2^52`, head);
        const r = mem.find(addr, len);
        if (r < 0) throw this.fail('addr-outside-memory', `indirect table 0x${addr.toString(16)}+${len} is not inside one guest memory region`, head);
        const reg = regions[r]!;
        view = reg.view;
        base = addr - reg.gpa;
        entries = len >>> 4;
        inIndirect = true;
        idx = 0;
        hops = 0;
        continue;
      }

      const writable = (flags & Desc.WRITE) !== 0;
      if (writable) seenWritable = true;
      else if (seenWritable) throw this.fail('write-before-read', `readable descriptor ${idx} follows a writable one`, head);

      if (len !== 0) {
        if (addr < 0) throw this.fail('addr-too-large', `buffer address in descriptor ${idx} is beyond 2^52`, head);
        const r = mem.find(addr, len);
        if (r < 0) throw this.fail('addr-outside-memory', `buffer 0x${addr.toString(16)}+${len} (descriptor ${idx}) is not inside one guest memory region`, head);
        if (writable) writableBytes += len;
        else {
          readableBytes += len;
          readable++;
        }
        // Used lengths are u32; doubles hold the exact sum, so the check cannot itself overflow.
        if (readableBytes + writableBytes > U32_MAX) throw this.fail('chain-too-large', `chain from head ${head} is longer than 2^32-1 bytes`, head);
        if (count >= maxSegments) throw this.fail('chain-too-long', `chain from head ${head} has more than ${maxSegments} segments`, head);
        const reg = regions[r]!;
        const o = addr - reg.gpa;
        gpas[count] = addr;
        lengths[count] = len;
        regionIdx[count] = r;
        offsets[count] = o;
        count++;
      }

      if ((flags & Desc.NEXT) === 0) break;
      if (next >= entries) {
        throw this.fail('desc-out-of-range', `descriptor ${idx} links to ${next} >= ${entries}${inIndirect ? ' (indirect table entries)' : ' (queue size)'}`, head);
      }
      idx = next;
    }

    chain.count = count;
    chain.readableCount = readable;
    chain.readableBytes = readableBytes;
    chain.writableBytes = writableBytes;
  }

  private fail(code: ConstructorParameters<typeof VirtqueueError>[0], detail: string, head: number): VirtqueueError {
    return new VirtqueueError(code, this.name, detail, head);
  }

  /** Writes a used element at usedIdx; the driver sees it only after flushUsed(). */
  pushUsed(head: number, len: number): void {
    if (!(head >= 0 && head < this.size && (head | 0) === head) || !(len >= 0 && len <= U32_MAX && Math.floor(len) === len)) {
      throw new VirtqueueError('bad-argument', this.name, `pushUsed(${head}, ${len}): head must be < ${this.size} and len a u32`);
    }
    const off = 4 + 8 * (this.used & this.mask);
    this.usedView.setUint32(off, head, true);
    this.usedView.setUint32(off + 4, len, true);
    this.used = (this.used + 1) & 0xffff;
  }

  /**
   * pushUsed(heads[i], 0) for i < n: the transmit side's return of chains the host is done with
   * (nothing written into them). The heads are the device's own cookies, popped here, yet each
   * is checked like pushUsed's, with one check per element instead of a call.
   */
  pushUsedHeads(heads: Int32Array, n: number): void {
    const v = this.usedView;
    const size = this.size;
    const mask = this.mask;
    let used = this.used;
    for (let i = 0; i < n; i++) {
      const head = heads[i]!;
      if (!(head >= 0 && head < size)) {
        this.used = used;
        throw new VirtqueueError('bad-argument', this.name, `pushUsed(${head}, 0): head must be < ${size}`);
      }
      const off = 4 + 8 * (used & mask);
      v.setUint32(off, head, true);
      v.setUint32(off + 4, 0, true);
      used = (used + 1) & 0xffff;
    }
    this.used = used;
  }

  /**
   * Publishes pushed elements by writing used->idx. An atomic store: the element stores above
   * may not be moved after it, by the JIT (which takes guest memory for unshared and owes plain
   * stores no order) or by a weakly ordered CPU. On x86 it costs one locked instruction per burst.
   */
  flushUsed(): void {
    const newIdx = this.used;
    const old = this.publishedUsed;
    // One predictable branch per burst while migration logging is off.
    if (this.log !== null) this.logUsedEntries(old, newIdx);
    Atomics.store(this.usedHeader, 1, newIdx);
    this.publishedUsed = newIdx;
    // More than 65535 elements since the last notify check: the u16 window no longer says
    // whether used_event was crossed, so notify unconditionally next time.
    if (((newIdx - this.signalledUsed) & 0xffff) < ((newIdx - old) & 0xffff)) this.signalledValid = false;
  }

  /**
   * Logging for live migration. Every byte the device writes into guest memory is reported to
   * the driver in a used element ("len: the total number of bytes written into the buffer",
   * virtio 1.2 §2.7.8): frames a tap readv or the kernel's AF_XDP path put there, headers,
   * bounce copies, offload replies. So this queue's used publishing is the one place that
   * marks them all, whatever path wrote them, and a new write path cannot forget to.
   */
  setDirtyLog(log: DirtyLog | null, usedLog: UsedRingLog = { logUsed: false, logGuestAddr: 0 }): void {
    this.log = log;
    this.usedLog = { logUsed: usedLog.logUsed, logGuestAddr: usedLog.logGuestAddr };
    if (log && !this.logChain) this.logChain = new DescriptorChain(MAX_LOG_SEGMENTS);
  }

  /**
   * Marks the pages written for used elements [from, to) and the used ring words themselves.
   * The chain is walked again from the descriptor table: the driver may not touch a chain it
   * made available before it is used (§2.7.13), so the walk sees what pop() saw; a driver that
   * breaks that rule only spoils its own migration, and the walk keeps every bound check.
   */
  private logUsedEntries(from: number, to: number): void {
    const log = this.log!;
    const ch = this.logChain!;
    const n = (to - from) & 0xffff;
    for (let i = 0; i < n; i++) {
      const slot = (from + i) & this.mask;
      const head = this.usedView.getUint32(4 + 8 * slot, true);
      let left = this.usedView.getUint32(8 + 8 * slot, true);
      if (left > 0) {
        try {
          this.load(ch, head);
          for (let k = ch.readableCount; k < ch.count && left > 0; k++) {
            const take = Math.min(ch.length[k]!, left);
            if (!log.mark(ch.gpa[k]!, take)) this.logMisses++;
            left -= take;
          }
        } catch (e) {
          if (!(e instanceof VirtqueueError)) throw e;
          this.logMisses++;
        }
      }
    }
    // The elements written, as one run of the ring (two when it wraps), then used->idx.
    const first = from & this.mask;
    const run = Math.min(n, this.size - first);
    if (!log.markUsed(this.usedLog, 4 + 8 * first, 8 * run)) this.logMisses++;
    if (run < n && !log.markUsed(this.usedLog, 4, 8 * (n - run))) this.logMisses++;
    if (!log.markUsed(this.usedLog, 2, 2)) this.logMisses++;
  }

  /** Pending pushUsed elements not yet flushed. */
  get unflushed(): number {
    return (this.used - this.publishedUsed) & 0xffff;
  }

  /** Un-pops the last n chains (they will be popped again, re-read from guest memory). */
  rewind(n: number): void {
    if (!Number.isInteger(n) || n < 0 || n > this.size) {
      throw new VirtqueueError('bad-argument', this.name, `rewind(${n}) outside 0..${this.size}`);
    }
    this.lastAvail = (this.lastAvail - n) & 0xffff;
    // Re-read avail->idx on the next pop so the avail-idx-jump check covers the rewound window.
    this.shadowAvail = this.lastAvail;
  }

  /**
   * Whether to signal the call eventfd for what flushUsed() published since the previous call.
   * Call it once after each flush and signal when it says so: it advances the "old" index
   * whatever the answer. Returns false when nothing was flushed since the previous call
   * (except for the first call after construction or a usedIdx reset, which says true with
   * EVENT_IDX as libvhost-user does).
   */
  needsNotify(): boolean {
    const newIdx = this.publishedUsed;
    const old = this.signalledUsed;
    const valid = this.signalledValid;
    this.signalledUsed = newIdx;
    this.signalledValid = true;
    // Nothing published since the last check: an interrupt would only be spurious.
    if (valid && newIdx === old) return false;
    fullFence(); // used->idx store must be visible before we read the driver's suppression state
    if (!this.eventIdx) {
      return (this.availView.getUint16(0, true) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (!valid) return true;
    const usedEvent = this.availView.getUint16(4 + 2 * this.size, true);
    return vringNeedEvent(usedEvent, newIdx, old);
  }

  /**
   * Asks the driver to kick (enabled) or not. With EVENT_IDX, enabling writes
   * avail_event = lastAvailIdx (kick when anything past what we consumed arrives); disabling
   * writes nothing, so the driver stops kicking once it passes the old avail_event.
   * The usual worker loop: setKickNotification(false); pop until empty; setKickNotification(true);
   * then re-check availableCount() before sleeping (a chain may have raced the enable). The
   * fence here orders that re-check after the store.
   */
  setKickNotification(enabled: boolean): void {
    if (this.eventIdx) {
      // Disabling writes nothing (the driver stops kicking once it passes the old avail_event),
      // so there is no store to order: no fence. The TX path disables at every burst.
      if (!enabled) return;
      this.usedView.setUint16(4 + 8 * this.size, this.lastAvail, true);
      // avail_event is a used-ring word too: logged like the elements (it may sit on a page
      // of its own, past the last element's).
      if (this.log !== null && !this.log.markUsed(this.usedLog, 4 + 8 * this.size, 2)) this.logMisses++;
    } else {
      this.usedView.setUint16(0, enabled ? 0 : VIRTQ_USED_F_NO_NOTIFY, true);
      if (this.log !== null && !this.log.markUsed(this.usedLog, 0, 2)) this.logMisses++;
    }
    fullFence();
  }
}

function u16(v: number, queue: string, what: string): number {
  if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new VirtqueueError('bad-argument', queue, `${what} ${v} is not a u16`);
  return v;
}
