// The per-device offload broker: one request (offload header + payload, already copied out
// of guest memory) in, one response out, plus the operator and lifecycle API the service and
// the datapath use. This file only wires the parts together:
//   state.ts            the device's offload state (claim, quotas, maps, program, pins)
//   dispatch.ts         header and per-command rule checks, one response per request
//   commands.ts         the command table (rules + handler per command)
//   claim-, map-, program-commands.ts   the handlers
//   program-state.ts    the program state machine
//   restore.ts          re-adopting pinned state after a restart
//   migration.ts        the state QEMU carries to another host (format: migration-format.ts)
// Host fds and ids never reach the guest.

import { BpfMapType } from '../sys/bpf/maps.js';
import { progInfo } from '../sys/bpf/info.js';
import { Dispatcher, type RefusalRecord } from './dispatch.js';
import { mapTypeName, type MapEntry } from './map-table.js';
import { validateQuotas, quotaWarnings, readMemlock, type Quotas, type QuotaUsage } from './quotas.js';
import { publicView, type OffloadProgram } from './program-state.js';
import { restoreFromPins } from './restore.js';
import { exportState, importState, describeState, type ExportExtras, type ImportExtras, type StateSummary } from './migration.js';
import { OffloadState, type OffloadBrokerOptions as StateOptions } from './state.js';

export type { Quotas, QuotaUsage } from './quotas.js';
export type { OffloadProgram } from './program-state.js';
export type { RefusalRecord } from './dispatch.js';
export type { ExportExtras, ImportExtras, StateSummary, VerdictCounters } from './migration.js';

export interface OffloadBrokerOptions extends StateOptions {
  /** Called with each refusal's status and stable code (logs, metrics, tests); must not throw. */
  onRefusal?: (r: RefusalRecord) => void;
}

export interface OffloadShowMap {
  handle: number; id: number; type: string; typeId: number; keySize: number; valueSize: number;
  maxEntries: number; flags: number; name: string; entries: number; bytes: number; kernelBytes: number | null;
  createdAt: string;
  /** The kernel's name for it (`bpftool map show`): the device's prefix, then the guest's name (host-names.ts). */
  hostName: string;
}

/** The device's program: the guest's name and the kernel's (`bpftool prog show`) for the program the broker loaded. */
export interface OffloadProgramInfo { id: number; tag: string; name: string; hostName: string }

export interface OffloadShow {
  device: string;
  claimed: boolean;
  claimedAt: string | null;
  program: (OffloadProgram & { name: string; hostName: string; mapHandles: number[] }) | null;
  /** The prefix of every host BPF object name of this device (host-names.ts). */
  bpfPrefix: string;
  /** The object the program came with (OBJ_LOAD): its programs (tail-call targets too) and map handles. */
  object: { name: string; programs: { name: string; id: number; tag: string; insns: number }[]; mapHandles: number[] } | null;
  maps: OffloadShowMap[];
  quotas: { limits: Quotas; usage: QuotaUsage };
  allowedHelpers: number[];
  pinDir: string | null;
  requests: { total: number; byStatus: Record<string, number> };
}

/** Live elements of a map, bounded by max_entries: a map the program updates meanwhile cannot make this loop forever. */
function countEntries(e: MapEntry): number {
  if (e.def.type === BpfMapType.ARRAY) return e.def.maxEntries;
  let n = 0;
  let key: Uint8Array | null = null;
  const buf = [new Uint8Array(e.def.keySize), new Uint8Array(e.def.keySize)];
  while (n <= e.def.maxEntries) {
    const next: Uint8Array | null = e.map.nextKey(key, buf[n & 1]);
    if (!next) break;
    key = next;
    n++;
  }
  return Math.min(n, e.def.maxEntries);
}

/** The kernel's name of a program ('' when it cannot be read). */
function kernelProgName(fd: number): string {
  try { return progInfo(fd).name; } catch { return ''; }
}

/** What an operator detach did (control API offload.detach, CLI `offload detach`). */
export interface OffloadDetach {
  detached: boolean;
  /**
   * What was detached: a PROG_SET 'program' (its maps stay, the guest's to reuse or free) or an
   * 'object' (its programs and maps went with it); null when nothing was attached.
   */
  kind: 'program' | 'object' | null;
  /** A pending OBJ_LOAD was cancelled (the guest's OBJ_LOAD answers CANCELLED). */
  cancelledLoad: boolean;
}

