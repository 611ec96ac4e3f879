// The offload migration state's byte format (docs/offload-protocol.md §7): encode, and decode
// (syntax only: magic, version, lengths, counts, section order, field ranges). Whether this
// device accepts what a decoded state says (quotas, map types, the program) is judged in
// migration.ts, as the broker judges a decoded request in its commands.
//
// The bytes come from QEMU's migration stream, i.e. from another host: untrusted. Every read
// goes through wire.Reader, so each count is checked against the bytes present before it sizes
// anything, and every failure is a MigrationStateError with a stable code.

import { crc32 } from 'node:zlib';
import { MAX_MESSAGE_BYTES, MIN_RESPONSE_LIMIT, OBJ_NAME_BYTES, decodeObjName, encodeObjName, encodeProgSetPayload } from './protocol.js';
import { decodeProgSet } from './host-codec.js';
import { Reader, Writer } from './wire.js';
import { MigrationStateError, OffloadConfigError, ProtocolError, type MigrationStateCode } from './errors.js';
import { DEFAULT_QUOTAS, validateQuotas, type Quotas } from './quotas.js';
import type { MapDef } from './map-table.js';

/** 'V','X','M','S' in memory order (bytes 56 58 4D 53), read as a little-endian u32. */
export const STATE_MAGIC = 0x534d5856;
/**
 * Version 1: PROG_SET programs and MAP_CREATE maps. Version 2 adds the OBJECT section (written
 * only when an object is loaded); version 3 the UPLOAD section (written only while the guest is
 * uploading an object), so a state without either still reads on an older destination.
 */
export const STATE_VERSION = 1;
export const STATE_VERSION_OBJECT = 2;
export const STATE_VERSION_UPLOAD = 3;
export const STATE_HEADER_BYTES = 16;
const SECTION_HEADER_BYTES = 8;
/** A section's length is a u32. */
const MAX_SECTION_BYTES = 0xffffffff;
/** Guest handles are 1..2^31-1 (map-table.ts); next_handle may be one past the last. */
const MAX_HANDLE = 0x7fffffff;
/** The largest time a JavaScript Date holds (ms since the epoch). */
const MAX_DATE_MS = 8.64e15;

export const Section = { CLAIM: 1, QUOTAS: 2, MAP: 3, PROGRAM: 4, COUNTERS: 5, OBJECT: 6, UPLOAD: 7 } as const;
const UPLOAD_PREFIX_BYTES = 8 + OBJ_NAME_BYTES;
const PROG_NAME_BYTES = 64;
const OBJECT_PREFIX_BYTES = 16 + OBJ_NAME_BYTES + PROG_NAME_BYTES + 8;
const MAP_HEADER_BYTES = 32 + OBJ_NAME_BYTES;
const QUOTAS_BYTES = 32;
const CLAIM_BYTES = 24;
const COUNTERS_BYTES = 32;
const PROGRAM_PREFIX_BYTES = 16;

/** Frames the offloaded program gave each verdict, as the datapath counted them (net/stats.ts). */
export interface VerdictCounters { pass: number; drop: number; tx: number; aborted: number }

export interface StateMap extends MapDef {
  handle: number;
  /** Elements present: keys[count × keySize], values[count × valueSize], packed. */
  count: number;
  keys: Uint8Array;
  values: Uint8Array;
}

export interface StateProgram {
  name: string;
  license: string;
  /** The program's declared map table (guest handles). */
  mapHandles: number[];
  /** As the guest sent them: map references hold guest handles. */
  insns: Uint8Array;
  /** The kernel tag on the source, 16 hex digits: the destination's load must give the same. */
  tag: string;
  /** XDP_FLAGS_* the source's port attached it with (0: run through BPF_PROG_TEST_RUN); for the caller. */
  attachFlags: number;
}

/** One map of a loaded object; per-CPU values are valueCpus × round_up(valueSize, 8) bytes each. */
export interface StateObjectMap extends StateMap { valueCpus: number }

/** A loaded object (OBJ_LOAD): the ELF as the guest uploaded it, its entry, and its maps' contents in libbpf's order. */
export interface StateObject {
  attachFlags: number;
  /** The entry program's kernel tag on the source. */
  tag: string;
  name: string;
  progName: string;
  elf: Uint8Array;
  maps: StateObjectMap[];
}

/** An object upload in progress (OBJ_BEGIN, OBJ_CHUNK… before OBJ_LOAD): what the guest sent so far. */
export interface StateUpload {
  name: string;
  /** OBJ_BEGIN's total_bytes. */
  totalBytes: number;
  /** The first `received` bytes of the object, received.byteLength ≤ totalBytes. */
  received: Uint8Array;
}

