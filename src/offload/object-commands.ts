// The object path (docs/offload-protocol.md §8): OBJ_BEGIN, OBJ_CHUNK, OBJ_LOAD, OBJ_SHOW,
// OBJ_UNLOAD. A guest uploads a whole clang-built ELF object in chunks; OBJ_LOAD walks it
// through these steps, each refusing with a status and a stable code:
//
//   inspect   bpf-object.ts reads the bytes without trusting them (bounded sections, string
//             tables, BTF, .maps definitions, global data sections, program sections)
//   judge     policy on what it read, before any kernel object exists: license, externs
//             (kfuncs, ksyms), map types and geometry, quotas, every instruction of every
//             program section (helpers named)
//   load      libbpf opens, relocates and loads it in a child process (object-loader/); the
//             verifier's log (with the C source lines BTF line info gives) comes back on refusal
//   recheck   the final, relocated instructions of every program against the same policy,
//             map references only to the object's own maps; the kernel's map geometry against
//             the quotas; every PROG_ARRAY slot holding one of the object's own programs
//   publish   maps get handles, the entry program becomes the device's program (replacing
//             one from either path; an older object's programs and maps go with it)
//
// Until publish, a refusal closes every fd the child handed over: nothing stays in the kernel.

import { BpfMap, BpfMapType, isPerCpuMapType, numPossibleCpus, BPF_F_NO_PREALLOC, BPF_F_RDONLY_PROG, BPF_F_WRONLY_PROG } from '../sys/bpf/maps.js';
import { closeBpfFd } from '../sys/bpf/programs.js';
import { Errno } from '../sys/errors.js';
import { Pseudo } from '../sys/bpf/insns.js';
import { Status, QuotaId, MAX_CHUNK_BYTES, type MapCreateRequest } from './protocol.js';
import {
  decodeObjBegin, decodeObjChunk, decodeObjLoad, encodeObjBeginBody, encodeObjLoadBody, encodeObjShowBody, encodeU32Body,
  encodeVerifierLog,
} from './host-codec.js';
import { ProtocolError, refuse } from './errors.js';
import { inspectObject, BpfObjectError, type ObjectInspection } from './bpf-object.js';
import { decodeProgram, instructionChecks, isGplCompatible, runInOrder, rewriteMapRefs } from './program-check.js';
import { OBJECT_MAP_TYPES, checkMapGeometry, mapTypeName, type MapEntry } from './map-table.js';
import { estimateMapBytes, readMemlock } from './quotas.js';
import { publishLoaded } from './program-commands.js';
import { loadObjectInChild, loadObjectInChildAsync, ObjectLoaderError, DEFAULT_LOADER_OPTIONS, type LoadedObjectFds, type LoaderOptions } from './object-loader/loader.js';
import type { LoadedObject, LoadedProgram } from './program-state.js';
import type { OffloadState } from './state.js';

const BPF_F_NO_COMMON_LRU = 0x2;
const BPF_F_MMAPABLE = 0x400;
const DEFAULT_OBJECT_NAME = 'vx_obj';

/** Child-process limits for OBJ_LOAD; tests may shorten the timeout. */
export const objectLoaderOptions: LoaderOptions = {};

/** How long an OBJ_LOAD's child may run before it is killed: what a wait for a pending load is bounded by. */
export function objectLoadTimeoutMs(): number {
  return objectLoaderOptions.timeoutMs ?? DEFAULT_LOADER_OPTIONS.timeoutMs;
}

/** One device's loader options: a 64 KiB verifier log, kernel names under its prefix, then the limits. */
function loaderOptions(st: OffloadState): LoaderOptions {
  return { logBytes: 64 * 1024, namePrefix: st.bpfPrefix, ...objectLoaderOptions };
}

function objectRefused(code: string, reason: string, detail: { a?: number; b?: number } = {}): never {
  return refuse(Status.OBJECT_REFUSED, code, reason, detail);
}

// ---------------------------------------------------------------------------------------
// Upload

