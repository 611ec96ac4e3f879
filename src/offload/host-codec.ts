// The backend's side of the offload codec: request payloads in (syntax only: fields, sizes,
// counts; whether the device allows what they say is judged by the commands), response
// bytes out. Payloads are the broker's private copy of guest bytes; every read goes through
// wire.Reader, so a short or inconsistent payload becomes BAD_REQUEST, never a bad read.

import {
  HEADER_BYTES, RESPONSE_FLAG, MAX_REASON_BYTES, MAX_LICENSE_BYTES, OBJ_NAME_BYTES, ERROR_DETAIL_BYTES, PROG_NAME_BYTES,
  writeHeader, decodeObjName, encodeObjName,
  type ClaimRequest, type MapCreateRequest, type ElemRequest, type LookupBatchRequest, type UpdateBatchRequest,
  type ProgSetRequest, type Caps, type ErrorDetail, type ObjBeginRequest, type ObjChunkRequest, type ObjLoadRequest, type ObjShow,
} from './protocol.js';
import { Reader, Writer, malformed, boundedUtf8, tailUtf8, decodeUtf8 } from './wire.js';

// ---------------------------------------------------------------------------------------
// Requests

export function decodeClaim(p: Uint8Array): ClaimRequest {
  const r = new Reader(p, 'CLAIM');
  const out = { minVersion: r.u16('min_version'), maxVersion: r.u16('max_version'), maxResponseBytes: r.u32('max_response_bytes') };
  r.end();
  if (out.minVersion > out.maxVersion) malformed('claim-version-range', `CLAIM: min_version ${out.minVersion} > max_version ${out.maxVersion}`);
  return out;
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

export function decodeMapFree(p: Uint8Array): { handle: number } {
  const r = new Reader(p, 'MAP_FREE');
  const handle = r.u32('handle');
  r.end();
  return { handle };
}

export function decodeElem(p: Uint8Array, what: string): ElemRequest {
  const r = new Reader(p, what);
  return { handle: r.u32('handle'), flags: r.u32('flags'), data: r.rest() };
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

/** ELEM_UPDATE_BATCH and ELEM_DELETE_BATCH: count × element size is checked against the map by the command. */
export function decodeBatch(p: Uint8Array, what: string): UpdateBatchRequest {
  const r = new Reader(p, what);
  return { handle: r.u32('handle'), flags: r.u32('flags'), count: r.u32('count'), data: r.rest() };
}

export function decodeProgSet(p: Uint8Array): ProgSetRequest {
  const r = new Reader(p, 'PROG_SET');
  const flags = r.u32('flags');
  const insnCount = r.u32('insn_count');
  const mapCount = r.u32('map_count');
  const licenseLen = r.u32('license_len');
  const name = decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'program name');
  // "Every count is checked against the bytes actually present before it sizes anything."
  const mapHandles = r.u32s(mapCount, 'map_handles', 'map-count-exceeds-payload', `PROG_SET: map_count ${mapCount} exceeds the payload`);
  if (licenseLen === 0 || licenseLen > MAX_LICENSE_BYTES) {
    malformed('bad-license-length', `PROG_SET: license_len ${licenseLen} outside 1..${MAX_LICENSE_BYTES}`);
  }
  const licBytes = r.take(licenseLen, 'license');
  if (licBytes.includes(0)) malformed('license-has-nul', 'PROG_SET: license contains a NUL byte');
  const license = decodeUtf8(licBytes);
  if (insnCount === 0) malformed('no-instructions', 'PROG_SET: no instructions');
  r.fits(insnCount, 8, 'insn_count', 'insn-count-exceeds-payload', `PROG_SET: insn_count ${insnCount} exceeds the payload (${r.remaining} bytes left)`);
  const insns = r.take(insnCount * 8, 'insns');
  r.end();
  return { flags, name, license, mapHandles, insns };
}

export function decodeObjBegin(p: Uint8Array): ObjBeginRequest {
  const r = new Reader(p, 'OBJ_BEGIN');
  const out = { totalBytes: r.u32('total_bytes'), flags: r.u32('flags'), name: decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'object name') };
  r.end();
  return out;
}

/** OBJ_CHUNK: the data is a view into the broker's private copy of the request. */
export function decodeObjChunk(p: Uint8Array): ObjChunkRequest {
  const r = new Reader(p, 'OBJ_CHUNK');
  return { offset: r.u32('offset'), data: r.rest() };
}

