import { VxError } from '../errors.js';
import { SharedMapping, closeFd, fdInfo } from '../sys/libc.js';
import type { MemoryRegionDesc } from './protocol.js';
import { MAX_GUEST_ADDRESS, type RegionInfo } from '../memory/guest-memory.js';

interface Mapped {
  desc: MemoryRegionDesc;
  mapping: SharedMapping;
  fd: number;
}

export type MemoryTableErrorCode =
  | 'region-out-of-range' | 'empty-region' | 'region-overflow' | 'region-overlap'
  | 'region-not-memory-file' | 'region-file-too-small';

/** A memory region the frontend described cannot be mapped; the frontend's table is wrong, so no reconnect helps. */
export class MemoryTableError extends VxError {
  constructor(code: MemoryTableErrorCode, message: string) {
    super(code, message);
  }
}

/**
 * The frontend's memory regions mapped into this process. Owns the region fds and mappings;
 * produces RegionInfo lists for GuestMemory (here and in datapath workers).
 */
export class MemoryTable {
  private mapped: Mapped[] = [];

  get regionCount(): number { return this.mapped.length; }

  get descriptions(): MemoryRegionDesc[] { return this.mapped.map((m) => m.desc); }

  /** Checks a region description from the frontend before anything is mapped. */
  static validate(d: MemoryRegionDesc, existing: readonly MemoryRegionDesc[]): void {
    const fields: [string, number][] = [['guest_phys_addr', d.gpa], ['memory_size', d.size], ['userspace_addr', d.uva], ['mmap_offset', d.mmapOffset]];
    for (const [name, v] of fields) {
      if (!(v >= 0) || v > MAX_GUEST_ADDRESS) throw new MemoryTableError('region-out-of-range', `region ${name} 0x${v.toString(16)} out of range`);
    }
    if (d.size === 0) throw new MemoryTableError('empty-region', 'region of size 0');
    if (d.gpa + d.size > MAX_GUEST_ADDRESS || d.uva + d.size > MAX_GUEST_ADDRESS || d.mmapOffset + d.size > MAX_GUEST_ADDRESS) {
      throw new MemoryTableError('region-overflow', 'region end overflows');
    }
    for (const o of existing) {
      if (d.gpa < o.gpa + o.size && o.gpa < d.gpa + d.size) throw new MemoryTableError('region-overlap', `region at gpa 0x${d.gpa.toString(16)} overlaps another`);
    }
  }

  /** Maps one region; takes ownership of fd (closed on failure too). */
  add(d: MemoryRegionDesc, fd: number): void {
    try {
      MemoryTable.validate(d, this.mapped.map((m) => m.desc));
      const info = fdInfo(fd);
      // Touching a mapping past the end of its file is SIGBUS, not an error we could catch.
      if (info.kind !== 'file') throw new MemoryTableError('region-not-memory-file', 'region fd is not a memory file (memfd, shm or hugetlbfs)');
      if (d.mmapOffset + d.size > info.size) {
        throw new MemoryTableError('region-file-too-small', `region needs ${d.mmapOffset + d.size} bytes of its file, which has ${info.size}`);
      }
      const align = info.blockSize;
      const len = Math.ceil((d.mmapOffset + d.size) / align) * align;
      const mapping = new SharedMapping(fd, len, 0);
      this.mapped.push({ desc: d, mapping, fd });
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  /** Unmaps the region matching gpa/size/uva (REM_MEM_REG); false when there is none. */
  remove(d: MemoryRegionDesc): boolean {
    const i = this.mapped.findIndex((m) => m.desc.gpa === d.gpa && m.desc.size === d.size && m.desc.uva === d.uva);
    if (i < 0) return false;
    const [m] = this.mapped.splice(i, 1);
    m!.mapping.unmap();
    closeFd(m!.fd);
    return true;
  }

  infos(): RegionInfo[] {
    return this.mapped.map((m) => ({
      gpa: m.desc.gpa,
      size: m.desc.size,
      uva: m.desc.uva,
      hostAddress: m.mapping.address + m.desc.mmapOffset,
      fd: m.fd,
      fileOffset: m.desc.mmapOffset,
    }));
  }

  /** Releases this table's regions and takes over `other`'s (which is left empty). */
  replaceWith(other: MemoryTable): void {
    this.clear();
    this.mapped = other.mapped;
    other.mapped = [];
  }

  /** Takes over `other`'s regions in addition to this table's own (which `other` loses). */
  absorb(other: MemoryTable): void {
    this.mapped.push(...other.mapped);
    other.mapped = [];
  }

  /** Unmaps everything and closes the fds. Callers must have dropped every view first. */
  clear(): void {
    for (const m of this.mapped) {
      m.mapping.unmap();
      closeFd(m.fd);
    }
    this.mapped = [];
  }
}

