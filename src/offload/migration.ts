// The device's offload state across a live migration (DESIGN.md decision 11): export on the
// source, import on the destination. QEMU carries the bytes in its own migration stream
// (VHOST_USER_PROTOCOL_F_DEVICE_STATE); the format is migration-format.ts and
// docs/offload-protocol.md §7.
//
// Import treats the state as guest input from another host: copy, decode (syntax), judge
// against *this* device's quotas and helper allow-list (the destination's configuration
// wins), then build through the same steps MAP_CREATE and PROG_SET use, so the program goes
// through the broker's checks and the host verifier again. Nothing is published (no claim or
// program listener hears anything) until the whole state is in place; a refusal at any step
// closes what was created and removes what was pinned.

import { BpfMapType, BPF_ANY, BPF_F_RDONLY_PROG, isPerCpuMapType, numPossibleCpus } from '../sys/bpf/maps.js';
import { BpfError } from '../sys/bpf/libbpf.js';
import { closeBpfFd } from '../sys/bpf/programs.js';
import { Status, type MapCreateRequest } from './protocol.js';
import { MigrationStateError, ProtocolError, type MigrationStateCode } from './errors.js';
import { checkMapDef, mapTypeName, type MapEntry } from './map-table.js';
import { estimateMapBytes } from './quotas.js';
import { decodeProgram, judgeProgram } from './program-check.js';
import { createMapEntry } from './map-commands.js';
import { checkAndLoad, publishProgram } from './program-commands.js';
import { decodeState, encodeState, type MigrationState, type StateMap, type StateObject, type StateObjectMap, type StateProgram, type VerdictCounters } from './migration-format.js';
import { loadObjectBytes } from './object-commands.js';
import { publishLoaded } from './program-commands.js';
import type { Loaded, LoadedProgram } from './program-state.js';
import type { Quotas } from './quotas.js';
import type { OffloadState } from './state.js';

export type { VerdictCounters } from './migration-format.js';

/** What the caller (the vhost-user/net side) adds to the state: the broker has no datapath knowledge. */
export interface ExportExtras {
  /** Verdict counters summed over the device's pairs (net/stats.ts xdpPass/xdpDrop/xdpTx/xdpAborted). */
  counters?: VerdictCounters;
  /** XDP_FLAGS_* the port attached the program with (0: BPF_PROG_TEST_RUN on a tap port). */
  attachFlags?: number;
}

/** What import gives back for the caller to apply: counters to seed, the source's attach flags and quotas. */
export interface ImportExtras {
  counters: VerdictCounters | null;
  attachFlags: number | null;
  /** The source's limits (informational: this device keeps its own). */
  sourceQuotas: Quotas;
}

/** Without a program or maps; what the destination needs to know before it has a broker (no --offload). */
export interface StateSummary {
  claimed: boolean;
  maps: number;
  elements: number;
  program: { name: string; insns: number; tag: string } | null;
}

// ---------------------------------------------------------------------------------------
// Export

/**
 * Every element of a map, keys and values packed. Read with the program not running (the
 * caller stops the datapath first); bounded by max_entries and deduplicated, so a map changed
 * meanwhile cannot make this loop forever or write a key twice.
 */
function readElements(e: MapEntry): Pick<StateMap, 'count' | 'keys' | 'values'> {
  const { keySize, valueSize, maxEntries } = e.def;
  const keys: Uint8Array[] = [];
  const values: Uint8Array[] = [];
  if (e.def.type === BpfMapType.ARRAY) {
    for (let i = 0; i < maxEntries; i++) {
      const k = new Uint8Array(4);
      new DataView(k.buffer).setUint32(0, i, true);
      const v = e.map.lookup(k);
      if (v) { keys.push(k); values.push(v); }
    }
  } else {
    const seen = new Set<string>();
    let key: Uint8Array | null = null;
    for (let n = 0; n < maxEntries; n++) {
      const next: Uint8Array | null = e.map.nextKey(key);
      if (!next) break;
      key = next;
      const id = Buffer.from(next).toString('latin1');
      if (seen.has(id)) continue;
      const v = e.map.lookup(next);
      if (!v) continue;
      seen.add(id);
      keys.push(next);
      values.push(v);
    }
  }
  // valueBytes: a per-CPU value is every CPU's (possible CPUs × round_up(value_size, 8)).
  return { count: keys.length, keys: Buffer.concat(keys, keys.length * keySize), values: Buffer.concat(values, values.length * e.map.valueBytes) };
}

