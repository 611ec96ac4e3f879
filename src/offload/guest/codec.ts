// The guest's side of the offload codec: request encoders and response decoders, as an
// offload-aware guest (the TS test frontend, the benches, the demo, docs examples) uses them.
// The backend never imports this module; it re-exports the shared protocol vocabulary so a
// guest-side user imports one module. Responses are decoded as untrusted bytes too.

import {
  Cmd, Status, OFFLOAD_MAGIC, OFFLOAD_VERSION, HEADER_BYTES, RESPONSE_FLAG, MAX_REASON_BYTES, ERROR_DETAIL_BYTES,
  MAP_CREATE_BYTES, OBJ_NAME_BYTES, PROG_NAME_BYTES, MAX_CHUNK_BYTES, readHeader, writeHeader, encodeObjName, encodeProgSetPayload,
  decodeObjName, type ClaimRequest, type MapCreateRequest, type Caps, type ErrorDetail, type ObjShow, type ObjShowMap,
} from '../protocol.js';
import { Reader, Writer, malformed, decodeUtf8 } from '../wire.js';
import { setInsnImm } from '../../sys/bpf/insns.js';

export * from '../protocol.js';
export { ProtocolError } from '../errors.js';

// ---------------------------------------------------------------------------------------
// Requests

/** Header + payload. */
export function encodeRequest(command: number, seq: number, payload: Uint8Array = new Uint8Array(0),
  version = OFFLOAD_VERSION): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES + payload.byteLength);
  writeHeader(out, command, seq, payload.byteLength, version);
  out.set(payload, HEADER_BYTES);
  return out;
}

export function encodeClaim(seq: number, r: Partial<ClaimRequest> = {}): Uint8Array {
  const w = new Writer(8).u16(r.minVersion ?? OFFLOAD_VERSION).u16(r.maxVersion ?? OFFLOAD_VERSION)
    .u32(r.maxResponseBytes ?? 0);
  return encodeRequest(Cmd.CLAIM, seq, w.finish());
}

export const encodeCaps = (seq: number): Uint8Array => encodeRequest(Cmd.CAPS, seq);
export const encodeRelease = (seq: number): Uint8Array => encodeRequest(Cmd.RELEASE, seq);
export const encodeProgUnset = (seq: number): Uint8Array => encodeRequest(Cmd.PROG_UNSET, seq);

export function encodeMapCreate(seq: number, m: Omit<MapCreateRequest, 'flags' | 'name'> & Partial<MapCreateRequest>): Uint8Array {
  const w = new Writer(MAP_CREATE_BYTES).u32(m.type).u32(m.keySize).u32(m.valueSize).u32(m.maxEntries)
    .u32(m.flags ?? 0).bytes(encodeObjName(m.name ?? ''));
  return encodeRequest(Cmd.MAP_CREATE, seq, w.finish());
}

