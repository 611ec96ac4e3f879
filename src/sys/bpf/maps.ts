import { VxError } from '../../errors.js';
import { Errno } from '../errors.js';
import { NativeBuffer, closeFd } from '../libc.js';
import { libbpf, fail, checkObjName, scratch, optsStruct, BpfError } from './libbpf.js';
import { mapInfo, type BpfMapInfo } from './info.js';

// Maps: creation, element and batch operations on one map fd, with the geometry checks that
// keep the kernel from reading or writing past a caller's buffer.

const fn = {
  map_create: libbpf.func('bpf_map_create', 'int', ['int', 'str', 'uint32', 'uint32', 'uint32', 'intptr_t']),
  map_lookup_elem: libbpf.func('bpf_map_lookup_elem', 'int', ['int', 'void *', 'void *']),
  map_update_elem: libbpf.func('bpf_map_update_elem', 'int', ['int', 'void *', 'void *', 'uint64']),
  map_delete_elem: libbpf.func('bpf_map_delete_elem', 'int', ['int', 'void *']),
  map_get_next_key: libbpf.func('bpf_map_get_next_key', 'int', ['int', 'void *', 'void *']),
  map_lookup_batch: libbpf.func('bpf_map_lookup_batch', 'int',
    ['int', 'void *', 'void *', 'void *', 'void *', 'void *', 'intptr_t']),
  map_update_batch: libbpf.func('bpf_map_update_batch', 'int', ['int', 'void *', 'void *', 'void *', 'intptr_t']),
  map_delete_batch: libbpf.func('bpf_map_delete_batch', 'int', ['int', 'void *', 'void *', 'intptr_t']),
  map_get_fd_by_id: libbpf.func('bpf_map_get_fd_by_id', 'int', ['uint32']),
  num_possible_cpus: libbpf.func('libbpf_num_possible_cpus', 'int', []),
};

// Constants (uapi linux/bpf.h)

export const BpfMapType = {
  HASH: 1, ARRAY: 2, PROG_ARRAY: 3, PERF_EVENT_ARRAY: 4, PERCPU_HASH: 5, PERCPU_ARRAY: 6,
  STACK_TRACE: 7, CGROUP_ARRAY: 8, LRU_HASH: 9, LRU_PERCPU_HASH: 10, LPM_TRIE: 11,
  ARRAY_OF_MAPS: 12, HASH_OF_MAPS: 13, DEVMAP: 14, SOCKMAP: 15, CPUMAP: 16, XSKMAP: 17,
  SOCKHASH: 18, CGROUP_STORAGE: 19, REUSEPORT_SOCKARRAY: 20, PERCPU_CGROUP_STORAGE: 21,
  QUEUE: 22, STACK: 23, SK_STORAGE: 24, DEVMAP_HASH: 25, STRUCT_OPS: 26, RINGBUF: 27,
  INODE_STORAGE: 28, TASK_STORAGE: 29, BLOOM_FILTER: 30,
} as const;

const PERCPU_MAP_TYPES: ReadonlySet<number> = new Set([
  BpfMapType.PERCPU_HASH, BpfMapType.PERCPU_ARRAY, BpfMapType.LRU_PERCPU_HASH,
  BpfMapType.PERCPU_CGROUP_STORAGE,
]);

export function isPerCpuMapType(type: number): boolean {
  return PERCPU_MAP_TYPES.has(type);
}

/** Element update flags (bpf_map_update_elem). */
export const BPF_ANY = 0;
export const BPF_NOEXIST = 1;
export const BPF_EXIST = 2;
export const BPF_F_LOCK = 4;

/** Map creation flags worth naming. */
export const BPF_F_NO_PREALLOC = 1;
export const BPF_F_RDONLY_PROG = 1 << 7;
export const BPF_F_WRONLY_PROG = 1 << 8;

export interface MapCreateOptions {
  name?: string;
  /** map_flags, e.g. BPF_F_NO_PREALLOC (required by the kernel for LPM_TRIE). */
  flags?: number;
  numaNode?: number;
  innerMapFd?: number;
}

/** bpf_map_create; returns the new map's fd. */
export function mapCreate(type: number, keySize: number, valueSize: number, maxEntries: number,
  opts: MapCreateOptions = {}): number {
  const name = opts.name ?? '';
  checkObjName('bpf_map_create', name);
  // struct bpf_map_create_opts (libbpf 1.1): sz@0 btf_fd@8 btf_key@12 btf_value@16
  // btf_vmlinux_value@20 inner_map_fd@24 map_flags@28 map_extra@32 numa_node@40 map_ifindex@44; 48 bytes.
  const address = optsStruct(48);
  const v = scratch.view;
  v.setUint32(24, opts.innerMapFd ?? 0, true);
  v.setUint32(28, opts.flags ?? 0, true);
  v.setUint32(40, opts.numaNode ?? 0, true);
  const fd = fn.map_create(type, name.length ? name : null, keySize, valueSize, maxEntries, address) as number;
  if (fd < 0) fail('bpf_map_create', fd, `type ${type} key ${keySize} value ${valueSize} entries ${maxEntries}`);
  return fd;
}

