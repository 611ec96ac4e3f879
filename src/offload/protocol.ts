// The offload wire protocol (docs/offload-protocol.md): constants and the codec for both
// directions. The backend decodes requests and encodes responses; the guest side (the TS
// test frontend, benches, docs examples) encodes requests and decodes responses. Decoders
// take untrusted bytes: every read is bounds-checked first and a malformed message becomes
// a ProtocolError carrying the status the peer should see, never an out-of-range read.

export const OFFLOAD_ETHERTYPE = 0x88b5;
/** 'V','X','D','P' in memory order: bytes 56 58 44 50, read as a little-endian u32. */
export const OFFLOAD_MAGIC = 0x50445856;
export const OFFLOAD_VERSION = 1;
export const HEADER_BYTES = 16;
export const RESPONSE_FLAG = 0x8000;
/** The frame the datapath wraps around a message: 12-byte vnet header + 14-byte Ethernet. */
export const VNET_HDR_BYTES = 12;
export const ETH_HDR_BYTES = 14;
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
} as const;
export type CmdName = keyof typeof Cmd;

const cmdNames = new Map<number, CmdName>(Object.entries(Cmd).map(([k, v]) => [v, k as CmdName]));
export function commandName(cmd: number): string {
  return cmdNames.get(cmd & ~RESPONSE_FLAG) ?? `0x${cmd.toString(16).padStart(4, '0')}`;
}
export function isKnownCommand(cmd: number): boolean {
  return cmdNames.has(cmd);
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
} as const;
export type StatusName = keyof typeof Status;
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
} as const;

export const UpdateFlag = { ANY: 0, NOEXIST: 1, EXIST: 2 } as const;

/** A request the backend refuses while decoding: the status and reason the guest gets. */
export class ProtocolError extends Error {
  readonly status: number;
  readonly detail: ErrorDetail;
  constructor(status: number, reason: string, detail: Partial<ErrorDetail> = {}) {
    super(reason);
    this.name = 'ProtocolError';
    this.status = status;
    this.detail = { a: detail.a ?? 0, b: detail.b ?? 0, c: detail.c ?? 0 };
  }
}

function bad(reason: string): never {
  throw new ProtocolError(Status.BAD_REQUEST, reason);
}

/** Fixed part of every failure response's body (meaning per status, see the spec). */
export interface ErrorDetail { a: number; b: number; c: number }
export const ERROR_DETAIL_BYTES = 16;
export const NO_INSN = 0xffffffff;

// ---------------------------------------------------------------------------------------
// Bounds-checked reader and a growable writer

