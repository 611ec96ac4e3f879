import { raw, SysError, lastErrno, Errno } from '../sys/libc.js';
import type { HostQueue } from './port.js';

/** writev errors that mean "this frame is not going out": counted as a drop. */
const DROPPED = new Set([Errno.EAGAIN, Errno.EINTR, Errno.ENOBUFS, Errno.EMSGSIZE, Errno.ENETDOWN, Errno.ENXIO, Errno.EINVAL]);

/**
 * A host queue behind one fd that takes a frame per readv/writev (a tap queue, vnet header
 * first; a packet socket): the iovecs point straight into guest buffers.
 */
export class FdQueue implements HostQueue {
  constructor(readonly fd: number, private readonly what: string) {}

  receive(iovAddress: number, iovCount: number): number {
    const n = raw.readv(this.fd, iovAddress, iovCount);
    if (n >= 0) return n;
    const e = lastErrno();
    if (e === Errno.EAGAIN || e === Errno.EINTR) return -1;
    throw new SysError(`readv(${this.what})`, e);
  }

  /**
   * Frames the host cannot take now (full, link down) or at all (too large for its MTU) are
   * dropped, -1: a guest can send those at line rate, and an exception per frame costs more
   * than the frame.
   */
  transmit(iovAddress: number, iovCount: number): number {
    const n = raw.writev(this.fd, iovAddress, iovCount);
    if (n >= 0) return n;
    const e = lastErrno();
    if (DROPPED.has(e)) return -1;
    throw new SysError(`writev(${this.what})`, e);
  }
}
