// One device's offload state, shared by the command modules: the claim, the quotas and
// helper allow-list, the map table, the program slot, the pins, and the change
// notifications the datapath listens to. It also owns what every command derives from that
// state (the response limit, the capability block) and the teardown paths (reset, close),
// so a handler never rebuilds either on its own.

import { closeBpfFd } from '../sys/bpf/programs.js';
import { Status, OFFLOAD_VERSION, MAX_MESSAGE_BYTES, MAX_VERIFIER_LOG_BYTES, NO_INSN, type Caps } from './protocol.js';
import { VERIFIER_RESPONSE_OVERHEAD_BYTES } from './host-codec.js';
import { refuse } from './errors.js';
import { validateAllowList, DEFAULT_ALLOWED_HELPERS } from './program-check.js';
import { MapTable, OFFLOAD_MAP_TYPES, type MapEntry } from './map-table.js';
import { DEFAULT_QUOTAS, TokenBucket, validateQuotas, type Quotas, type QuotaUsage } from './quotas.js';
import { DevicePins } from './pinning.js';
import { ProgramSlot, publicView, type LoadedProgram, type OffloadProgram } from './program-state.js';
import { bpfPrefix, hostObjectName } from './host-names.js';

export interface OffloadBrokerOptions {
  device: string;
  quotas?: Partial<Quotas>;
  allowedHelpers?: number[];
  pinDir?: string | null;
  now?: () => number;
  log?: (line: string) => void;
}

export interface Claim { at: string; responseLimit: number }

/** The bytes of an object the guest is uploading: a private buffer of the announced size. */
export interface ObjectUpload { name: string; bytes: Uint8Array; received: number }

export class OffloadState {
  readonly device: string;
  /** The prefix of this device's host BPF object names (host-names.ts). */
  readonly bpfPrefix: string;
  limits: Quotas;
  readonly allowed: ReadonlySet<number>;
  readonly maps = new MapTable();
  readonly program = new ProgramSlot();
  claim: Claim | null = null;
  /** An object upload in progress (OBJ_BEGIN, OBJ_CHUNK…), consumed by OBJ_LOAD. */
  upload: ObjectUpload | null = null;
  readonly bucket: TokenBucket;
  readonly pins: DevicePins | null;
  readonly now: () => number;
  closed = false;
  /** Bumped by reset() and close(): an OBJ_LOAD that awaited its child compares it before adopting the result. */
  epoch = 0;
  /** The OBJ_LOAD waiting on its loader child (serving path); aborting it kills the child (cancelLoad). */
  pendingLoad: AbortController | null = null;
  private readonly logFn: (line: string) => void;
  private readonly programListeners: ((p: OffloadProgram | null) => void)[] = [];
  private readonly claimListeners: ((claimed: boolean) => void)[] = [];

  constructor(opts: OffloadBrokerOptions) {
    this.device = opts.device;
    this.bpfPrefix = bpfPrefix(opts.device);
    this.limits = { ...DEFAULT_QUOTAS, ...validateQuotas(opts.quotas ?? {}) };
    this.allowed = validateAllowList(opts.allowedHelpers ?? [...DEFAULT_ALLOWED_HELPERS]);
    this.now = opts.now ?? Date.now;
    this.logFn = opts.log ?? (() => {});
    this.bucket = new TokenBucket(this.limits.maxOpsPerSec, this.now);
    this.pins = opts.pinDir ? new DevicePins(opts.pinDir, opts.device) : null;
  }

  /** The host kernel's name for an object the guest calls `name` (or the backend makes for `name`). */
  hostName(name: string): string {
    return hostObjectName(this.bpfPrefix, name);
  }

  log(line: string): void {
    try { this.logFn(`offload ${this.device}: ${line}`); } catch { /* a logger must not break the broker */ }
  }

  isoNow(): string {
    return new Date(this.now()).toISOString();
  }

  // -------------------------------------------------------------------------------------
  // Change notifications

  onProgramChange(cb: (p: OffloadProgram | null) => void): void { this.programListeners.push(cb); }
  onClaimChange(cb: (claimed: boolean) => void): void { this.claimListeners.push(cb); }

  emitProgram(): void {
    const cur = this.program.current;
    const p = cur ? publicView(cur) : null;
    for (const cb of this.programListeners) {
      try { cb(p); } catch (e) { this.log(`program listener failed: ${(e as Error).message}`); }
    }
  }

  emitClaim(): void {
    const claimed = this.claim !== null;
    for (const cb of this.claimListeners) {
      try { cb(claimed); } catch (e) { this.log(`claim listener failed: ${(e as Error).message}`); }
    }
  }

  // -------------------------------------------------------------------------------------
  // Derived from the claim and the quotas

  /** "The backend never sends a larger response" than the CLAIM's max_response_bytes (§1 Limits). */
  responseLimit(): number {
    return this.claim?.responseLimit ?? MAX_MESSAGE_BYTES;
  }

  /** Room for the log in a VERIFIER_REJECTED response within the claimed response limit. */
  verifierLogLimit(): number {
    return Math.max(0, Math.min(MAX_VERIFIER_LOG_BYTES, this.responseLimit() - VERIFIER_RESPONSE_OVERHEAD_BYTES));
  }