export class OffloadBroker {
  readonly device: string;
  private readonly st: OffloadState;
  private readonly dispatcher: Dispatcher;

  constructor(opts: OffloadBrokerOptions) {
    this.st = new OffloadState(opts);
    this.device = this.st.device;
    this.dispatcher = new Dispatcher(this.st, opts.onRefusal);
  }

  /**
   * Re-adopts a device's pinned offload after a backend restart (see restore.ts). Without
   * pins: a fresh broker.
   */
  static restore(opts: OffloadBrokerOptions): OffloadBroker {
    const b = new OffloadBroker(opts);
    restoreFromPins(b.st);
    return b;
  }

  /**
   * A broker built from a migration state (a fresh broker + importState). Throws
   * MigrationStateError, leaving no kernel object or pin behind.
   */
  static fromState(bytes: Uint8Array, opts: OffloadBrokerOptions): { broker: OffloadBroker } & ImportExtras {
    const b = new OffloadBroker(opts);
    try {
      return { broker: b, ...b.importState(bytes) };
    } catch (e) {
      b.close();
      throw e;
    }
  }

  /**
   * What a state holds, decoded but not judged and without touching the kernel: for a
   * destination without --offload, which must refuse a claimed state (the guest's offload
   * cannot land there) but may accept an unclaimed one. Throws MigrationStateError.
   */
  static describeState(bytes: Uint8Array): StateSummary {
    return describeState(bytes);
  }

  /**
   * The device's offload state for QEMU's migration stream (docs/offload-protocol.md §7).
   * Read-only: the source keeps running with its offload until discard(). Call it with the
   * datapath stopped, so the program does not change its maps while they are read. Throws
   * MigrationStateError ('state-program-unexportable', 'state-too-large').
   */
  exportState(extras: ExportExtras = {}): Uint8Array {
    return exportState(this.st, extras);
  }

  /**
   * Fills this broker (fresh: unclaimed, no maps, nothing pinned) from a migration state,
   * judged against this device's quotas and allow-list, the program verified again by the
   * host kernel. On success the guest's handles are the same integers, the claim and program
   * listeners have fired (the program is attached before the first frame), and the returned
   * counters and attach flags are the caller's to apply. Throws MigrationStateError, leaving
   * the broker fresh and nothing in the kernel or pin dir.
   */
  importState(bytes: Uint8Array): ImportExtras {
    return importState(this.st, bytes);
  }

  /**
   * After QEMU completed the migration: the guest's offload now lives on the destination, so
   * this backend drops its program, maps, claim and pins (unlike close(), which keeps pins).
   */
  discard(): void {
    this.st.reset('migrated to another backend');
  }

  /** One request in (a private copy), one response out; never throws. */
  handle(request: Uint8Array): Uint8Array {
    return this.dispatcher.handle(request);
  }

  /**
   * handle() for the serving path: the same rules and responses, but OBJ_LOAD awaits its
   * loader child instead of blocking the thread (and every other device) while it runs. The
   * caller keeps the device's requests in order: nothing else of this broker's guest requests
   * may run until it settles. Never rejects.
   */
  async handleAsync(request: Uint8Array): Promise<Uint8Array> {
    return this.dispatcher.serve(request);
  }

  /** handleAsync without the promise when the command answered at once (every command but OBJ_LOAD). */
  serve(request: Uint8Array): Uint8Array | Promise<Uint8Array> {
    return this.dispatcher.serve(request);
  }

  get claimed(): boolean { return this.st.claim !== null; }

  /** The program with its guest and host names, or null; cheap (one BPF_OBJ_GET_INFO_BY_FD), for status and metrics. */
  programInfo(): OffloadProgramInfo | null {
    const p = this.st.program.current;
    return p ? { id: p.id, tag: p.tag, name: p.name, hostName: kernelProgName(p.fd) } : null;
  }

  get bpfPrefix(): string { return this.st.bpfPrefix; }

