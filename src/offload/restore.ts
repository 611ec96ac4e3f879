// Re-adopting a device's pinned offload after a backend restart (DESIGN.md decision 9): the
// claim, every pinned map under its old handle (contents intact: they are the same kernel
// maps) and the program (still the same kernel program). Objects that cannot be re-opened are
// logged and left out; their handles then answer BAD_MAP_HANDLE. The pinned program source
// came from the guest once, so it is checked again as if the guest had just sent it.
//
// A loaded object (OBJ_LOAD, protocol §8) comes back whole or not at all: meta_obj names its
// programs and maps, each program pin must be the XDP program of the recorded tag using only
// the object's maps, every PROG_ARRAY slot one of those programs, and the entry's pinned code
// passes the object path's instruction checks again before it may be composed. A pin dir is
// ours, but may have been tampered with: anything else refuses the object with a code in the
// log (`pin-object-*`), its pins and maps go, and the rest of the device is restored.

import { BpfMap, BpfMapType } from '../sys/bpf/maps.js';
import { mapInfo, progInfo } from '../sys/bpf/info.js';
import { closeBpfFd, BpfProgType } from '../sys/bpf/programs.js';
import { OFFLOAD_MAP_TYPES, OBJECT_MAP_TYPES } from './map-table.js';
import { ProtocolError } from './errors.js';
import { rewriteMapRefs } from './program-check.js';
import { judgeInsns } from './object-commands.js';
import { estimateMapBytes, readMemlock } from './quotas.js';
import { checkProgramFor } from './program-commands.js';
import type { DevicePins, PinnedClaim, PinnedObjectMeta } from './pinning.js';
import type { LoadedProgram, ObjectProgram } from './program-state.js';
import type { OffloadState } from './state.js';
import { roleOf } from './host-names.js';

/** Fills a fresh state from its pins; a state without pins (or with none written) stays fresh. */
export function restoreFromPins(st: OffloadState): void {
  const pins = st.pins;
  if (!pins || !pins.exists()) return;
  const claim = pins.readClaim();
  if (!claim || claim.device !== st.device) {
    st.log('pinned state unreadable; starting unclaimed and removing it');
    pins.removeAll();
    return;
  }
  let obj: PinnedObjectMeta | null = null;
  if (pins.hasObject()) {
    try {
      obj = objectMeta(pins.readObject());
    } catch (e) {
      st.log(`object not restored (${(e as PinRefusal).code ?? 'pin-object-meta'}): ${(e as Error).message}`);
      dropObjectPins(st, pins, null);
    }
  }
  // A crash between pinning one path's program and unpinning the other's leaves both: the newer wins.
  if (obj && pins.getProgMeta() !== undefined) {
    const progAt = pins.getProgMeta()?.loadedAt ?? '';
    if (progAt > obj.loadedAt) {
      st.log('pinned object is older than the pinned program (interrupted replace); dropping the object');
      dropObjectPins(st, pins, obj);
      obj = null;
    } else {
      pins.unpinProg();
    }
  }
  restoreMaps(st, pins, claim, new Set(obj?.mapHandles ?? []));
  st.maps.setNextHandle(claim.nextHandle); // add() already moved past every restored handle
  st.claim = { at: claim.claimedAt, responseLimit: claim.responseLimit };
  if (obj) {
    try {
      restoreObject(st, pins, obj);
    } catch (e) {
      st.log(`object '${obj.name}' not restored (${(e as PinRefusal).code ?? 'pin-object-kernel'}): ${(e as Error).message}`);
      dropObjectPins(st, pins, obj);
    }
  } else {
    try {
      restoreProgram(st, pins);
    } catch (e) {
      st.log(`program not restored: ${(e as Error).message}`);
    }
  }
  const p = st.program.current;
  st.log(`restored from ${pins.dir}: ${st.maps.size} maps, ${p ? `program id ${p.id}` : 'no program'}`);
}

