// Per-device map handles: the small integers the guest sees (from 1, never reused while
// the claim lasts) mapped to the host maps behind them. Host fds, map ids and kernel
// addresses stay on this side (DESIGN.md decision 4). Also the map-type policy.

import { BpfMap, BpfMapType, isPerCpuMapType, BPF_F_NO_PREALLOC, BPF_F_RDONLY_PROG, BPF_F_WRONLY_PROG } from '../sys/bpf/maps.js';
import { Status, QuotaId, type MapCreateRequest } from './protocol.js';
import { ProtocolError } from './errors.js';
import type { Quotas } from './quotas.js';

/** Map types a guest may create. Per-CPU types are refused with their own reason. */
export const OFFLOAD_MAP_TYPES: readonly number[] = [BpfMapType.HASH, BpfMapType.ARRAY, BpfMapType.LRU_HASH];

/**
 * Map types an object (§8) may hold: per-CPU types too (the guest learns possible_cpus from
 * OBJ_SHOW), and PROG_ARRAY for tail calls into the object's own programs.
 */
export const OBJECT_MAP_TYPES: readonly number[] = [
  BpfMapType.HASH, BpfMapType.ARRAY, BpfMapType.PROG_ARRAY, BpfMapType.PERCPU_HASH, BpfMapType.PERCPU_ARRAY,
  BpfMapType.LRU_HASH, BpfMapType.LRU_PERCPU_HASH,
];

const typeNames = new Map<number, string>(Object.entries(BpfMapType).map(([k, v]) => [v, k]));
export function mapTypeName(type: number): string {
  return typeNames.get(type) ?? `type ${type}`;
}

/** Flags with a meaning for the program's view only; the rest would change the host side. */
export const ALLOWED_MAP_FLAGS = BPF_F_NO_PREALLOC | BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG;

export interface MapDef { type: number; keySize: number; valueSize: number; maxEntries: number; flags: number; name: string }

/** Checks a MAP_CREATE against type policy and the per-map quotas; throws ProtocolError. */
export function checkMapDef(d: MapCreateRequest, q: Quotas): void {
  if (isPerCpuMapType(d.type)) {
    throw new ProtocolError(Status.MAP_TYPE_REFUSED, 'map-type-percpu',
      `map type ${mapTypeName(d.type)} (${d.type}) is refused: per-CPU values are sized by the host's CPU count, which the guest cannot know`,
      { a: d.type });
  }
  if (!OFFLOAD_MAP_TYPES.includes(d.type)) {
    throw new ProtocolError(Status.MAP_TYPE_REFUSED, 'bad-map-type',
      `map type ${mapTypeName(d.type)} (${d.type}) is not offloadable (allowed: ${OFFLOAD_MAP_TYPES.map(mapTypeName).join(', ')})`,
      { a: d.type });
  }
  const badFlags = d.flags & ~ALLOWED_MAP_FLAGS;
  if (badFlags !== 0) {
    throw new ProtocolError(Status.BAD_REQUEST, 'bad-map-flags',
      `map flags 0x${(badFlags >>> 0).toString(16)} are not allowed (allowed: NO_PREALLOC 0x1, RDONLY_PROG 0x80, WRONLY_PROG 0x100)`);
  }
  if ((d.flags & BPF_F_NO_PREALLOC) !== 0 && d.type !== BpfMapType.HASH) {
    // The kernel answers EINVAL (ARRAY) or ENOTSUPP (LRU_HASH); say why instead.
    throw new ProtocolError(Status.BAD_REQUEST, 'no-prealloc-not-hash', `NO_PREALLOC applies to HASH maps only; ${mapTypeName(d.type)} maps are always preallocated`);
  }
  if (d.type === BpfMapType.ARRAY && d.keySize !== 4) {
    throw new ProtocolError(Status.BAD_REQUEST, 'array-key-size', `ARRAY maps have 4-byte keys, not ${d.keySize}`);
  }
  checkMapGeometry(d, q);
}

