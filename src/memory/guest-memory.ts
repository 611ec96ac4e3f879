import koffi from 'koffi';
import { VxError } from '../errors.js';

/**
 * Where one region of guest RAM is, in three address spaces: guest-physical (descriptors),
 * the frontend's virtual addresses (vring addresses in SET_VRING_ADDR), and ours.
 * Plain data, so it can be posted to datapath workers (the mapping itself is process-wide).
 */
export interface RegionInfo {
  gpa: number;
  size: number;
  /** Frontend (QEMU) virtual address of the region start. */
  uva: number;
  /** Our virtual address of the region start (mapping base + mmap_offset). */
  hostAddress: number;
  /** The region's file and where the region starts in it, for a second mapping (AF_XDP UMEM). */
  fd?: number;
  fileOffset?: number;
}

export interface GuestRegion extends RegionInfo {
  readonly bytes: Uint8Array;
  readonly view: DataView;
}

/** A guest or frontend address outside guest memory (code `guest-address`). */
export class GuestMemoryError extends VxError {
  constructor(message: string) {
    super('guest-address', message);
  }
}

/** Largest address we accept from the guest: beyond it a JS number could not hold gpa + len exactly. */
export const MAX_GUEST_ADDRESS = 2 ** 52;

/**
 * All guest memory access goes through here. Every lookup is clamped to one region: a buffer
 * that straddles two regions is refused rather than split (QEMU lays RAM out so that real
 * buffers never do).
 */
export class GuestMemory {
  readonly regions: readonly GuestRegion[];
  private last = 0;

  constructor(infos: readonly RegionInfo[]) {
    this.regions = infos.map((r) => {
      // SAFETY: hostAddress..+size is a live MAP_SHARED mapping owned by the session that built
      // this table; the table is dropped before that mapping is unmapped.
      const ab = koffi.view(r.hostAddress, r.size);
      return { ...r, bytes: new Uint8Array(ab), view: new DataView(ab) };
    });
  }

  get infos(): RegionInfo[] {
    return this.regions.map(({ gpa, size, uva, hostAddress }) => ({ gpa, size, uva, hostAddress }));
  }

  /** Index of the region that holds all of [gpa, gpa+len), or -1. len 0 is treated as 1. */
  find(gpa: number, len: number): number {
    // 2^52 (MAX_GUEST_ADDRESS) as a literal: this runs for every descriptor.
    if (!(gpa >= 0) || !(len >= 0) || gpa + len > 0x10000000000000) return -1;
    const end = gpa + (len === 0 ? 1 : len);
    const regs = this.regions;
    const hint = regs[this.last];
    // `!== undefined`, not truthiness: testing an object for truthiness costs V8 a dozen
    // checks (false, '', HeapNumber, BigInt...) on every descriptor.
    if (hint !== undefined && gpa >= hint.gpa && end <= hint.gpa + hint.size) return this.last;
    for (let i = 0; i < regs.length; i++) {
      const r = regs[i]!;
      if (gpa >= r.gpa && end <= r.gpa + r.size) {
        this.last = i;
        return i;
      }
    }
    return -1;
  }

  /** Region holding [gpa, gpa+len); throws GuestMemoryError when there is none. */
  regionFor(gpa: number, len: number): GuestRegion {
    const i = this.find(gpa, len);
    if (i < 0) throw new GuestMemoryError(`guest range 0x${gpa.toString(16)}+${len} is outside guest memory`);
    return this.regions[i]!;
  }

  /** Our virtual address of guest-physical gpa, for iovecs handed to the kernel. */
  translate(gpa: number, len: number): number {
    const r = this.regionFor(gpa, len);
    return r.hostAddress + (gpa - r.gpa);
  }

  /** A view (no copy) of [gpa, gpa+len). */
  slice(gpa: number, len: number): Uint8Array {
    const r = this.regionFor(gpa, len);
    const off = gpa - r.gpa;
    return r.bytes.subarray(off, off + len);
  }

  /** Frontend virtual address → guest-physical, clamped to one region. */
  uvaToGpa(uva: number, len: number): number {
    if (!(uva >= 0) || !(len >= 0) || uva + len > MAX_GUEST_ADDRESS) {
      throw new GuestMemoryError(`frontend address 0x${uva.toString(16)} is out of range`);
    }
    for (const r of this.regions) {
      if (uva >= r.uva && uva + len <= r.uva + r.size) return r.gpa + (uva - r.uva);
    }
    throw new GuestMemoryError(`frontend address 0x${uva.toString(16)}+${len} is in no region`);
  }
}

/** Reads a little-endian u64 as a number; returns -1 when it exceeds MAX_GUEST_ADDRESS. */
export function readAddress(view: DataView, off: number): number {
  const lo = view.getUint32(off, true);
  const hi = view.getUint32(off + 4, true);
  // MAX_GUEST_ADDRESS / 2^32 as a literal: a module constant is a cell load and a TDZ check per call.
  if (hi >= 0x100000) return -1;
  return hi * 2 ** 32 + lo;
}