export interface MigrationState {
  claim: { claimedAtMs: number; responseLimit: number; nextHandle: number } | null;
  /** The source's limits: informational, the destination's own configuration wins. */
  quotas: Quotas;
  maps: StateMap[];
  program: StateProgram | null;
  counters: VerdictCounters | null;
  /** In version 2 states (and version 3 ones while an object is loaded); never with `program`. */
  object?: StateObject | null;
  /** Only in version 3 states. */
  upload?: StateUpload | null;
}

function refused(code: MigrationStateCode, message: string, rule?: string, cause?: unknown): never {
  throw new MigrationStateError(code, message, rule, cause);
}
const malformed = (message: string, rule?: string): never => refused('state-malformed', message, rule);

// ---------------------------------------------------------------------------------------
// Encode

function section(out: Writer, type: number, body: Uint8Array): void {
  if (body.byteLength > MAX_SECTION_BYTES) {
    refused('state-too-large', `migration state section ${type} is ${body.byteLength} bytes, over the u32 section length`);
  }
  out.u16(type).u16(0).u32(body.byteLength).bytes(body);
}

export function encodeState(s: MigrationState): Uint8Array {
  const out = new Writer(4096);
  const version = s.upload ? STATE_VERSION_UPLOAD : s.object ? STATE_VERSION_OBJECT : STATE_VERSION;
  out.u32(STATE_MAGIC).u16(version).u16(0).u32(0).u32(0); // length and crc patched below
  const c = s.claim;
  section(out, Section.CLAIM, new Writer(CLAIM_BYTES).u32(c ? 1 : 0).u32(c?.responseLimit ?? 0).u32(c?.nextHandle ?? 0).u32(0)
    .u64(c?.claimedAtMs ?? 0).finish());
  const q = s.quotas;
  section(out, Section.QUOTAS, new Writer(QUOTAS_BYTES).u32(q.maxMaps).u32(q.maxEntries).u32(q.maxProgInsns).u32(q.maxOpsPerSec)
    .u32(q.maxKeySize).u32(q.maxValueSize).u64(q.maxMapMemory).finish());
  for (const m of s.maps) {
    const w = new Writer(MAP_HEADER_BYTES + m.keys.byteLength + m.values.byteLength)
      .u32(m.handle).u32(m.type).u32(m.keySize).u32(m.valueSize).u32(m.maxEntries).u32(m.flags).u32(1).u32(m.count)
      .bytes(encodeObjName(m.name)).bytes(m.keys).bytes(m.values);
    section(out, Section.MAP, w.finish());
  }
  const p = s.program;
  if (p) {
    const body = encodeProgSetPayload({ license: p.license, insns: p.insns, mapHandles: p.mapHandles, name: p.name });
    section(out, Section.PROGRAM, new Writer(PROGRAM_PREFIX_BYTES + body.byteLength)
      .u32(p.attachFlags).u32(0).bytes(Buffer.from(p.tag, 'hex')).bytes(body).finish());
  }
  const n = s.counters;
  if (n) section(out, Section.COUNTERS, new Writer(COUNTERS_BYTES).u64(n.pass).u64(n.drop).u64(n.tx).u64(n.aborted).finish());
  const o = s.object;
  if (o) {
    const name64 = new Uint8Array(PROG_NAME_BYTES);
    name64.set(Buffer.from(o.progName, 'latin1').subarray(0, PROG_NAME_BYTES - 1));
    const w = new Writer(OBJECT_PREFIX_BYTES + o.elf.byteLength + o.maps.reduce((t, m) => t + MAP_HEADER_BYTES + m.keys.byteLength + m.values.byteLength, 0))
      .u32(o.attachFlags).u32(0).bytes(Buffer.from(o.tag, 'hex')).bytes(encodeObjName(o.name)).bytes(name64)
      .u32(o.elf.byteLength).u32(o.maps.length).bytes(o.elf);
    for (const m of o.maps) {
      w.u32(m.handle).u32(m.type).u32(m.keySize).u32(m.valueSize).u32(m.maxEntries).u32(m.flags).u32(m.valueCpus).u32(m.count)
        .bytes(encodeObjName(m.name)).bytes(m.keys).bytes(m.values);
    }
    section(out, Section.OBJECT, w.finish());
  }
  const u = s.upload;
  if (u) {
    section(out, Section.UPLOAD, new Writer(UPLOAD_PREFIX_BYTES + u.received.byteLength)
      .u32(u.totalBytes).u32(u.received.byteLength).bytes(encodeObjName(u.name)).bytes(u.received).finish());
  }
  const bytes = out.finish();
  if (bytes.byteLength > 0xffffffff) refused('state-too-large', `migration state is ${bytes.byteLength} bytes, over the u32 total length`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  v.setUint32(8, bytes.byteLength, true);
  v.setUint32(12, crc32(bytes.subarray(STATE_HEADER_BYTES)), true);
  return bytes;
}

// ---------------------------------------------------------------------------------------
// Decode

/** Reader refusals (wire.ts) as migration-state refusals; ours pass through. */
function asStateError(e: unknown): unknown {
  if (e instanceof ProtocolError) {
    return new MigrationStateError(e.code === 'truncated' ? 'state-truncated' : 'state-malformed', `migration state: ${e.message}`, e.code, e);
  }
  if (e instanceof OffloadConfigError) return new MigrationStateError('state-malformed', `migration state quotas: ${e.message}`, e.code, e);
  return e;
}

/**
 * Decodes a private copy of a state (the caller copies: the state is parsed in place and
 * element bytes stay views into it). Throws MigrationStateError.
 */
export function decodeState(b: Uint8Array): MigrationState {
  try {
    return decode(b);
  } catch (e) {
    throw asStateError(e);
  }
}

function decodeHeader(b: Uint8Array): void {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (b.byteLength >= 4 && v.getUint32(0, true) !== STATE_MAGIC) {
    refused('bad-state-magic', `migration state magic 0x${v.getUint32(0, true).toString(16)} (want 0x${STATE_MAGIC.toString(16)}, 'VXMS')`);
  }
  if (b.byteLength < STATE_HEADER_BYTES) refused('state-truncated', `migration state is ${b.byteLength} bytes, shorter than its ${STATE_HEADER_BYTES}-byte header`);
  const version = v.getUint16(4, true);
  if (version < STATE_VERSION || version > STATE_VERSION_UPLOAD) {
    refused('state-version', `migration state version ${version} is not supported (this host reads ${STATE_VERSION}..${STATE_VERSION_UPLOAD})`);
  }
  if (v.getUint16(6, true) !== 0) malformed('migration state header flags are not 0');
  const total = v.getUint32(8, true);
  if (total > b.byteLength) refused('state-truncated', `migration state says ${total} bytes, ${b.byteLength} present`);
  if (total < b.byteLength) refused('state-trailing', `migration state says ${total} bytes, ${b.byteLength} present`);
  // Corruption in transit is caught here; a hostile source can recompute the CRC, so every check below still runs.
  const want = v.getUint32(12, true);
  const got = crc32(b.subarray(STATE_HEADER_BYTES));
  if (want !== got) refused('state-checksum', `migration state CRC32 0x${got.toString(16)} does not match its header (0x${want.toString(16)})`);
}

function decode(b: Uint8Array): MigrationState {
  decodeHeader(b);
  const version = new DataView(b.buffer, b.byteOffset, b.byteLength).getUint16(4, true);
  const r = new Reader(b.subarray(STATE_HEADER_BYTES), 'migration state');
  const s: Omit<MigrationState, 'quotas'> & { quotas: Quotas | null } = { claim: null, quotas: null, maps: [], program: null, counters: null };
  let last = 0;
  let claimed = false;
  while (r.remaining > 0) {
    const type = r.u16('section type');
    if (r.u16('section flags') !== 0) malformed(`section ${type}: flags are not 0`);
    const len = r.u32('section length');
    const body = new Reader(r.take(len, `section ${type} body`), `migration state section ${type}`);
    // "CLAIM, QUOTAS, MAP…, PROGRAM?, COUNTERS?" (§7): one order, so one state has one encoding.
    if (type < last || (type === last && type !== Section.MAP) || (last === 0 && type !== Section.CLAIM)
      || (last === Section.CLAIM && type !== Section.QUOTAS)) {
      malformed(`section ${type} after section ${last}: sections go CLAIM, QUOTAS, MAP…, PROGRAM, COUNTERS`);
    }
    last = type;
    switch (type) {
      case Section.CLAIM: claimed = decodeClaim(body, s); break;
      case Section.QUOTAS: s.quotas = decodeQuotas(body); break;
      case Section.MAP: s.maps.push(decodeMap(body, s.maps.at(-1)?.handle ?? 0)); break;
      case Section.PROGRAM: s.program = decodeProgram(body); break;
      case Section.COUNTERS: s.counters = decodeCounters(body); break;
      case Section.OBJECT:
        if (version === STATE_VERSION) malformed('an OBJECT section in a version 1 state');
        s.object = decodeObject(body);
        break;
      case Section.UPLOAD:
        if (version !== STATE_VERSION_UPLOAD) malformed(`an UPLOAD section in a version ${version} state`);
        s.upload = decodeUpload(body);
        break;
      default: malformed(`unknown section type ${type}`);
    }
    body.end();
  }
  if (!s.quotas) refused('state-truncated', 'migration state ends before its CLAIM and QUOTAS sections');
  if (!claimed && (s.maps.length > 0 || s.program || s.object)) malformed('an unclaimed state carries maps or a program');
  if (version === STATE_VERSION_OBJECT && !s.object) malformed('a version 2 state without its OBJECT section');
  if (version === STATE_VERSION_UPLOAD && !s.upload) malformed('a version 3 state without its UPLOAD section');
  if (!claimed && s.upload) malformed('an unclaimed state carries an upload');
  if (s.object && s.program) malformed('a state carries both a PROGRAM and an OBJECT');
  if (s.object) {
    const plain = new Set(s.maps.map((m) => m.handle));
    const seen = new Set<number>();
    for (const m of s.object.maps) {
      if (plain.has(m.handle) || seen.has(m.handle)) malformed(`OBJECT map handle ${m.handle} is used twice`);
      seen.add(m.handle);
      if (s.claim && m.handle >= s.claim.nextHandle) malformed(`OBJECT map handle ${m.handle} is not below next_handle ${s.claim.nextHandle}`);
    }
  }
  const top = s.maps.at(-1)?.handle ?? 0;
  if (s.claim && top >= s.claim.nextHandle) malformed(`map handle ${top} is not below next_handle ${s.claim.nextHandle}`);
  return { ...s, quotas: s.quotas };
}

function decodeClaim(r: Reader, s: Pick<MigrationState, 'claim'>): boolean {
  const claimed = r.u32('claimed');
  const responseLimit = r.u32('response_limit');
  const nextHandle = r.u32('next_handle');
  const reserved = r.u32('reserved');
  const claimedAtMs = r.u64('claimed_at');
  if (claimed > 1 || reserved !== 0) malformed('CLAIM: claimed is not 0/1 or reserved is not 0');
  if (claimed === 0) {
    if (responseLimit !== 0 || nextHandle !== 0 || claimedAtMs !== 0) malformed('CLAIM: an unclaimed state has non-zero claim fields');
    return false;
  }
  // "max_response_bytes, ≥ 1024; 0 = 61,440" (§1 Limits): a claim holds the resolved limit.
  if (responseLimit < MIN_RESPONSE_LIMIT || responseLimit > MAX_MESSAGE_BYTES) {
    malformed(`CLAIM: response_limit ${responseLimit} outside ${MIN_RESPONSE_LIMIT}..${MAX_MESSAGE_BYTES}`);
  }
  if (nextHandle < 1 || nextHandle > MAX_HANDLE + 1) malformed(`CLAIM: next_handle ${nextHandle} outside 1..${MAX_HANDLE + 1}`);
  if (claimedAtMs > MAX_DATE_MS) malformed(`CLAIM: claimed_at ${claimedAtMs} is not a time`);
  s.claim = { claimedAtMs, responseLimit, nextHandle };
  return true;
}

function decodeQuotas(r: Reader): Quotas {
  const q = {
    maxMaps: r.u32('max_maps'), maxEntries: r.u32('max_entries'), maxProgInsns: r.u32('max_prog_insns'),
    maxOpsPerSec: r.u32('max_ops_per_sec'), maxKeySize: r.u32('max_key_size'), maxValueSize: r.u32('max_value_size'),
    maxMapMemory: r.u64('max_map_memory'),
    // Not carried by version 1 (the object path came later): informational only, like the rest.
    maxObjectBytes: DEFAULT_QUOTAS.maxObjectBytes,
  };
  validateQuotas(q);
  return q;
}

function decodeMap(r: Reader, previous: number): StateMap {
  const { valueCpus: _cpus, ...m } = decodeMapBody(r, 'MAP', (handle, cpus) => {
    if (handle <= previous || handle > MAX_HANDLE) malformed(`MAP: handle ${handle} is not above the previous map's (${previous}) or outside 1..${MAX_HANDLE}`);
    // Per-CPU values are sized by the CPU count, which two hosts need not share; the device never
    // holds per-CPU maps through MAP_CREATE (it refuses them), so these never need more than one value.
    if (cpus !== 1) refused('state-map-type', `MAP ${handle}: value_cpus ${cpus}: per-CPU values are not carried (must be 1)`, 'map-type-percpu');
  });
  return m;
}

/** One map's layout (MAP sections and the OBJECT section's maps); `check` judges handle and value_cpus before anything is sized. */
function decodeMapBody(r: Reader, label: string, check: (handle: number, cpus: number) => void): StateObjectMap {
  const handle = r.u32('handle');
  const type = r.u32('type');
  const keySize = r.u32('key_size');
  const valueSize = r.u32('value_size');
  const maxEntries = r.u32('max_entries');
  const flags = r.u32('flags');
  const valueCpus = r.u32('value_cpus');
  const count = r.u32('count');
  const name = decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'map name');
  check(handle, valueCpus);
  if (keySize === 0 || valueSize === 0 || maxEntries === 0) malformed(`${label} ${handle}: key size, value size and max entries must be non-zero`, 'zero-map-size');
  if (count > maxEntries) malformed(`${label} ${handle}: ${count} elements in a map of max_entries ${maxEntries}`);
  const valueBytes = valueCpus === 1 ? valueSize : Math.ceil(valueSize / 8) * 8 * valueCpus;
  // "Every count is checked against the bytes actually present before it sizes anything."
  r.fits(count, keySize + valueBytes, 'count', 'count-exceeds-payload');
  const keys = r.take(count * keySize, 'keys');
  const values = r.take(count * valueBytes, 'values');
  return { handle, type, keySize, valueSize, maxEntries, flags, name, count, keys, values, valueCpus };
}

