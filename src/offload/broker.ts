// The per-device offload broker: one request (offload header + payload, already copied out
// of guest memory) in, one response out. A single dispatcher checks the header, the claim
// and the request rate before any handler runs; handlers decode (syntax), judge (policy
// and quotas), then act on the kernel through libbpf, rolling back anything half-made so a
// refusal never leaves partial state. Host fds and ids never reach the guest.

import { BpfError } from '../sys/bpf/libbpf.js';
import { BpfMap, BpfMapType } from '../sys/bpf/maps.js';
import { BpfProgType, progLoadWithLog, closeBpfFd } from '../sys/bpf/programs.js';
import { mapInfo, progInfo } from '../sys/bpf/info.js';
import { Errno } from '../sys/errors.js';
import {
  Cmd, Status, QuotaId, ProtocolError, OFFLOAD_MAGIC, OFFLOAD_VERSION, HEADER_BYTES, RESPONSE_FLAG,
  MAX_MESSAGE_BYTES, MIN_RESPONSE_LIMIT, MAX_VERIFIER_LOG_BYTES, MAX_REASON_BYTES, ERROR_DETAIL_BYTES, NO_INSN,
  readHeader, isKnownCommand, commandName, statusName, encodeResponse, encodeErrorBody, encodeVerifierLog,
  encodeCapsBody, decodeClaim, decodeMapCreate, decodeMapFree, decodeElem, decodeLookupBatch, decodeBatch,
  decodeProgSet, Writer, type ErrorDetail, type Caps,
} from './protocol.js';
import { decodeProgram, judgeProgram, rewriteMapRefs, validateAllowList, DEFAULT_ALLOWED_HELPERS } from './program-check.js';
import { MapTable, checkMapDef, mapTypeName, OFFLOAD_MAP_TYPES, type MapEntry } from './map-table.js';
import {
  DEFAULT_QUOTAS, TokenBucket, validateQuotas, quotaWarnings, estimateMapBytes, readMemlock,
  type Quotas, type QuotaUsage,
} from './quotas.js';
import { DevicePins } from './pinning.js';

export type { Quotas, QuotaUsage } from './quotas.js';

export interface OffloadBrokerOptions {
  device: string;
  quotas?: Partial<Quotas>;
  allowedHelpers?: number[];
  pinDir?: string | null;
  now?: () => number;
  log?: (line: string) => void;
}

export interface OffloadProgram {
  /** Owned by the broker and closed when the program changes: a datapath thread should open its own with progGetFdById(id). */
  fd: number;
  id: number;
  tag: string;
  insns: number;
  loadedAt: string;
}

interface LoadedProgram extends OffloadProgram {
  name: string;
  usedHandles: number[];
  /** The checked instructions with host map fds in place, for composition (xsk port); null when re-adopted from pins. */
  code: Uint8Array | null;
  license: string;
}

export interface OffloadShowMap {
  handle: number; id: number; type: string; typeId: number; keySize: number; valueSize: number;
  maxEntries: number; flags: number; name: string; entries: number; bytes: number; kernelBytes: number | null;
  createdAt: string;
}

export interface OffloadShow {
  device: string;
  claimed: boolean;
  claimedAt: string | null;
  program: (OffloadProgram & { name: string; mapHandles: number[] }) | null;
  maps: OffloadShowMap[];
  quotas: { limits: Quotas; usage: QuotaUsage };
  allowedHelpers: number[];
  pinDir: string | null;
  requests: { total: number; byStatus: Record<string, number> };
}

/** Thrown inside handlers to become a response; carries an optional extra after the detail. */
class Refusal extends ProtocolError {
  constructor(status: number, reason: string, detail: Partial<ErrorDetail> = {}, readonly extra?: Uint8Array) {
    super(status, reason, detail);
  }
}

type Handler = (payload: Uint8Array, seq: number) => Uint8Array;

const EMPTY = new Uint8Array(0);
/** Verifier log buffer handed to the kernel: the newest part of the log is kept (kernel ≥ 6.4). */
const VERIFIER_LOG_BUFFER = MAX_VERIFIER_LOG_BYTES;

function u32Body(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n, true);
  return b;
}

function isoNow(now: () => number): string {
  return new Date(now()).toISOString();
}

export class OffloadBroker {
  readonly device: string;
  private limits: Quotas;
  private readonly allowed: Set<number>;
  private readonly maps = new MapTable();
  private prog: LoadedProgram | null = null;
  private claim: { at: string; responseLimit: number } | null = null;
  private readonly bucket: TokenBucket;
  private readonly pins: DevicePins | null;
  private readonly now: () => number;
  private readonly logFn: (line: string) => void;
  private readonly programListeners: ((p: OffloadProgram | null) => void)[] = [];
  private readonly claimListeners: ((claimed: boolean) => void)[] = [];
  private readonly handlers: ReadonlyMap<number, Handler>;
  private total = 0;
  private readonly byStatus: Record<string, number> = {};
  private closed = false;