export function exportState(st: OffloadState, extras: ExportExtras = {}): Uint8Array {
  const c = st.claim;
  const cur = st.program.current;
  const object = cur?.object ? exportObject(st, cur, extras.attachFlags ?? 0) : null;
  const mine = new Set(object?.maps.map((m) => m.handle) ?? []);
  const maps: StateMap[] = st.maps.entries().filter((e) => !mine.has(e.handle)).map((e) => ({ handle: e.handle, ...e.def, ...readElements(e) }));
  const p = object ? null : cur;
  let program: StateProgram | null = null;
  if (p) {
    if (!p.source) {
      throw new MigrationStateError('state-program-unexportable',
        `program id ${p.id} was re-adopted from pins without its source; it cannot be loaded on another host`);
    }
    program = { name: p.name, license: p.license, mapHandles: p.source.mapHandles, insns: p.source.insns, tag: p.tag, attachFlags: extras.attachFlags ?? 0 };
  }
  const at = c ? Date.parse(c.at) : NaN;
  // An upload the guest has not finished goes too: its next OBJ_CHUNK may reach the destination.
  const u = c ? st.upload : null;
  const upload = u ? { name: u.name, totalBytes: u.bytes.byteLength, received: u.bytes.subarray(0, u.received) } : null;
  const bytes = encodeState({
    claim: c ? { claimedAtMs: Number.isFinite(at) ? at : 0, responseLimit: c.responseLimit, nextHandle: st.maps.nextHandle } : null,
    quotas: { ...st.limits }, maps, program, counters: extras.counters ?? null, object, upload,
  });
  st.log(`migration state exported: ${bytes.byteLength} bytes, ${maps.length} maps, ${program ? `program ${p!.tag}` : object ? `object '${object.name}' ${object.tag}` : 'no program'}` +
    `${upload ? `, an upload at ${upload.received.byteLength} of ${upload.totalBytes} bytes` : ''}`);
  return bytes;
}

/**
 * A loaded object as the destination loads it again: the ELF the guest uploaded, the entry's
 * name, and every map's contents in libbpf's order (a PROG_ARRAY's and a read-only map's come
 * from the ELF again: the object's own programs, `.rodata` as the guest patched it).
 */
function exportObject(st: OffloadState, p: LoadedProgram, attachFlags: number): StateObject {
  const obj = p.object!;
  if (!obj.elf) {
    throw new MigrationStateError('state-object-unsupported',
      `object '${obj.name}' was re-adopted from pins without its bytes; it cannot be loaded on another host (OBJ_UNLOAD and load it again to migrate)`);
  }
  const entry = obj.programs.find((x) => x.fd === p.fd)!;
  const maps: StateObjectMap[] = obj.mapHandles.map((h) => {
    const e = st.maps.get(h)!;
    const fromElf = e.def.type === BpfMapType.PROG_ARRAY || (e.def.flags & BPF_F_RDONLY_PROG) !== 0;
    const contents = fromElf ? { count: 0, keys: new Uint8Array(0), values: new Uint8Array(0) } : readElements(e);
    return { handle: h, ...e.def, ...contents, valueCpus: isPerCpuMapType(e.def.type) ? numPossibleCpus() : 1 };
  });
  return { attachFlags, tag: p.tag, name: obj.name, progName: entry.name, elf: obj.elf, maps };
}

// ---------------------------------------------------------------------------------------
// Import

export function describeState(bytes: Uint8Array): StateSummary {
  const s = decodeState(bytes.slice());
  return {
    claimed: s.claim !== null, maps: s.maps.length, elements: s.maps.reduce((n, m) => n + m.count, 0),
    program: s.program ? { name: s.program.name, insns: s.program.insns.byteLength / 8, tag: s.program.tag }
      : s.object ? { name: s.object.progName, insns: 0, tag: s.object.tag } : null,
  };
}

type Phase = 'maps' | 'program';

/** A refusal by one of the broker's own rules, as the migration-state refusal naming it. */
function asStateError(e: unknown, phase: Phase, what: string): MigrationStateError {
  if (e instanceof MigrationStateError) return e;
  if (e instanceof ProtocolError) {
    let code: MigrationStateCode;
    if (e.status === Status.QUOTA_EXCEEDED) code = 'state-quota';
    else if (e.status === Status.MAP_TYPE_REFUSED) code = 'state-map-type';
    else if (e.status === Status.KERNEL_ERROR) code = 'state-kernel';
    else if (phase === 'program') code = 'state-program-refused';
    else code = 'state-malformed';
    return new MigrationStateError(code, `${what}: ${e.message}`, e.code, e);
  }
  if (e instanceof BpfError) return new MigrationStateError('state-kernel', `${what}: ${e.message.split('\n')[0]}`, e.code, e);
  // Host-side failures (a pin that cannot be written): still a refusal with a code, so the migration fails cleanly.
  return new MigrationStateError('state-kernel', `${what}: ${(e as Error)?.message ?? String(e)}`, undefined, e);
}

