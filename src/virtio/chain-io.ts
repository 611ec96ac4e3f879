import type { GuestMemory } from '../memory/guest-memory.js';
import type { DescriptorChain } from './descriptor-chain.js';
import { writeU64 } from '../sys/u64.js';

const NO_I32 = new Int32Array(0);
const NO_F64 = new Float64Array(0);
const NO_U32 = new Uint32Array(0);
/** Below this many bytes a segment is copied byte by byte: no subarray is made (no allocation). */
const SMALL_COPY = 64;

/**
 * A position in a run of guest buffer segments: parallel (region, offset, length) arrays, as a
 * popped DescriptorChain holds them or as a datapath keeps them for buffers it handed to the
 * host (an RX stash, an AF_XDP in-flight table). The one place that walks segments, so every
 * copy in or out of guest buffers shares one set of bounds: nothing is touched past the last
 * segment's length, and each segment was clamped to one guest memory region when it was popped
 * (SplitQueue.pop → GuestMemory.find). Modelled on rust-vmm virtio-queue's descriptor_utils
 * Reader/Writer; reused per frame (re-aimed with over*), so the datapath allocates nothing.
 */
abstract class ChainCursor {
  protected region: Int32Array = NO_I32;
  protected offset: Float64Array = NO_F64;
  protected length: Uint32Array = NO_U32;
  /** Current segment, the end of the run, and the byte position inside the current segment. */
  protected seg = 0;
  protected end = 0;
  protected pos = 0;

  constructor(protected readonly mem: GuestMemory) {}

  /** Aims the cursor at segments [first, end) of the given arrays, at their first byte. */
  overSegments(region: Int32Array, offset: Float64Array, length: Uint32Array, first: number, end: number): this {
    this.region = region;
    this.offset = offset;
    this.length = length;
    this.seg = first;
    this.end = end;
    this.pos = 0;
    return this;
  }

  /** Bytes from the position to the end of the run. */
  get remaining(): number {
    let n = 0;
    for (let s = this.seg; s < this.end; s++) n += this.length[s]!;
    return n - this.pos;
  }

  /** Moves the position forward by up to n bytes; returns how many it moved. */
  skip(n: number): number {
    let done = 0;
    while (done < n && this.seg < this.end) {
      const left = this.length[this.seg]! - this.pos;
      if (left > n - done) {
        this.pos += n - done;
        return n;
      }
      done += left;
      this.seg++;
      this.pos = 0;
    }
    return done;
  }

  /**
   * Writes iovecs (16 bytes each: host address, length) for the rest of the run into `view`
   * from byte `at`, at most `max` of them, empty segments left out; returns how many. The
   * position does not move: the kernel, not this cursor, moves the bytes.
   */
  iovecs(view: DataView, at: number, max: number): number {
    let cnt = 0;
    let pos = this.pos;
    for (let s = this.seg; s < this.end && cnt < max; s++) {
      const len = this.length[s]! - pos;
      if (len > 0) {
        const o = at + cnt * 16;
        writeU64(view, o, this.mem.regions[this.region[s]!]!.hostAddress + this.offset[s]! + pos);
        view.setUint32(o + 8, len, true);
        view.setUint32(o + 12, 0, true);
        cnt++;
      }
      pos = 0;
    }
    return cnt;
  }

  /** Host address of the position (the caller knows the current segment holds what it needs). */
  get hostAddress(): number {
    return this.mem.regions[this.region[this.seg]!]!.hostAddress + this.offset[this.seg]! + this.pos;
  }

  /**
   * Copies up to len bytes between `buf` (from index `at`) and the run, into the guest when
   * `toGuest`; returns the count copied. Small pieces go byte by byte (no subarray allocated).
   */
  protected copy(buf: Uint8Array, at: number, len: number, toGuest: boolean): number {
    let done = 0;
    while (done < len && this.seg < this.end) {
      const s = this.seg;
      const take = Math.min(this.length[s]! - this.pos, len - done);
      const bytes = this.mem.regions[this.region[s]!]!.bytes;
      const off = this.offset[s]! + this.pos;
      const b = at + done;
      if (take < SMALL_COPY) {
        if (toGuest) for (let i = 0; i < take; i++) bytes[off + i] = buf[b + i]!;
        else for (let i = 0; i < take; i++) buf[b + i] = bytes[off + i]!;
      } else if (toGuest) {
        bytes.set(buf.subarray(b, b + take), off);
      } else {
        buf.set(bytes.subarray(off, off + take), b);
      }
      this.advance(take);
      done += take;
    }
    return done;
  }

