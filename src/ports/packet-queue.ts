import { raw, NativeBuffer, check, closeFd, SysError, lastErrno, Errno } from '../sys/libc.js';
import { FdQueue } from './fd-queue.js';

const AF_PACKET = 17;
const SOCK_RAW = 3;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_PACKET = 263;
const PACKET_VNET_HDR = 15;
const PACKET_QDISC_BYPASS = 20;
/** Linux 6.2+: a vnet header of a chosen size (12 = virtio_net_hdr_mrg_rxbuf, as the guest writes it). */
const PACKET_VNET_HDR_SZ = 24;
const SLL_SIZE = 20;

/** What a worker needs to open a packet queue (plain data: posted to workers). */
export interface PacketQueueConfig {
  kind: 'packet';
  ifname: string;
  ifindex: number;
  /** The guest's vnet header length (10 or 12): the socket consumes it on every frame. */
  headerLength: number;
}

/**
 * A transmit-only host queue: an AF_PACKET socket bound to one interface, frames written from
 * guest buffers (vnet header first, which the kernel checks as a tap does). Created with
 * protocol 0, it is never hooked into receive, so it is never readable and holds no frames.
 *
 * It carries the xsk port's reserved pair, which has no AF_XDP socket: a stock multi-queue
 * guest sends data there, and those frames must still reach the host.
 */
export class PacketQueue extends FdQueue {
  static open(cfg: PacketQueueConfig): PacketQueue {
    if (cfg.headerLength !== 10 && cfg.headerLength !== 12) {
      throw new SysError('packet queue', Errno.EINVAL, `vnet header length ${cfg.headerLength}`);
    }
    const fd = check(raw.socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), 'socket(AF_PACKET)');
    const b = new NativeBuffer(4096);
    try {
      const setInt = (opt: number, value: number, what: string) => {
        b.view.setInt32(0, value, true);
        if (raw.setsockopt(fd, SOL_PACKET, opt, b.address, 4) < 0) throw new SysError(`setsockopt(${what})`, lastErrno(), cfg.ifname);
      };
      if (cfg.headerLength === 10) setInt(PACKET_VNET_HDR, 1, 'PACKET_VNET_HDR');
      else setInt(PACKET_VNET_HDR_SZ, 12, 'PACKET_VNET_HDR_SZ');
      // Like an AF_XDP socket: straight to the driver, no qdisc in between.
      setInt(PACKET_QDISC_BYPASS, 1, 'PACKET_QDISC_BYPASS');
      b.bytes.fill(0, 0, SLL_SIZE);
      b.view.setUint16(0, AF_PACKET, true);
      b.view.setInt32(4, cfg.ifindex, true);
      check(raw.bind(fd, b.address, SLL_SIZE), 'bind(AF_PACKET)', cfg.ifname);
    } catch (e) {
      closeFd(fd);
      throw e;
    } finally {
      b.free();
    }
    return new PacketQueue(fd, `AF_PACKET ${cfg.ifname}`);
  }

  close(): void {
    closeFd(this.fd);
  }
}