export function objBegin(st: OffloadState, p: Uint8Array): Uint8Array {
  const r = decodeObjBegin(p);
  st.upload = null; // "starts (or restarts) an upload"
  const max = st.limits.maxObjectBytes;
  if (r.totalBytes > max) {
    refuse(Status.QUOTA_EXCEEDED, 'quota-exceeded', `object of ${r.totalBytes} bytes is over this device's max-object-bytes quota of ${max}`,
      { a: QuotaId.MAX_OBJECT_BYTES, b: r.totalBytes, c: max });
  }
  if (r.totalBytes === 0) refuse(Status.BAD_REQUEST, 'empty-object', 'OBJ_BEGIN: total_bytes is 0');
  st.upload = { name: r.name, bytes: new Uint8Array(r.totalBytes), received: 0 };
  return encodeObjBeginBody(max, MAX_CHUNK_BYTES);
}

export function objChunk(st: OffloadState, p: Uint8Array): Uint8Array {
  const r = decodeObjChunk(p);
  const u = st.upload ?? refuse(Status.BAD_REQUEST, 'no-upload', 'OBJ_CHUNK without OBJ_BEGIN');
  // "A gap, overlap or excess is BAD_REQUEST and discards the upload."
  const discard = (code: string, reason: string): never => { st.upload = null; return refuse(Status.BAD_REQUEST, code, `${reason}; the upload is discarded`); };
  if (r.offset !== u.received) discard('chunk-out-of-order', `OBJ_CHUNK at offset ${r.offset}, but ${u.received} bytes were received`);
  if (r.data.byteLength === 0) discard('empty-chunk', 'OBJ_CHUNK carries no bytes');
  if (r.data.byteLength > u.bytes.byteLength - u.received) {
    discard('chunk-excess', `OBJ_CHUNK of ${r.data.byteLength} bytes at ${r.offset} goes past the announced ${u.bytes.byteLength}`);
  }
  u.bytes.set(r.data, u.received);
  u.received += r.data.byteLength;
  return encodeU32Body(u.received);
}

// ---------------------------------------------------------------------------------------
// Judge (before the kernel)

/** Estimated kernel bytes of one map; per-CPU values are multiplied by the host's CPUs. */
function objectMapBytes(d: { type: number; keySize: number; valueSize: number; maxEntries: number }): number {
  if (d.type === BpfMapType.PROG_ARRAY) return 1024 + 8 * d.maxEntries;
  const cpus = isPerCpuMapType(d.type) ? numPossibleCpus() : 1;
  const base = d.type === BpfMapType.PERCPU_ARRAY ? BpfMapType.ARRAY
    : d.type === BpfMapType.PERCPU_HASH ? BpfMapType.HASH : d.type === BpfMapType.LRU_PERCPU_HASH ? BpfMapType.LRU_HASH : d.type;
  return estimateMapBytes(base, d.keySize, Math.ceil(d.valueSize / 8) * 8 * cpus, d.maxEntries);
}

/** One map of an object against the object path's type policy and this device's per-map quotas. */
function checkObjectMap(st: OffloadState, d: MapCreateRequest, internal: boolean): void {
  const what = `map '${d.name}'`;
  if (!OBJECT_MAP_TYPES.includes(d.type)) {
    refuse(Status.MAP_TYPE_REFUSED, 'bad-map-type',
      `${what}: map type ${mapTypeName(d.type)} (${d.type}) is not offloadable (objects may hold: ${OBJECT_MAP_TYPES.map(mapTypeName).join(', ')})`,
      { a: d.type });
  }
  const hash = d.type === BpfMapType.HASH || d.type === BpfMapType.PERCPU_HASH;
  const lru = d.type === BpfMapType.LRU_HASH || d.type === BpfMapType.LRU_PERCPU_HASH;
  const allowed = BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG | (hash ? BPF_F_NO_PREALLOC : 0) | (lru ? BPF_F_NO_COMMON_LRU : 0)
    | (internal ? BPF_F_MMAPABLE : 0);
  if ((d.flags & ~allowed) !== 0) objectRefused('bad-map-flags', `${what}: map flags 0x${(d.flags >>> 0).toString(16)} are not allowed for a ${mapTypeName(d.type)} map`);
  const arrayLike = d.type === BpfMapType.ARRAY || d.type === BpfMapType.PERCPU_ARRAY || d.type === BpfMapType.PROG_ARRAY;
  if (arrayLike && d.keySize !== 4) objectRefused('array-key-size', `${what}: ${mapTypeName(d.type)} maps have 4-byte keys, not ${d.keySize}`);
  if (d.type === BpfMapType.PROG_ARRAY && d.valueSize !== 4) objectRefused('prog-array-value-size', `${what}: PROG_ARRAY values are 4 bytes, not ${d.valueSize}`);
  try {
    checkMapGeometry(d, st.limits);
  } catch (e) {
    if (e instanceof ProtocolError && e.status === Status.BAD_REQUEST) objectRefused(e.code, `${what}: ${e.message}`);
    throw e;
  }
}

