// The device's program and the explicit state machine a PROG_SET walks through, after
// netdevsim's bpf.c (received → verified → translated → attached):
//
//   received   decoded from the request (syntax only)
//   checked    judged against device policy, map handles rewritten to host fds
//   loaded     accepted by the host verifier; the kernel holds it, pinned when pinning is on
//   published  the device's program: listeners (the datapath, which attaches it to the port)
//              have been told; the previous program is closed only after that
//
// A candidate's phase is one field; each step takes the phase before it, so a step cannot be
// skipped or repeated. A refusal at any step leaves the published program untouched.
// `restored` is a program re-adopted from pins after a restart: it runs, and carries its
// checked code only when the pinned source could be checked again.

import type { ProgSetRequest } from './protocol.js';
import type { JudgedProgram } from './program-check.js';

export interface OffloadProgram {
  /** Owned by the broker and closed when the program changes: a datapath thread gets its own duplicate of it (net-device.ts). */
  fd: number;
  id: number;
  tag: string;
  insns: number;
  loadedAt: string;
}

export interface LoadedProgram extends OffloadProgram {
  name: string;
  usedHandles: number[];
  /** The checked instructions with host map fds in place, for composition (xsk port); null when they could not be restored. */
  code: Uint8Array | null;
  license: string;
  /**
   * The instructions as the guest sent them (map references still guest handles) and the
   * program's declared map table: what the migration state carries (migration.ts), since the
   * destination rewrites handles into its own fds. Null when a restart could not recover it.
   */
  source: { insns: Uint8Array; mapHandles: number[] } | null;
  /** Set when the program came with a whole object (OBJ_LOAD, §8): the object's other programs and its maps go with it. */
  object?: LoadedObject;
}

/** A program of a loaded object (the entry included). */
export interface ObjectProgram {
  name: string;
  /** Owned by the broker; closed when the object goes (the entry's is LoadedProgram.fd). */
  fd: number;
  id: number;
  tag: string;
  insns: number;
}

/** What OBJ_LOAD added besides the entry program: every program and every map of the object. */
export interface LoadedObject {
  /** OBJ_BEGIN's name (libbpf's object name; it prefixes the internal maps' names). */
  name: string;
  programs: ObjectProgram[];
  /** Handles of the object's maps, in libbpf's order. They leave the table with the object. */
  mapHandles: number[];
  /**
   * The ELF bytes as the guest uploaded them (its own copy): what a migration carries, since
   * the destination loads the object again. Absent when a restart could not recover them.
   */
  elf?: Uint8Array;
}

export type Candidate =
  | { phase: 'received'; req: ProgSetRequest }
  | { phase: 'checked'; req: ProgSetRequest; judged: JudgedProgram; code: Uint8Array }
  | { phase: 'loaded'; req: ProgSetRequest; judged: JudgedProgram; program: LoadedProgram };

export type Received = Extract<Candidate, { phase: 'received' }>;
export type Checked = Extract<Candidate, { phase: 'checked' }>;
export type Loaded = Extract<Candidate, { phase: 'loaded' }>;

type SlotState =
  | { phase: 'empty' }
  | { phase: 'published'; program: LoadedProgram }
  | { phase: 'restored'; program: LoadedProgram };

/** The device's current program, in one field. */
export class ProgramSlot {
  private state: SlotState = { phase: 'empty' };

  get phase(): SlotState['phase'] { return this.state.phase; }

  get current(): LoadedProgram | null {
    return this.state.phase === 'empty' ? null : this.state.program;
  }

  /** Makes a loaded program the device's program; returns the one it replaces (the caller closes it after notifying). */
  publish(program: LoadedProgram): LoadedProgram | null {
    const old = this.current;
    this.state = { phase: 'published', program };
    return old;
  }

  /** Re-adopts a pinned program after a restart. */
  restore(program: LoadedProgram): void {
    if (this.state.phase !== 'empty') throw new Error(`cannot restore a program over a ${this.state.phase} one`);
    this.state = { phase: 'restored', program };
  }

  /** Empties the slot; returns what it held (the caller unpins, notifies and closes). */
  take(): LoadedProgram | null {
    const old = this.current;
    this.state = { phase: 'empty' };
    return old;
  }
}

export function publicView(p: LoadedProgram): OffloadProgram {
  return { fd: p.fd, id: p.id, tag: p.tag, insns: p.insns, loadedAt: p.loadedAt };
}