  caps(): Caps {
    return {
      version: OFFLOAD_VERSION,
      maxRequestBytes: MAX_MESSAGE_BYTES,
      maxResponseBytes: this.responseLimit(),
      maxProgInsns: this.limits.maxProgInsns,
      maxMaps: this.limits.maxMaps,
      maxEntries: this.limits.maxEntries,
      maxKeySize: this.limits.maxKeySize,
      maxValueSize: this.limits.maxValueSize,
      maxOpsPerSec: this.limits.maxOpsPerSec,
      verifierLogBytes: this.verifierLogLimit(),
      maxMapMemory: this.limits.maxMapMemory,
      usedMaps: this.maps.size,
      usedMapMemory: this.maps.chargedBytes,
      mapTypes: [...OFFLOAD_MAP_TYPES],
      helpers: this.helpers(),
    };
  }

  helpers(): number[] {
    return [...this.allowed].sort((a, b) => a - b);
  }

  usage(): QuotaUsage {
    return {
      maps: this.maps.size,
      mapMemory: this.maps.chargedBytes,
      largestMapEntries: this.maps.largestMaxEntries(),
      progInsns: this.program.current?.insns ?? 0,
      opsPerSec: this.bucket.recentRate,
    };
  }

  // -------------------------------------------------------------------------------------
  // Maps and pins

  /** The map behind a guest handle, or BAD_MAP_HANDLE: "a = handle, b = 0xffffffff" outside a program. */
  entry(handle: number): MapEntry {
    return this.maps.get(handle)
      ?? refuse(Status.BAD_MAP_HANDLE, 'bad-map-handle', `map handle ${handle} is not a map of this device`, { a: handle, b: NO_INSN });
  }

  /** Persists the claim (with the next handle), so an acknowledged claim or map survives a restart. */
  writeClaimState(): void {
    if (this.pins && this.claim) {
      this.pins.writeClaim({
        version: 1, device: this.device, claimedAt: this.claim.at, nextHandle: this.maps.nextHandle, responseLimit: this.claim.responseLimit,
      });
    }
  }

  // -------------------------------------------------------------------------------------
  // Teardown

  /** Unpins, notifies, then closes: listeners drop their use of the fd before it goes. */
  unloadProgram(why: string): boolean {
    const old = this.program.take();
    if (!old) return false;
    try { this.pins?.unpinProg(); } catch (e) { this.log(`unpin program failed: ${(e as Error).message}`); }
    this.emitProgram();
    this.retire(old, true);
    this.log(`program id ${old.id} unloaded (${why})`);
    return true;
  }

  /**
   * Closes a program nobody runs any more; an object's other programs and its maps go with it
   * (unpinned when `unpin`: not on close(), which keeps pins for the next process).
   */
  retire(old: LoadedProgram, unpin: boolean): void {
    closeBpfFd(old.fd);
    const obj = old.object;
    if (!obj) return;
    for (const p of obj.programs) if (p.fd !== old.fd) closeBpfFd(p.fd);
    if (unpin && this.pins) {
      try { this.pins.unpinObjectGen(old.id); } catch (e) { this.log(`unpin object '${obj.name}' failed: ${(e as Error).message}`); }
    }
    for (const h of obj.mapHandles) {
      if (unpin && this.pins) {
        try { this.pins.unpinMap(h); } catch (e) { this.log(`unpin map ${h} failed: ${(e as Error).message}`); }
      }
      this.maps.remove(h);
    }
    this.log(`object '${obj.name}' released: ${obj.programs.length} programs, maps [${obj.mapHandles.join(', ')}]`);
  }

  /**
   * Kills a pending OBJ_LOAD's loader child; the load then answers CANCELLED (or, after a reset
   * or close, NOT_CLAIMED as before) and leaves nothing in the kernel. True when one was pending.
   */
  cancelLoad(why: string): boolean {
    const p = this.pendingLoad;
    if (!p) return false;
    this.pendingLoad = null;
    // Logged once, by the load itself (object-commands), once its child is gone: with the object's name.
    p.abort(why);
    return true;
  }

  /** Drops the claim, the program and every map, pins included. */
  reset(reason: string): void {
    this.epoch++;
    // Its result would be discarded (epoch): no reason to let the child run on.
    this.cancelLoad(reason);
    const wasClaimed = this.claim !== null;
    this.unloadProgram(reason);
    const n = this.maps.size;
    this.maps.clear();
    this.claim = null;
    this.upload = null;
    if (this.pins) {
      try { this.pins.removeAll(); } catch (e) { this.log(`removing pins failed: ${(e as Error).message}`); }
    }
    if (wasClaimed || n > 0) this.log(`reset (${reason}): ${n} maps freed, claim dropped`);
    if (wasClaimed) this.emitClaim();
  }

  /** Releases fds without unpinning: with a pin dir the kernel objects stay for restore(). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.epoch++;
    this.cancelLoad('broker closed');
    const old: LoadedProgram | null = this.program.take();
    if (old) {
      this.emitProgram();
      this.retire(old, false);
    }
    this.maps.clear();
    this.claim = null;
    this.upload = null;
  }
}