/** Maps and bytes the device holds outside the current object (which a new one replaces). */
function usageOutsideObject(st: OffloadState): { maps: number; bytes: number } {
  const mine = new Set(st.program.current?.object?.mapHandles ?? []);
  let maps = 0;
  let bytes = 0;
  for (const e of st.maps.entries()) if (!mine.has(e.handle)) { maps++; bytes += e.chargedBytes; }
  return { maps, bytes };
}

function checkMapQuotas(st: OffloadState, count: number, bytes: number): void {
  const q = st.limits;
  const other = usageOutsideObject(st);
  if (other.maps + count > q.maxMaps) {
    refuse(Status.QUOTA_EXCEEDED, 'quota-exceeded', `the object has ${count} maps (global data included) and this device ${other.maps} more; its max-maps quota is ${q.maxMaps}`,
      { a: QuotaId.MAX_MAPS, b: other.maps + count, c: q.maxMaps });
  }
  if (other.bytes + bytes > q.maxMapMemory) {
    refuse(Status.QUOTA_EXCEEDED, 'quota-exceeded', `the object's maps need ${bytes} bytes; this device uses ${other.bytes} of its max-map-memory quota of ${q.maxMapMemory}`,
      { a: QuotaId.MAX_MAP_MEMORY, b: Math.min(bytes, 0xffffffff), c: q.maxMapMemory });
  }
}

/** A program's instructions against the device's policy; `mapRef` judges each map reference. */
export function judgeInsns(st: OffloadState, insns: Uint8Array, where: string, tailCalls: boolean, mapRef: (index: number, src: number, imm: number) => void) {
  let decoded;
  try {
    decoded = decodeProgram(insns);
  } catch (e) {
    if (e instanceof ProtocolError) objectRefused(e.code, `${where}: ${e.message}`, e.detail);
    throw e;
  }
  const items = instructionChecks(decoded, { allowedHelpers: st.allowed, tailCalls, where });
  for (const m of decoded.mapRefs) items.push({ index: m.index, check: () => mapRef(m.index, m.src, m.handle) });
  runInOrder(items);
  return decoded;
}

/** Everything that can be judged from the bytes alone, before libbpf or the kernel sees them. */
function judgeInspection(st: OffloadState, o: ObjectInspection, progName: string): void {
  if (!isGplCompatible(o.license)) {
    refuse(Status.LICENSE_REFUSED, 'license-refused', `license '${o.license.slice(0, 64)}' is not GPL-compatible`);
  }
  for (const x of o.externs) {
    if (x.calledFrom) refuse(Status.KFUNC_REFUSED, 'kfunc-refused', `the object calls kfunc '${x.name.slice(0, 64)}' (section '${x.calledFrom}'): kfuncs are not allowed on this device`);
    refuse(Status.KSYM_REFUSED, 'ksym-refused', `the object refers to extern '${x.name.slice(0, 64)}' (a ksym or kconfig value of the host kernel): not allowed on this device`);
  }
  if (o.programs.length === 0) objectRefused('no-programs', "the object has no SEC(\"xdp\") program");
  if (progName && !o.programs.includes(progName)) {
    refuse(Status.BAD_REQUEST, 'no-such-program', `the object has no program '${progName}' (it has: ${o.programs.join(', ').slice(0, 300)})`);
  }
  let hasProgArray = false;
  let bytes = 0;
  for (const def of o.maps) {
    // libbpf sizes a PROG_ARRAY's key and value itself (u32 index, u32 program fd).
    const m = def.type === BpfMapType.PROG_ARRAY ? { ...def, keySize: def.keySize || 4, valueSize: def.valueSize || 4 } : def;
    if (m.pinning !== 0) objectRefused('map-pinning', `map '${m.name}' asks to be pinned (LIBBPF_PIN_*): pins on the host are the backend's, not the guest's`);
    if (m.initialValues && m.type !== BpfMapType.PROG_ARRAY) objectRefused('map-initial-values', `map '${m.name}': only a PROG_ARRAY may be initialised in the object`);
    checkObjectMap(st, m, false);
    if (m.type === BpfMapType.PROG_ARRAY) hasProgArray = true;
    bytes += objectMapBytes(m);
  }
  const data = o.dataSections.filter((s) => s.size > 0);
  for (const s of data) {
    checkObjectMap(st, { type: BpfMapType.ARRAY, keySize: 4, valueSize: s.size, maxEntries: 1, flags: 0, name: s.name }, true);
    bytes += objectMapBytes({ type: BpfMapType.ARRAY, keySize: 4, valueSize: s.size, maxEntries: 1 });
  }
  checkMapQuotas(st, o.maps.length + data.length, bytes);
  // The sections as clang wrote them: helpers and pseudo loads are final already. A map
  // reference here has no relocation behind it (clang leaves src_reg 0): a hand-made one.
  for (const c of o.code) {
    judgeInsns(st, c.insns, `section '${c.section}'`, hasProgArray, (index, src) =>
      refuse(Status.INSN_REFUSED, 'unrelocated-map-ref', `section '${c.section}' instruction ${index}: ld_imm64 src_reg ${src} without a relocation`, { a: index }));
  }
}