/** Opens a map by id (ENOENT if it is gone); the caller owns the fd. */
export function mapGetFdById(id: number): number {
  const fd = fn.map_get_fd_by_id(id) as number;
  if (fd < 0) fail('bpf_map_get_fd_by_id', fd, `id ${id}`);
  return fd;
}

let possibleCpus = 0;
/** Number of possible CPUs: per-CPU map values are this many 8-byte-aligned slots. */
export function numPossibleCpus(): number {
  if (possibleCpus === 0) {
    const n = fn.num_possible_cpus() as number;
    if (n < 0) fail('libbpf_num_possible_cpus', n);
    possibleCpus = n;
  }
  return possibleCpus;
}

/**
 * A map fd with its geometry, so element operations can refuse buffers of the wrong size
 * before the kernel reads or writes past them (VxError 'bad-key-size', 'bad-value-size',
 * 'bad-batch-count', 'short-keys-buffer', 'short-values-buffer', 'short-batch-cursor': the
 * caller's bug, never an errno).
 */
export class BpfMap {
  readonly fd: number;
  readonly type: number;
  readonly keySize: number;
  readonly valueSize: number;
  readonly maxEntries: number;
  readonly flags: number;
  readonly name: string;
  /** Bytes one value occupies in user space: valueSize, or per-CPU slots for per-CPU maps. */
  readonly valueBytes: number;
  /** Batch cursors are opaque to user space; hash maps use a u32 bucket, arrays a key. */
  readonly batchTokenSize: number;
  private closed = false;
  private readonly batchCount = new Uint32Array(1);
  private readonly batchOpts: NativeBuffer | null = null;

  private constructor(fd: number, info: BpfMapInfo) {
    this.fd = fd;
    this.type = info.type;
    this.keySize = info.keySize;
    this.valueSize = info.valueSize;
    this.maxEntries = info.maxEntries;
    this.flags = info.flags;
    this.name = info.name;
    this.valueBytes = isPerCpuMapType(info.type)
      ? ((info.valueSize + 7) & ~7) * numPossibleCpus()
      : info.valueSize;
    this.batchTokenSize = Math.max(8, info.keySize);
  }

  static create(type: number, keySize: number, valueSize: number, maxEntries: number,
    opts: MapCreateOptions = {}): BpfMap {
    const fd = mapCreate(type, keySize, valueSize, maxEntries, opts);
    return new BpfMap(fd, {
      type, id: 0, keySize, valueSize, maxEntries, flags: opts.flags ?? 0, name: opts.name ?? '',
    });
  }

  /** Takes ownership of a map fd (e.g. from objGet or mapGetFdById) and reads its geometry. */
  static fromFd(fd: number): BpfMap {
    return new BpfMap(fd, mapInfo(fd));
  }

  private checkKey(key: Uint8Array, what = 'key'): void {
    if (key.byteLength !== this.keySize) {
      throw new VxError('bad-key-size', `bpf_map ${this.name}: ${what} is ${key.byteLength} bytes, map wants ${this.keySize}`);
    }
  }

  private checkValue(value: Uint8Array): void {
    if (value.byteLength !== this.valueBytes) {
      throw new VxError('bad-value-size', `bpf_map ${this.name}: value is ${value.byteLength} bytes, map wants ${this.valueBytes}`);
    }
  }

  /** Copies the value for key into `out` (allocated when omitted); null when absent. */
  lookup(key: Uint8Array, out?: Uint8Array): Uint8Array | null {
    this.checkKey(key);
    const value = out ?? new Uint8Array(this.valueBytes);
    this.checkValue(value);
    const r = fn.map_lookup_elem(this.fd, key, value) as number;
    if (r === -Errno.ENOENT) return null;
    if (r < 0) fail('bpf_map_lookup_elem', r, this.name);
    return value;
  }

  /** flags: BPF_ANY, BPF_NOEXIST (EEXIST if present), BPF_EXIST (ENOENT if absent). */
  update(key: Uint8Array, value: Uint8Array, flags: number = BPF_ANY): void {
    this.checkKey(key);
    this.checkValue(value);
    const r = fn.map_update_elem(this.fd, key, value, flags) as number;
    if (r < 0) fail('bpf_map_update_elem', r, this.name);
  }

