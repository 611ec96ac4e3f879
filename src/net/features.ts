import { bit, F_PROTOCOL_FEATURES, ProtocolFeature } from '../vhost-user/protocol.js';

/** virtio-net feature bits (virtio 1.3, 5.1.3) and the transport bits we use. */
export const NetFeature = {
  CSUM: 0, GUEST_CSUM: 1, CTRL_GUEST_OFFLOADS: 2, MTU: 3, MAC: 5, GUEST_TSO4: 7, GUEST_TSO6: 8,
  GUEST_ECN: 9, GUEST_UFO: 10, HOST_TSO4: 11, HOST_TSO6: 12, HOST_ECN: 13, HOST_UFO: 14,
  MRG_RXBUF: 15, STATUS: 16, CTRL_VQ: 17, CTRL_RX: 18, CTRL_VLAN: 19, GUEST_ANNOUNCE: 21, MQ: 22,
  NOTIFY_ON_EMPTY: 24, ANY_LAYOUT: 27, RING_INDIRECT_DESC: 28, RING_EVENT_IDX: 29, VERSION_1: 32,
  RING_PACKED: 34,
} as const;

const F = NetFeature;

/**
 * What we offer. CTRL_VQ/CTRL_RX/GUEST_ANNOUNCE/MTU/MAC/STATUS are served by the frontend itself
 * (QEMU terminates the control queue), but QEMU masks bits the backend does not offer, so we
 * offer them. Not offered: UFO (the kernel dropped UFO), RING_PACKED (split ring only so far),
 * ACCESS_PLATFORM (no IOTLB). LOG_ALL is added by the session, which owns the dirty log.
 */
export const OFFERED_FEATURES: bigint = [
  F.CSUM, F.GUEST_CSUM, F.CTRL_GUEST_OFFLOADS, F.MTU, F.MAC, F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_ECN,
  F.HOST_TSO4, F.HOST_TSO6, F.HOST_ECN, F.MRG_RXBUF, F.STATUS, F.CTRL_VQ, F.CTRL_RX, F.GUEST_ANNOUNCE,
  F.MQ, F.NOTIFY_ON_EMPTY, F.ANY_LAYOUT, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX, F.VERSION_1,
  F_PROTOCOL_FEATURES,
].reduce((m, b) => m | bit(b), 0n);

/**
 * Protocol features: MQ, REPLY_ACK, NET_MTU, RARP, RESET_DEVICE, CONFIGURE_MEM_SLOTS.
 * Not yet: BACKEND_REQ/HOST_NOTIFIER (no backend-initiated messages), INFLIGHT_SHMFD (net does
 * not need crash-consistent inflight tracking: a lost in-flight frame is a dropped packet),
 * CONFIG (QEMU owns virtio-net config), STATUS, INBAND_NOTIFICATIONS. LOG_SHMFD and DEVICE_STATE
 * are added by the session for a backend with the migration hooks (docs/migration.md).
 */
export const OFFERED_PROTOCOL_FEATURES: bigint = [
  ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.NET_MTU, ProtocolFeature.RARP,
  ProtocolFeature.RESET_DEVICE, ProtocolFeature.CONFIGURE_MEM_SLOTS,
].reduce((m, b) => m | bit(b), 0n);

export function describeFeatures(f: bigint): string[] {
  const names: string[] = [];
  for (const [name, b] of Object.entries(NetFeature)) if (f & bit(b)) names.push(name);
  if (f & bit(F_PROTOCOL_FEATURES)) names.push('PROTOCOL_FEATURES');
  return names;
}
