import { raw, NativeBuffer, closeFd, IOV_MAX } from '../sys/libc.js';
import { ArgumentError } from '../errors.js';
import { openPacketSocket } from '../sys/packet-socket.js';
import { readU64, writeU64 } from '../sys/u64.js';
import { FdQueue } from './fd-queue.js';

/** What a worker needs to open a packet queue (plain data: posted to workers). */
export interface PacketQueueConfig {
  kind: 'packet';
  ifname: string;
  ifindex: number;
  /** The guest's vnet header length: skipped, the frame after it is sent. */
  headerLength: number;
}

/**
 * A transmit-only host queue: an AF_PACKET socket bound to one interface, frames written from
 * guest buffers. Created with protocol 0, it is never hooked into receive, so it is never
 * readable and holds no frames.
 *
 * It carries the xsk port's reserved pair, which has no AF_XDP socket: a stock multi-queue
 * guest sends data there, and those frames must still reach the host. Its frames are plain
 * (an xsk device offers no checksum or segmentation offload, and the TX path refuses headers
 * that ask for them), so the vnet header is skipped rather than handed to the kernel: no
 * PACKET_VNET_HDR_SZ, which needs Linux 6.2 for the 12-byte header.
 */
export class PacketQueue extends FdQueue {
  /** The caller's iovecs, copied and moved past the header (theirs stay as they were). */
  private readonly iov = new NativeBuffer(IOV_MAX * 16);

  private constructor(fd: number, what: string, private readonly headerLength: number) {
    super(fd, what);
  }

  static open(cfg: PacketQueueConfig): PacketQueue {
    if (!Number.isInteger(cfg.headerLength) || cfg.headerLength < 0 || cfg.headerLength > 64) {
      throw new ArgumentError(`packet queue: vnet header length ${cfg.headerLength}`);
    }
    // Like an AF_XDP socket: straight to the driver, no qdisc in between.
    const fd = openPacketSocket(cfg.ifindex, cfg.ifname, { protocolBE: 0, qdiscBypass: true });
    return new PacketQueue(fd, `AF_PACKET ${cfg.ifname}`, cfg.headerLength);
  }

  override transmit(iovAddress: number, iovCount: number): number {
    if (!(iovCount > 0 && iovCount <= IOV_MAX)) return -1;
    raw.memcpy(this.iov.address, iovAddress, iovCount * 16);
    const v = this.iov.view;
    let skip = this.headerLength;
    let first = 0;
    while (skip > 0 && first < iovCount) {
      const len = readU64(v, first * 16 + 8);
      if (len <= skip) {
        skip -= len;
        first++;
      } else {
        writeU64(v, first * 16, readU64(v, first * 16) + skip);
        writeU64(v, first * 16 + 8, len - skip);
        skip = 0;
      }
    }
    // Nothing past the header: not a frame (the TX path counts those before they get here).
    if (first >= iovCount) return -1;
    return super.transmit(this.iov.address + first * 16, iovCount - first);
  }

  close(): void {
    closeFd(this.fd);
    this.iov.free();
  }
}