  constructor(opts: OffloadBrokerOptions) {
    this.device = opts.device;
    this.limits = { ...DEFAULT_QUOTAS, ...validateQuotas(opts.quotas ?? {}) };
    this.allowed = validateAllowList(opts.allowedHelpers ?? [...DEFAULT_ALLOWED_HELPERS]);
    this.now = opts.now ?? Date.now;
    this.logFn = opts.log ?? (() => {});
    this.bucket = new TokenBucket(this.limits.maxOpsPerSec, this.now);
    this.pins = opts.pinDir ? new DevicePins(opts.pinDir, opts.device) : null;
    // One table, so what each command accepts is visible in one place.
    this.handlers = new Map<number, Handler>([
      [Cmd.CLAIM, (p, s) => this.onClaim(p, s)],
      [Cmd.CAPS, (p, s) => this.onCaps(p, s)],
      [Cmd.RELEASE, (p, s) => this.onRelease(p, s)],
      [Cmd.PROG_SET, (p, s) => this.onProgSet(p, s)],
      [Cmd.PROG_UNSET, (p, s) => this.onProgUnset(p, s)],
      [Cmd.MAP_CREATE, (p, s) => this.onMapCreate(p, s)],
      [Cmd.MAP_FREE, (p, s) => this.onMapFree(p, s)],
      [Cmd.ELEM_LOOKUP, (p, s) => this.onElemLookup(p, s)],
      [Cmd.ELEM_UPDATE, (p, s) => this.onElemUpdate(p, s)],
      [Cmd.ELEM_DELETE, (p, s) => this.onElemDelete(p, s)],
      [Cmd.GET_FIRST_KEY, (p, s) => this.onGetKey(p, s, true)],
      [Cmd.GET_NEXT_KEY, (p, s) => this.onGetKey(p, s, false)],
      [Cmd.ELEM_LOOKUP_BATCH, (p, s) => this.onLookupBatch(p, s)],
      [Cmd.ELEM_UPDATE_BATCH, (p, s) => this.onUpdateBatch(p, s)],
      [Cmd.ELEM_DELETE_BATCH, (p, s) => this.onDeleteBatch(p, s)],
    ]);
  }

  get claimed(): boolean { return this.claim !== null; }

  get program(): OffloadProgram | null {
    const p = this.prog;
    return p ? { fd: p.fd, id: p.id, tag: p.tag, insns: p.insns, loadedAt: p.loadedAt } : null;
  }

  onProgramChange(cb: (p: OffloadProgram | null) => void): void { this.programListeners.push(cb); }

  /**
   * The loaded program's checked instructions (host map fds in place, valid while it is loaded)
   * and license, for running it inside a composed program; null without one, or after a restart
   * (pins keep the loaded program, not its source).
   */
  get programSource(): { code: Uint8Array; license: string; name: string } | null {
    const p = this.prog;
    return p?.code ? { code: p.code, license: p.license, name: p.name } : null;
  }
  /** Claim taken (CLAIM) or dropped (RELEASE, reset): the datapath moves the pair between data and offload use. */
  onClaimChange(cb: (claimed: boolean) => void): void { this.claimListeners.push(cb); }

  private log(line: string): void {
    try { this.logFn(`offload ${this.device}: ${line}`); } catch { /* a logger must not break the broker */ }
  }

  private emitProgram(): void {
    const p = this.program;
    for (const cb of this.programListeners) {
      try { cb(p); } catch (e) { this.log(`program listener failed: ${(e as Error).message}`); }
    }
  }

  private emitClaim(): void {
    for (const cb of this.claimListeners) {
      try { cb(this.claimed); } catch (e) { this.log(`claim listener failed: ${(e as Error).message}`); }
    }
  }

  // -------------------------------------------------------------------------------------
  // Dispatch

