import { GuestMemory, type RegionInfo } from '../../src/memory/guest-memory.js';
import { SharedMapping, closeFd, memfdCreate } from '../../src/sys/libc.js';

export const MiB = 1 << 20;
/** The second region's gpa: above 4 GiB, so the u64 high word matters. */
export const HI = 0x1_0000_0000;

/**
 * Two 1 MiB memfds, each mapped twice: once for the "frontend" (driver) and once for the
 * "backend" (device), so host addresses differ between the two sides as they do with QEMU.
 */
export interface MemoryFixture {
  driverMem: GuestMemory;
  deviceMem: GuestMemory;
  release(): void;
}

export function makeMemoryFixture(tag: string): MemoryFixture {
  const fds: number[] = [];
  const maps: SharedMapping[] = [];
  const release = () => {
    for (const m of maps) m.unmap();
    for (const fd of fds) closeFd(fd);
  };
  try {
    const drv: RegionInfo[] = [];
    const dev: RegionInfo[] = [];
    for (const gpa of [0, HI]) {
      const fd = memfdCreate(`${tag}-${gpa}`, MiB);
      fds.push(fd);
      const a = new SharedMapping(fd, MiB, 0);
      maps.push(a);
      const b = new SharedMapping(fd, MiB, 0);
      maps.push(b);
      drv.push({ gpa, size: MiB, uva: a.address, hostAddress: a.address });
      dev.push({ gpa, size: MiB, uva: a.address, hostAddress: b.address });
    }
    return { driverMem: new GuestMemory(drv), deviceMem: new GuestMemory(dev), release };
  } catch (e) {
    release();
    throw e;
  }
}
