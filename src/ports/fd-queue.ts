import { raw, SysError, lastErrno, Errno } from '../sys/libc.js';
import type { HostQueue } from './port.js';

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

  transmit(iovAddress: number, iovCount: number): number {
    const n = raw.writev(this.fd, iovAddress, iovCount);
    if (n >= 0) return n;
    const e = lastErrno();
    if (e === Errno.EAGAIN || e === Errno.EINTR || e === Errno.ENOBUFS) return -1;
    throw new SysError(`writev(${this.what})`, e);
  }
}
