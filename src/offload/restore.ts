// Re-adopting a device's pinned offload after a backend restart (DESIGN.md decision 9): the
// claim, every pinned map under its old handle (contents intact: they are the same kernel
// maps) and the program (still the same kernel program). Objects that cannot be re-opened are
// logged and left out; their handles then answer BAD_MAP_HANDLE. The pinned program source
// came from the guest once, so it is checked again as if the guest had just sent it.

import { BpfMap } from '../sys/bpf/maps.js';
import { mapInfo, progInfo } from '../sys/bpf/info.js';
import { closeBpfFd } from '../sys/bpf/programs.js';
import { OFFLOAD_MAP_TYPES } from './map-table.js';
import { estimateMapBytes, readMemlock } from './quotas.js';
import { checkProgramFor } from './program-commands.js';
import type { DevicePins, PinnedClaim } from './pinning.js';
import type { LoadedProgram } from './program-state.js';
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
  restoreMaps(st, pins, claim);
  st.maps.setNextHandle(claim.nextHandle);
  st.claim = { at: claim.claimedAt, responseLimit: claim.responseLimit };
  try {
    restoreProgram(st, pins);
  } catch (e) {
    st.log(`program not restored: ${(e as Error).message}`);
  }
  const p = st.program.current;
  st.log(`restored from ${pins.dir}: ${st.maps.size} maps, ${p ? `program id ${p.id}` : 'no program'}`);
}

function restoreMaps(st: OffloadState, pins: DevicePins, claim: PinnedClaim): void {
  for (const { handle, meta } of pins.listMaps()) {
    let map: BpfMap | null = null;
    try {
      map = BpfMap.fromFd(pins.getMap(handle));
      if (!OFFLOAD_MAP_TYPES.includes(map.type)) throw new Error(`pinned map type ${map.type} is not offloadable`);
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