export function encodeMapFree(seq: number, handle: number): Uint8Array {
  return encodeRequest(Cmd.MAP_FREE, seq, new Writer(4).u32(handle).finish());
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

export function encodeLookupBatch(seq: number, handle: number, maxCount: number, cursor: Uint8Array | null = null): Uint8Array {
  const c = cursor ?? new Uint8Array(0);
  const w = new Writer(16 + c.byteLength).u32(handle).u32(0).u32(maxCount).u32(c.byteLength).bytes(c);
  return encodeRequest(Cmd.ELEM_LOOKUP_BATCH, seq, w.finish());
}

export function encodeUpdateBatch(seq: number, handle: number, keys: Uint8Array, values: Uint8Array, count: number, flags = 0): Uint8Array {
  const w = new Writer(12 + keys.byteLength + values.byteLength).u32(handle).u32(flags).u32(count).bytes(keys).bytes(values);
  return encodeRequest(Cmd.ELEM_UPDATE_BATCH, seq, w.finish());
}

export function encodeDeleteBatch(seq: number, handle: number, keys: Uint8Array, count: number): Uint8Array {
  const w = new Writer(12 + keys.byteLength).u32(handle).u32(0).u32(count).bytes(keys);
  return encodeRequest(Cmd.ELEM_DELETE_BATCH, seq, w.finish());
}

export function encodeProgSet(seq: number, p: Parameters<typeof encodeProgSetPayload>[0]): Uint8Array {
  return encodeRequest(Cmd.PROG_SET, seq, encodeProgSetPayload(p));
}

// The object path (§8).

export function encodeObjBegin(seq: number, totalBytes: number, name = '', flags = 0): Uint8Array {
  return encodeRequest(Cmd.OBJ_BEGIN, seq, new Writer(24).u32(totalBytes).u32(flags).bytes(encodeObjName(name)).finish());
}

export function encodeObjChunk(seq: number, offset: number, data: Uint8Array): Uint8Array {
  return encodeRequest(Cmd.OBJ_CHUNK, seq, new Writer(4 + data.byteLength).u32(offset).bytes(data).finish());
}

export function encodeObjLoad(seq: number, progName = '', flags = 0): Uint8Array {
  return encodeRequest(Cmd.OBJ_LOAD, seq, new Writer(4 + PROG_NAME_BYTES).u32(flags).bytes(encodeObjName(progName, PROG_NAME_BYTES)).finish());
}

export const encodeObjShow = (seq: number): Uint8Array => encodeRequest(Cmd.OBJ_SHOW, seq);
export const encodeObjUnload = (seq: number): Uint8Array => encodeRequest(Cmd.OBJ_UNLOAD, seq);

/** The OBJ_BEGIN, OBJ_CHUNK… requests that upload `object` (chunks of at most maxChunk bytes), sequence numbers from `seq()`. */
export function objectUploadRequests(object: Uint8Array, seq: () => number, name = '', maxChunk = MAX_CHUNK_BYTES): Uint8Array[] {
  const out = [encodeObjBegin(seq(), object.byteLength, name)];
  for (let off = 0; off < object.byteLength; off += maxChunk) {
    out.push(encodeObjChunk(seq(), off, object.subarray(off, Math.min(object.byteLength, off + maxChunk))));
  }
  return out;
}

/**
 * A copy of `insns` whose map ld_imm64s (src_reg 1, imm = map index, as
 * src/offload/bpf-object.ts leaves them) refer to the handles MAP_CREATE returned.
 */
export function bindMapHandles(insns: Uint8Array, relocations: readonly { insnIndex: number; mapIndex: number }[],
  handles: readonly number[]): Uint8Array {
  const out = insns.slice();
  for (const r of relocations) {
    const h = handles[r.mapIndex];
    if (h === undefined) throw new RangeError(`no handle for map index ${r.mapIndex}`);
    setInsnImm(out, r.insnIndex, h);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Responses

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
  if (!h) return malformed('truncated', `response shorter than its ${HEADER_BYTES}-byte header`);
  if (h.magic !== OFFLOAD_MAGIC) malformed('bad-magic', `bad magic 0x${h.magic.toString(16)}`);
  if ((h.command & RESPONSE_FLAG) === 0) malformed('not-a-response', `command 0x${h.command.toString(16)} is not a response`);
  if (h.length > msg.byteLength - HEADER_BYTES) {
    malformed('length-exceeds-message', `length ${h.length} exceeds the ${msg.byteLength - HEADER_BYTES} bytes present`);
  }
  const r = new Reader(msg.subarray(HEADER_BYTES, HEADER_BYTES + h.length), 'response');
  const status = r.u32('status');
  const reasonLen = r.u32('reason_len');
  if (reasonLen > MAX_REASON_BYTES) malformed('reason-too-long', `reason_len ${reasonLen} > ${MAX_REASON_BYTES}`);
  const reason = decodeUtf8(r.take(reasonLen, 'reason'));
  const body = r.rest();
  const out: Response = { command: h.command & ~RESPONSE_FLAG, seq: h.seq, status, reason, body };
  if (status !== Status.OK && body.byteLength >= ERROR_DETAIL_BYTES) {
    const d = new Reader(body, 'error detail');
    out.detail = { a: d.u32('a'), b: d.u32('b'), c: d.u64('c') };
    if (status === Status.VERIFIER_REJECTED && d.remaining >= 4) {
      const n = d.u32('log_len');
      out.verifierLog = decodeUtf8(d.take(Math.min(n, d.remaining), 'log'));
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
  r.fits(nTypes + nHelpers, 4, 'counts', 'count-exceeds-payload', 'caps: counts exceed the body');
  const mapTypes = r.u32s(nTypes, 'map_types');
  const helpers = r.u32s(nHelpers, 'helpers');
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

export function decodeObjBeginBody(b: Uint8Array): { maxObjectBytes: number; maxChunkBytes: number } {
  const r = new Reader(b, 'OBJ_BEGIN response');
  return { maxObjectBytes: r.u32('max_object_bytes'), maxChunkBytes: r.u32('max_chunk_bytes') };
}

export function decodeObjLoadBody(b: Uint8Array): { progCount: number; mapCount: number; tag: string } {
  const r = new Reader(b, 'OBJ_LOAD response');
  const progCount = r.u32('prog_count');
  const mapCount = r.u32('map_count');
  return { progCount, mapCount, tag: Buffer.from(r.take(8, 'tag')).toString('hex') };
}

export function decodeObjShowBody(b: Uint8Array): ObjShow {
  const r = new Reader(b, 'OBJ_SHOW response');
  const objName = decodeObjName(r.take(OBJ_NAME_BYTES, 'obj_name'), 'obj_name');
  const progName = decodeObjName(r.take(PROG_NAME_BYTES, 'prog_name'), 'prog_name');
  const tag = Buffer.from(r.take(8, 'tag')).toString('hex');
  const progCount = r.u32('prog_count');
  const possibleCpus = r.u32('possible_cpus');
  const n = r.u32('map_count');
  r.fits(n, 40, 'map_count');
  const maps: ObjShowMap[] = [];
  for (let i = 0; i < n; i++) {
    maps.push({
      handle: r.u32('handle'), type: r.u32('type'), keySize: r.u32('key_size'), valueSize: r.u32('value_size'),
      maxEntries: r.u32('max_entries'), flags: r.u32('flags'), name: decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'map name'),
    });
  }
  return { objName, progName, tag, progCount, possibleCpus, maps };
}