export function decodeObjLoad(p: Uint8Array): ObjLoadRequest {
  const r = new Reader(p, 'OBJ_LOAD');
  const out = { flags: r.u32('flags'), progName: decodeObjName(r.take(PROG_NAME_BYTES, 'prog_name'), 'program name') };
  r.end();
  return out;
}

// ---------------------------------------------------------------------------------------
// Responses

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

/** Bytes a response spends before its body: header, status, reason_len. */
export const RESPONSE_OVERHEAD_BYTES = HEADER_BYTES + 8;

export function encodeErrorBody(detail: ErrorDetail, extra?: Uint8Array): Uint8Array {
  const w = new Writer(ERROR_DETAIL_BYTES + (extra?.byteLength ?? 0)).u32(detail.a).u32(detail.b).u64(detail.c);
  if (extra) w.bytes(extra);
  return w.finish();
}

/** The VERIFIER_REJECTED extra: u32 log_len, log (the tail, when longer than `max`). */
export function encodeVerifierLog(log: string, max: number): Uint8Array {
  const b = tailUtf8(log, max);
  return new Writer(4 + b.byteLength).u32(b.byteLength).bytes(b).finish();
}

/** Bytes of a VERIFIER_REJECTED response around its log: overhead, longest reason, detail, log_len. */
export const VERIFIER_RESPONSE_OVERHEAD_BYTES = RESPONSE_OVERHEAD_BYTES + MAX_REASON_BYTES + ERROR_DETAIL_BYTES + 4;

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

/** MAP_CREATE: u32 handle, u32 reserved, u64 charged_bytes. */
export function encodeMapCreateBody(handle: number, chargedBytes: number): Uint8Array {
  return new Writer(16).u32(handle).u32(0).u64(chargedBytes).finish();
}

/** PROG_SET: u32 insns, u32 reserved, u8 tag[8]. */
export function encodeProgSetBody(insns: number, tag: Uint8Array): Uint8Array {
  return new Writer(16).u32(insns).u32(0).bytes(tag).finish();
}

/** u32 processed (ELEM_UPDATE_BATCH, ELEM_DELETE_BATCH); PROG_UNSET's was_loaded. */
export function encodeU32Body(n: number): Uint8Array {
  return new Writer(4).u32(n).finish();
}

/** Bytes of an ELEM_LOOKUP_BATCH body before its elements: u32 count, u32 done, u32 cursor_len. */
export const LOOKUP_BATCH_BODY_PREFIX_BYTES = 12;

/** ELEM_LOOKUP_BATCH body: u32 count, u32 done, u32 cursor_len, cursor, keys, values. */
export function encodeLookupBatchBody(count: number, done: boolean, cursor: Uint8Array, keys: Uint8Array, values: Uint8Array): Uint8Array {
  return new Writer(LOOKUP_BATCH_BODY_PREFIX_BYTES + cursor.byteLength + keys.byteLength + values.byteLength)
    .u32(count).u32(done ? 1 : 0).u32(cursor.byteLength).bytes(cursor).bytes(keys).bytes(values).finish();
}


/** OBJ_BEGIN: u32 max_object_bytes, u32 max_chunk_bytes. */
export function encodeObjBeginBody(maxObjectBytes: number, maxChunkBytes: number): Uint8Array {
  return new Writer(8).u32(maxObjectBytes).u32(maxChunkBytes).finish();
}

/** OBJ_LOAD: u32 prog_count, u32 map_count, u8 tag[8] (the entry program's). */
export function encodeObjLoadBody(progCount: number, mapCount: number, tag: Uint8Array): Uint8Array {
  return new Writer(16).u32(progCount).u32(mapCount).bytes(tag).finish();
}

/**
 * OBJ_SHOW: char obj_name[16], char prog_name[64], u8 tag[8], u32 prog_count, u32 possible_cpus,
 * u32 map_count, then per map u32 handle, type, key_size, value_size, max_entries, flags, char name[16].
 */
export function encodeObjShowBody(s: ObjShow): Uint8Array {
  const w = new Writer(100 + 40 * s.maps.length)
    .bytes(encodeObjName(s.objName)).bytes(encodeObjName(s.progName, PROG_NAME_BYTES)).bytes(Buffer.from(s.tag, 'hex'))
    .u32(s.progCount).u32(s.possibleCpus).u32(s.maps.length);
  for (const m of s.maps) {
    w.u32(m.handle).u32(m.type).u32(m.keySize).u32(m.valueSize).u32(m.maxEntries).u32(m.flags).bytes(encodeObjName(m.name));
  }
  return w.finish();
}