export class Reader {
  private readonly v: DataView;
  private off = 0;
  constructor(readonly bytes: Uint8Array, private readonly what: string) {
    this.v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  get offset(): number { return this.off; }
  get remaining(): number { return this.bytes.byteLength - this.off; }
  need(n: number, field: string): void {
    if (!Number.isSafeInteger(n) || n < 0 || n > this.remaining) {
      bad(`${this.what}: ${field} needs ${n} bytes, ${this.remaining} left`);
    }
  }
  u16(field: string): number { this.need(2, field); const x = this.v.getUint16(this.off, true); this.off += 2; return x; }
  u32(field: string): number { this.need(4, field); const x = this.v.getUint32(this.off, true); this.off += 4; return x; }
  u64(field: string): number {
    this.need(8, field);
    const lo = this.v.getUint32(this.off, true);
    const hi = this.v.getUint32(this.off + 4, true);
    this.off += 8;
    return hi * 0x100000000 + lo;
  }
  /** A view (not a copy: the caller already holds a private copy of the request). */
  take(n: number, field: string): Uint8Array {
    this.need(n, field);
    const out = this.bytes.subarray(this.off, this.off + n);
    this.off += n;
    return out;
  }
  rest(): Uint8Array { return this.take(this.remaining, 'rest'); }
  end(): void {
    if (this.remaining !== 0) bad(`${this.what}: ${this.remaining} unexpected trailing bytes`);
  }
}

export class Writer {
  private buf: Uint8Array;
  private v: DataView;
  private off = 0;
  constructor(initial = 256) {
    this.buf = new Uint8Array(initial);
    this.v = new DataView(this.buf.buffer);
  }
  private room(n: number): void {
    if (this.off + n <= this.buf.byteLength) return;
    let size = this.buf.byteLength * 2;
    while (size < this.off + n) size *= 2;
    const b = new Uint8Array(size);
    b.set(this.buf.subarray(0, this.off));
    this.buf = b;
    this.v = new DataView(b.buffer);
  }
  get length(): number { return this.off; }
  u16(x: number): this { this.room(2); this.v.setUint16(this.off, x, true); this.off += 2; return this; }
  u32(x: number): this { this.room(4); this.v.setUint32(this.off, x >>> 0, true); this.off += 4; return this; }
  u64(x: number): this {
    this.room(8);
    this.v.setUint32(this.off, x % 0x100000000, true);
    this.v.setUint32(this.off + 4, Math.floor(x / 0x100000000), true);
    this.off += 8;
    return this;
  }
  bytes(b: Uint8Array): this { this.room(b.byteLength); this.buf.set(b, this.off); this.off += b.byteLength; return this; }
  zeros(n: number): this { this.room(n); this.buf.fill(0, this.off, this.off + n); this.off += n; return this; }
  finish(): Uint8Array { return this.buf.subarray(0, this.off); }
}

// ---------------------------------------------------------------------------------------
// Header

export interface Header { magic: number; version: number; command: number; seq: number; length: number }

/** Reads the 16-byte header without judging it (the broker decides what a bad field means). */
export function readHeader(msg: Uint8Array): Header | null {
  if (msg.byteLength < HEADER_BYTES) return null;
  const v = new DataView(msg.buffer, msg.byteOffset, HEADER_BYTES);
  return {
    magic: v.getUint32(0, true), version: v.getUint16(4, true), command: v.getUint16(6, true),
    seq: v.getUint32(8, true), length: v.getUint32(12, true),
  };
}

function writeHeader(out: Uint8Array, command: number, seq: number, length: number, version = OFFLOAD_VERSION): void {
  const v = new DataView(out.buffer, out.byteOffset, HEADER_BYTES);
  v.setUint32(0, OFFLOAD_MAGIC, true);
  v.setUint16(4, version, true);
  v.setUint16(6, command, true);
  v.setUint32(8, seq >>> 0, true);
  v.setUint32(12, length, true);
}

/** Guest side: header + payload. */
export function encodeRequest(command: number, seq: number, payload: Uint8Array = new Uint8Array(0),
  version = OFFLOAD_VERSION): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES + payload.byteLength);
  writeHeader(out, command, seq, payload.byteLength, version);
  out.set(payload, HEADER_BYTES);
  return out;
}

// ---------------------------------------------------------------------------------------
// Strings

const utf8 = new TextEncoder();
const utf8d = new TextDecoder('utf-8', { fatal: false });