// ---------------------------------------------------------------------------------------
// Recheck (after libbpf, before publishing)

interface Checked {
  maps: { fd: number; id: number; def: MapCreateRequest; charged: number }[];
  programs: { name: string; fd: number; id: number; tag: string; insns: number; code: Uint8Array }[];
  entry: number;
}

function recheck(st: OffloadState, got: LoadedObjectFds, progName: string): Checked {
  const maps = got.maps.map((m) => {
    const def: MapCreateRequest = { type: m.type, keySize: m.keySize, valueSize: m.valueSize, maxEntries: m.maxEntries, flags: m.flags, name: m.name };
    checkObjectMap(st, def, m.internal);
    return { fd: m.fd, id: m.id, def, charged: Math.max(objectMapBytes(def), readMemlock(m.fd) ?? 0) };
  });
  checkMapQuotas(st, maps.length, maps.reduce((n, m) => n + m.charged, 0));
  const parentFd = new Map(got.maps.map((m) => [m.childFd, m.fd]));
  const hasProgArray = maps.some((m) => m.def.type === BpfMapType.PROG_ARRAY);
  const programs = got.programs.map((p) => {
    const where = `program '${p.name}'`;
    const decoded = judgeInsns(st, p.insns, where, hasProgArray, (index, src, imm) => {
      if (src !== Pseudo.MAP_FD && src !== Pseudo.MAP_VALUE) return;
      if (!parentFd.has(imm)) {
        refuse(Status.BAD_MAP_HANDLE, 'object-foreign-map', `${where} instruction ${index}: refers to a map outside the object`, { a: 0, b: index });
      }
    });
    if (decoded.count > st.limits.maxProgInsns) {
      refuse(Status.QUOTA_EXCEEDED, 'quota-exceeded', `${where} has ${decoded.count} instructions after relocation, over this device's max-prog-insns quota of ${st.limits.maxProgInsns}`,
        { a: QuotaId.MAX_PROG_INSNS, b: decoded.count, c: st.limits.maxProgInsns });
    }
    const judged = { decoded, license: 'GPL', usedHandles: [] };
    return { name: p.name, fd: p.fd, id: p.id, tag: p.tag, insns: decoded.count, code: rewriteMapRefs(judged, (childFd) => parentFd.get(childFd)!) };
  });
  // Every PROG_ARRAY slot holds one of this object's programs (user space reads program ids).
  const ids = new Set(programs.map((p) => p.id));
  const targets = new Set<number>();
  for (const m of maps.filter((x) => x.def.type === BpfMapType.PROG_ARRAY)) {
    const view = BpfMap.fromFd(m.fd);
    const key = new Uint8Array(4);
    for (let i = 0; i < m.def.maxEntries; i++) {
      new DataView(key.buffer).setUint32(0, i, true);
      let v: Uint8Array | null = null;
      try { v = view.lookup(key); } catch { v = null; }
      if (!v) continue;
      const id = new DataView(v.buffer, v.byteOffset).getUint32(0, true);
      if (!ids.has(id)) objectRefused('prog-array-foreign', `PROG_ARRAY '${m.def.name}' slot ${i} holds a program that is not the object's`);
      targets.add(id);
    }
  }
  // "empty: the object's first XDP program" — a tail-call target is not an entry, so the first one no PROG_ARRAY holds.
  let entry = progName ? programs.findIndex((p) => p.name === progName) : programs.findIndex((p) => !targets.has(p.id));
  if (entry < 0 && !progName) entry = 0;
  if (entry < 0) refuse(Status.BAD_REQUEST, 'no-such-program', `the object has no program '${progName}'`);
  return { maps, programs, entry };
}

