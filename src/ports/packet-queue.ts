import { closeFd, IOV_MAX } from '../sys/libc.js';
import { ArgumentError } from '../errors.js';
import { openPacketSocket } from '../sys/packet-socket.js';
import type { DescriptorChain } from '../virtio/descriptor-chain.js';
import { FdQueue } from './fd-queue.js';

/** What a worker needs to open a packet queue (plain data: posted to workers). */
export interface PacketQueueConfig {
  kind: 'packet';
  ifname: string;
  ifindex: number;
  /** The guest's vnet header length: skipped, the frame after it is sent (bind() sets it again from the device's format). */
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
  override readonly carriesHeader = false;

  private constructor(fd: number, what: string) {
    super(fd, what);
  }

  static open(cfg: PacketQueueConfig): PacketQueue {
    if (!Number.isInteger(cfg.headerLength) || cfg.headerLength < 0 || cfg.headerLength > 64) {
      throw new ArgumentError(`packet queue: vnet header length ${cfg.headerLength}`);
    }
    // Like an AF_XDP socket: straight to the driver, no qdisc in between.
    const fd = openPacketSocket(cfg.ifindex, cfg.ifname, { protocolBE: 0, qdiscBypass: true });
    const q = new PacketQueue(fd, `AF_PACKET ${cfg.ifname}`);
    q.headerLength = cfg.headerLength;
    return q;
  }

  /** The frame after the vnet header, wherever the descriptors split it. */
  protected override txIovecs(ch: DescriptorChain, iov: DataView): number {
    const r = this.reader!.overReadable(ch);
    r.skip(this.headerLength);
    return r.iovecs(iov, 0, IOV_MAX);
  }

  override close(): void {
    closeFd(this.fd);
    super.close();
  }
}