/** Sizes against the per-map quotas (MAP_CREATE and the object path). */
export function checkMapGeometry(d: MapCreateRequest, q: Quotas): void {
  if (d.keySize === 0 || d.valueSize === 0 || d.maxEntries === 0) {
    throw new ProtocolError(Status.BAD_REQUEST, 'zero-map-size', 'key size, value size and max entries must be non-zero');
  }
  if (d.keySize > q.maxKeySize) {
    throw new ProtocolError(Status.QUOTA_EXCEEDED, 'quota-exceeded', `key size ${d.keySize} is over this device's max-key-size of ${q.maxKeySize}`,
      { a: QuotaId.MAX_KEY_SIZE, b: d.keySize, c: q.maxKeySize });
  }
  if (d.valueSize > q.maxValueSize) {
    throw new ProtocolError(Status.QUOTA_EXCEEDED, 'quota-exceeded', `value size ${d.valueSize} is over this device's max-value-size of ${q.maxValueSize}`,
      { a: QuotaId.MAX_VALUE_SIZE, b: d.valueSize, c: q.maxValueSize });
  }
  if (d.maxEntries > q.maxEntries) {
    throw new ProtocolError(Status.QUOTA_EXCEEDED, 'quota-exceeded', `max_entries ${d.maxEntries} is over this device's max-entries quota of ${q.maxEntries}`,
      { a: QuotaId.MAX_ENTRIES, b: d.maxEntries, c: q.maxEntries });
  }
}

export interface MapEntry {
  handle: number;
  map: BpfMap;
  /** Kernel map id: host-side only (show, pinning); never sent to the guest. */
  id: number;
  def: MapDef;
  /** Bytes charged against max-map-memory. */
  chargedBytes: number;
  createdAt: string;
}

const MAX_HANDLE = 0x7fffffff;

export class MapTable {
  private readonly byHandle = new Map<number, MapEntry>();
  private next = 1;
  private charged = 0;

  get size(): number { return this.byHandle.size; }
  get chargedBytes(): number { return this.charged; }
  get nextHandle(): number { return this.next; }

  /** The entry for a guest handle, or undefined (unknown, freed, or another device's). */
  get(handle: number): MapEntry | undefined {
    return this.byHandle.get(handle);
  }

  has(handle: number): boolean {
    return this.byHandle.has(handle);
  }

  /** The handle the next add() will use; throws when the handle space is exhausted. */
  peekHandle(): number {
    if (this.next > MAX_HANDLE) throw new ProtocolError(Status.QUOTA_EXCEEDED, 'handles-exhausted', 'map handles exhausted for this claim', { a: 0 });
    return this.next;
  }

  add(e: Omit<MapEntry, 'handle'>, handle = this.peekHandle()): MapEntry {
    if (this.byHandle.has(handle)) throw new Error(`map handle ${handle} already in use`);
    const entry: MapEntry = { ...e, handle };
    this.byHandle.set(handle, entry);
    this.charged += e.chargedBytes;
    this.next = Math.max(this.next, handle + 1);
    return entry;
  }

  /** Removes the entry and closes its map fd; returns it, or undefined when unknown. */
  remove(handle: number): MapEntry | undefined {
    const e = this.byHandle.get(handle);
    if (!e) return undefined;
    this.byHandle.delete(handle);
    this.charged -= e.chargedBytes;
    e.map.close();
    return e;
  }

  entries(): MapEntry[] {
    return [...this.byHandle.values()].sort((a, b) => a.handle - b.handle);
  }

  largestMaxEntries(): number {
    let n = 0;
    for (const e of this.byHandle.values()) n = Math.max(n, e.def.maxEntries);
    return n;
  }

  /** Closes every map fd and forgets every handle; handle numbering restarts at 1. */
  clear(): void {
    for (const e of this.byHandle.values()) e.map.close();
    this.byHandle.clear();
    this.charged = 0;
    this.next = 1;
  }

  /** After a restore: continue numbering past handles the guest may still remember. */
  setNextHandle(n: number): void {
    this.next = Math.max(this.next, n);
  }
}
