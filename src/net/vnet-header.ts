import { bit, hasBit } from '../vhost-user/protocol.js';
import { NetFeature as F } from './features.js';
import type { ChainReader, ChainWriter } from '../virtio/chain-io.js';
import type { DescriptorChain } from '../virtio/descriptor-chain.js';

/**
 * struct virtio_net_hdr (virtio 1.3, 5.1.6): the header in front of every frame, and every rule
 * about it. Little-endian:
 *   0 flags (u8)  1 gso_type (u8)  2 hdr_len  4 gso_size  6 csum_start  8 csum_offset
 *   10 num_buffers (u16; present with VERSION_1 or MRG_RXBUF)
 */
export const HDR_FLAGS = 0;
export const HDR_GSO_TYPE = 1;
export const HDR_HDR_LEN = 2;
export const HDR_GSO_SIZE = 4;
export const HDR_CSUM_START = 6;
export const HDR_CSUM_OFFSET = 8;
export const HDR_NUM_BUFFERS = 10;

export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VIRTIO_NET_HDR_GSO_NONE = 0;
export const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
export const VIRTIO_NET_HDR_GSO_UDP = 3;
export const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
export const VIRTIO_NET_HDR_GSO_UDP_L4 = 5;
export const VIRTIO_NET_HDR_GSO_ECN = 0x80;

/** Header requests a driver may make, by the features it acked (FrameFormat.txOffloads). */
export const TX_CSUM = 1; // VIRTIO_NET_F_CSUM
export const TX_TSO4 = 2; // VIRTIO_NET_F_HOST_TSO4
export const TX_TSO6 = 4; // VIRTIO_NET_F_HOST_TSO6
export const TX_ECN = 8; // VIRTIO_NET_F_HOST_ECN

/** Length of the header in front of every frame: 12 with VERSION_1 or MRG_RXBUF, else 10. */
export function vnetHeaderLength(f: bigint): number {
  return f & (bit(F.VERSION_1) | bit(F.MRG_RXBUF)) ? 12 : 10;
}

/** What guest TX headers may ask for, by the acked features. */
export function txOffloads(f: bigint): number {
  return (hasBit(f, F.CSUM) ? TX_CSUM : 0) | (hasBit(f, F.HOST_TSO4) ? TX_TSO4 : 0)
    | (hasBit(f, F.HOST_TSO6) ? TX_TSO6 : 0) | (hasBit(f, F.HOST_ECN) ? TX_ECN : 0);
}

/**
 * The header's flags (low byte) and gso_type (high byte) at the start of a TX chain; 0 without
 * a header. flags and gso_type are adjacent: one 16-bit load.
 */
export function headerRequests(r: ChainReader, ch: DescriptorChain, headerLength: number): number {
  return headerLength < 2 ? 0 : r.firstU16(ch);
}

/**
 * True when a header asks the device for work the driver did not negotiate (the spec forbids
 * it): a checksum without CSUM, TCPv4/v6 segmentation without HOST_TSO4/6, ECN without
 * HOST_ECN, and UDP segmentation (UFO, USO), which is never offered. Flag bits other than
 * NEEDS_CSUM are ignored, as the device must.
 */
export function unnegotiatedRequest(req: number, allowed: number): boolean {
  if ((req & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0 && (allowed & TX_CSUM) === 0) return true;
  const gso = (req >> 8) & 0xff;
  if ((gso & VIRTIO_NET_HDR_GSO_ECN) !== 0 && (allowed & TX_ECN) === 0) return true;
  const type = gso & ~VIRTIO_NET_HDR_GSO_ECN;
  if (type === VIRTIO_NET_HDR_GSO_NONE) return false;
  if (type === VIRTIO_NET_HDR_GSO_TCPV4) return (allowed & TX_TSO4) === 0;
  if (type === VIRTIO_NET_HDR_GSO_TCPV6) return (allowed & TX_TSO6) === 0;
  return true;
}

/**
 * Writes the header of a received frame the host delivered without one (AF_XDP): no checksum
 * or segmentation information (GSO_NONE, flags 0), and num_buffers when the layout has it.
 * Returns the bytes written (less than headerLength when the buffers are shorter).
 */
export function writeRxHeader(w: ChainWriter, headerLength: number, numBuffers: number): number {
  if (headerLength <= HDR_NUM_BUFFERS) return w.zero(headerLength);
  let n = w.zero(HDR_NUM_BUFFERS);
  n += w.writeU16(numBuffers);
  return n + w.zero(headerLength - HDR_NUM_BUFFERS - 2);
}

/**
 * Sets num_buffers in a header the host wrote (tap: its header has num_buffers 0) or we wrote;
 * the writer stands at the header's first byte. A 10-byte header has no such field: the bytes
 * at offset 10 are the frame's, and stay untouched.
 */
export function setNumBuffers(w: ChainWriter, headerLength: number, numBuffers: number): void {
  if (headerLength < HDR_NUM_BUFFERS + 2) return;
  w.skip(HDR_NUM_BUFFERS);
  w.writeU16(numBuffers);
}
