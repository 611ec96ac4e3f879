import { ArgumentError } from '../errors.js';
import { raw, MAP_FAILED, MAP_PRIVATE, MAP_ANONYMOUS, PROT_READ, PROT_WRITE, SysError, lastErrno, Errno } from '../sys/libc.js';
import { remapSharedAt, mapFileAt, XDP_PACKET_HEADROOM, XDP_UMEM_MIN_CHUNK_SIZE } from '../sys/xsk.js';
import type { RegionInfo } from '../memory/guest-memory.js';
import type { UmemRegion, XskUmemInfo } from './xsk-queue.js';

// Guest RAM as an AF_XDP UMEM, and the pinned-memory quota that bounds it: what XskPort lays
// out per memory table, apart from the link, the program and the sockets.

export const PAGE = 4096;
/** Placement alignment of guest regions inside the UMEM (the hugetlbfs page size). */
const HUGE = 2 << 20;
const MiB = 1024 * 1024;
/** The pin limit when none is given. */
export const DEFAULT_PIN_LIMIT = 4096 * MiB;
/** Largest pin limit accepted (a sanity bound, far above any guest this host can run). */
export const MAX_PIN_LIMIT = 2 ** 40;

/** The UMEM chunk that holds the headroom and a frame of maxFrame bytes: 2 KiB, or a page. */
export function umemChunkSize(maxFrame: number): number {
  return maxFrame + XDP_PACKET_HEADROOM <= XDP_UMEM_MIN_CHUNK_SIZE ? XDP_UMEM_MIN_CHUNK_SIZE : PAGE;
}

/**
 * A virtual range laid out as [private bounce chunks][gap][region 0][gap][region 1]...: the
 * regions are second mappings of the guest's memfd pages (mremap of the session's mapping),
 * so the kernel writes received frames straight into guest RAM. The gap before each region is
 * private memory at least one frameOffset long: a guest buffer at the very start of a region
 * then still has its chunk (which starts frameOffset before the frame) inside the UMEM, and
 * nothing of another region lies in that headroom.
 */
export class GuestUmem {
  readonly info: XskUmemInfo;
  private released = false;

  private constructor(info: XskUmemInfo) {
    this.info = info;
  }

  static create(regions: readonly RegionInfo[], opts: { maxFrame: number; bounceBytes: number; pinLimitBytes: number }): GuestUmem {
    const chunkSize = umemChunkSize(opts.maxFrame);
    if (opts.maxFrame + XDP_PACKET_HEADROOM > chunkSize) {
      throw new ArgumentError(`xsk umem: frames of ${opts.maxFrame} bytes do not fit a ${chunkSize}-byte chunk (MTU too large for AF_XDP without multi-buffer)`);
    }
    // The headroom shrinks the largest frame the kernel will write to exactly maxFrame.
    const headroom = chunkSize - XDP_PACKET_HEADROOM - opts.maxFrame;
    const frameOffset = headroom + XDP_PACKET_HEADROOM;
    // Regions sit at 2 MiB-aligned places: a second mapping of a hugetlbfs file must be.
    const gap = roundUp(frameOffset, HUGE);
    const bounce = roundUp(opts.bounceBytes, PAGE);
    // Regions whose mapping is not page-aligned cannot be remapped; their buffers bounce.
    const usable = regions.filter((r) => r.hostAddress % PAGE === 0 && r.size % PAGE === 0 && r.size > 0);
    let length = roundUp(bounce, HUGE);
    for (const r of usable) length += gap + roundUp(r.size, HUGE);
    const fullLength = length;
    const zeroCopy = usable.length > 0 && length <= opts.pinLimitBytes;
    // Bounce-only maps no guest file: page alignment is enough there.
    if (!zeroCopy) length = bounce + roundUp(frameOffset, PAGE);
    if (length > opts.pinLimitBytes) {
      throw new SysError('xsk umem', Errno.ENOMEM, `bounce area of ${length} bytes exceeds the pin limit of ${opts.pinLimitBytes}`);
    }
    // Reserve 2 MiB more than needed, then use the first 2 MiB-aligned address in it.
    const slack = zeroCopy ? HUGE : 0;
    const reserved = raw.mmap(0, length + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (reserved === MAP_FAILED) throw new SysError('mmap', lastErrno(), `UMEM reservation of ${length} bytes`);
    const address = zeroCopy ? roundUp(reserved, HUGE) : reserved;
    if (address > reserved) raw.munmap(reserved, address - reserved);
    if (slack > 0 && reserved + slack > address) raw.munmap(address + length, reserved + slack - address);
    const placed: UmemRegion[] = [];
    try {
      if (zeroCopy) {
        let off = roundUp(bounce, HUGE);
        for (const r of usable) {
          off += gap;
          // The region's own file mapped once more (hugetlbfs refuses mremap of its mappings);
          // mremap of our mapping when the file is unknown.
          if (r.fd !== undefined) mapFileAt(r.fd, r.fileOffset ?? 0, r.size, address + off);
          else remapSharedAt(r.hostAddress, r.size, address + off);
          placed.push({ gpa: r.gpa, size: r.size, umemOffset: off });
          off += roundUp(r.size, HUGE);
        }
      }
    } catch (e) {
      raw.munmap(address, length);
      throw e;
    }
    let bounceReason: string | null = null;
    if (!zeroCopy) {
      bounceReason = usable.length === 0
        ? 'no guest memory region is page-aligned'
        : `guest RAM needs ${fullLength} bytes pinned, over the pin limit of ${opts.pinLimitBytes}`;
    }
    return new GuestUmem({
      address, length, chunkSize, headroom, frameOffset, maxFrame: opts.maxFrame, regions: placed,
      mode: zeroCopy ? 'zero-copy' : 'bounce', bounceReason,
    });
  }

  /** Unmaps our second view of guest RAM (the kernel keeps its own pins until the last socket closes). */
  release(): void {
    if (this.released) return;
    this.released = true;
    raw.munmap(this.info.address, this.info.length);
  }
}

function roundUp(v: number, a: number): number {
  return Math.ceil(v / a) * a;
}

/** The outcome of a pin limit change. */
export interface PinLimitChange {
  limit: number;
  /** Bytes pinned now (unchanged by the call). */
  pinned: number;
  warnings: string[];
}

/**
 * The smallest pin limit a port can run under: its bounce-only UMEM at the largest chunk any
 * MTU can bring (a page), so a later MTU change cannot push the bounce area over the limit.
 */
export function minPinLimit(queuePairs: number, bounceChunks: number): number {
  return queuePairs * 2 * bounceChunks * PAGE + PAGE;
}

/** Throws a RangeError saying why `bytes` cannot be the pin limit of a port of this geometry. */
export function checkPinLimit(bytes: number, queuePairs: number, bounceChunks: number): number {
  const min = minPinLimit(queuePairs, bounceChunks);
  if (!Number.isSafeInteger(bytes) || bytes < min || bytes > MAX_PIN_LIMIT) {
    throw new RangeError(`pin limit ${bytes} must be an integer in ${min}..${MAX_PIN_LIMIT} bytes (${(min / 1024).toFixed(0)} KiB..1 TiB; the minimum is the bounce area of ${queuePairs} queue pair(s))`);
  }
  return bytes;
}
