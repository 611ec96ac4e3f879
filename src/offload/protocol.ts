// The offload wire protocol's vocabulary (docs/offload-protocol.md), shared by both sides:
// constants, command and status numbers, the 16-byte header, object names, and the shapes of
// decoded messages. The codecs are elsewhere: host-codec.ts (the backend decodes requests and
// encodes responses) and guest/codec.ts (the guest side encodes requests, decodes responses);
// both read and write through wire.ts.

import { malformed, Writer, encodeUtf8 } from './wire.js';
export type { ErrorDetail } from './errors.js';

/** The offload frames' EtherType (IEEE 802 local experimental 1), with all-zero MACs (§1). */
export const OFFLOAD_ETHERTYPE = 0x88b5;
/** 'V','X','D','P' in memory order: bytes 56 58 44 50, read as a little-endian u32. */
export const OFFLOAD_MAGIC = 0x50445856;
export const OFFLOAD_VERSION = 1;
export const HEADER_BYTES = 16;
export const RESPONSE_FLAG = 0x8000;
/** Largest message (offload header + payload) either side sends: 60 KiB. */
export const MAX_MESSAGE_BYTES = 60 * 1024;
/** Smallest response limit a guest may announce in CLAIM. */
export const MIN_RESPONSE_LIMIT = 1024;
export const MAX_REASON_BYTES = 512;
export const MAX_VERIFIER_LOG_BYTES = 16 * 1024;
export const MAX_LICENSE_BYTES = 128;
export const OBJ_NAME_BYTES = 16;

// Numbered from 0x0100 so no value coincides with a virtio-net control class (0..9 in
// virtio 1.3); these never travel on the control queue anyway.
export const Cmd = {
  CLAIM: 0x0101,
  CAPS: 0x0102,
  RELEASE: 0x0103,
  PROG_SET: 0x0110,
  PROG_UNSET: 0x0111,
  MAP_CREATE: 0x0120,
  MAP_FREE: 0x0121,
  ELEM_LOOKUP: 0x0130,
  ELEM_UPDATE: 0x0131,
  ELEM_DELETE: 0x0132,
  GET_FIRST_KEY: 0x0133,
  GET_NEXT_KEY: 0x0134,
  ELEM_LOOKUP_BATCH: 0x0140,
  ELEM_UPDATE_BATCH: 0x0141,
  ELEM_DELETE_BATCH: 0x0142,
  // The object path (§8): a whole libbpf object from guest userspace.
  OBJ_BEGIN: 0x0150,
  OBJ_CHUNK: 0x0151,
  OBJ_LOAD: 0x0152,
  OBJ_SHOW: 0x0153,
  OBJ_UNLOAD: 0x0154,
} as const;
type CmdName = keyof typeof Cmd;

const cmdNames = new Map<number, CmdName>(Object.entries(Cmd).map(([k, v]) => [v, k as CmdName]));
export function commandName(cmd: number): string {
  return cmdNames.get(cmd & ~RESPONSE_FLAG) ?? `0x${cmd.toString(16).padStart(4, '0')}`;
}

export const Status = {
  OK: 0,
  BAD_REQUEST: 1,
  UNSUPPORTED_VERSION: 2,
  UNKNOWN_COMMAND: 3,
  NOT_CLAIMED: 4,
  QUOTA_EXCEEDED: 5,
  HELPER_NOT_ALLOWED: 6,
  KFUNC_REFUSED: 7,
  KSYM_REFUSED: 8,
  TAIL_CALL_REFUSED: 9,
  BAD_MAP_HANDLE: 10,
  MAP_TYPE_REFUSED: 11,
  VERIFIER_REJECTED: 12,
  TOO_LARGE: 13,
  RATE_LIMITED: 14,
  NO_SUCH_ELEMENT: 15,
  ELEMENT_EXISTS: 16,
  KERNEL_ERROR: 17,
  LICENSE_REFUSED: 18,
  INSN_REFUSED: 19,
  MAP_IN_USE: 20,
  MAP_FULL: 21,
  /** Object path: the ELF object is malformed, hostile or not loadable (reason says why). */
  OBJECT_REFUSED: 22,
  /** More requests wait behind a pending one (an OBJ_LOAD's loader) than the host queues; retry once it is answered. */
  BUSY: 23,
  /** The pending OBJ_LOAD was cancelled by the operator (`offload detach`); nothing was loaded. */
  CANCELLED: 24,
} as const;
type StatusName = keyof typeof Status;
const statusNames = new Map<number, StatusName>(Object.entries(Status).map(([k, v]) => [v, k as StatusName]));
export function statusName(s: number): string {
  return statusNames.get(s) ?? `status ${s}`;
}