  handle(request: Uint8Array): Uint8Array {
    let command = 0;
    let seq = 0;
    try {
      const h = readHeader(request);
      if (!h) return this.fail(0, 0, Status.BAD_REQUEST, `request is ${request.byteLength} bytes, shorter than the ${HEADER_BYTES}-byte header`);
      command = h.command;
      seq = h.seq;
      if (h.magic !== OFFLOAD_MAGIC) return this.fail(command, seq, Status.BAD_REQUEST, `bad magic 0x${h.magic.toString(16)} (want 0x${OFFLOAD_MAGIC.toString(16)})`);
      if (h.version !== OFFLOAD_VERSION) {
        return this.fail(command, seq, Status.UNSUPPORTED_VERSION, `protocol version ${h.version} is not supported (this host speaks ${OFFLOAD_VERSION}..${OFFLOAD_VERSION})`,
          { a: OFFLOAD_VERSION, b: OFFLOAD_VERSION });
      }
      if ((command & RESPONSE_FLAG) !== 0) return this.fail(command, seq, Status.BAD_REQUEST, `command 0x${command.toString(16)} has the response bit set`);
      if (h.length > MAX_MESSAGE_BYTES - HEADER_BYTES) {
        return this.fail(command, seq, Status.TOO_LARGE, `payload length ${h.length} is over the ${MAX_MESSAGE_BYTES - HEADER_BYTES}-byte limit`,
          { c: MAX_MESSAGE_BYTES });
      }
      if (h.length > request.byteLength - HEADER_BYTES) {
        return this.fail(command, seq, Status.BAD_REQUEST, `payload length ${h.length} but only ${request.byteLength - HEADER_BYTES} bytes present`);
      }
      const handler = this.handlers.get(command);
      if (!handler || !isKnownCommand(command)) return this.fail(command, seq, Status.UNKNOWN_COMMAND, `unknown command 0x${command.toString(16)}`);
      if (command !== Cmd.RELEASE) {
        const wait = this.bucket.take();
        if (wait > 0) {
          return this.fail(command, seq, Status.RATE_LIMITED, `over this device's max-ops-per-sec quota of ${this.limits.maxOpsPerSec}; retry in ${wait} ms`, { a: wait });
        }
      }
      if (this.closed) return this.fail(command, seq, Status.NOT_CLAIMED, 'the offload broker of this device is closed');
      if (!this.claim && command !== Cmd.CLAIM) {
        return this.fail(command, seq, Status.NOT_CLAIMED, `${commandName(command)} before CLAIM: the offload pair is not claimed`);
      }
      // Bytes after `length` are frame padding (Ethernet minimum size) and are ignored.
      const payload = request.subarray(HEADER_BYTES, HEADER_BYTES + h.length);
      const out = handler(payload, seq);
      if (out.byteLength > this.responseLimit()) {
        return this.fail(command, seq, Status.TOO_LARGE, `response of ${out.byteLength} bytes is over the claimed response limit of ${this.responseLimit()}`);
      }
      this.count(Status.OK);
      return out;
    } catch (e) {
      if (e instanceof ProtocolError) {
        return this.fail(command, seq, e.status, e.message, e.detail, e instanceof Refusal ? e.extra : undefined);
      }
      if (e instanceof BpfError) {
        return this.fail(command, seq, Status.KERNEL_ERROR, e.message.split('\n')[0] ?? e.code, { a: e.errno });
      }
      this.log(`internal error on ${commandName(command)}: ${(e as Error)?.stack ?? String(e)}`);
      return this.fail(command, seq, Status.KERNEL_ERROR, `internal error: ${(e as Error)?.message ?? String(e)}`);
    }
  }

  private responseLimit(): number {
    return this.claim?.responseLimit ?? MAX_MESSAGE_BYTES;
  }

  private count(status: number): void {
    this.total++;
    const k = statusName(status);
    this.byStatus[k] = (this.byStatus[k] ?? 0) + 1;
  }

  private fail(command: number, seq: number, status: number, reason: string, detail: Partial<ErrorDetail> = {}, extra?: Uint8Array): Uint8Array {
    this.count(status);
    const d: ErrorDetail = { a: detail.a ?? 0, b: detail.b ?? 0, c: detail.c ?? 0 };
    return encodeResponse(command & 0x7fff, seq, status, reason, encodeErrorBody(d, extra));
  }

  private ok(command: number, seq: number, body?: Uint8Array): Uint8Array {
    return encodeResponse(command, seq, Status.OK, '', body);
  }

  // -------------------------------------------------------------------------------------
  // Claim, capabilities, release