  /** Returns false when the key was absent. Arrays cannot delete (EINVAL). */
  delete(key: Uint8Array): boolean {
    this.checkKey(key);
    const r = fn.map_delete_elem(this.fd, key) as number;
    if (r === -Errno.ENOENT) return false;
    if (r < 0) fail('bpf_map_delete_elem', r, this.name);
    return true;
  }

  /** The key after `key` (the first key when key is null); null at the end. */
  nextKey(key: Uint8Array | null, out?: Uint8Array): Uint8Array | null {
    if (key) this.checkKey(key);
    const next = out ?? new Uint8Array(this.keySize);
    this.checkKey(next, 'next key buffer');
    const r = fn.map_get_next_key(this.fd, key, next) as number;
    if (r === -Errno.ENOENT) return null;
    if (r < 0) fail('bpf_map_get_next_key', r, this.name);
    return next;
  }

  /** Every key, in kernel order (a snapshot that tolerates concurrent deletes only loosely). */
  *keys(): Generator<Uint8Array> {
    let key: Uint8Array | null = null;
    for (;;) {
      key = this.nextKey(key);
      if (!key) return;
      yield key;
    }
  }

  private batchOptsAddress(elemFlags: number): number {
    // struct bpf_map_batch_opts: sz@0 elem_flags@8 flags@16; 24 bytes.
    const address = optsStruct(24);
    scratch.view.setBigUint64(8, BigInt(elemFlags), true);
    return address;
  }

  private checkBatch(count: number, keys: Uint8Array, values: Uint8Array | null): void {
    if (!Number.isInteger(count) || count < 0 || count > 0xffffffff) {
      throw new VxError('bad-batch-count', `bpf_map_batch ${this.name}: count ${count}`);
    }
    if (keys.byteLength < count * this.keySize) {
      throw new VxError('short-keys-buffer', `bpf_map_batch ${this.name}: keys buffer holds fewer than ${count} keys`);
    }
    if (values && values.byteLength < count * this.valueBytes) {
      throw new VxError('short-values-buffer', `bpf_map_batch ${this.name}: values buffer holds fewer than ${count} values`);
    }
  }

  /** A failed batch call: how many elements the kernel handled first travels in `processed`. */
  private failBatch(op: string, r: number, count: number, verb: string): never {
    const processed = this.batchCount[0]!;
    throw new BpfError(op, -r, `${this.name}: ${processed} of ${count} ${verb}`, { processed });
  }

  /**
   * Reads up to maxCount elements after `cursor` (null = from the start) into keys/values,
   * packed. Returns how many were read and the cursor for the next call (null when the map
   * is exhausted). The cursor is an opaque token of batchTokenSize bytes.
   */
  lookupBatch(cursor: Uint8Array | null, keys: Uint8Array, values: Uint8Array, maxCount: number):
    { count: number; next: Uint8Array | null } {
    this.checkBatch(maxCount, keys, values);
    if (cursor && cursor.byteLength < this.batchTokenSize) {
      throw new VxError('short-batch-cursor', `bpf_map_lookup_batch ${this.name}: cursor of ${cursor.byteLength} bytes, map wants ${this.batchTokenSize}`);
    }
    const next = new Uint8Array(this.batchTokenSize);
    this.batchCount[0] = maxCount;
    const r = fn.map_lookup_batch(this.fd, cursor, next, keys, values, this.batchCount,
      this.batchOptsAddress(0)) as number;
    const count = this.batchCount[0]!;
    if (r === -Errno.ENOENT) return { count, next: null };
    if (r < 0) fail('bpf_map_lookup_batch', r, this.name);
    return { count, next };
  }

  /** Writes count packed key/value pairs; returns how many were written before any error. */
  updateBatch(keys: Uint8Array, values: Uint8Array, count: number, elemFlags: number = BPF_ANY): number {
    this.checkBatch(count, keys, values);
    this.batchCount[0] = count;
    const r = fn.map_update_batch(this.fd, keys, values, this.batchCount, this.batchOptsAddress(elemFlags)) as number;
    if (r < 0) this.failBatch('bpf_map_update_batch', r, count, 'written');
    return this.batchCount[0]!;
  }

  /** Deletes count packed keys; an absent key stops the batch with ENOENT. */
  deleteBatch(keys: Uint8Array, count: number): number {
    this.checkBatch(count, keys, null);
    this.batchCount[0] = count;
    const r = fn.map_delete_batch(this.fd, keys, this.batchCount, this.batchOptsAddress(0)) as number;
    if (r < 0) this.failBatch('bpf_map_delete_batch', r, count, 'deleted');
    return this.batchCount[0]!;
  }

  info(): BpfMapInfo {
    return mapInfo(this.fd);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeFd(this.fd);
  }
}