/**
 * Pins the object's maps, its programs, the entry's code with map references as guest handles
 * (so a restarted backend can compose it again on an xsk port) and meta_obj last (pinning.ts).
 */
function pinLoadedObject(st: OffloadState, program: LoadedProgram, object: LoadedObject, entry: number, entries: MapEntry[]): void {
  const pins = st.pins;
  if (!pins) return;
  const handleOf = new Map(entries.map((e) => [e.map.fd, e.handle]));
  let code: Uint8Array | null = null;
  if (program.code) {
    const decoded = decodeProgram(program.code);
    code = rewriteMapRefs({ decoded, license: 'GPL', usedHandles: [] }, (fd) => {
      const h = handleOf.get(fd);
      if (h === undefined) throw new Error(`entry refers to fd ${fd}, not one of the object's maps`);
      return h;
    });
  }
  for (const e of entries) pins.pinMap(e.handle, e.map.fd, { handle: e.handle, chargedBytes: e.chargedBytes, createdAt: e.createdAt, name: e.def.name, object: true });
  pins.pinObject({
    version: 1, name: object.name, loadedAt: program.loadedAt, gen: program.id, entry, license: program.license,
    programs: object.programs.map((x) => ({ name: x.name, tag: x.tag, insns: x.insns })),
    mapHandles: [...object.mapHandles], codeBytes: code?.byteLength ?? 0, elfBytes: object.elf?.byteLength ?? 0,
  }, object.programs.map((x) => x.fd), code, object.elf);
}

function asRefusal(st: OffloadState, e: ObjectLoaderError): ProtocolError {
  if (e.code === 'object-load-failed' && e.log) {
    // "The verifier log (bounded) goes back to the guest" (DESIGN.md decision 6); with the
    // object's BTF line info it carries the C source lines.
    return new ProtocolError(Status.VERIFIER_REJECTED, 'verifier-rejected',
      `the host verifier rejected program '${e.program ?? '?'}': ${e.message.split('\n')[0]}`, { a: e.errno },
      encodeVerifierLog(e.log, st.verifierLogLimit()));
  }
  return new ProtocolError(Status.OBJECT_REFUSED, e.code, e.message.split('\n')[0]!.slice(0, 400), { a: e.errno });
}

// ---------------------------------------------------------------------------------------
// OBJ_LOAD

/** OBJ_LOAD's checks on the request and the upload; consumes the upload, whatever the outcome. */
function takeUpload(st: OffloadState, p: Uint8Array): { bytes: Uint8Array; name: string; progName: string } {
  const r = decodeObjLoad(p);
  const u = st.upload ?? refuse(Status.BAD_REQUEST, 'no-upload', 'OBJ_LOAD without an upload (OBJ_BEGIN, OBJ_CHUNK…)');
  if (u.received < u.bytes.byteLength) {
    refuse(Status.BAD_REQUEST, 'upload-incomplete', `OBJ_LOAD after ${u.received} of the announced ${u.bytes.byteLength} bytes`);
  }
  // OBJ_LOAD consumes the upload, whatever its outcome.
  st.upload = null;
  return { bytes: u.bytes, name: u.name || DEFAULT_OBJECT_NAME, progName: r.progName };
}

/** The loaded object becomes the device's program; OBJ_LOAD's response body. */
function publishObject(st: OffloadState, program: LoadedProgram): Uint8Array {
  const object = program.object!;
  // The claim's next handle moves past the object's maps; a program pinned before (PROG_SET)
  // must not come back in its place (restore.ts also prefers the newer of the two).
  st.writeClaimState();
  st.pins?.unpinProg();
  publishLoaded(st, program);
  st.log(`object '${object.name}' loaded: entry '${program.name}', ${object.programs.length} programs, ${object.mapHandles.length} maps`);
  return encodeObjLoadBody(object.programs.length, object.mapHandles.length, Buffer.from(program.tag, 'hex'));
}

