// Map commands: create and free (quota-checked, pinned, rolled back on any refusal), single
// elements (lookup, update, delete, first/next key) and batches. The dispatch table has
// already checked each payload's fixed size and its flags; what is left here depends on the
// map: key and value sizes, the handle, and the kernel's answer.

import { BpfMap, BpfMapType } from '../sys/bpf/maps.js';
import { BpfError } from '../sys/bpf/libbpf.js';
import { mapInfo } from '../sys/bpf/info.js';
import { Errno } from '../sys/errors.js';
import { Status, QuotaId, type MapCreateRequest } from './protocol.js';
import {
  decodeMapCreate, decodeMapFree, decodeElem, decodeLookupBatch, decodeBatch,
  encodeMapCreateBody, encodeU32Body, encodeLookupBatchBody, RESPONSE_OVERHEAD_BYTES, LOOKUP_BATCH_BODY_PREFIX_BYTES,
} from './host-codec.js';
import { ProtocolError, refuse } from './errors.js';
import { checkMapDef, mapTypeName, type MapEntry } from './map-table.js';
import { estimateMapBytes, readMemlock } from './quotas.js';
import type { OffloadState } from './state.js';

const EMPTY = new Uint8Array(0);

// ---------------------------------------------------------------------------------------
// Create and free

/**
 * Creates one map under `handle` (default: the next one) after the type and quota checks,
 * pins it, and adds it to the table; "a refusal never leaves partial state". Shared by
 * MAP_CREATE and migration import (migration.ts), which passes the guest's old handle.
 */
export function createMapEntry(st: OffloadState, d: MapCreateRequest, handle = st.maps.peekHandle()): MapEntry {
  const q = st.limits;
  checkMapDef(d, q);
  if (st.maps.size + 1 > q.maxMaps) {
    refuse(Status.QUOTA_EXCEEDED, 'quota-exceeded', `this device already has ${st.maps.size} maps; its max-maps quota is ${q.maxMaps}`,
      { a: QuotaId.MAX_MAPS, b: st.maps.size, c: q.maxMaps });
  }
  // Checked on the estimate before the kernel allocates anything, then again on the kernel's own figure.
  const estimate = estimateMapBytes(d.type, d.keySize, d.valueSize, d.maxEntries);
  const memoryRefusal = (need: number) => new ProtocolError(Status.QUOTA_EXCEEDED, 'quota-exceeded',
    `map needs ${need} bytes; this device uses ${st.maps.chargedBytes} of its max-map-memory quota of ${q.maxMapMemory}`,
    { a: QuotaId.MAX_MAP_MEMORY, b: Math.min(need, 0xffffffff), c: q.maxMapMemory });
  if (st.maps.chargedBytes + estimate > q.maxMapMemory) throw memoryRefusal(estimate);

  let map: BpfMap;
  try {
    map = BpfMap.create(d.type, d.keySize, d.valueSize, d.maxEntries, { flags: d.flags, name: st.hostName(d.name) });
  } catch (e) {
    if (e instanceof BpfError) {
      refuse(Status.KERNEL_ERROR, 'kernel-error', `the kernel refused the ${mapTypeName(d.type)} map: ${e.code}`, { a: e.errno });
    }
    throw e;
  }
  // "A refusal never leaves partial state": from here on every refusal closes the map.
  let e: MapEntry;
  try {
    const charged = Math.max(estimate, readMemlock(map.fd) ?? 0);
    if (st.maps.chargedBytes + charged > q.maxMapMemory) throw memoryRefusal(charged);
    const id = mapInfo(map.fd).id;
    const createdAt = st.isoNow();
    st.pins?.pinMap(handle, map.fd, { handle, chargedBytes: charged, createdAt, name: d.name });
    e = st.maps.add({ map, id, def: { ...d }, chargedBytes: charged, createdAt }, handle);
  } catch (err) {
    map.close();
    if (st.pins) { try { st.pins.unpinMap(handle); } catch { /* best effort */ } }
    throw err;
  }
  st.log(`map ${handle} created: ${mapTypeName(d.type)} key ${d.keySize} value ${d.valueSize} entries ${d.maxEntries} (${e.chargedBytes} bytes, id ${e.id})`);
  return e;
}

export function mapCreate(st: OffloadState, p: Uint8Array): Uint8Array {
  const e = createMapEntry(st, decodeMapCreate(p));
  st.writeClaimState();
  return encodeMapCreateBody(e.handle, e.chargedBytes);
}

export function mapFree(st: OffloadState, p: Uint8Array): undefined {
  const { handle } = decodeMapFree(p);
  st.entry(handle);
  if (st.program.current?.object?.mapHandles.includes(handle)) {
    refuse(Status.MAP_IN_USE, 'object-map', `map handle ${handle} belongs to the loaded object; OBJ_UNLOAD frees it with the object`, { a: handle });
  }
  if (st.program.current?.usedHandles.includes(handle)) {
    refuse(Status.MAP_IN_USE, 'map-in-use', `map handle ${handle} is used by the loaded program; PROG_UNSET or replace it first`, { a: handle });
  }
  st.pins?.unpinMap(handle);
  st.maps.remove(handle);
  st.log(`map ${handle} freed`);
  return undefined;
}