/** Each key once (map contents must come out exact, not last-write-wins), array indexes in range. */
function checkKeys(m: StateMap, what: string): void {
  const seen = new Set<string>();
  const k = m.keySize;
  for (let i = 0; i < m.count; i++) {
    const key = m.keys.subarray(i * k, (i + 1) * k);
    const id = Buffer.from(key.buffer, key.byteOffset, k).toString('latin1');
    if (seen.has(id)) throw new MigrationStateError('state-malformed', `${what}: element ${i} repeats a key`, 'duplicate-key');
    seen.add(id);
    if (m.type === BpfMapType.ARRAY || m.type === BpfMapType.PERCPU_ARRAY) {
      const idx = new DataView(key.buffer, key.byteOffset, 4).getUint32(0, true);
      if (idx >= m.maxEntries) throw new MigrationStateError('state-malformed', `${what}: index ${idx} beyond max_entries ${m.maxEntries}`, 'array-index');
    }
  }
}

/**
 * Judges the whole state against this device's rules before the kernel is asked for anything:
 * the checks MAP_CREATE and PROG_SET make, with the destination's quotas and allow-list.
 */
function judge(st: OffloadState, s: MigrationState): void {
  const q = st.limits;
  if (s.maps.length > q.maxMaps) {
    throw new MigrationStateError('state-quota', `state has ${s.maps.length} maps; this device's max-maps quota is ${q.maxMaps}`, 'quota-exceeded');
  }
  let bytes = 0;
  for (const m of s.maps) {
    const what = `map ${m.handle}`;
    try { checkMapDef(m, q); } catch (e) { throw asStateError(e, 'maps', what); }
    checkKeys(m, what);
    bytes += estimateMapBytes(m.type, m.keySize, m.valueSize, m.maxEntries);
  }
  const o = s.object;
  if (o) {
    if (o.elf.byteLength > q.maxObjectBytes) {
      throw new MigrationStateError('state-quota', `the object is ${o.elf.byteLength} bytes; this device's max-object-bytes quota is ${q.maxObjectBytes}`, 'quota-exceeded');
    }
    for (const m of o.maps) {
      const what = `object map ${m.handle}`;
      const want = isPerCpuMapType(m.type) ? numPossibleCpus() : 1;
      // Per-CPU values are this host's CPUs' each: with another count there is no faithful mapping.
      if (m.valueCpus !== want) {
        throw new MigrationStateError('state-map-type', `${what}: values for ${m.valueCpus} CPUs, this host has ${want} for it`, 'percpu-cpus');
      }
      checkKeys(m, what);
    }
  }
  if (s.upload && s.upload.totalBytes > q.maxObjectBytes) {
    throw new MigrationStateError('state-quota', `the upload in progress is of a ${s.upload.totalBytes}-byte object; this device's max-object-bytes quota is ${q.maxObjectBytes}`, 'quota-exceeded');
  }
  if (bytes > q.maxMapMemory) {
    throw new MigrationStateError('state-quota', `state's maps need ${bytes} bytes; this device's max-map-memory quota is ${q.maxMapMemory}`, 'quota-exceeded');
  }
  const p = s.program;
  if (p) {
    const handles = new Set(s.maps.map((m) => m.handle));
    try {
      judgeProgram(decodeProgram(p.insns), p.license, p.mapHandles, { maxInsns: q.maxProgInsns, allowedHelpers: st.allowed, handleExists: (h) => handles.has(h) });
    } catch (e) {
      throw asStateError(e, 'program', 'program');
    }
  }
}

/** Creates one map under its old handle and writes every element (keys already known distinct). */
function buildMap(st: OffloadState, m: StateMap): void {
  const def: MapCreateRequest = { type: m.type, keySize: m.keySize, valueSize: m.valueSize, maxEntries: m.maxEntries, flags: m.flags, name: m.name };
  const e = createMapEntry(st, def, m.handle);
  // The kernel's batch update takes no NOEXIST (elem_flags allows BPF_F_LOCK only), hence judge()'s duplicate check.
  if (m.count > 0) e.map.updateBatch(m.keys, m.values, m.count, BPF_ANY);
}

/** Undoes a partial import: nothing was published, so nobody is told; the kernel objects and pins go. */
function rollback(st: OffloadState, loaded: Loaded | null, object: LoadedProgram | null): void {
  if (loaded) {
    try { st.pins?.unpinProg(); } catch { /* removeAll below */ }
    closeBpfFd(loaded.program.fd);
  }
  if (object) for (const x of object.object!.programs) closeBpfFd(x.fd);
  st.maps.clear();
  st.claim = null;
  if (st.pins) {
    try { st.pins.removeAll(); } catch (e) { st.log(`removing pins after a refused import failed: ${(e as Error).message}`); }
  }
}

