import { raw, NativeBuffer, check, closeFd, SOCK_RAW, SOCK_NONBLOCK, SOCK_CLOEXEC } from './libc.js';

const AF_PACKET = 17;
const SOL_PACKET = 263;
const PACKET_QDISC_BYPASS = 20;
/** sizeof(struct sockaddr_ll). */
export const SLL_SIZE = 20;
/** htons(ETH_P_ALL): receive every protocol. */
export const ETH_P_ALL_BE = 0x0300;

/**
 * A non-blocking AF_PACKET raw socket bound to one interface. It is created with protocol 0,
 * so it receives nothing until bind() narrows it to this interface (no frame from another
 * interface slips in between); `protocolBE` 0 keeps it out of receive for good (transmit only).
 */
export function openPacketSocket(ifindex: number, ifname: string, opts: { protocolBE: number; qdiscBypass?: boolean }): number {
  const fd = check(raw.socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), 'socket(AF_PACKET)');
  const b = new NativeBuffer(4096);
  try {
    if (opts.qdiscBypass) {
      b.view.setInt32(0, 1, true);
      check(raw.setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, b.address, 4), 'setsockopt(PACKET_QDISC_BYPASS)', ifname);
    }
    b.bytes.fill(0, 0, SLL_SIZE);
    b.view.setUint16(0, AF_PACKET, true);
    b.view.setUint16(2, opts.protocolBE, true);
    b.view.setInt32(4, ifindex, true);
    check(raw.bind(fd, b.address, SLL_SIZE), 'bind(AF_PACKET)', ifname);
  } catch (e) {
    closeFd(fd);
    throw e;
  } finally {
    b.free();
  }
  return fd;
}