  /** Moves n bytes on inside the current segment (n at most what is left of it). */
  protected advance(n: number): void {
    this.pos += n;
    if (this.pos >= this.length[this.seg]!) {
      this.seg++;
      this.pos = 0;
    }
  }

  /** Bytes left in the current segment. */
  get contiguous(): number {
    return this.seg < this.end ? this.length[this.seg]! - this.pos : 0;
  }
}

/** Reads guest buffers (the device-readable part of a chain, or any run of segments). */
export class ChainReader extends ChainCursor {
  /** Aims at the device-readable segments of a popped chain. */
  overReadable(ch: DescriptorChain): this {
    return this.overSegments(ch.region, ch.offset, ch.length, 0, ch.readableCount);
  }

  /**
   * The little-endian u16 at the start of a popped chain's readable part (0 past its end). One
   * load, the cursor left alone, when the first readable segment holds both bytes, as it does
   * for nearly every TX header; otherwise the reader is aimed at the chain and peeks.
   */
  firstU16(ch: DescriptorChain): number {
    if (ch.readableCount > 0 && ch.length[0]! >= 2) return this.mem.regions[ch.region[0]!]!.view.getUint16(ch.offset[0]!, true);
    return this.overReadable(ch).peekU16();
  }

  /** Copies up to len bytes into `into` from index `at`; returns the count copied (less at the end of the run). */
  read(into: Uint8Array, at: number, len: number): number {
    return this.copy(into, at, len, false);
  }

  /**
   * The little-endian u16 at the position without moving it; bytes past the end of the run
   * read as 0. One load when both bytes are in the current segment.
   */
  peekU16(): number {
    if (this.seg >= this.end) return 0;
    const s = this.seg;
    const r = this.mem.regions[this.region[s]!]!;
    const off = this.offset[s]! + this.pos;
    if (this.length[s]! - this.pos >= 2) return r.view.getUint16(off, true);
    let hi = 0;
    for (let n = s + 1; n < this.end; n++) {
      if (this.length[n]! === 0) continue;
      hi = this.mem.regions[this.region[n]!]!.bytes[this.offset[n]!]!;
      break;
    }
    return r.bytes[off]! | (hi << 8);
  }
}

/** Writes guest buffers (the device-writable part of a chain, or any run of segments). */
export class ChainWriter extends ChainCursor {
  /** Aims at the device-writable segments of a popped chain. */
  overWritable(ch: DescriptorChain): this {
    return this.overSegments(ch.region, ch.offset, ch.length, ch.readableCount, ch.count);
  }

  /** Copies up to len bytes from `from` (from index `at`); returns the count written (less at the end of the run). */
  write(from: Uint8Array, at: number, len: number): number {
    return this.copy(from, at, len, true);
  }

  /** Writes up to len zero bytes; returns the count written. */
  zero(len: number): number {
    let done = 0;
    while (done < len && this.seg < this.end) {
      const s = this.seg;
      const take = Math.min(this.length[s]! - this.pos, len - done);
      const off = this.offset[s]! + this.pos;
      this.mem.regions[this.region[s]!]!.bytes.fill(0, off, off + take);
      this.advance(take);
      done += take;
    }
    return done;
  }

  /** Writes a little-endian u16 (split over segments if it must be); returns the bytes written. */
  writeU16(value: number): number {
    let done = 0;
    while (done < 2 && this.seg < this.end) {
      const s = this.seg;
      if (this.length[s]! - this.pos === 0) { this.advance(0); continue; }
      this.mem.regions[this.region[s]!]!.bytes[this.offset[s]! + this.pos] = done === 0 ? value & 0xff : (value >> 8) & 0xff;
      this.advance(1);
      done++;
    }
    return done;
  }
}
