// PROG_SET and PROG_UNSET. A PROG_SET walks the candidate states of program-state.ts one
// step at a time (received → checked → loaded → published); each step is a function from
// the phase before it, and a refusal at any step leaves the device's program as it was.

import { BpfError } from '../sys/bpf/libbpf.js';
import { BpfProgType, progLoadWithLog, closeBpfFd } from '../sys/bpf/programs.js';
import { progInfo } from '../sys/bpf/info.js';
import { Status, MAX_VERIFIER_LOG_BYTES } from './protocol.js';
import { decodeProgSet, encodeProgSetBody, encodeU32Body, encodeVerifierLog } from './host-codec.js';
import { refuse } from './errors.js';
import { decodeProgram, judgeProgram, rewriteMapRefs } from './program-check.js';
import type { Received, Checked, Loaded, LoadedProgram } from './program-state.js';
import type { ProgSetRequest } from './protocol.js';
import type { OffloadState } from './state.js';

/** Verifier log buffer handed to the kernel: the newest part of the log is kept (kernel ≥ 6.4). */
const VERIFIER_LOG_BUFFER = MAX_VERIFIER_LOG_BYTES;

/** decode + judge + map-reference rewrite: the checks a program passes before the kernel sees it (also used by restore). */
export function checkProgramFor(st: OffloadState, insns: Uint8Array, license: string, declaredHandles: readonly number[]) {
  const judged = judgeProgram(decodeProgram(insns), license, declaredHandles, {
    maxInsns: st.limits.maxProgInsns,
    allowedHelpers: st.allowed,
    handleExists: (h) => st.maps.has(h),
  });
  return { judged, code: rewriteMapRefs(judged, (h) => st.maps.get(h)!.map.fd) };
}

function check(st: OffloadState, c: Received): Checked {
  const { judged, code } = checkProgramFor(st, c.req.insns, c.req.license, c.req.mapHandles);
  return { phase: 'checked', req: c.req, judged, code };
}

function load(st: OffloadState, c: Checked): Loaded {
  const { req, judged, code } = c;
  let fd: number;
  try {
    fd = progLoadWithLog(code, { license: req.license, type: BpfProgType.XDP, name: st.hostName(req.name || 'offload'), logSize: VERIFIER_LOG_BUFFER }).fd;
  } catch (err) {
    if (err instanceof BpfError) {
      st.log(`program refused by the verifier: ${err.code}`);
      // "The verifier log (bounded) goes back to the guest" (DESIGN.md decision 6).
      refuse(Status.VERIFIER_REJECTED, 'verifier-rejected', `the host verifier rejected the program: ${err.code}`,
        { a: err.errno }, encodeVerifierLog(err.verifierLog ?? '', st.verifierLogLimit()));
    }
    throw err;
  }
  // Pinned before it is published, so a published program survives a restart; closed on any failure here.
  try {
    const info = progInfo(fd);
    const program: LoadedProgram = {
      fd, id: info.id, tag: info.tag, insns: judged.decoded.count, loadedAt: st.isoNow(),
      name: req.name, usedHandles: judged.usedHandles, code, license: req.license,
      // A copy: req.insns is a view into the whole request (or migration state).
      source: { insns: req.insns.slice(), mapHandles: [...req.mapHandles] },
    };
    st.pins?.pinProg(fd, {
      insns: program.insns, loadedAt: program.loadedAt, usedHandles: program.usedHandles, name: program.name,
      source: { bytes: req.insns.byteLength, license: req.license, declaredHandles: [...req.mapHandles], tag: program.tag },
    }, req.insns);
    return { phase: 'loaded', req, judged, program };
  } catch (err) {
    closeBpfFd(fd);
    throw err;
  }
}

/**
 * received → checked → loaded: the program is in the kernel (and pinned) but not yet the
 * device's. Shared by PROG_SET and migration import (migration.ts), which publishes only once
 * the whole state is in place.
 */
export function checkAndLoad(st: OffloadState, req: ProgSetRequest): Loaded {
  return load(st, check(st, { phase: 'received', req }));
}

/** published: the old program (if any) is closed only after listeners saw the new one. */
export function publishProgram(st: OffloadState, loaded: Loaded): LoadedProgram {
  return publishLoaded(st, loaded.program);
}

/** Publishes a loaded program of either path (OBJ_LOAD's has an object); retires the one it replaces. */
export function publishLoaded(st: OffloadState, prog: LoadedProgram): LoadedProgram {
  const old = st.program.publish(prog);
  st.emitProgram();
  if (old) st.retire(old, true);
  st.log(`program loaded: id ${prog.id} tag ${prog.tag}, ${prog.insns} insns, maps [${prog.usedHandles.join(', ')}]${old ? ` (replaced id ${old.id})` : ''}`);
  return prog;
}

export function progSet(st: OffloadState, p: Uint8Array): Uint8Array {
  const prog = publishProgram(st, checkAndLoad(st, decodeProgSet(p)));
  return encodeProgSetBody(prog.insns, Buffer.from(prog.tag, 'hex'));
}

export function progUnset(st: OffloadState): Uint8Array {
  return encodeU32Body(st.unloadProgram('guest PROG_UNSET') ? 1 : 0);
}