/**
 * Fills a fresh device state from migration bytes; throws MigrationStateError (the state is
 * then as fresh as before: no map, program or pin). On success the claim and the program are
 * published, so listeners attach the program to the port before the guest's first frame.
 */
export function importState(st: OffloadState, bytes: Uint8Array): ImportExtras {
  if (st.closed || st.claim || st.maps.size > 0 || st.program.current || st.pins?.exists()) {
    throw new MigrationStateError('state-not-fresh', `device ${st.device} already holds offload state; import needs a fresh broker`);
  }
  // "Copy, then validate" (DESIGN.md decision 5): the decoded state is views into this copy.
  const s = decodeState(bytes.slice());
  judge(st, s);
  let loaded: Loaded | null = null;
  let object: LoadedProgram | null = null;
  let phase: Phase = 'maps';
  let what = 'state';
  try {
    if (s.claim) st.pins?.ensureDir();
    for (const m of s.maps) {
      what = `map ${m.handle} (${mapTypeName(m.type)})`;
      buildMap(st, m);
    }
    if (s.claim) st.maps.setNextHandle(s.claim.nextHandle);
    const p = s.program;
    if (p) {
      phase = 'program';
      what = 'program';
      loaded = checkAndLoad(st, { flags: 0, name: p.name, license: p.license, mapHandles: p.mapHandles, insns: p.insns });
      // The kernel's tag hashes the instructions with map references blanked, so it is the same on every host.
      if (loaded.program.tag !== p.tag) {
        throw new MigrationStateError('state-program-refused', `program tag ${loaded.program.tag} is not the source's ${p.tag}`, 'tag-mismatch');
      }
    }
    if (s.object) {
      phase = 'program';
      what = `object '${s.object.name}'`;
      object = importObject(st, s.object);
    }
    if (s.claim) {
      st.claim = { at: new Date(s.claim.claimedAtMs).toISOString(), responseLimit: s.claim.responseLimit };
      st.writeClaimState();
    }
  } catch (e) {
    rollback(st, loaded, object);
    const err = asStateError(e, phase, what);
    st.log(`migration state refused (${err.code}): ${err.message}`);
    throw err;
  }
  // Published: from here on nothing can fail.
  if (s.upload) {
    const whole = new Uint8Array(s.upload.totalBytes);
    whole.set(s.upload.received);
    st.upload = { name: s.upload.name, bytes: whole, received: s.upload.received.byteLength };
  }
  if (s.claim) {
    st.log(`migration state imported: ${s.maps.length} maps, ${s.maps.reduce((n, m) => n + m.count, 0)} elements, response limit ${s.claim.responseLimit}`);
    st.emitClaim();
  }
  if (loaded) publishProgram(st, loaded);
  if (object) publishLoaded(st, object);
  return { counters: s.counters, attachFlags: s.program?.attachFlags ?? s.object?.attachFlags ?? null, sourceQuotas: s.quotas };
}

/**
 * Loads the source's object through OBJ_LOAD's own steps (inspect, judge, libbpf in a child,
 * recheck) with the source's handles, checks it is the same object (map geometry, entry tag),
 * then writes the maps' contents. Not published: importState does that once all stands.
 */
function importObject(st: OffloadState, o: StateObject): LoadedProgram {
  const program = loadObjectBytes(st, o.elf, o.name, o.progName, o.maps.map((m) => m.handle));
  try {
    if (program.tag !== o.tag) {
      throw new MigrationStateError('state-program-refused', `object entry tag ${program.tag} is not the source's ${o.tag}`, 'tag-mismatch');
    }
    for (const m of o.maps) {
      const e = st.maps.get(m.handle)!;
      const d = e.def;
      if (d.type !== m.type || d.keySize !== m.keySize || d.valueSize !== m.valueSize || d.maxEntries !== m.maxEntries) {
        throw new MigrationStateError('state-malformed', `object map ${m.handle} ('${d.name}') is not the source's (${mapTypeName(m.type)} ${m.keySize}/${m.valueSize}/${m.maxEntries})`, 'object-maps-differ');
      }
      if (m.count > 0 && (d.type === BpfMapType.PROG_ARRAY || (d.flags & BPF_F_RDONLY_PROG) !== 0)) {
        throw new MigrationStateError('state-malformed', `object map ${m.handle} ('${d.name}') comes from the object; the state may not carry its contents`, 'object-map-contents');
      }
      const vb = e.map.valueBytes;
      for (let i = 0; i < m.count; i++) {
        e.map.update(m.keys.subarray(i * m.keySize, (i + 1) * m.keySize), m.values.subarray(i * vb, (i + 1) * vb), BPF_ANY);
      }
    }
    return program;
  } catch (e) {
    // loadObjectBytes handed the programs over: close them here (rollback clears maps and pins).
    for (const x of program.object!.programs) closeBpfFd(x.fd);
    throw e;
  }
}