  private caps(): Caps {
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
      helpers: [...this.allowed].sort((a, b) => a - b),
    };
  }

  /** Room for the log in a VERIFIER_REJECTED response within the claimed response limit. */
  private verifierLogLimit(): number {
    const overhead = HEADER_BYTES + 8 + MAX_REASON_BYTES + ERROR_DETAIL_BYTES + 4;
    return Math.max(0, Math.min(MAX_VERIFIER_LOG_BYTES, this.responseLimit() - overhead));
  }

  private onClaim(p: Uint8Array, seq: number): Uint8Array {
    const c = decodeClaim(p);
    if (c.minVersion > OFFLOAD_VERSION || c.maxVersion < OFFLOAD_VERSION) {
      throw new Refusal(Status.UNSUPPORTED_VERSION,
        `guest speaks versions ${c.minVersion}..${c.maxVersion}, this host ${OFFLOAD_VERSION}..${OFFLOAD_VERSION}`,
        { a: OFFLOAD_VERSION, b: OFFLOAD_VERSION });
    }
    let limit = MAX_MESSAGE_BYTES;
    if (c.maxResponseBytes !== 0) {
      if (c.maxResponseBytes < MIN_RESPONSE_LIMIT) {
        throw new Refusal(Status.BAD_REQUEST, `max_response_bytes ${c.maxResponseBytes} is below the minimum of ${MIN_RESPONSE_LIMIT}`);
      }
      limit = Math.min(limit, c.maxResponseBytes);
    }
    const first = !this.claim;
    const at = this.claim?.at ?? isoNow(this.now);
    if (this.pins) {
      // Persist before acknowledging, so an acknowledged claim survives a restart.
      this.pins.ensureDir();
      this.pins.writeClaim({ version: 1, device: this.device, claimedAt: at, nextHandle: this.maps.nextHandle, responseLimit: limit });
    }
    this.claim = { at, responseLimit: limit };
    if (first) {
      this.log(`claimed (response limit ${limit} bytes)`);
      this.emitClaim();
    }
    return this.ok(Cmd.CLAIM, seq, encodeCapsBody(this.caps()));
  }

  private onCaps(p: Uint8Array, seq: number): Uint8Array {
    if (p.byteLength !== 0) throw new Refusal(Status.BAD_REQUEST, `CAPS takes no payload (${p.byteLength} bytes given)`);
    return this.ok(Cmd.CAPS, seq, encodeCapsBody(this.caps()));
  }

  private onRelease(p: Uint8Array, seq: number): Uint8Array {
    if (p.byteLength !== 0) throw new Refusal(Status.BAD_REQUEST, `RELEASE takes no payload (${p.byteLength} bytes given)`);
    this.reset('guest released the offload pair');
    return this.ok(Cmd.RELEASE, seq);
  }

  // -------------------------------------------------------------------------------------
  // Maps

  private entry(handle: number): MapEntry {
    const e = this.maps.get(handle);
    if (!e) throw new Refusal(Status.BAD_MAP_HANDLE, `map handle ${handle} is not a map of this device`, { a: handle, b: NO_INSN });
    return e;
  }

  private writeClaimState(): void {
    if (this.pins && this.claim) {
      this.pins.writeClaim({ version: 1, device: this.device, claimedAt: this.claim.at, nextHandle: this.maps.nextHandle, responseLimit: this.claim.responseLimit });
    }
  }

  private onMapCreate(p: Uint8Array, seq: number): Uint8Array {
    const d = decodeMapCreate(p);
    const q = this.limits;
    checkMapDef(d, q);
    if (this.maps.size + 1 > q.maxMaps) {
      throw new Refusal(Status.QUOTA_EXCEEDED, `this device already has ${this.maps.size} maps; its max-maps quota is ${q.maxMaps}`,
        { a: QuotaId.MAX_MAPS, b: this.maps.size, c: q.maxMaps });
    }
    const estimate = estimateMapBytes(d.type, d.keySize, d.valueSize, d.maxEntries);
    const memoryRefusal = (need: number) => new Refusal(Status.QUOTA_EXCEEDED,
      `map needs ${need} bytes; this device uses ${this.maps.chargedBytes} of its max-map-memory quota of ${q.maxMapMemory}`,
      { a: QuotaId.MAX_MAP_MEMORY, b: Math.min(need, 0xffffffff), c: q.maxMapMemory });
    if (this.maps.chargedBytes + estimate > q.maxMapMemory) throw memoryRefusal(estimate);
    const handle = this.maps.peekHandle();

    let map: BpfMap;
    try {
      map = BpfMap.create(d.type, d.keySize, d.valueSize, d.maxEntries, { flags: d.flags, name: d.name });
    } catch (e) {
      if (e instanceof BpfError) {
        throw new Refusal(Status.KERNEL_ERROR, `the kernel refused the ${mapTypeName(d.type)} map: ${e.code}`, { a: e.errno });
      }
      throw e;
    }
    // From here on every refusal closes the map: nothing half-made survives.
    try {
      const charged = Math.max(estimate, readMemlock(map.fd) ?? 0);
      if (this.maps.chargedBytes + charged > q.maxMapMemory) throw memoryRefusal(charged);
      const id = mapInfo(map.fd).id;
      const createdAt = isoNow(this.now);
      this.pins?.pinMap(handle, map.fd, { handle, chargedBytes: charged, createdAt });
      this.maps.add({ map, id, def: { ...d }, chargedBytes: charged, createdAt }, handle);
    } catch (e) {
      map.close();
      if (this.pins) { try { this.pins.unpinMap(handle); } catch { /* best effort */ } }
      throw e;
    }
    this.writeClaimState();
    const e = this.maps.get(handle)!;
    this.log(`map ${handle} created: ${mapTypeName(d.type)} key ${d.keySize} value ${d.valueSize} entries ${d.maxEntries} (${e.chargedBytes} bytes, id ${e.id})`);
    return this.ok(Cmd.MAP_CREATE, seq, new Writer(16).u32(handle).u32(0).u64(e.chargedBytes).finish());
  }

  private onMapFree(p: Uint8Array, seq: number): Uint8Array {
    const { handle } = decodeMapFree(p);
    this.entry(handle);
    if (this.prog?.usedHandles.includes(handle)) {
      throw new Refusal(Status.MAP_IN_USE, `map handle ${handle} is used by the loaded program; PROG_UNSET or replace it first`, { a: handle });
    }
    this.pins?.unpinMap(handle);
    this.maps.remove(handle);
    this.log(`map ${handle} freed`);
    return this.ok(Cmd.MAP_FREE, seq);
  }

  private expectLen(what: string, got: number, want: number, e: MapEntry): void {
    if (got !== want) {
      throw new Refusal(Status.BAD_REQUEST,
        `${what}: ${got} bytes of key/value data, map ${e.handle} wants ${want} (key ${e.def.keySize}, value ${e.def.valueSize})`);
    }
  }

  private elemError(err: unknown, e: MapEntry, op: string, processed?: number): never {
    if (!(err instanceof BpfError)) throw err;
    const c = processed ?? 0;
    switch (err.errno) {
      case Errno.ENOENT:
        throw new Refusal(Status.NO_SUCH_ELEMENT, `${op}: no such element in map ${e.handle}`, { a: err.errno, c });
      case Errno.EEXIST:
        throw new Refusal(Status.ELEMENT_EXISTS, `${op}: element exists in map ${e.handle} (NOEXIST)`, { a: err.errno, c });
      case Errno.E2BIG:
        if (e.def.type === BpfMapType.ARRAY) {
          throw new Refusal(Status.NO_SUCH_ELEMENT, `${op}: index beyond max_entries ${e.def.maxEntries} of ARRAY map ${e.handle}`, { a: err.errno, c });
        }
        throw new Refusal(Status.MAP_FULL, `${op}: map ${e.handle} is full (max_entries ${e.def.maxEntries})`, { a: err.errno, c });
      default:
        throw new Refusal(Status.KERNEL_ERROR, `${op} on map ${e.handle}: ${err.code}`, { a: err.errno, c });
    }
  }

  private checkUpdateFlags(flags: number): void {
    if (flags > 2) throw new Refusal(Status.BAD_REQUEST, `update flags ${flags}: only ANY (0), NOEXIST (1), EXIST (2)`);
  }

  private checkNoFlags(what: string, flags: number): void {
    if (flags !== 0) throw new Refusal(Status.BAD_REQUEST, `${what}: flags must be 0, got ${flags}`);
  }

  private onElemLookup(p: Uint8Array, seq: number): Uint8Array {
    const r = decodeElem(p, 'ELEM_LOOKUP');
    this.checkNoFlags('ELEM_LOOKUP', r.flags);
    const e = this.entry(r.handle);
    this.expectLen('ELEM_LOOKUP', r.data.byteLength, e.def.keySize, e);
    let value: Uint8Array | null;
    try { value = e.map.lookup(r.data); } catch (err) { this.elemError(err, e, 'lookup'); }
    if (!value) throw new Refusal(Status.NO_SUCH_ELEMENT, `lookup: no such element in map ${e.handle}`, { a: Errno.ENOENT });
    return this.ok(Cmd.ELEM_LOOKUP, seq, value);
  }

  private onElemUpdate(p: Uint8Array, seq: number): Uint8Array {
    const r = decodeElem(p, 'ELEM_UPDATE');
    this.checkUpdateFlags(r.flags);
    const e = this.entry(r.handle);
    const k = e.def.keySize;
    this.expectLen('ELEM_UPDATE', r.data.byteLength, k + e.def.valueSize, e);
    try { e.map.update(r.data.subarray(0, k), r.data.subarray(k), r.flags); } catch (err) { this.elemError(err, e, 'update'); }
    return this.ok(Cmd.ELEM_UPDATE, seq);
  }

  private refuseArrayDelete(e: MapEntry, op: string): void {
    if (e.def.type === BpfMapType.ARRAY) throw new Refusal(Status.BAD_REQUEST, `${op}: elements of ARRAY map ${e.handle} cannot be deleted`);
  }

  private onElemDelete(p: Uint8Array, seq: number): Uint8Array {
    const r = decodeElem(p, 'ELEM_DELETE');
    this.checkNoFlags('ELEM_DELETE', r.flags);
    const e = this.entry(r.handle);
    this.refuseArrayDelete(e, 'delete');
    this.expectLen('ELEM_DELETE', r.data.byteLength, e.def.keySize, e);
    let found: boolean;
    try { found = e.map.delete(r.data); } catch (err) { this.elemError(err, e, 'delete'); }
    if (!found) throw new Refusal(Status.NO_SUCH_ELEMENT, `delete: no such element in map ${e.handle}`, { a: Errno.ENOENT });
    return this.ok(Cmd.ELEM_DELETE, seq);
  }

  private onGetKey(p: Uint8Array, seq: number, first: boolean): Uint8Array {
    const what = first ? 'GET_FIRST_KEY' : 'GET_NEXT_KEY';
    const r = decodeElem(p, what);
    this.checkNoFlags(what, r.flags);
    const e = this.entry(r.handle);
    this.expectLen(what, r.data.byteLength, first ? 0 : e.def.keySize, e);
    let next: Uint8Array | null;
    try { next = e.map.nextKey(first ? null : r.data); } catch (err) { this.elemError(err, e, what); }
    if (!next) {
      throw new Refusal(Status.NO_SUCH_ELEMENT, first ? `map ${e.handle} is empty` : `no key after this one in map ${e.handle}`, { a: Errno.ENOENT });
    }
    return this.ok(first ? Cmd.GET_FIRST_KEY : Cmd.GET_NEXT_KEY, seq, next);
  }

  private onLookupBatch(p: Uint8Array, seq: number): Uint8Array {
    const r = decodeLookupBatch(p);
    this.checkNoFlags('ELEM_LOOKUP_BATCH', r.flags);
    const e = this.entry(r.handle);
    const m = e.map;
    if (r.cursor.byteLength !== 0 && r.cursor.byteLength !== m.batchTokenSize) {
      throw new Refusal(Status.BAD_REQUEST, `ELEM_LOOKUP_BATCH: cursor is ${r.cursor.byteLength} bytes; pass 0 bytes to start or the ${m.batchTokenSize}-byte cursor of the previous response`);
    }
    if (r.maxCount === 0) throw new Refusal(Status.BAD_REQUEST, 'ELEM_LOOKUP_BATCH: max_count is 0');
    const per = e.def.keySize + e.def.valueSize;
    const room = this.responseLimit() - HEADER_BYTES - 8 - 12 - m.batchTokenSize;
    const count = Math.min(r.maxCount, e.def.maxEntries, Math.floor(room / per));
    if (count <= 0) throw new Refusal(Status.TOO_LARGE, 'ELEM_LOOKUP_BATCH: not even one element fits the response limit');
    const keys = new Uint8Array(count * e.def.keySize);
    const values = new Uint8Array(count * e.def.valueSize);
    let res: { count: number; next: Uint8Array | null };
    try {
      res = m.lookupBatch(r.cursor.byteLength ? r.cursor : null, keys, values, count);
    } catch (err) {
      if (err instanceof BpfError && err.errno === Errno.ENOSPC) {
        throw new Refusal(Status.KERNEL_ERROR, `ELEM_LOOKUP_BATCH: max_count ${count} is smaller than one hash bucket of map ${e.handle}; retry with a larger max_count`, { a: err.errno });
      }
      this.elemError(err, e, 'lookup batch');
    }
    const n = res.count;
    const cursor = res.next ?? EMPTY;
    const w = new Writer(12 + cursor.byteLength + n * per)
      .u32(n).u32(res.next ? 0 : 1).u32(cursor.byteLength).bytes(cursor)
      .bytes(keys.subarray(0, n * e.def.keySize)).bytes(values.subarray(0, n * e.def.valueSize));
    return this.ok(Cmd.ELEM_LOOKUP_BATCH, seq, w.finish());
  }

  private batchData(what: string, count: number, data: Uint8Array, per: number, e: MapEntry): void {
    // count is checked against the bytes present before it sizes anything.
    if (count > data.byteLength / Math.max(1, per) || count * per !== data.byteLength) {
      throw new Refusal(Status.BAD_REQUEST, `${what}: count ${count} × ${per} bytes does not match the ${data.byteLength} bytes present (map ${e.handle})`);
    }
  }

  /** The elements processed before a batch failed, from libbpf's error detail ("N of M"). */
  private processedOf(err: unknown): number {
    const m = err instanceof BpfError ? / (\d+) of \d+ (?:written|deleted)/.exec(err.message) : null;
    return m ? Number(m[1]) : 0;
  }

  private onUpdateBatch(p: Uint8Array, seq: number): Uint8Array {
    const r = decodeBatch(p, 'ELEM_UPDATE_BATCH');
    this.checkUpdateFlags(r.flags);
    const e = this.entry(r.handle);
    const k = e.def.keySize;
    this.batchData('ELEM_UPDATE_BATCH', r.count, r.data, k + e.def.valueSize, e);
    if (r.count === 0) return this.ok(Cmd.ELEM_UPDATE_BATCH, seq, u32Body(0));
    let n: number;
    try {
      n = e.map.updateBatch(r.data.subarray(0, r.count * k), r.data.subarray(r.count * k), r.count, r.flags);
    } catch (err) {
      this.elemError(err, e, 'update batch', this.processedOf(err));
    }
    return this.ok(Cmd.ELEM_UPDATE_BATCH, seq, u32Body(n));
  }

  private onDeleteBatch(p: Uint8Array, seq: number): Uint8Array {
    const r = decodeBatch(p, 'ELEM_DELETE_BATCH');
    this.checkNoFlags('ELEM_DELETE_BATCH', r.flags);
    const e = this.entry(r.handle);
    this.refuseArrayDelete(e, 'delete batch');
    this.batchData('ELEM_DELETE_BATCH', r.count, r.data, e.def.keySize, e);
    if (r.count === 0) return this.ok(Cmd.ELEM_DELETE_BATCH, seq, u32Body(0));
    let n: number;
    try {
      n = e.map.deleteBatch(r.data, r.count);
    } catch (err) {
      this.elemError(err, e, 'delete batch', this.processedOf(err));
    }
    return this.ok(Cmd.ELEM_DELETE_BATCH, seq, u32Body(n));
  }

  // -------------------------------------------------------------------------------------
  // Programs: received → checked → loaded → published (onProgramChange)

  private onProgSet(p: Uint8Array, seq: number): Uint8Array {
    // received
    const req = decodeProgSet(p);
    if (req.flags !== 0) throw new Refusal(Status.BAD_REQUEST, `PROG_SET: flags must be 0, got ${req.flags}`);
    // checked
    const judged = judgeProgram(decodeProgram(req.insns), req.license, req.mapHandles, {
      maxInsns: this.limits.maxProgInsns,
      allowedHelpers: this.allowed,
      handleExists: (h) => this.maps.has(h),
    });
    const insns = rewriteMapRefs(judged, (h) => this.maps.get(h)!.map.fd);
    // loaded
    let fd: number;
    try {
      fd = progLoadWithLog(insns, {
        license: req.license, type: BpfProgType.XDP, name: req.name || 'vx_offload', logSize: VERIFIER_LOG_BUFFER,
      }).fd;
    } catch (err) {
      if (err instanceof BpfError) {
        const log = err.verifierLog ?? '';
        this.log(`program refused by the verifier: ${err.code}`);
        throw new Refusal(Status.VERIFIER_REJECTED, `the host verifier rejected the program: ${err.code}`,
          { a: err.errno }, encodeVerifierLog(log, this.verifierLogLimit()));
      }
      throw err;
    }
    let loaded: LoadedProgram;
    try {
      const info = progInfo(fd);
      loaded = {
        fd, id: info.id, tag: info.tag, insns: judged.decoded.count, loadedAt: isoNow(this.now),
        name: req.name, usedHandles: judged.usedHandles, code: insns, license: req.license,
      };
      this.pins?.pinProg(fd, {
        insns: loaded.insns, loadedAt: loaded.loadedAt, usedHandles: loaded.usedHandles, name: loaded.name,
        source: { bytes: req.insns.byteLength, license: req.license, declaredHandles: [...req.mapHandles], tag: loaded.tag },
      }, req.insns);
    } catch (err) {
      closeBpfFd(fd);
      throw err;
    }
    // published: the old program (if any) is closed only after listeners saw the new one.
    const old = this.prog;
    this.prog = loaded;
    this.emitProgram();
    if (old) closeBpfFd(old.fd);
    this.log(`program loaded: id ${loaded.id} tag ${loaded.tag}, ${loaded.insns} insns, maps [${loaded.usedHandles.join(', ')}]${old ? ` (replaced id ${old.id})` : ''}`);
    const tag = Buffer.from(loaded.tag, 'hex');
    return this.ok(Cmd.PROG_SET, seq, new Writer(16).u32(loaded.insns).u32(0).bytes(tag).finish());
  }

  private onProgUnset(p: Uint8Array, seq: number): Uint8Array {
    if (p.byteLength !== 0) throw new Refusal(Status.BAD_REQUEST, `PROG_UNSET takes no payload (${p.byteLength} bytes given)`);
    const was = this.unloadProgram('guest PROG_UNSET');
    return this.ok(Cmd.PROG_UNSET, seq, u32Body(was ? 1 : 0));
  }

  private unloadProgram(why: string): boolean {
    const old = this.prog;
    if (!old) return false;
    this.prog = null;
    try { this.pins?.unpinProg(); } catch (e) { this.log(`unpin program failed: ${(e as Error).message}`); }
    this.emitProgram();
    closeBpfFd(old.fd);
    this.log(`program id ${old.id} unloaded (${why})`);
    return true;
  }

  // -------------------------------------------------------------------------------------
  // Operator and lifecycle API

  reset(reason: string): void {
    const wasClaimed = this.claimed;
    this.unloadProgram(reason);
    const n = this.maps.size;
    this.maps.clear();
    this.claim = null;
    if (this.pins) {
      try { this.pins.removeAll(); } catch (e) { this.log(`removing pins failed: ${(e as Error).message}`); }
    }
    if (wasClaimed || n > 0) this.log(`reset (${reason}): ${n} maps freed, claim dropped`);
    if (wasClaimed) this.emitClaim();
  }

  detach(): boolean {
    return this.unloadProgram('operator detach');
  }

  /** Releases fds without unpinning: with a pin dir the kernel objects stay for restore(). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    const old = this.prog;
    this.prog = null;
    if (old) {
      this.emitProgram();
      closeBpfFd(old.fd);
    }
    this.maps.clear();
    this.claim = null;
  }

  private usage(): QuotaUsage {
    return {
      maps: this.maps.size,
      mapMemory: this.maps.chargedBytes,
      largestMapEntries: this.maps.largestMaxEntries(),
      progInsns: this.prog?.insns ?? 0,
      opsPerSec: this.bucket.recentRate,
    };
  }

  quotas(): { limits: Quotas; usage: QuotaUsage } {
    return { limits: { ...this.limits }, usage: this.usage() };
  }

  setQuotas(changes: Partial<Quotas>): { limits: Quotas; usage: QuotaUsage; warnings: string[] } {
    const clean = validateQuotas(changes);
    this.limits = { ...this.limits, ...clean };
    if (clean.maxOpsPerSec !== undefined) this.bucket.setRate(clean.maxOpsPerSec);
    const usage = this.usage();
    const warnings = quotaWarnings(this.limits, usage);
    this.log(`quotas set: ${Object.entries(clean).map(([k, v]) => `${k}=${v}`).join(' ')}${warnings.length ? ` (${warnings.length} warnings)` : ''}`);
    return { limits: { ...this.limits }, usage, warnings };
  }

  private countEntries(e: MapEntry): number {
    if (e.def.type === BpfMapType.ARRAY) return e.def.maxEntries;
    let n = 0;
    let key: Uint8Array | null = null;
    const buf = [new Uint8Array(e.def.keySize), new Uint8Array(e.def.keySize)];
    // Bounded: a map being updated concurrently by the program cannot make this loop forever.
    while (n <= e.def.maxEntries) {
      const next: Uint8Array | null = e.map.nextKey(key, buf[n & 1]);
      if (!next) break;
      key = next;
      n++;
    }
    return Math.min(n, e.def.maxEntries);
  }

  show(): OffloadShow {
    const p = this.prog;
    return {
      device: this.device,
      claimed: this.claimed,
      claimedAt: this.claim?.at ?? null,
      program: p ? { fd: p.fd, id: p.id, tag: p.tag, insns: p.insns, loadedAt: p.loadedAt, name: p.name, mapHandles: [...p.usedHandles] } : null,
      maps: this.maps.entries().map((e) => ({
        handle: e.handle, id: e.id, type: mapTypeName(e.def.type), typeId: e.def.type, keySize: e.def.keySize,
        valueSize: e.def.valueSize, maxEntries: e.def.maxEntries, flags: e.def.flags, name: e.def.name,
        entries: this.countEntries(e), bytes: e.chargedBytes, kernelBytes: readMemlock(e.map.fd), createdAt: e.createdAt,
      })),
      quotas: this.quotas(),
      allowedHelpers: [...this.allowed].sort((a, b) => a - b),
      pinDir: this.pins?.dir ?? null,
      requests: { total: this.total, byStatus: { ...this.byStatus } },
    };
  }

  /**
   * Re-adopts a device's pinned offload after a backend restart: the claim, every pinned
   * map under its old handle (contents intact: they are the same kernel maps) and the
   * program (still the same kernel program). Objects that cannot be re-opened are logged
   * and left out; their handles then answer BAD_MAP_HANDLE. Without pins: a fresh broker.
   */
  static restore(opts: OffloadBrokerOptions): OffloadBroker {
    const b = new OffloadBroker(opts);
    const pins = b.pins;
    if (!pins || !pins.exists()) return b;
    const claim = pins.readClaim();
    if (!claim || claim.device !== b.device) {
      b.log('pinned state unreadable; starting unclaimed and removing it');
      pins.removeAll();
      return b;
    }
    for (const { handle, meta } of pins.listMaps()) {
      let map: BpfMap | null = null;
      try {
        map = BpfMap.fromFd(pins.getMap(handle));
        if (!OFFLOAD_MAP_TYPES.includes(map.type)) throw new Error(`pinned map type ${map.type} is not offloadable`);
        const info = mapInfo(map.fd);
        const charged = meta?.chargedBytes ?? Math.max(estimateMapBytes(map.type, map.keySize, map.valueSize, map.maxEntries), readMemlock(map.fd) ?? 0);
        b.maps.add({
          map, id: info.id, chargedBytes: charged, createdAt: meta?.createdAt ?? claim.claimedAt,
          def: { type: map.type, keySize: map.keySize, valueSize: map.valueSize, maxEntries: map.maxEntries, flags: map.flags, name: map.name },
        }, handle);
      } catch (e) {
        map?.close();
        b.log(`map ${handle} not restored: ${(e as Error).message}`);
        try { pins.unpinMap(handle); } catch { /* already gone */ }
      }
    }
    b.maps.setNextHandle(claim.nextHandle);
    b.claim = { at: claim.claimedAt, responseLimit: claim.responseLimit };
    try {
      const got = pins.getProg();
      if (got) {
        const info = progInfo(got.fd);
        const ids = new Map(b.maps.entries().map((e) => [e.id, e.handle]));
        const used = got.meta?.usedHandles ?? info.mapIds.map((id) => ids.get(id)).filter((h): h is number => h !== undefined);
        b.prog = {
          fd: got.fd, id: info.id, tag: info.tag, insns: got.meta?.insns ?? info.xlatedProgLen / 8,
          loadedAt: got.meta?.loadedAt ?? isoNow(b.now), name: got.meta?.name ?? info.name,
          usedHandles: used.filter((h) => b.maps.has(h)), code: null, license: 'GPL',
        };
        const src = got.meta?.source;
        if (src && src.tag === info.tag) {
          try {
            const bytes = pins.getSource(src.bytes);
            if (!bytes) throw new Error('source pin missing or short');
            // Checked again as if the guest had just sent it: the pins are host files, but the
            // bytes came from the guest once.
            const judged = judgeProgram(decodeProgram(bytes), src.license, src.declaredHandles, {
              maxInsns: b.limits.maxProgInsns, allowedHelpers: b.allowed, handleExists: (h) => b.maps.has(h),
            });
            b.prog.code = rewriteMapRefs(judged, (h) => b.maps.get(h)!.map.fd);
            b.prog.license = src.license;
          } catch (e) {
            b.log(`program source not restored (the program runs, but cannot be composed again): ${(e as Error).message}`);
          }
        } else if (src) {
          b.log('pinned program source belongs to another program (interrupted replace); not composing it');
        }
      }
    } catch (e) {
      b.log(`program not restored: ${(e as Error).message}`);
    }
    b.log(`restored from ${pins.dir}: ${b.maps.size} maps, ${b.prog ? `program id ${b.prog.id}` : 'no program'}`);
    return b;
  }
}

