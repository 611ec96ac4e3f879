import { buildUdpFrame, parseUdpFrame, patternPayload, checkPatternPayload } from './packet-socket.js';

export const GUEST_MAC = '52:54:00:12:34:56';
export const HOST_MAC = '52:54:00:ab:cd:ef';

/** A UDP frame whose payload carries `seq` in a checkable pattern. */
export function udpFrame(seq: number, len: number, srcPort = 1000, src = GUEST_MAC, dst = HOST_MAC): Uint8Array {
  return buildUdpFrame({ srcMac: src, dstMac: dst, srcIp: '198.18.0.1', dstIp: '198.18.0.2', srcPort, dstPort: 9, payload: patternPayload(seq, len) });
}

/** The sequence number of a frame built by udpFrame, or null when it is not one (or is corrupted). */
export function seqOf(f: Uint8Array): number | null {
  const u = parseUdpFrame(f);
  return u ? checkPatternPayload(u.payload) : null;
}