function decodeProgram(r: Reader): StateProgram {
  const attachFlags = r.u32('attach_flags');
  if (r.u32('reserved') !== 0) malformed('PROGRAM: reserved is not 0');
  const tag = Buffer.from(r.take(8, 'tag')).toString('hex');
  const p = decodeProgSet(r.rest());
  if (p.flags !== 0) malformed('PROGRAM: PROG_SET flags are not 0');
  return { name: p.name, license: p.license, mapHandles: p.mapHandles, insns: p.insns, tag, attachFlags };
}

function decodeObject(r: Reader): StateObject {
  const attachFlags = r.u32('attach_flags');
  if (r.u32('reserved') !== 0) malformed('OBJECT: reserved is not 0');
  const tag = Buffer.from(r.take(8, 'tag')).toString('hex');
  const name = decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'object name');
  const raw = r.take(PROG_NAME_BYTES, 'prog_name');
  const nul = raw.indexOf(0);
  if (nul < 0 || raw.subarray(nul).some((x) => x !== 0)) malformed('OBJECT: prog_name is not NUL-terminated and zero-padded');
  const progName = Buffer.from(raw.subarray(0, nul)).toString('latin1');
  if (!/^[A-Za-z0-9_.]{1,63}$/.test(progName)) malformed('OBJECT: prog_name is not a C function name');
  const elfBytes = r.u32('elf_bytes');
  const count = r.u32('map_count');
  if (elfBytes === 0) malformed('OBJECT: no object bytes');
  const elf = r.take(elfBytes, 'elf');
  r.fits(count, MAP_HEADER_BYTES, 'map_count', 'count-exceeds-payload');
  const maps: StateObjectMap[] = [];
  for (let i = 0; i < count; i++) {
    maps.push(decodeMapBody(r, 'OBJECT map', (handle, cpus) => {
      if (handle < 1 || handle > MAX_HANDLE) malformed(`OBJECT map ${i}: handle ${handle} outside 1..${MAX_HANDLE}`);
      if (cpus < 1 || cpus > 4096) malformed(`OBJECT map ${handle}: value_cpus ${cpus} outside 1..4096`);
    }));
  }
  return { attachFlags, tag, name, progName, elf, maps };
}

function decodeUpload(r: Reader): StateUpload {
  const totalBytes = r.u32('total_bytes');
  const n = r.u32('received_bytes');
  const name = decodeObjName(r.take(OBJ_NAME_BYTES, 'name'), 'upload name');
  if (totalBytes === 0) malformed('UPLOAD: total_bytes is 0');
  if (n > totalBytes) malformed(`UPLOAD: ${n} bytes received of an object of ${totalBytes}`);
  return { name, totalBytes, received: r.take(n, 'received bytes') };
}

function decodeCounters(r: Reader): VerdictCounters {
  const c = { pass: r.u64('pass'), drop: r.u64('drop'), tx: r.u64('tx'), aborted: r.u64('aborted') };
  for (const [k, v] of Object.entries(c)) if (!Number.isSafeInteger(v)) malformed(`COUNTERS: ${k} is over 2^53`);
  return c;
}