// ---------------------------------------------------------------------------------------
// Elements

/** "The payload after handle, flags must be exactly key (+ value) bytes" (§3, element commands). */
function expectLen(what: string, got: number, want: number, e: MapEntry): void {
  if (got !== want) {
    refuse(Status.BAD_REQUEST, 'bad-element-size',
      `${what}: ${got} bytes of key/value data, map ${e.handle} wants ${want} (key ${e.def.keySize}, value ${e.map.valueBytes})`);
  }
}

/** A kernel refusal of an element operation, as the status the spec gives it; `processed` for batches. */
function elemError(err: unknown, e: MapEntry, op: string, processed = 0): never {
  if (!(err instanceof BpfError)) throw err;
  const c = processed;
  switch (err.errno) {
    case Errno.ENOENT:
      return refuse(Status.NO_SUCH_ELEMENT, 'no-such-element', `${op}: no such element in map ${e.handle}`, { a: err.errno, c });
    case Errno.EEXIST:
      return refuse(Status.ELEMENT_EXISTS, 'element-exists', `${op}: element exists in map ${e.handle} (NOEXIST)`, { a: err.errno, c });
    case Errno.E2BIG:
      if (e.def.type === BpfMapType.ARRAY || e.def.type === BpfMapType.PERCPU_ARRAY) {
        refuse(Status.NO_SUCH_ELEMENT, 'no-such-element', `${op}: index beyond max_entries ${e.def.maxEntries} of ARRAY map ${e.handle}`, { a: err.errno, c });
      }
      return refuse(Status.MAP_FULL, 'map-full', `${op}: map ${e.handle} is full (max_entries ${e.def.maxEntries})`, { a: err.errno, c });
    default:
      return refuse(Status.KERNEL_ERROR, 'kernel-error', `${op} on map ${e.handle}: ${err.code}`, { a: err.errno, c });
  }
}

/**
 * The map behind a handle for an element command. A PROG_ARRAY's elements are the object's own
 * programs, set by the object (libbpf fills it); reading one would show a host program id.
 */
function dataEntry(st: OffloadState, handle: number, op: string): MapEntry {
  const e = st.entry(handle);
  if (e.def.type === BpfMapType.PROG_ARRAY) {
    refuse(Status.BAD_REQUEST, 'prog-array-elements', `${op}: map ${handle} is a PROG_ARRAY; its elements are the object's programs and are not read or written by handle`);
  }
  return e;
}

function noSuchElement(reason: string): never {
  return refuse(Status.NO_SUCH_ELEMENT, 'no-such-element', reason, { a: Errno.ENOENT });
}

function refuseArrayDelete(e: MapEntry, op: string): void {
  if (e.def.type === BpfMapType.ARRAY || e.def.type === BpfMapType.PERCPU_ARRAY) refuse(Status.BAD_REQUEST, 'array-delete', `${op}: elements of ARRAY map ${e.handle} cannot be deleted`);
}

export function elemLookup(st: OffloadState, p: Uint8Array): Uint8Array {
  const r = decodeElem(p, 'ELEM_LOOKUP');
  const e = dataEntry(st, r.handle, 'ELEM_LOOKUP');
  expectLen('ELEM_LOOKUP', r.data.byteLength, e.def.keySize, e);
  let value: Uint8Array | null;
  try { value = e.map.lookup(r.data); } catch (err) { elemError(err, e, 'lookup'); }
  return value ?? noSuchElement(`lookup: no such element in map ${e.handle}`);
}

export function elemUpdate(st: OffloadState, p: Uint8Array): undefined {
  const r = decodeElem(p, 'ELEM_UPDATE');
  const e = dataEntry(st, r.handle, 'ELEM_UPDATE');
  const k = e.def.keySize;
  expectLen('ELEM_UPDATE', r.data.byteLength, k + e.map.valueBytes, e);
  try { e.map.update(r.data.subarray(0, k), r.data.subarray(k), r.flags); } catch (err) { elemError(err, e, 'update'); }
  return undefined;
}

export function elemDelete(st: OffloadState, p: Uint8Array): undefined {
  const r = decodeElem(p, 'ELEM_DELETE');
  const e = dataEntry(st, r.handle, 'ELEM_DELETE');
  refuseArrayDelete(e, 'delete');
  expectLen('ELEM_DELETE', r.data.byteLength, e.def.keySize, e);
  let found: boolean;
  try { found = e.map.delete(r.data); } catch (err) { elemError(err, e, 'delete'); }
  if (!found) noSuchElement(`delete: no such element in map ${e.handle}`);
  return undefined;
}