function restoreMaps(st: OffloadState, pins: DevicePins, claim: PinnedClaim, objectHandles: ReadonlySet<number>): void {
  for (const { handle, meta } of pins.listMaps()) {
    let map: BpfMap | null = null;
    try {
      map = BpfMap.fromFd(pins.getMap(handle));
      // An object's maps may be of the object path's types (per-CPU, LRU, PROG_ARRAY); a map outside it may not.
      const ofObject = objectHandles.has(handle);
      if (meta?.object && !ofObject) throw new Error('pin-object-orphan-map: a map of an object that is not restored');
      const allowed = ofObject ? OBJECT_MAP_TYPES : OFFLOAD_MAP_TYPES;
      if (!allowed.includes(map.type)) throw new Error(`pinned map type ${map.type} is not offloadable`);
      const info = mapInfo(map.fd);
      const charged = meta?.chargedBytes ?? Math.max(estimateMapBytes(map.type, map.keySize, map.valueSize, map.maxEntries), readMemlock(map.fd) ?? 0);
      st.maps.add({
        map, id: info.id, chargedBytes: charged, createdAt: meta?.createdAt ?? claim.claimedAt,
        def: { type: map.type, keySize: map.keySize, valueSize: map.valueSize, maxEntries: map.maxEntries, flags: map.flags, name: meta?.name ?? roleOf(st.bpfPrefix, map.name) },
      }, handle);
    } catch (e) {
      map?.close();
      st.log(`map ${handle} not restored: ${(e as Error).message}`);
      try { pins.unpinMap(handle); } catch { /* already gone */ }
    }
  }
}

function restoreProgram(st: OffloadState, pins: DevicePins): void {
  const got = pins.getProg();
  if (!got) return;
  let info: ReturnType<typeof progInfo>;
  try {
    info = progInfo(got.fd);
  } catch (e) {
    closeBpfFd(got.fd);
    throw e;
  }
  const ids = new Map(st.maps.entries().map((e) => [e.id, e.handle]));
  const used = got.meta?.usedHandles ?? info.mapIds.map((id) => ids.get(id)).filter((h): h is number => h !== undefined);
  const program: LoadedProgram = {
    fd: got.fd, id: info.id, tag: info.tag, insns: got.meta?.insns ?? info.xlatedProgLen / 8,
    loadedAt: got.meta?.loadedAt ?? st.isoNow(), name: got.meta?.name ?? roleOf(st.bpfPrefix, info.name),
    usedHandles: used.filter((h) => st.maps.has(h)), code: null, license: 'GPL', source: null,
  };
  const src = got.meta?.source;
  if (src && src.tag === info.tag) {
    try {
      const bytes = pins.getSource(src.bytes);
      if (!bytes) throw new Error('source pin missing or short');
      program.code = checkProgramFor(st, bytes, src.license, src.declaredHandles).code;
      program.license = src.license;
      program.source = { insns: bytes, mapHandles: [...src.declaredHandles] };
    } catch (e) {
      st.log(`program source not restored (the program runs, but cannot be composed again): ${(e as Error).message}`);
    }
  } else if (src) {
    st.log('pinned program source belongs to another program (interrupted replace); not composing it');
  }
  st.program.restore(program);
}

// ---------------------------------------------------------------------------------------
// Objects

class PinRefusal extends Error {
  constructor(readonly code: string, message: string) { super(message); }
}

const MAX_OBJECT_PROGRAMS = 16;
const MAX_CODE_BYTES = 8 << 20;
const NAME_RE = /^[A-Za-z0-9_.]{1,63}$/;
const TAG_RE = /^[0-9a-f]{16}$/;

const isCount = (x: unknown, max: number): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0 && x <= max;