/** UTF-8 cut at maxBytes on a character boundary. */
export function boundedUtf8(s: string, maxBytes: number): Uint8Array {
  const b = utf8.encode(s);
  if (b.byteLength <= maxBytes) return b;
  let end = maxBytes;
  while (end > 0 && (b[end]! & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}

/** A 16-byte NUL-padded object name: at most 15 of [A-Za-z0-9_.], zero padding after. */
export function decodeObjName(b: Uint8Array, field: string): string {
  let end = b.indexOf(0);
  if (end < 0) bad(`${field} is not NUL-terminated within ${OBJ_NAME_BYTES} bytes`);
  for (let i = end; i < b.byteLength; i++) if (b[i] !== 0) bad(`${field} has bytes after its NUL`);
  let s = '';
  for (let i = 0; i < end; i++) {
    const c = b[i]!;
    const ok = (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c === 0x5f || c === 0x2e;
    if (!ok) bad(`${field} byte ${i} (0x${c.toString(16)}) is not one of [A-Za-z0-9_.]`);
    s += String.fromCharCode(c);
  }
  return s;
}

function encodeObjName(name: string): Uint8Array {
  const out = new Uint8Array(OBJ_NAME_BYTES);
  if (!/^[A-Za-z0-9_.]{0,15}$/.test(name)) throw new RangeError(`name '${name}': at most 15 of [A-Za-z0-9_.]`);
  for (let i = 0; i < name.length; i++) out[i] = name.charCodeAt(i);
  return out;
}

// ---------------------------------------------------------------------------------------
// Requests: guest-side encoders and backend-side decoders, command by command

export interface ClaimRequest { minVersion: number; maxVersion: number; maxResponseBytes: number }
export function encodeClaim(seq: number, r: Partial<ClaimRequest> = {}): Uint8Array {
  const w = new Writer(8).u16(r.minVersion ?? OFFLOAD_VERSION).u16(r.maxVersion ?? OFFLOAD_VERSION)
    .u32(r.maxResponseBytes ?? 0);
  return encodeRequest(Cmd.CLAIM, seq, w.finish());
}
export function decodeClaim(p: Uint8Array): ClaimRequest {
  const r = new Reader(p, 'CLAIM');
  const out = { minVersion: r.u16('min_version'), maxVersion: r.u16('max_version'), maxResponseBytes: r.u32('max_response_bytes') };
  r.end();
  if (out.minVersion > out.maxVersion) bad(`CLAIM: min_version ${out.minVersion} > max_version ${out.maxVersion}`);
  return out;
}

export const encodeCaps = (seq: number): Uint8Array => encodeRequest(Cmd.CAPS, seq);
export const encodeRelease = (seq: number): Uint8Array => encodeRequest(Cmd.RELEASE, seq);
export const encodeProgUnset = (seq: number): Uint8Array => encodeRequest(Cmd.PROG_UNSET, seq);

export interface MapCreateRequest {
  type: number; keySize: number; valueSize: number; maxEntries: number; flags: number; name: string;
}
export const MAP_CREATE_BYTES = 20 + OBJ_NAME_BYTES;
export function encodeMapCreate(seq: number, m: Omit<MapCreateRequest, 'flags' | 'name'> & Partial<MapCreateRequest>): Uint8Array {
  const w = new Writer(MAP_CREATE_BYTES).u32(m.type).u32(m.keySize).u32(m.valueSize).u32(m.maxEntries)
    .u32(m.flags ?? 0).bytes(encodeObjName(m.name ?? ''));
  return encodeRequest(Cmd.MAP_CREATE, seq, w.finish());
}
export function decodeMapCreate(p: Uint8Array): MapCreateRequest {
  const r = new Reader(p, 'MAP_CREATE');
  const out = {
    type: r.u32('type'), keySize: r.u32('key_size'), valueSize: r.u32('value_size'),
    maxEntries: r.u32('max_entries'), flags: r.u32('flags'), name: decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'name'),
  };
  r.end();
  return out;
}

export function encodeMapFree(seq: number, handle: number): Uint8Array {
  return encodeRequest(Cmd.MAP_FREE, seq, new Writer(4).u32(handle).finish());
}
export function decodeMapFree(p: Uint8Array): { handle: number } {
  const r = new Reader(p, 'MAP_FREE');
  const handle = r.u32('handle');
  r.end();
  return { handle };
}

/**
 * Element requests share one prefix: u32 handle, u32 flags, then the map's key (and value)
 * bytes. The sizes depend on the map, so the decoder returns the rest and the broker checks
 * it against the map's geometry.
 */
export interface ElemRequest { handle: number; flags: number; data: Uint8Array }
export function decodeElem(p: Uint8Array, what: string): ElemRequest {
  const r = new Reader(p, what);
  return { handle: r.u32('handle'), flags: r.u32('flags'), data: r.rest() };
}
function elem(cmd: number, seq: number, handle: number, flags: number, ...parts: Uint8Array[]): Uint8Array {
  const w = new Writer(8 + parts.reduce((n, p) => n + p.byteLength, 0)).u32(handle).u32(flags);
  for (const p of parts) w.bytes(p);
  return encodeRequest(cmd, seq, w.finish());
}
export const encodeElemLookup = (seq: number, handle: number, key: Uint8Array): Uint8Array =>
  elem(Cmd.ELEM_LOOKUP, seq, handle, 0, key);
export const encodeElemUpdate = (seq: number, handle: number, key: Uint8Array, value: Uint8Array, flags = 0): Uint8Array =>
  elem(Cmd.ELEM_UPDATE, seq, handle, flags, key, value);
export const encodeElemDelete = (seq: number, handle: number, key: Uint8Array): Uint8Array =>
  elem(Cmd.ELEM_DELETE, seq, handle, 0, key);
export const encodeGetFirstKey = (seq: number, handle: number): Uint8Array =>
  elem(Cmd.GET_FIRST_KEY, seq, handle, 0);
export const encodeGetNextKey = (seq: number, handle: number, key: Uint8Array): Uint8Array =>
  elem(Cmd.GET_NEXT_KEY, seq, handle, 0, key);

/** ELEM_LOOKUP_BATCH: u32 handle, u32 flags(0), u32 max_count, u32 cursor_len, cursor. */
export interface LookupBatchRequest { handle: number; flags: number; maxCount: number; cursor: Uint8Array }
export function encodeLookupBatch(seq: number, handle: number, maxCount: number, cursor: Uint8Array | null = null): Uint8Array {
  const c = cursor ?? new Uint8Array(0);
  const w = new Writer(16 + c.byteLength).u32(handle).u32(0).u32(maxCount).u32(c.byteLength).bytes(c);
  return encodeRequest(Cmd.ELEM_LOOKUP_BATCH, seq, w.finish());
}
export function decodeLookupBatch(p: Uint8Array): LookupBatchRequest {
  const r = new Reader(p, 'ELEM_LOOKUP_BATCH');
  const handle = r.u32('handle');
  const flags = r.u32('flags');
  const maxCount = r.u32('max_count');
  const cursorLen = r.u32('cursor_len');
  const cursor = r.take(cursorLen, 'cursor');
  r.end();
  return { handle, flags, maxCount, cursor };
}

/** ELEM_UPDATE_BATCH: u32 handle, u32 flags, u32 count, keys[count], values[count]. */
export interface UpdateBatchRequest { handle: number; flags: number; count: number; data: Uint8Array }
export function encodeUpdateBatch(seq: number, handle: number, keys: Uint8Array, values: Uint8Array, count: number, flags = 0): Uint8Array {
  const w = new Writer(12 + keys.byteLength + values.byteLength).u32(handle).u32(flags).u32(count).bytes(keys).bytes(values);
  return encodeRequest(Cmd.ELEM_UPDATE_BATCH, seq, w.finish());
}
/** ELEM_DELETE_BATCH: u32 handle, u32 flags(0), u32 count, keys[count]. */
export function encodeDeleteBatch(seq: number, handle: number, keys: Uint8Array, count: number): Uint8Array {
  const w = new Writer(12 + keys.byteLength).u32(handle).u32(0).u32(count).bytes(keys);
  return encodeRequest(Cmd.ELEM_DELETE_BATCH, seq, w.finish());
}
export function decodeBatch(p: Uint8Array, what: string): UpdateBatchRequest {
  const r = new Reader(p, what);
  return { handle: r.u32('handle'), flags: r.u32('flags'), count: r.u32('count'), data: r.rest() };
}

/**
 * PROG_SET: u32 flags(0), u32 insn_count, u32 map_count, u32 license_len, char name[16],
 * u32 map_handles[map_count], license[license_len] (no NUL), insns[insn_count * 8].
 * Map references: ld_imm64 with src_reg = 1 (BPF_PSEUDO_MAP_FD) and imm = guest handle, or
 * src_reg = 2 (BPF_PSEUDO_MAP_VALUE), imm = handle, second half's imm = value offset.
 */
export interface ProgSetRequest { flags: number; name: string; license: string; mapHandles: number[]; insns: Uint8Array }
export function encodeProgSet(seq: number, p: { license: string; insns: Uint8Array; mapHandles: readonly number[]; name?: string; flags?: number }): Uint8Array {
  const lic = utf8.encode(p.license);
  if (p.insns.byteLength % 8 !== 0) throw new RangeError('instructions are not a multiple of 8 bytes');
  const w = new Writer(32 + 4 * p.mapHandles.length + lic.byteLength + p.insns.byteLength)
    .u32(p.flags ?? 0).u32(p.insns.byteLength / 8).u32(p.mapHandles.length).u32(lic.byteLength)
    .bytes(encodeObjName(p.name ?? ''));
  for (const h of p.mapHandles) w.u32(h);
  w.bytes(lic).bytes(p.insns);
  return encodeRequest(Cmd.PROG_SET, seq, w.finish());
}
export function decodeProgSet(p: Uint8Array): ProgSetRequest {
  const r = new Reader(p, 'PROG_SET');
  const flags = r.u32('flags');
  const insnCount = r.u32('insn_count');
  const mapCount = r.u32('map_count');
  const licenseLen = r.u32('license_len');
  const name = decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'program name');
  // Counts are checked against what is actually present before any allocation they size.
  if (mapCount > r.remaining / 4) bad(`PROG_SET: map_count ${mapCount} exceeds the payload`);
  const mapHandles: number[] = [];
  for (let i = 0; i < mapCount; i++) mapHandles.push(r.u32('map_handles'));
  if (licenseLen === 0 || licenseLen > MAX_LICENSE_BYTES) bad(`PROG_SET: license_len ${licenseLen} outside 1..${MAX_LICENSE_BYTES}`);
  const licBytes = r.take(licenseLen, 'license');
  if (licBytes.includes(0)) bad('PROG_SET: license contains a NUL byte');
  const license = utf8d.decode(licBytes);
  if (insnCount === 0) bad('PROG_SET: no instructions');
  if (insnCount > r.remaining / 8) bad(`PROG_SET: insn_count ${insnCount} exceeds the payload (${r.remaining} bytes left)`);
  const insns = r.take(insnCount * 8, 'insns');
  r.end();
  return { flags, name, license, mapHandles, insns };
}

// ---------------------------------------------------------------------------------------
// Responses: backend-side encoders

/** header(cmd|0x8000, seq) + status + reason + body. */
export function encodeResponse(command: number, seq: number, status: number, reason: string, body?: Uint8Array): Uint8Array {
  const why = boundedUtf8(reason, MAX_REASON_BYTES);
  const bodyLen = body?.byteLength ?? 0;
  const len = 8 + why.byteLength + bodyLen;
  const out = new Uint8Array(HEADER_BYTES + len);
  writeHeader(out, (command | RESPONSE_FLAG) & 0xffff, seq, len);
  const v = new DataView(out.buffer, out.byteOffset + HEADER_BYTES);
  v.setUint32(0, status, true);
  v.setUint32(4, why.byteLength, true);
  out.set(why, HEADER_BYTES + 8);
  if (body) out.set(body, HEADER_BYTES + 8 + why.byteLength);
  return out;
}

export function encodeErrorBody(detail: ErrorDetail, extra?: Uint8Array): Uint8Array {
  const w = new Writer(ERROR_DETAIL_BYTES + (extra?.byteLength ?? 0)).u32(detail.a).u32(detail.b).u64(detail.c);
  if (extra) w.bytes(extra);
  return w.finish();
}

/** The VERIFIER_REJECTED extra: u32 log_len, log (the tail, when longer than `max`). */
export function encodeVerifierLog(log: string, max: number): Uint8Array {
  let b = utf8.encode(log);
  if (b.byteLength > max) {
    let start = b.byteLength - max;
    while (start < b.byteLength && (b[start]! & 0xc0) === 0x80) start++;
    b = b.subarray(start);
  }
  return new Writer(4 + b.byteLength).u32(b.byteLength).bytes(b).finish();
}

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
export function encodeCapsBody(c: Caps): Uint8Array {
  const w = new Writer(72 + 4 * (c.mapTypes.length + c.helpers.length))
    .u16(c.version).u16(0).u32(c.maxRequestBytes).u32(c.maxResponseBytes).u32(c.maxProgInsns)
    .u32(c.maxMaps).u32(c.maxEntries).u32(c.maxKeySize).u32(c.maxValueSize).u32(c.maxOpsPerSec)
    .u32(c.verifierLogBytes).u64(c.maxMapMemory).u32(c.usedMaps).u32(0).u64(c.usedMapMemory)
    .u32(c.mapTypes.length).u32(c.helpers.length);
  for (const t of c.mapTypes) w.u32(t);
  for (const h of c.helpers) w.u32(h);
  return w.finish();
}

// ---------------------------------------------------------------------------------------
// Responses: guest-side decoders

export interface Response {
  /** The request's command (response flag removed). */
  command: number;
  seq: number;
  status: number;
  reason: string;
  /** OK: the command's body. Failure: everything after the reason (detail + extra). */
  body: Uint8Array;
  detail?: ErrorDetail;
  verifierLog?: string;
}

export function decodeResponse(msg: Uint8Array): Response {
  const h = readHeader(msg);
  if (!h) return bad(`response shorter than its ${HEADER_BYTES}-byte header`);
  if (h.magic !== OFFLOAD_MAGIC) bad(`bad magic 0x${h.magic.toString(16)}`);
  if ((h.command & RESPONSE_FLAG) === 0) bad(`command 0x${h.command.toString(16)} is not a response`);
  if (h.length > msg.byteLength - HEADER_BYTES) bad(`length ${h.length} exceeds the ${msg.byteLength - HEADER_BYTES} bytes present`);
  const r = new Reader(msg.subarray(HEADER_BYTES, HEADER_BYTES + h.length), 'response');
  const status = r.u32('status');
  const reasonLen = r.u32('reason_len');
  if (reasonLen > MAX_REASON_BYTES) bad(`reason_len ${reasonLen} > ${MAX_REASON_BYTES}`);
  const reason = utf8d.decode(r.take(reasonLen, 'reason'));
  const body = r.rest();
  const out: Response = { command: h.command & ~RESPONSE_FLAG, seq: h.seq, status, reason, body };
  if (status !== Status.OK && body.byteLength >= ERROR_DETAIL_BYTES) {
    const d = new Reader(body, 'error detail');
    out.detail = { a: d.u32('a'), b: d.u32('b'), c: d.u64('c') };
    if (status === Status.VERIFIER_REJECTED && d.remaining >= 4) {
      const n = d.u32('log_len');
      out.verifierLog = utf8d.decode(d.take(Math.min(n, d.remaining), 'log'));
    }
  }
  return out;
}

export function decodeCapsBody(b: Uint8Array): Caps {
  const r = new Reader(b, 'caps');
  const version = r.u16('version'); r.u16('reserved');
  const c = {
    version, maxRequestBytes: r.u32('max_request_bytes'), maxResponseBytes: r.u32('max_response_bytes'),
    maxProgInsns: r.u32('max_prog_insns'), maxMaps: r.u32('max_maps'), maxEntries: r.u32('max_entries'),
    maxKeySize: r.u32('max_key_size'), maxValueSize: r.u32('max_value_size'), maxOpsPerSec: r.u32('max_ops_per_sec'),
    verifierLogBytes: r.u32('verifier_log_bytes'), maxMapMemory: r.u64('max_map_memory'),
  };
  const usedMaps = r.u32('used_maps'); r.u32('reserved');
  const usedMapMemory = r.u64('used_map_memory');
  const nTypes = r.u32('map_type_count');
  const nHelpers = r.u32('helper_count');
  if (nTypes + nHelpers > r.remaining / 4) bad('caps: counts exceed the body');
  const mapTypes: number[] = [];
  for (let i = 0; i < nTypes; i++) mapTypes.push(r.u32('map_types'));
  const helpers: number[] = [];
  for (let i = 0; i < nHelpers; i++) helpers.push(r.u32('helpers'));
  return { ...c, usedMaps, usedMapMemory, mapTypes, helpers };
}

export function decodeMapCreateBody(b: Uint8Array): { handle: number; chargedBytes: number } {
  const r = new Reader(b, 'MAP_CREATE response');
  const handle = r.u32('handle'); r.u32('reserved');
  return { handle, chargedBytes: r.u64('charged_bytes') };
}

export function decodeProgSetBody(b: Uint8Array): { insns: number; tag: string } {
  const r = new Reader(b, 'PROG_SET response');
  const insns = r.u32('insns'); r.u32('reserved');
  return { insns, tag: Buffer.from(r.take(8, 'tag')).toString('hex') };
}

/** u32 processed: body of ELEM_UPDATE_BATCH / ELEM_DELETE_BATCH; PROG_UNSET's was_loaded. */
export function decodeU32Body(b: Uint8Array): number {
  return new Reader(b, 'response').u32('value');
}

export interface LookupBatchResult { count: number; done: boolean; cursor: Uint8Array; keys: Uint8Array; values: Uint8Array }
/** ELEM_LOOKUP_BATCH body: u32 count, u32 done, u32 cursor_len, cursor, keys, values. */
export function decodeLookupBatchBody(b: Uint8Array, keySize: number, valueSize: number): LookupBatchResult {
  const r = new Reader(b, 'ELEM_LOOKUP_BATCH response');
  const count = r.u32('count');
  const done = r.u32('done') !== 0;
  const cursor = r.take(r.u32('cursor_len'), 'cursor');
  const keys = r.take(count * keySize, 'keys');
  const values = r.take(count * valueSize, 'values');
  return { count, done, cursor, keys, values };
}

/**
 * Guest side: a copy of `insns` whose map ld_imm64s (src_reg 1, imm = map index, as
 * src/offload/bpf-object.ts leaves them) refer to the handles MAP_CREATE returned.
 */
export function bindMapHandles(insns: Uint8Array, relocations: readonly { insnIndex: number; mapIndex: number }[],
  handles: readonly number[]): Uint8Array {
  const out = insns.slice();
  const v = new DataView(out.buffer);
  for (const r of relocations) {
    const h = handles[r.mapIndex];
    if (h === undefined) throw new RangeError(`no handle for map index ${r.mapIndex}`);
    v.setUint32(r.insnIndex * 8 + 4, h, true);
  }
  return out;
}