/** Which quota a QUOTA_EXCEEDED names (detail.a). */
export const QuotaId = {
  MAX_MAPS: 1,
  MAX_MAP_MEMORY: 2,
  MAX_ENTRIES: 3,
  MAX_PROG_INSNS: 4,
  MAX_KEY_SIZE: 5,
  MAX_VALUE_SIZE: 6,
  MAX_OBJECT_BYTES: 7,
} as const;

export const UpdateFlag = { ANY: 0, NOEXIST: 1, EXIST: 2 } as const;

export const ERROR_DETAIL_BYTES = 16;
export const NO_INSN = 0xffffffff;

// Fixed parts of request payloads (docs/offload-protocol.md §3), named once for both codecs
// and the dispatch table.
export const CLAIM_BYTES = 8;
export const MAP_CREATE_BYTES = 20 + OBJ_NAME_BYTES;
export const MAP_FREE_BYTES = 4;
/** u32 handle, u32 flags: the prefix of every element command. */
export const ELEM_PREFIX_BYTES = 8;
/** u32 handle, u32 flags, u32 max_count, u32 cursor_len. */
export const LOOKUP_BATCH_PREFIX_BYTES = 16;
/** u32 handle, u32 flags, u32 count. */
export const BATCH_PREFIX_BYTES = 12;
/** u32 flags, insn_count, map_count, license_len, char name[16]. */
export const PROG_SET_PREFIX_BYTES = 16 + OBJ_NAME_BYTES;
/** OBJ_BEGIN: u32 total_bytes, u32 flags, char name[16]. */
export const OBJ_BEGIN_BYTES = 8 + OBJ_NAME_BYTES;
/** OBJ_CHUNK: u32 offset, then the bytes. */
export const OBJ_CHUNK_PREFIX_BYTES = 4;
/** Program names on the object path are C function names: up to 63 of [A-Za-z0-9_.], NUL-padded to 64. */
export const PROG_NAME_BYTES = 64;
/** OBJ_LOAD: u32 flags, char prog_name[64]. */
export const OBJ_LOAD_BYTES = 4 + PROG_NAME_BYTES;
/** Most object bytes one OBJ_CHUNK carries: a whole message less the header and the offset. */
export const MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - HEADER_BYTES - OBJ_CHUNK_PREFIX_BYTES;

// ---------------------------------------------------------------------------------------
// Header

export interface Header { magic: number; version: number; command: number; seq: number; length: number }

/** Reads the 16-byte header without judging it (the dispatcher decides what a bad field means). */
export function readHeader(msg: Uint8Array): Header | null {
  if (msg.byteLength < HEADER_BYTES) return null;
  const v = new DataView(msg.buffer, msg.byteOffset, HEADER_BYTES);
  return {
    magic: v.getUint32(0, true), version: v.getUint16(4, true), command: v.getUint16(6, true),
    seq: v.getUint32(8, true), length: v.getUint32(12, true),
  };
}

export function writeHeader(out: Uint8Array, command: number, seq: number, length: number, version = OFFLOAD_VERSION): void {
  const v = new DataView(out.buffer, out.byteOffset, HEADER_BYTES);
  v.setUint32(0, OFFLOAD_MAGIC, true);
  v.setUint16(4, version, true);
  v.setUint16(6, command, true);
  v.setUint32(8, seq >>> 0, true);
  v.setUint32(12, length, true);
}

// ---------------------------------------------------------------------------------------
// Object names: "16 bytes: at most 15 characters of [A-Za-z0-9_.], NUL-padded; any byte
// after the first NUL must be zero" (§1 Limits).