/** meta_obj as read from bpffs, checked field by field: nothing in it is trusted until here. */
function objectMeta(raw: unknown): PinnedObjectMeta {
  const bad = (what: string): never => { throw new PinRefusal('pin-object-meta', `meta_obj: ${what}`); };
  if (typeof raw !== 'object' || raw === null) bad('unreadable');
  const m = raw as Record<string, unknown>;
  if (m.version !== 1) bad('unknown version');
  if (typeof m.name !== 'string' || m.name.length > 15) bad('bad name');
  if (typeof m.loadedAt !== 'string' || m.loadedAt.length > 40) bad('bad loadedAt');
  if (typeof m.license !== 'string' || m.license.length > 128) bad('bad license');
  if (!isCount(m.gen, 0xffffffff) || m.gen === 0) bad('bad generation');
  if (!Array.isArray(m.programs) || m.programs.length === 0 || m.programs.length > MAX_OBJECT_PROGRAMS) bad('bad program list');
  const programs = (m.programs as unknown[]).map((p) => {
    const q = (typeof p === 'object' && p !== null ? p : {}) as Record<string, unknown>;
    if (typeof q.name !== 'string' || !NAME_RE.test(q.name) || typeof q.tag !== 'string' || !TAG_RE.test(q.tag) || !isCount(q.insns, 1 << 20)) bad('bad program entry');
    return { name: q.name as string, tag: q.tag as string, insns: q.insns as number };
  });
  if (!isCount(m.entry, programs.length - 1)) bad('bad entry index');
  if (!Array.isArray(m.mapHandles) || m.mapHandles.length > 1024 || !m.mapHandles.every((h) => isCount(h, 0xffffffff) && h > 0)) bad('bad map handles');
  if (new Set(m.mapHandles as number[]).size !== (m.mapHandles as number[]).length) bad('duplicate map handles');
  if (!isCount(m.codeBytes, MAX_CODE_BYTES) || (m.codeBytes as number) % 8 !== 0) bad('bad code length');
  if (m.elfBytes !== undefined && !isCount(m.elfBytes, MAX_CODE_BYTES)) bad('bad object length');
  return {
    version: 1, name: m.name as string, loadedAt: m.loadedAt as string, gen: m.gen as number, entry: m.entry as number,
    license: m.license as string, programs, mapHandles: [...(m.mapHandles as number[])], codeBytes: m.codeBytes as number,
    elfBytes: (m.elfBytes as number | undefined) ?? 0,
  };
}

/** A refused object goes whole: its maps leave the table (closed) and every pin of it is removed. */
function dropObjectPins(st: OffloadState, pins: DevicePins, obj: PinnedObjectMeta | null): void {
  for (const h of obj?.mapHandles ?? []) {
    st.maps.remove(h);
    try { pins.unpinMap(h); } catch { /* already gone */ }
  }
  try { pins.unpinAnyObject(); } catch (e) { st.log(`removing object pins failed: ${(e as Error).message}`); }
}