function getKey(st: OffloadState, p: Uint8Array, first: boolean): Uint8Array {
  const what = first ? 'GET_FIRST_KEY' : 'GET_NEXT_KEY';
  const r = decodeElem(p, what);
  const e = dataEntry(st, r.handle, what);
  expectLen(what, r.data.byteLength, first ? 0 : e.def.keySize, e);
  let next: Uint8Array | null;
  try { next = e.map.nextKey(first ? null : r.data); } catch (err) { elemError(err, e, what); }
  return next ?? noSuchElement(first ? `map ${e.handle} is empty` : `no key after this one in map ${e.handle}`);
}

export const getFirstKey = (st: OffloadState, p: Uint8Array): Uint8Array => getKey(st, p, true);
export const getNextKey = (st: OffloadState, p: Uint8Array): Uint8Array => getKey(st, p, false);

// ---------------------------------------------------------------------------------------
// Batches

export function lookupBatch(st: OffloadState, p: Uint8Array): Uint8Array {
  const r = decodeLookupBatch(p);
  const e = dataEntry(st, r.handle, 'ELEM_LOOKUP_BATCH');
  const m = e.map;
  if (r.cursor.byteLength !== 0 && r.cursor.byteLength !== m.batchTokenSize) {
    refuse(Status.BAD_REQUEST, 'bad-batch-cursor',
      `ELEM_LOOKUP_BATCH: cursor is ${r.cursor.byteLength} bytes; pass 0 bytes to start or the ${m.batchTokenSize}-byte cursor of the previous response`);
  }
  if (r.maxCount === 0) refuse(Status.BAD_REQUEST, 'zero-max-count', 'ELEM_LOOKUP_BATCH: max_count is 0');
  // "Batch lookups return fewer elements" rather than exceed the claimed response limit (§1 Limits).
  const per = e.def.keySize + m.valueBytes;
  const room = st.responseLimit() - RESPONSE_OVERHEAD_BYTES - LOOKUP_BATCH_BODY_PREFIX_BYTES - m.batchTokenSize;
  const count = Math.min(r.maxCount, e.def.maxEntries, Math.floor(room / per));
  if (count <= 0) refuse(Status.TOO_LARGE, 'batch-does-not-fit', 'ELEM_LOOKUP_BATCH: not even one element fits the response limit');
  const keys = new Uint8Array(count * e.def.keySize);
  const values = new Uint8Array(count * m.valueBytes);
  let res: { count: number; next: Uint8Array | null };
  try {
    res = m.lookupBatch(r.cursor.byteLength ? r.cursor : null, keys, values, count);
  } catch (err) {
    if (err instanceof BpfError && err.errno === Errno.ENOSPC) {
      refuse(Status.KERNEL_ERROR, 'batch-smaller-than-bucket',
        `ELEM_LOOKUP_BATCH: max_count ${count} is smaller than one hash bucket of map ${e.handle}; retry with a larger max_count`, { a: err.errno });
    }
    elemError(err, e, 'lookup batch');
  }
  const n = res.count;
  return encodeLookupBatchBody(n, !res.next, res.next ?? EMPTY,
    keys.subarray(0, n * e.def.keySize), values.subarray(0, n * m.valueBytes));
}

/** "count × (key + value) must equal the bytes present", checked before count sizes anything. */
function batchData(what: string, count: number, data: Uint8Array, per: number, e: MapEntry): void {
  if (count > data.byteLength / Math.max(1, per) || count * per !== data.byteLength) {
    refuse(Status.BAD_REQUEST, 'bad-batch-size', `${what}: count ${count} × ${per} bytes does not match the ${data.byteLength} bytes present (map ${e.handle})`);
  }
}

/** The elements the kernel handled before a batch failed (BpfError carries the count). */
function processedOf(err: unknown): number {
  return err instanceof BpfError ? err.processed ?? 0 : 0;
}

export function updateBatch(st: OffloadState, p: Uint8Array): Uint8Array {
  const r = decodeBatch(p, 'ELEM_UPDATE_BATCH');
  const e = dataEntry(st, r.handle, 'ELEM_UPDATE_BATCH');
  const k = e.def.keySize;
  batchData('ELEM_UPDATE_BATCH', r.count, r.data, k + e.map.valueBytes, e);
  if (r.count === 0) return encodeU32Body(0);
  let n: number;
  try {
    n = e.map.updateBatch(r.data.subarray(0, r.count * k), r.data.subarray(r.count * k), r.count, r.flags);
  } catch (err) {
    elemError(err, e, 'update batch', processedOf(err));
  }
  return encodeU32Body(n);
}

export function deleteBatch(st: OffloadState, p: Uint8Array): Uint8Array {
  const r = decodeBatch(p, 'ELEM_DELETE_BATCH');
  const e = dataEntry(st, r.handle, 'ELEM_DELETE_BATCH');
  refuseArrayDelete(e, 'delete batch');
  batchData('ELEM_DELETE_BATCH', r.count, r.data, e.def.keySize, e);
  if (r.count === 0) return encodeU32Body(0);
  let n: number;
  try {
    n = e.map.deleteBatch(r.data, r.count);
  } catch (err) {
    elemError(err, e, 'delete batch', processedOf(err));
  }
  return encodeU32Body(n);
}