export function decodeObjName(b: Uint8Array, field: string): string {
  const end = b.indexOf(0);
  if (end < 0) malformed('name-not-terminated', `${field} is not NUL-terminated within ${b.byteLength} bytes`);
  for (let i = end; i < b.byteLength; i++) if (b[i] !== 0) malformed('name-not-padded', `${field} has bytes after its NUL`);
  let s = '';
  for (let i = 0; i < end; i++) {
    const c = b[i]!;
    const ok = (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c === 0x5f || c === 0x2e;
    if (!ok) malformed('name-bad-char', `${field} byte ${i} (0x${c.toString(16)}) is not one of [A-Za-z0-9_.]`);
    s += String.fromCharCode(c);
  }
  return s;
}

export function encodeObjName(name: string, size = OBJ_NAME_BYTES): Uint8Array {
  const out = new Uint8Array(size);
  if (!/^[A-Za-z0-9_.]*$/.test(name) || name.length > size - 1) throw new RangeError(`name '${name}': at most ${size - 1} of [A-Za-z0-9_.]`);
  for (let i = 0; i < name.length; i++) out[i] = name.charCodeAt(i);
  return out;
}

/**
 * The PROG_SET payload (§3). Written by the guest's PROG_SET and by the migration state's
 * program section (migration-format.ts), which carries the program exactly as the guest sent
 * it; the host reads both with host-codec's decodeProgSet.
 */
export function encodeProgSetPayload(p: { license: string; insns: Uint8Array; mapHandles: readonly number[]; name?: string; flags?: number }): Uint8Array {
  const lic = encodeUtf8(p.license);
  if (p.insns.byteLength % 8 !== 0) throw new RangeError('instructions are not a multiple of 8 bytes');
  const w = new Writer(32 + 4 * p.mapHandles.length + lic.byteLength + p.insns.byteLength)
    .u32(p.flags ?? 0).u32(p.insns.byteLength / 8).u32(p.mapHandles.length).u32(lic.byteLength)
    .bytes(encodeObjName(p.name ?? ''));
  for (const h of p.mapHandles) w.u32(h);
  return w.bytes(lic).bytes(p.insns).finish();
}

// ---------------------------------------------------------------------------------------
// Decoded message shapes

export interface ClaimRequest { minVersion: number; maxVersion: number; maxResponseBytes: number }
export interface MapCreateRequest {
  type: number; keySize: number; valueSize: number; maxEntries: number; flags: number; name: string;
}
/**
 * Element requests share one prefix: u32 handle, u32 flags, then the map's key (and value)
 * bytes. The sizes depend on the map, so the decoder returns the rest and the map commands
 * check it against the map's geometry.
 */
export interface ElemRequest { handle: number; flags: number; data: Uint8Array }
/** ELEM_LOOKUP_BATCH: u32 handle, u32 flags(0), u32 max_count, u32 cursor_len, cursor. */
export interface LookupBatchRequest { handle: number; flags: number; maxCount: number; cursor: Uint8Array }
/** ELEM_UPDATE_BATCH: u32 handle, u32 flags, u32 count, keys[count], values[count]; DELETE: keys only. */
export interface UpdateBatchRequest { handle: number; flags: number; count: number; data: Uint8Array }
/**
 * PROG_SET: u32 flags(0), u32 insn_count, u32 map_count, u32 license_len, char name[16],
 * u32 map_handles[map_count], license[license_len] (no NUL), insns[insn_count * 8].
 * Map references: ld_imm64 with src_reg = 1 (BPF_PSEUDO_MAP_FD) and imm = guest handle, or
 * src_reg = 2 (BPF_PSEUDO_MAP_VALUE), imm = handle, second half's imm = value offset.
 */
export interface ProgSetRequest { flags: number; name: string; license: string; mapHandles: number[]; insns: Uint8Array }

/** OBJ_BEGIN: u32 total_bytes, u32 flags (0), char name[16]. */
export interface ObjBeginRequest { totalBytes: number; flags: number; name: string }
/** OBJ_CHUNK: u32 offset (= bytes received so far), bytes. */
export interface ObjChunkRequest { offset: number; data: Uint8Array }
/** OBJ_LOAD: u32 flags (0), char prog_name[64] (empty: the object's first XDP program). */
export interface ObjLoadRequest { flags: number; progName: string }

export interface ObjShowMap { handle: number; type: number; keySize: number; valueSize: number; maxEntries: number; flags: number; name: string }
/** OBJ_SHOW body. */
export interface ObjShow { objName: string; progName: string; tag: string; progCount: number; possibleCpus: number; maps: ObjShowMap[] }

export interface Caps {
  version: number;
  maxRequestBytes: number;
  maxResponseBytes: number;
  maxProgInsns: number;
  maxMaps: number;
  maxEntries: number;
  maxKeySize: number;
  maxValueSize: number;
  maxOpsPerSec: number;
  verifierLogBytes: number;
  maxMapMemory: number;
  usedMaps: number;
  usedMapMemory: number;
  mapTypes: number[];
  helpers: number[];
}