function restoreObject(st: OffloadState, pins: DevicePins, meta: PinnedObjectMeta): void {
  const refuse = (code: string, what: string): never => { throw new PinRefusal(code, what); };
  const mapIds = new Set<number>();
  for (const h of meta.mapHandles) {
    const e = st.maps.get(h) ?? refuse('pin-object-map-missing', `map handle ${h} of the object is not pinned or not restorable`);
    mapIds.add(e.id);
  }
  const opened: ObjectProgram[] = [];
  try {
    meta.programs.forEach((p, i) => {
      let fd: number;
      try { fd = pins.getObjectProg(meta.gen, i); } catch (e) { return refuse('pin-object-program-missing', `program ${i} ('${p.name}'): ${(e as Error).message}`); }
      const info = (() => { try { return progInfo(fd); } catch (e) { closeBpfFd(fd); return refuse('pin-object-program-missing', `program ${i} pin is not a program: ${(e as Error).message}`); } })();
      opened.push({ name: p.name, fd, id: info.id, tag: info.tag, insns: p.insns });
      if (info.type !== BpfProgType.XDP) refuse('pin-object-mismatch', `program ${i} ('${p.name}') is of type ${info.type}, not XDP`);
      if (info.tag !== p.tag) refuse('pin-object-mismatch', `program ${i} ('${p.name}') has tag ${info.tag}, not the recorded ${p.tag}`);
      if (i === meta.entry && info.id !== meta.gen) refuse('pin-object-mismatch', `the entry program is id ${info.id}, not the recorded ${meta.gen}`);
      const foreign = info.mapIds.find((id) => !mapIds.has(id));
      if (foreign !== undefined) refuse('pin-object-foreign-map', `program ${i} ('${p.name}') uses map id ${foreign}, not one of the object's`);
    });
    const ids = new Set(opened.map((p) => p.id));
    if (ids.size !== opened.length) refuse('pin-object-mismatch', 'two program pins are the same program');
    for (const h of meta.mapHandles) {
      const e = st.maps.get(h)!;
      if (e.def.type !== BpfMapType.PROG_ARRAY) continue;
      const key = new Uint8Array(4);
      for (let i = 0; i < e.def.maxEntries; i++) {
        new DataView(key.buffer).setUint32(0, i, true);
        let v: Uint8Array | null = null;
        try { v = e.map.lookup(key); } catch { v = null; }
        if (v && !ids.has(new DataView(v.buffer, v.byteOffset).getUint32(0, true))) {
          refuse('pin-object-foreign-program', `PROG_ARRAY '${e.def.name}' slot ${i} holds a program that is not the object's`);
        }
      }
    }
    const entry = opened[meta.entry]!;
    const program: LoadedProgram = {
      fd: entry.fd, id: entry.id, tag: entry.tag, insns: entry.insns, loadedAt: meta.loadedAt, name: entry.name.slice(0, 15),
      usedHandles: [...meta.mapHandles], code: entryCode(st, pins, meta), license: meta.license, source: null,
      object: { name: meta.name, programs: opened, mapHandles: [...meta.mapHandles], ...objectElf(st, pins, meta) },
    };
    st.program.restore(program);
  } catch (e) {
    for (const p of opened) closeBpfFd(p.fd);
    throw e;
  }
}

/** The pinned ELF bytes (a migration loads them again on the destination, which checks them as a guest's upload). */
function objectElf(st: OffloadState, pins: DevicePins, meta: PinnedObjectMeta): { elf?: Uint8Array } {
  if (!meta.elfBytes) return {};
  try {
    const elf = pins.getObjectElf(meta.gen, meta.elfBytes);
    if (!elf) throw new Error('object pin missing or short');
    return { elf };
  } catch (e) {
    st.log(`object bytes not restored (the object runs, but cannot migrate): ${(e as Error).message}`);
    return {};
  }
}

/**
 * The entry's pinned code, judged again as the object path judges a relocated program (map
 * references only to the object's maps), with the handles turned into this process's fds; null
 * (the program runs, but an xsk port cannot compose it) when it is missing or refused.
 */
function entryCode(st: OffloadState, pins: DevicePins, meta: PinnedObjectMeta): Uint8Array | null {
  if (meta.codeBytes === 0) return null;
  try {
    const bytes = pins.getObjectCode(meta.gen, meta.codeBytes);
    if (!bytes) throw new Error('code pin missing or short');
    const mine = new Set(meta.mapHandles);
    const hasProgArray = meta.mapHandles.some((h) => st.maps.get(h)?.def.type === BpfMapType.PROG_ARRAY);
    const decoded = judgeInsns(st, bytes, `pinned entry of '${meta.name}'`, hasProgArray, (index, _src, handle) => {
      if (!mine.has(handle)) throw new PinRefusal('pin-object-foreign-map', `instruction ${index} refers to handle ${handle}, not one of the object's maps`);
    });
    if (decoded.count > st.limits.maxProgInsns) throw new Error(`${decoded.count} instructions, over max-prog-insns`);
    return rewriteMapRefs({ decoded, license: meta.license, usedHandles: [] }, (h) => st.maps.get(h)!.map.fd);
  } catch (e) {
    const code = e instanceof PinRefusal || e instanceof ProtocolError ? ` (${e.code})` : '';
    st.log(`object entry code not restored${code} (the program runs, but cannot be composed again): ${(e as Error).message}`);
    return null;
  }
}
