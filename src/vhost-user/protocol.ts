// Wire format of QEMU's docs/interop/vhost-user.rst: a 12-byte header (request, flags, size),
// then `size` bytes of payload, little-endian, with fds passed as SCM_RIGHTS on the header.

export const HEADER_SIZE = 12;
/** Largest payload any request we accept may carry (SET_MEM_TABLE with 8 regions is 264). */
export const MAX_PAYLOAD = 4096;

export const FLAG_VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;

export enum Request {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21,
  IOTLB_MSG = 22,
  SET_VRING_ENDIAN = 23,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  RESET_DEVICE = 34,
  VRING_KICK = 35,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
  SET_DEVICE_STATE_FD = 42,
  CHECK_DEVICE_STATE = 43,
}

export function requestName(id: number): string {
  return Request[id] ?? `UNKNOWN(${id})`;
}

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export enum ProtocolFeature {
  MQ = 0,
  LOG_SHMFD = 1,
  RARP = 2,
  REPLY_ACK = 3,
  NET_MTU = 4,
  BACKEND_REQ = 5,
  CROSS_ENDIAN = 6,
  CONFIG = 9,
  INFLIGHT_SHMFD = 12,
  RESET_DEVICE = 13,
  INBAND_NOTIFICATIONS = 14,
  CONFIGURE_MEM_SLOTS = 15,
  STATUS = 16,
  DEVICE_STATE = 19,
}

/** Virtio feature bit that says the backend speaks GET/SET_PROTOCOL_FEATURES. */
export const F_PROTOCOL_FEATURES = 30;
/** VHOST_F_LOG_ALL: dirty logging for live migration (offered when the backend takes a dirty log). */
export const F_LOG_ALL = 26;
/** SET_VRING_ADDR flags bit VHOST_VRING_F_LOG: used-ring writes are logged at log_guest_addr. */
export const VRING_F_LOG = 0;

export const bit = (n: number): bigint => 1n << BigInt(n);

export function hasBit(mask: bigint, n: number): boolean {
  return (mask & bit(n)) !== 0n;
}

/** Bits of a vring file descriptor message payload (SET_VRING_KICK/CALL/ERR). */
export const VRING_INDEX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;

/** Slots we announce in GET_MAX_MEM_SLOTS; also the SET_MEM_TABLE limit of the spec. */
export const MAX_MEM_REGIONS = 8;

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export function decodeHeader(b: Uint8Array): Header {
  const v = new DataView(b.buffer, b.byteOffset, HEADER_SIZE);
  return { request: v.getUint32(0, true), flags: v.getUint32(4, true), size: v.getUint32(8, true) };
}

export function encodeMessage(request: number, flags: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, payload.length, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

export function u64Payload(value: bigint | number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(value), true);
  return b;
}

export function vringStatePayload(index: number, num: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return b;
}

export interface VringAddr {
  index: number;
  flags: number;
  descUser: number;
  usedUser: number;
  availUser: number;
  logGuest: number;
}

export const VRING_ADDR_SIZE = 40;

export function vringAddrPayload(a: VringAddr): Uint8Array {
  const b = new Uint8Array(VRING_ADDR_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, a.index, true);
  v.setUint32(4, a.flags, true);
  v.setBigUint64(8, BigInt(a.descUser), true);
  v.setBigUint64(16, BigInt(a.usedUser), true);
  v.setBigUint64(24, BigInt(a.availUser), true);
  v.setBigUint64(32, BigInt(a.logGuest), true);
  return b;
}

/** SET_LOG_BASE payload: "Log description" (u64 log size, u64 log offset). */
export const LOG_DESC_SIZE = 16;

export function logDescPayload(size: number, offset: number): Uint8Array {
  const b = new Uint8Array(LOG_DESC_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(size), true);
  v.setBigUint64(8, BigInt(offset), true);
  return b;
}

/** SET_DEVICE_STATE_FD payload: "Device state transfer parameters" (u32 direction, u32 phase). */
export const DEVICE_STATE_PARAMS_SIZE = 8;

export interface MemoryRegionDesc {
  gpa: number;
  size: number;
  uva: number;
  mmapOffset: number;
}

export const MEMORY_REGION_SIZE = 32;

export function memoryRegionBytes(r: MemoryRegionDesc, into: DataView, off: number): void {
  into.setBigUint64(off, BigInt(r.gpa), true);
  into.setBigUint64(off + 8, BigInt(r.size), true);
  into.setBigUint64(off + 16, BigInt(r.uva), true);
  into.setBigUint64(off + 24, BigInt(r.mmapOffset), true);
}

export function memTablePayload(regions: readonly MemoryRegionDesc[]): Uint8Array {
  const b = new Uint8Array(8 + regions.length * MEMORY_REGION_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, regions.length, true);
  regions.forEach((r, i) => memoryRegionBytes(r, v, 8 + i * MEMORY_REGION_SIZE));
  return b;
}

export function singleRegionPayload(r: MemoryRegionDesc): Uint8Array {
  const b = new Uint8Array(8 + MEMORY_REGION_SIZE);
  memoryRegionBytes(r, new DataView(b.buffer), 8);
  return b;
}