  /** Requests handled, by response status (OK, QUOTA_EXCEEDED, RATE_LIMITED, ...). */
  get requests(): { total: number; byStatus: Record<string, number> } { return this.dispatcher.requests; }

  get program(): OffloadProgram | null {
    const p = this.st.program.current;
    return p ? publicView(p) : null;
  }

  /**
   * The loaded program's checked instructions (host map fds in place, valid while it is loaded)
   * and license, for running it inside a composed program; null without one, or after a restart
   * whose pins did not yield a source that passes the checks again.
   */
  get programSource(): { code: Uint8Array; license: string; name: string } | null {
    const p = this.st.program.current;
    return p?.code ? { code: p.code, license: p.license, name: p.name } : null;
  }

  onProgramChange(cb: (p: OffloadProgram | null) => void): void { this.st.onProgramChange(cb); }

  /** Claim taken (CLAIM) or dropped (RELEASE, reset): the datapath moves the pair between data and offload use. */
  onClaimChange(cb: (claimed: boolean) => void): void { this.st.onClaimChange(cb); }

  reset(reason: string): void { this.st.reset(reason); }

  /**
   * The operator's detach: cancels an OBJ_LOAD in flight (its child killed, the guest answered
   * CANCELLED) and removes the program (an object's maps go with it, PROG_SET maps stay).
   */
  detach(): OffloadDetach {
    const cancelledLoad = this.st.cancelLoad('operator detach');
    // Read before the unload: an object's maps go with its programs, a PROG_SET program's stay the guest's.
    const kind = this.st.program.current?.object ? 'object' : 'program';
    const detached = this.st.unloadProgram('operator detach');
    return { detached, kind: detached ? kind : null, cancelledLoad };
  }

  /** The BUSY answer to a request that cannot wait behind a pending one (the channel's queue is full). */
  busy(request: Uint8Array, waiting: number): Uint8Array {
    return this.dispatcher.busy(request, waiting);
  }

  /** Releases fds without unpinning: with a pin dir the kernel objects stay for restore(). */
  close(): void { this.st.close(); }

  quotas(): { limits: Quotas; usage: QuotaUsage } {
    return { limits: { ...this.st.limits }, usage: this.st.usage() };
  }

  setQuotas(changes: Partial<Quotas>): { limits: Quotas; usage: QuotaUsage; warnings: string[] } {
    const st = this.st;
    const clean = validateQuotas(changes);
    st.limits = { ...st.limits, ...clean };
    if (clean.maxOpsPerSec !== undefined) st.bucket.setRate(clean.maxOpsPerSec);
    const usage = st.usage();
    const warnings = quotaWarnings(st.limits, usage);
    st.log(`quotas set: ${Object.entries(clean).map(([k, v]) => `${k}=${v}`).join(' ')}${warnings.length ? ` (${warnings.length} warnings)` : ''}`);
    return { limits: { ...st.limits }, usage, warnings };
  }

  show(): OffloadShow {
    const st = this.st;
    const p = st.program.current;
    return {
      device: st.device,
      claimed: this.claimed,
      claimedAt: st.claim?.at ?? null,
      program: p ? { ...publicView(p), name: p.name, hostName: kernelProgName(p.fd), mapHandles: [...p.usedHandles] } : null,
      bpfPrefix: st.bpfPrefix,
      object: p?.object ? {
        name: p.object.name, mapHandles: [...p.object.mapHandles],
        programs: p.object.programs.map((x) => ({ name: x.name, id: x.id, tag: x.tag, insns: x.insns })),
      } : null,
      maps: st.maps.entries().map((e) => ({
        handle: e.handle, id: e.id, type: mapTypeName(e.def.type), typeId: e.def.type, keySize: e.def.keySize,
        valueSize: e.def.valueSize, maxEntries: e.def.maxEntries, flags: e.def.flags, name: e.def.name,
        entries: countEntries(e), bytes: e.chargedBytes, kernelBytes: readMemlock(e.map.fd), createdAt: e.createdAt, hostName: e.map.name,
      })),
      quotas: this.quotas(),
      allowedHelpers: st.helpers(),
      pinDir: st.pins?.dir ?? null,
      requests: this.dispatcher.requests,
    };
  }
}
