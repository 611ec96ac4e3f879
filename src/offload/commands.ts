// The command table: every command the broker serves, with the rules the dispatcher checks
// before its handler runs (DPDK vhost_user.c's handler table, rust-vmm's backend_req_handler
// size checks). Handlers never repeat these checks; they start from a payload whose fixed
// size and flags are already known good.

import {
  Cmd, CLAIM_BYTES, MAP_CREATE_BYTES, MAP_FREE_BYTES, ELEM_PREFIX_BYTES, LOOKUP_BATCH_PREFIX_BYTES,
  BATCH_PREFIX_BYTES, PROG_SET_PREFIX_BYTES, OBJ_BEGIN_BYTES, OBJ_CHUNK_PREFIX_BYTES, OBJ_LOAD_BYTES,
} from './protocol.js';
import * as claims from './claim-commands.js';
import * as maps from './map-commands.js';
import * as programs from './program-commands.js';
import * as objects from './object-commands.js';
import type { OffloadState } from './state.js';

export interface CommandSpec {
  readonly name: string;
  /** False only for CLAIM: the dispatcher checks the "claim" before any other command runs (§2). */
  readonly needsClaim: boolean;
  /** "Every command but RELEASE costs one token" of the max-ops-per-sec bucket. */
  readonly costsToken: boolean;
  /** "Request payloads must be exactly the size stated (no trailing bytes) unless a field says otherwise" (§3). */
  readonly size: { exactly: number } | { atLeast: number };
  /** Where the request's u32 flags sit, and what they may be: "flags (0)", or ELEM_UPDATE's ANY/NOEXIST/EXIST. */
  readonly flags?: { offset: number; allowed: 'zero' | 'update' };
  /** Returns the OK response's body (undefined: empty); throws ProtocolError to refuse. */
  readonly run: (st: OffloadState, payload: Uint8Array) => Uint8Array | undefined;
  /** The serving path's variant of `run` for a command that waits on something slow (OBJ_LOAD's child). */
  readonly runAsync?: (st: OffloadState, payload: Uint8Array) => Promise<Uint8Array | undefined>;
}

const elem = (name: string, run: CommandSpec['run'], allowed: 'zero' | 'update' = 'zero'): CommandSpec =>
  ({ name, needsClaim: true, costsToken: true, size: { atLeast: ELEM_PREFIX_BYTES }, flags: { offset: 4, allowed }, run });

export const COMMANDS: ReadonlyMap<number, CommandSpec> = new Map<number, CommandSpec>([
  [Cmd.CLAIM, { name: 'CLAIM', needsClaim: false, costsToken: true, size: { exactly: CLAIM_BYTES }, run: claims.claim }],
  [Cmd.CAPS, { name: 'CAPS', needsClaim: true, costsToken: true, size: { exactly: 0 }, run: claims.caps }],
  [Cmd.RELEASE, { name: 'RELEASE', needsClaim: true, costsToken: false, size: { exactly: 0 }, run: claims.release }],
  [Cmd.PROG_SET, {
    name: 'PROG_SET', needsClaim: true, costsToken: true, size: { atLeast: PROG_SET_PREFIX_BYTES },
    flags: { offset: 0, allowed: 'zero' }, run: programs.progSet,
  }],
  [Cmd.PROG_UNSET, { name: 'PROG_UNSET', needsClaim: true, costsToken: true, size: { exactly: 0 }, run: programs.progUnset }],
  [Cmd.MAP_CREATE, { name: 'MAP_CREATE', needsClaim: true, costsToken: true, size: { exactly: MAP_CREATE_BYTES }, run: maps.mapCreate }],
  [Cmd.MAP_FREE, { name: 'MAP_FREE', needsClaim: true, costsToken: true, size: { exactly: MAP_FREE_BYTES }, run: maps.mapFree }],
  [Cmd.ELEM_LOOKUP, elem('ELEM_LOOKUP', maps.elemLookup)],
  [Cmd.ELEM_UPDATE, elem('ELEM_UPDATE', maps.elemUpdate, 'update')],
  [Cmd.ELEM_DELETE, elem('ELEM_DELETE', maps.elemDelete)],
  [Cmd.GET_FIRST_KEY, elem('GET_FIRST_KEY', maps.getFirstKey)],
  [Cmd.GET_NEXT_KEY, elem('GET_NEXT_KEY', maps.getNextKey)],
  [Cmd.ELEM_LOOKUP_BATCH, {
    name: 'ELEM_LOOKUP_BATCH', needsClaim: true, costsToken: true, size: { atLeast: LOOKUP_BATCH_PREFIX_BYTES },
    flags: { offset: 4, allowed: 'zero' }, run: maps.lookupBatch,
  }],
  [Cmd.ELEM_UPDATE_BATCH, {
    name: 'ELEM_UPDATE_BATCH', needsClaim: true, costsToken: true, size: { atLeast: BATCH_PREFIX_BYTES },
    flags: { offset: 4, allowed: 'update' }, run: maps.updateBatch,
  }],
  [Cmd.ELEM_DELETE_BATCH, {
    name: 'ELEM_DELETE_BATCH', needsClaim: true, costsToken: true, size: { atLeast: BATCH_PREFIX_BYTES },
    flags: { offset: 4, allowed: 'zero' }, run: maps.deleteBatch,
  }],
  // The object path (§8).
  [Cmd.OBJ_BEGIN, {
    name: 'OBJ_BEGIN', needsClaim: true, costsToken: true, size: { exactly: OBJ_BEGIN_BYTES },
    flags: { offset: 4, allowed: 'zero' }, run: objects.objBegin,
  }],
  [Cmd.OBJ_CHUNK, { name: 'OBJ_CHUNK', needsClaim: true, costsToken: true, size: { atLeast: OBJ_CHUNK_PREFIX_BYTES }, run: objects.objChunk }],
  [Cmd.OBJ_LOAD, {
    name: 'OBJ_LOAD', needsClaim: true, costsToken: true, size: { exactly: OBJ_LOAD_BYTES },
    flags: { offset: 0, allowed: 'zero' }, run: objects.objLoad, runAsync: objects.objLoadAsync,
  }],
  [Cmd.OBJ_SHOW, { name: 'OBJ_SHOW', needsClaim: true, costsToken: true, size: { exactly: 0 }, run: objects.objShow }],
  [Cmd.OBJ_UNLOAD, { name: 'OBJ_UNLOAD', needsClaim: true, costsToken: true, size: { exactly: 0 }, run: objects.objUnload }],
]);