export function objLoad(st: OffloadState, p: Uint8Array): Uint8Array {
  const u = takeUpload(st, p);
  return publishObject(st, loadObjectBytes(st, u.bytes, u.name, u.progName));
}

/** OBJ_LOAD on the serving path: the child runs while the thread serves other devices. */
export async function objLoadAsync(st: OffloadState, p: Uint8Array): Promise<Uint8Array> {
  const u = takeUpload(st, p);
  return publishObject(st, await loadObjectBytesAsync(st, u.bytes, u.name, u.progName));
}

/** inspect → judge: policy on the bytes, before any kernel object exists. */
function inspectAndJudge(st: OffloadState, bytes: Uint8Array, progName: string): ObjectInspection {
  let inspected: ObjectInspection;
  try {
    inspected = inspectObject(bytes);
  } catch (e) {
    if (e instanceof BpfObjectError) objectRefused('object-malformed', `malformed object: ${e.message}`);
    throw e;
  }
  judgeInspection(st, inspected, progName);
  return inspected;
}

/** A loader failure as the guest's refusal. */
function loaderFailed(st: OffloadState, name: string, e: unknown): never {
  if (e instanceof ObjectLoaderError) {
    st.log(`object '${name}' refused by the loader (${e.code}): ${e.message.split('\n')[0]}`);
    throw asRefusal(st, e);
  }
  throw e;
}

/**
 * inspect → judge → load → recheck → handles → pins: an object in the kernel, pinned when
 * pinning is on, but not the device's program yet (the caller publishes it, or retires it).
 * `handles`: the handles its maps must get, in libbpf's order (migration import: the source's);
 * otherwise the table's next ones. A refusal leaves nothing in the kernel, the table or the pins.
 */
export function loadObjectBytes(st: OffloadState, bytes: Uint8Array, name: string, progName: string, handles?: readonly number[]): LoadedProgram {
  const inspected = inspectAndJudge(st, bytes, progName);
  let got: LoadedObjectFds;
  try {
    got = loadObjectInChild(bytes, name, loaderOptions(st));
  } catch (e) {
    loaderFailed(st, name, e);
  }
  return adoptLoaded(st, got, inspected, bytes, name, progName, handles);
}

/**
 * loadObjectBytes with the child awaited; st.pendingLoad cancels it meanwhile (the child is
 * killed). A device reset or closed while the child ran gets nothing: the result is discarded,
 * its fds closed, and the request refused as before (NOT_CLAIMED); a load the operator's detach
 * cancelled is CANCELLED. Either way nothing of it stays in the kernel.
 */
export async function loadObjectBytesAsync(st: OffloadState, bytes: Uint8Array, name: string, progName: string): Promise<LoadedProgram> {
  const inspected = inspectAndJudge(st, bytes, progName);
  const epoch = st.epoch;
  const cancel = new AbortController();
  st.pendingLoad = cancel;
  let got: LoadedObjectFds | null = null;
  try {
    got = await loadObjectInChildAsync(bytes, name, loaderOptions(st), cancel.signal);
  } catch (e) {
    if (!cancel.signal.aborted) loaderFailed(st, name, e);
  } finally {
    if (st.pendingLoad === cancel) st.pendingLoad = null;
  }
  const stale = st.closed || st.epoch !== epoch || !st.claim;
  if (stale || cancel.signal.aborted || !got) {
    for (const fd of got ? [...got.maps.map((m) => m.fd), ...got.programs.map((x) => x.fd)] : []) closeBpfFd(fd);
    if (stale) {
      st.log(`object '${name}' discarded: the device was ${st.closed ? 'closed' : 'reset'} while it loaded`);
      refuse(Status.NOT_CLAIMED, 'broker-reset', `the device's offload was ${st.closed ? 'closed' : 'reset'} while the object loaded`);
    }
    st.log(`object '${name}' not loaded: cancelled (${String(cancel.signal.reason)})`);
    refuse(Status.CANCELLED, 'load-cancelled', `the load of object '${name}' was cancelled by the host (${String(cancel.signal.reason)}); nothing was loaded`);
  }
  return adoptLoaded(st, got, inspected, bytes, name, progName);
}

/** recheck → handles → pins on what the child made; every fd it handed over is closed on a refusal. */
function adoptLoaded(st: OffloadState, got: LoadedObjectFds, inspected: ObjectInspection, bytes: Uint8Array, name: string,
  progName: string, handles?: readonly number[]): LoadedProgram {
  // From here on the kernel objects are ours: every refusal closes them.
  const owned = new Set<number>([...got.maps.map((m) => m.fd), ...got.programs.map((x) => x.fd)]);
  try {
    const c = recheck(st, got, progName);
    if (handles && handles.length !== c.maps.length) {
      objectRefused('object-maps-differ', `the object has ${c.maps.length} maps, ${handles.length} handles were given for them`);
    }
    const entries: MapEntry[] = [];
    try {
      c.maps.forEach((m, i) => {
        const handle = handles ? handles[i]! : st.maps.peekHandle();
        const createdAt = st.isoNow();
        const e = st.maps.add({ map: BpfMap.fromFd(m.fd), id: m.id, def: m.def, chargedBytes: m.charged, createdAt }, handle);
        owned.delete(m.fd);
        entries.push(e);
      });
    } catch (e) {
      for (const x of entries) st.maps.remove(x.handle);
      throw e;
    }
    const entry = c.programs[c.entry]!;
    const object: LoadedObject = {
      name, mapHandles: entries.map((e) => e.handle), elf: bytes,
      programs: c.programs.map((x) => ({ name: x.name, fd: x.fd, id: x.id, tag: x.tag, insns: x.insns })),
    };
    const program: LoadedProgram = {
      fd: entry.fd, id: entry.id, tag: entry.tag, insns: entry.insns, loadedAt: st.isoNow(), name: entry.name.slice(0, 15),
      usedHandles: [...object.mapHandles], code: entry.code, license: inspected.license, source: null, object,
    };
    // Pinned before it is published (docs §5, §8): a published object survives a restart. A
    // failure to pin refuses the load: its maps leave the table (closed) and unpinned.
    try {
      pinLoadedObject(st, program, object, c.entry, entries);
    } catch (e) {
      for (const x of entries) {
        try { st.pins?.unpinMap(x.handle); } catch { /* best effort */ }
        st.maps.remove(x.handle);
      }
      if (e instanceof ProtocolError) throw e;
      refuse(Status.KERNEL_ERROR, 'pin-failed', `the object could not be pinned: ${(e as Error).message.slice(0, 200)}`,
        { a: (e as { errno?: number }).errno ?? 0 });
    }
    for (const x of c.programs) owned.delete(x.fd);
    return program;
  } finally {
    for (const fd of owned) closeBpfFd(fd);
  }
}

// ---------------------------------------------------------------------------------------
// OBJ_SHOW, OBJ_UNLOAD

function currentObject(st: OffloadState): { program: LoadedProgram; object: LoadedObject } {
  const program = st.program.current;
  const object = program?.object;
  if (!program || !object) return refuse(Status.NO_SUCH_ELEMENT, 'no-object', 'no object is loaded', { a: Errno.ENOENT });
  return { program, object };
}

export function objShow(st: OffloadState): Uint8Array {
  const { program, object } = currentObject(st);
  const entry = object.programs.find((x) => x.fd === program.fd);
  return encodeObjShowBody({
    objName: object.name, progName: entry?.name ?? program.name, tag: program.tag, progCount: object.programs.length,
    possibleCpus: numPossibleCpus(),
    maps: object.mapHandles.map((h) => st.maps.get(h)).filter((e): e is MapEntry => e !== undefined).map((e) => ({
      handle: e.handle, type: e.def.type, keySize: e.def.keySize, valueSize: e.def.valueSize, maxEntries: e.def.maxEntries,
      flags: e.def.flags, name: e.def.name,
    })),
  });
}

export function objUnload(st: OffloadState): Uint8Array {
  const loaded = st.program.current?.object !== undefined;
  if (loaded) st.unloadProgram('guest OBJ_UNLOAD');
  return encodeU32Body(loaded ? 1 : 0);
}
