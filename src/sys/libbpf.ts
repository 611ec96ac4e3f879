import koffi from 'koffi';
import { errnoName, Errno } from './errors.js';
import { NativeBuffer, closeFd } from './libc.js';
import { BPF_INSN_SIZE } from './bpf-insn.js';

// Typed bindings to the system libbpf (1.1) low-level API (bpf/bpf.h, bpf_xdp_* from
// libbpf.h). Pointers travel as numbers (intptr_t) or as Uint8Arrays that koffi passes by
// address, so no BigInt and no per-call struct marshalling. The library is loaded when this
// module is evaluated, which also makes it usable from worker threads (each worker loads it).
const lib = koffi.load('libbpf.so.1');

const fn = {
  map_create: lib.func('bpf_map_create', 'int', ['int', 'str', 'uint32', 'uint32', 'uint32', 'intptr_t']),
  map_lookup_elem: lib.func('bpf_map_lookup_elem', 'int', ['int', 'void *', 'void *']),
  map_update_elem: lib.func('bpf_map_update_elem', 'int', ['int', 'void *', 'void *', 'uint64']),
  map_delete_elem: lib.func('bpf_map_delete_elem', 'int', ['int', 'void *']),
  map_get_next_key: lib.func('bpf_map_get_next_key', 'int', ['int', 'void *', 'void *']),
  map_lookup_batch: lib.func('bpf_map_lookup_batch', 'int',
    ['int', 'void *', 'void *', 'void *', 'void *', 'void *', 'intptr_t']),
  map_update_batch: lib.func('bpf_map_update_batch', 'int', ['int', 'void *', 'void *', 'void *', 'intptr_t']),
  map_delete_batch: lib.func('bpf_map_delete_batch', 'int', ['int', 'void *', 'void *', 'intptr_t']),
  prog_load: lib.func('bpf_prog_load', 'int', ['int', 'str', 'str', 'void *', 'size_t', 'intptr_t']),
  prog_test_run_opts: lib.func('bpf_prog_test_run_opts', 'int', ['int', 'intptr_t']),
  xdp_attach: lib.func('bpf_xdp_attach', 'int', ['int', 'int', 'uint32', 'intptr_t']),
  xdp_detach: lib.func('bpf_xdp_detach', 'int', ['int', 'uint32', 'intptr_t']),
  xdp_query: lib.func('bpf_xdp_query', 'int', ['int', 'int', 'intptr_t']),
  obj_pin: lib.func('bpf_obj_pin', 'int', ['int', 'str']),
  obj_get: lib.func('bpf_obj_get', 'int', ['str']),
  obj_get_info_by_fd: lib.func('bpf_obj_get_info_by_fd', 'int', ['int', 'intptr_t', 'intptr_t']),
  prog_get_next_id: lib.func('bpf_prog_get_next_id', 'int', ['uint32', 'intptr_t']),
  map_get_next_id: lib.func('bpf_map_get_next_id', 'int', ['uint32', 'intptr_t']),
  prog_get_fd_by_id: lib.func('bpf_prog_get_fd_by_id', 'int', ['uint32']),
  map_get_fd_by_id: lib.func('bpf_map_get_fd_by_id', 'int', ['uint32']),
  enable_stats: lib.func('bpf_enable_stats', 'int', ['int']),
  num_possible_cpus: lib.func('libbpf_num_possible_cpus', 'int', []),
};

// ---------------------------------------------------------------------------------------
// Constants (uapi linux/bpf.h and linux/if_link.h)

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

export const BpfProgType = { SOCKET_FILTER: 1, KPROBE: 2, SCHED_CLS: 3, SCHED_ACT: 4, TRACEPOINT: 5, XDP: 6 } as const;

/** Element update flags (bpf_map_update_elem). */
export const BPF_ANY = 0;
export const BPF_NOEXIST = 1;
export const BPF_EXIST = 2;
export const BPF_F_LOCK = 4;

/** Map creation flags worth naming. */
export const BPF_F_NO_PREALLOC = 1;
export const BPF_F_RDONLY_PROG = 1 << 7;
export const BPF_F_WRONLY_PROG = 1 << 8;

export const XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0;
export const XDP_FLAGS_SKB_MODE = 1 << 1;
export const XDP_FLAGS_DRV_MODE = 1 << 2;
export const XDP_FLAGS_HW_MODE = 1 << 3;
export const XDP_FLAGS_REPLACE = 1 << 4;

/** bpf_xdp_query attach_mode values. */
export const XDP_ATTACHED_NONE = 0;
export const XDP_ATTACHED_DRV = 1;
export const XDP_ATTACHED_SKB = 2;
export const XDP_ATTACHED_HW = 3;
export const XDP_ATTACHED_MULTI = 4;

export const XDP_ABORTED = 0;
export const XDP_DROP = 1;
export const XDP_PASS = 2;
export const XDP_TX = 3;
export const XDP_REDIRECT = 4;

// Instruction encoding lives in bpf-insn.ts (pure bytes, importable by ports/ and offload/);
// re-exported here so existing importers of libbpf keep working.
export {
  BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE, BPF_PSEUDO_CALL, BPF_PSEUDO_KFUNC_CALL, BPF_INSN_SIZE,
  encodeInsns, decodeInsn, type BpfInsn,
} from './bpf-insn.js';

// ---------------------------------------------------------------------------------------
// Errors

/** A failed libbpf call. libbpf returns -errno; `verifierLog` is set for program loads. */
export class BpfError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly op: string;
  readonly verifierLog?: string;
  constructor(op: string, errno: number, detail?: string, verifierLog?: string) {
    const code = errnoName(errno);
    super(`${op}${detail ? ` (${detail})` : ''}: ${code}${verifierLog ? `\n${verifierLog}` : ''}`);
    this.name = 'BpfError';
    this.errno = errno;
    this.code = code;
    this.op = op;
    if (verifierLog !== undefined) this.verifierLog = verifierLog;
  }
}

function fail(op: string, ret: number, detail?: string): never {
  throw new BpfError(op, -ret, detail);
}

// One scratch area per module instance (so per worker thread) for the small out-parameters
// and opts structs of control-path calls. Calls are synchronous, so reuse is safe.
const scratch = new NativeBuffer(4096);
const SCRATCH_OPTS = 0;        // up to 128 bytes of opts struct
const SCRATCH_U32 = 128;       // u32 out-parameters
const SCRATCH_INFO = 256;      // bpf_prog_info / bpf_map_info (up to 1 KiB)
const SCRATCH_IDS = 2048;      // map id arrays (up to 512 ids)
const MAX_INFO_MAP_IDS = 512;

function zeroScratch(offset: number, len: number): void {
  scratch.bytes.fill(0, offset, offset + len);
}

// ---------------------------------------------------------------------------------------
// Maps

const OBJ_NAME_RE = /^[A-Za-z0-9_.]{0,15}$/;

function checkObjName(kind: string, name: string): void {
  // The kernel rejects other characters with a bare EINVAL; say why instead.
  if (!OBJ_NAME_RE.test(name)) throw new BpfError(kind, Errno.EINVAL, `name '${name}': at most 15 of [A-Za-z0-9_.]`);
}

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
  const v = scratch.view;
  zeroScratch(SCRATCH_OPTS, 48);
  v.setBigUint64(0, 48n, true);
  v.setUint32(24, opts.innerMapFd ?? 0, true);
  v.setUint32(28, opts.flags ?? 0, true);
  v.setUint32(40, opts.numaNode ?? 0, true);
  const fd = fn.map_create(type, name.length ? name : null, keySize, valueSize, maxEntries,
    scratch.address + SCRATCH_OPTS) as number;
  if (fd < 0) fail('bpf_map_create', fd, `type ${type} key ${keySize} value ${valueSize} entries ${maxEntries}`);
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
 * before the kernel reads or writes past them.
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
      throw new BpfError('bpf_map', Errno.EINVAL, `${what} is ${key.byteLength} bytes, map wants ${this.keySize}`);
    }
  }

  private checkValue(value: Uint8Array): void {
    if (value.byteLength !== this.valueBytes) {
      throw new BpfError('bpf_map', Errno.EINVAL, `value is ${value.byteLength} bytes, map wants ${this.valueBytes}`);
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
    const v = scratch.view;
    zeroScratch(SCRATCH_OPTS, 24);
    v.setBigUint64(0, 24n, true);
    v.setBigUint64(8, BigInt(elemFlags), true);
    return scratch.address + SCRATCH_OPTS;
  }

  private checkBatch(count: number, keys: Uint8Array, values: Uint8Array | null): void {
    if (!Number.isInteger(count) || count < 0 || count > 0xffffffff) {
      throw new BpfError('bpf_map_batch', Errno.EINVAL, `count ${count}`);
    }
    if (keys.byteLength < count * this.keySize) {
      throw new BpfError('bpf_map_batch', Errno.EINVAL, `keys buffer holds fewer than ${count} keys`);
    }
    if (values && values.byteLength < count * this.valueBytes) {
      throw new BpfError('bpf_map_batch', Errno.EINVAL, `values buffer holds fewer than ${count} values`);
    }
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
      throw new BpfError('bpf_map_lookup_batch', Errno.EINVAL, 'cursor too small');
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
    if (r < 0) fail('bpf_map_update_batch', r, `${this.name}: ${this.batchCount[0]} of ${count} written`);
    return this.batchCount[0]!;
  }

  /** Deletes count packed keys; an absent key stops the batch with ENOENT. */
  deleteBatch(keys: Uint8Array, count: number): number {
    this.checkBatch(count, keys, null);
    this.batchCount[0] = count;
    const r = fn.map_delete_batch(this.fd, keys, this.batchCount, this.batchOptsAddress(0)) as number;
    if (r < 0) fail('bpf_map_delete_batch', r, `${this.name}: ${this.batchCount[0]} of ${count} deleted`);
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

// ---------------------------------------------------------------------------------------
// Programs

export interface ProgLoadOptions {
  /** GPL-compatible license string; GPL-only helpers need one. */
  license: string;
  type?: number;
  name?: string;
  expectedAttachType?: number;
  progFlags?: number;
  /** Bytes kept of the verifier log on failure (tail end on kernels >= 6.4). Default 64 KiB, max 16 MiB. */
  logSize?: number;
  /** Load with this log level (1 or 2) even on success; the log is then returned by progLoadWithLog. */
  logLevel?: number;
}

const DEFAULT_LOG_SIZE = 64 * 1024;
const MAX_LOG_SIZE = 16 * 1024 * 1024;

function loadOnce(insns: Uint8Array, o: ProgLoadOptions, log: NativeBuffer | null, logLevel: number): number {
  // struct bpf_prog_load_opts (libbpf 1.1): sz@0 attempts@8 expected_attach_type@12
  // prog_btf_fd@16 prog_flags@20 prog_ifindex@24 kern_version@28 attach_btf_id@32
  // attach_prog_fd@36 attach_btf_obj_fd@40 fd_array@48 func_info@56 ... log_level@88
  // log_size@92 log_buf@96; 104 bytes.
  const v = scratch.view;
  zeroScratch(SCRATCH_OPTS, 104);
  v.setBigUint64(0, 104n, true);
  v.setUint32(12, o.expectedAttachType ?? 0, true);
  v.setUint32(20, o.progFlags ?? 0, true);
  if (log) {
    log.bytes[0] = 0;
    v.setUint32(88, logLevel, true);
    v.setUint32(92, log.size, true);
    v.setBigUint64(96, BigInt(log.address), true);
  }
  return fn.prog_load(o.type ?? BpfProgType.XDP, o.name ? o.name : null, o.license, insns,
    insns.byteLength / BPF_INSN_SIZE, scratch.address + SCRATCH_OPTS) as number;
}

function readLog(log: NativeBuffer): string {
  let end = log.bytes.indexOf(0);
  if (end < 0) end = log.size;
  return Buffer.from(log.bytes.buffer, log.bytes.byteOffset, end).toString('utf8');
}

function checkLoadArgs(insns: Uint8Array, o: ProgLoadOptions): number {
  if (insns.byteLength === 0 || insns.byteLength % BPF_INSN_SIZE !== 0) {
    throw new BpfError('bpf_prog_load', Errno.EINVAL, `instructions are ${insns.byteLength} bytes, not a non-zero multiple of 8`);
  }
  checkObjName('bpf_prog_load', o.name ?? '');
  if (o.license.includes('\0')) throw new BpfError('bpf_prog_load', Errno.EINVAL, 'license contains NUL');
  const size = Math.floor(o.logSize ?? DEFAULT_LOG_SIZE);
  if (!(size >= 256 && size <= MAX_LOG_SIZE)) {
    throw new BpfError('bpf_prog_load', Errno.EINVAL, `log size ${o.logSize} outside 256..${MAX_LOG_SIZE}`);
  }
  return size;
}

/**
 * Loads raw instructions (8-byte struct bpf_insn each) and returns the program fd. A
 * verifier rejection throws BpfError with the verifier's log (bounded by logSize). The
 * first attempt runs without a log so that a successful load never pays for one and a
 * truncated log cannot turn a success into ENOSPC; the errno reported is that attempt's.
 */
export function progLoad(insns: Uint8Array, opts: ProgLoadOptions): number {
  return progLoadWithLog(insns, opts).fd;
}

export function progLoadWithLog(insns: Uint8Array, opts: ProgLoadOptions): { fd: number; log: string } {
  const logSize = checkLoadArgs(insns, opts);
  const level = opts.logLevel ?? 0;
  if (level !== 0) {
    const log = new NativeBuffer(logSize);
    try {
      const fd = loadOnce(insns, opts, log, level);
      const text = readLog(log);
      if (fd < 0) throw new BpfError('bpf_prog_load', -fd, opts.name, text);
      return { fd, log: text };
    } finally {
      log.free();
    }
  }
  const fd = loadOnce(insns, opts, null, 0);
  if (fd >= 0) return { fd, log: '' };
  const log = new NativeBuffer(logSize);
  try {
    const retry = loadOnce(insns, opts, log, 1);
    // A program that loads only the second time (EAGAIN-like races) is still a program.
    if (retry >= 0) return { fd: retry, log: readLog(log) };
    throw new BpfError('bpf_prog_load', -fd, opts.name, readLog(log));
  } finally {
    log.free();
  }
}

// ---------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN

// struct bpf_test_run_opts (libbpf 1.1), 80 bytes.
const TR_SIZE = 80;
const TR_DATA_IN = 8, TR_DATA_OUT = 16, TR_SIZE_IN = 24, TR_SIZE_OUT = 28;
const TR_CTX_IN = 32, TR_CTX_SIZE_IN = 48;
const TR_RETVAL = 56, TR_REPEAT = 60, TR_DURATION = 64, TR_FLAGS = 68, TR_BATCH_SIZE = 76;
/** BPF_F_TEST_XDP_LIVE_FRAMES: frames the program redirects or bounces really leave (5.18+). */
const BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1;
/** struct xdp_md as test-run context: data@0 data_end@4 data_meta@8 ingress_ifindex@12 rx_queue_index@16 egress_ifindex@20. */
const XDP_MD_SIZE = 24;
/** Where runLive keeps its xdp_md, inside the opts buffer past the struct. */
const CTX_OFF = 2048;

/**
 * Runs one program through BPF_PROG_TEST_RUN with a preallocated opts struct, for the
 * datapath: run() takes native addresses (e.g. inside mapped guest RAM), allocates nothing
 * and returns the program's return value. The kernel copies data_in before running and
 * copies the result out afterwards, so dataOut may equal dataIn to rewrite a frame in place.
 */
export class TestRunner {
  readonly progFd: number;
  private readonly opts: NativeBuffer;
  private readonly view: DataView;
  private readonly address: number;
  private bounce: NativeBuffer | null = null;

  constructor(progFd: number) {
    this.progFd = progFd;
    this.opts = new NativeBuffer(4096);
    this.view = this.opts.view;
    this.address = this.opts.address;
    this.view.setBigUint64(0, BigInt(TR_SIZE), true);
  }

  /**
   * Runs on [dataIn, dataIn+lenIn) and writes at most outCap bytes of the result to dataOut
   * (0 = discard). Returns the program's verdict; outLength/duration describe the run.
   * Throws BpfError: ENOSPC when the result is larger than outCap (the truncated result is
   * still written), EINVAL for frames the kernel refuses (e.g. shorter than 14 bytes).
   */
  run(dataIn: number, lenIn: number, dataOut: number, outCap: number, repeat = 1): number {
    const v = this.view;
    this.setPointer(TR_DATA_IN, dataIn);
    this.setPointer(TR_DATA_OUT, dataOut);
    v.setUint32(TR_SIZE_IN, lenIn, true);
    v.setUint32(TR_SIZE_OUT, dataOut === 0 ? 0 : outCap, true);
    v.setInt32(TR_REPEAT, repeat, true);
    const r = fn.prog_test_run_opts(this.progFd, this.address) as number;
    if (r < 0) fail('bpf_prog_test_run_opts', r, `${lenIn} bytes in`);
    return v.getUint32(TR_RETVAL, true);
  }

  /** Two u32 halves instead of setBigUint64: no BigInt per packet. */
  private setPointer(off: number, address: number): void {
    this.view.setUint32(off, address % 0x100000000, true);
    this.view.setUint32(off + 4, Math.floor(address / 0x100000000), true);
  }

  /** Verdict of the last run; still valid after an ENOSPC throw (the program did run). */
  get retval(): number { return this.view.getUint32(TR_RETVAL, true); }
  /** Length of the frame the last run produced (after any head/tail adjustment). */
  get outLength(): number { return this.view.getUint32(TR_SIZE_OUT, true); }
  /** Average ns per repetition of the last run, as measured by the kernel. */
  get duration(): number { return this.view.getUint32(TR_DURATION, true); }

  /** Convenience for control paths and tests: copies through a native bounce buffer. */
  runBytes(data: Uint8Array, opts: { outCap?: number; repeat?: number } = {}):
    { retval: number; data: Uint8Array; duration: number } {
    const outCap = opts.outCap ?? Math.max(4096, data.byteLength);
    const need = data.byteLength + outCap;
    if (!this.bounce || this.bounce.size < need) {
      this.bounce?.free();
      this.bounce = new NativeBuffer(Math.ceil(need / 4096) * 4096);
    }
    const b = this.bounce;
    b.bytes.set(data, 0);
    const retval = this.run(b.address, data.byteLength, b.address + data.byteLength, outCap, opts.repeat ?? 1);
    const outLen = Math.min(this.outLength, outCap);
    const out = b.bytes.slice(data.byteLength, data.byteLength + outLen);
    return { retval, data: out, duration: this.duration };
  }

  /**
   * Live-frames mode: runs the program `repeat` times on copies of the frame as if it arrived
   * on (ifindex, queue), and what it returns is carried out for real: XDP_TX sends the frame
   * out of ifindex through its driver's ndo_xdp_xmit, XDP_REDIRECT follows the redirect. This
   * is a kernel-speed packet generator (what xdp-trafficgen does). Frames go in batches of
   * `batchSize` (the kernel's default is 64). Returns the number of frames run.
   */
  runLive(frame: number, frameLen: number, ifindex: number, repeat: number, opts: { queue?: number; batchSize?: number } = {}): number {
    const v = this.view;
    for (let i = 0; i < XDP_MD_SIZE; i += 4) v.setUint32(CTX_OFF + i, 0, true);
    v.setUint32(CTX_OFF + 4, frameLen, true); // data_end must equal the frame length
    v.setUint32(CTX_OFF + 12, ifindex, true);
    v.setUint32(CTX_OFF + 16, opts.queue ?? 0, true);
    this.setPointer(TR_DATA_IN, frame);
    this.setPointer(TR_DATA_OUT, 0);
    v.setUint32(TR_SIZE_IN, frameLen, true);
    v.setUint32(TR_SIZE_OUT, 0, true);
    this.setPointer(TR_CTX_IN, this.address + CTX_OFF);
    v.setUint32(TR_CTX_SIZE_IN, XDP_MD_SIZE, true);
    v.setInt32(TR_REPEAT, repeat, true);
    v.setUint32(TR_FLAGS, BPF_F_TEST_XDP_LIVE_FRAMES, true);
    v.setUint32(TR_BATCH_SIZE, opts.batchSize ?? 0, true);
    try {
      const r = fn.prog_test_run_opts(this.progFd, this.address) as number;
      if (r < 0) fail('bpf_prog_test_run_opts (live frames)', r, `${frameLen} bytes on ifindex ${ifindex}`);
    } finally {
      // run() leaves these alone; put the struct back the way it expects.
      this.setPointer(TR_CTX_IN, 0);
      v.setUint32(TR_CTX_SIZE_IN, 0, true);
      v.setUint32(TR_FLAGS, 0, true);
      v.setUint32(TR_BATCH_SIZE, 0, true);
    }
    return repeat;
  }

  /** Frees the opts struct (not the program fd). */
  dispose(): void {
    this.opts.free();
    this.bounce?.free();
    this.bounce = null;
  }
}

// ---------------------------------------------------------------------------------------
// XDP attach

function xdpOptsAddress(oldProgFd: number | undefined): number {
  // struct bpf_xdp_attach_opts: sz@0 old_prog_fd@8; 16 bytes.
  zeroScratch(SCRATCH_OPTS, 16);
  scratch.view.setBigUint64(0, 16n, true);
  scratch.view.setInt32(8, oldProgFd ?? 0, true);
  return scratch.address + SCRATCH_OPTS;
}

/**
 * Attaches progFd as the XDP program of ifindex. flags: XDP_FLAGS_SKB_MODE / DRV_MODE,
 * XDP_FLAGS_UPDATE_IF_NOEXIST (EBUSY if one is attached), or XDP_FLAGS_REPLACE with
 * oldProgFd (EEXIST if the attached one is not that program).
 */
export function xdpAttach(ifindex: number, progFd: number, flags = 0, oldProgFd?: number): void {
  if ((flags & XDP_FLAGS_REPLACE) !== 0 && oldProgFd === undefined) {
    throw new BpfError('bpf_xdp_attach', Errno.EINVAL, 'XDP_FLAGS_REPLACE needs oldProgFd');
  }
  const r = fn.xdp_attach(ifindex, progFd, flags, xdpOptsAddress(oldProgFd)) as number;
  if (r < 0) fail('bpf_xdp_attach', r, `ifindex ${ifindex}`);
}

/** Detaches the XDP program of ifindex in the mode given by flags (same flags as attach). */
export function xdpDetach(ifindex: number, flags = 0, oldProgFd?: number): void {
  const r = fn.xdp_detach(ifindex, flags, xdpOptsAddress(oldProgFd)) as number;
  if (r < 0) fail('bpf_xdp_detach', r, `ifindex ${ifindex}`);
}

export interface XdpQueryResult {
  /** The attached program's id when exactly one mode is in use, else 0. */
  progId: number;
  drvProgId: number;
  hwProgId: number;
  skbProgId: number;
  /** XDP_ATTACHED_* */
  attachMode: number;
}

export function xdpQuery(ifindex: number, flags = 0): XdpQueryResult {
  // struct bpf_xdp_query_opts: sz@0 prog_id@8 drv@12 hw@16 skb@20 attach_mode(u8)@24; 32 bytes.
  zeroScratch(SCRATCH_OPTS, 32);
  const v = scratch.view;
  v.setBigUint64(0, 32n, true);
  const r = fn.xdp_query(ifindex, flags, scratch.address + SCRATCH_OPTS) as number;
  if (r < 0) fail('bpf_xdp_query', r, `ifindex ${ifindex}`);
  return {
    progId: v.getUint32(8, true), drvProgId: v.getUint32(12, true), hwProgId: v.getUint32(16, true),
    skbProgId: v.getUint32(20, true), attachMode: v.getUint8(24),
  };
}

// ---------------------------------------------------------------------------------------
// Pinning

/** Pins a program or map fd at a path inside a mounted bpffs. */
export function objPin(fd: number, path: string): void {
  const r = fn.obj_pin(fd, path) as number;
  if (r < 0) fail('bpf_obj_pin', r, path);
}

/** Opens a pinned object; the caller owns the returned fd. */
export function objGet(path: string): number {
  const fd = fn.obj_get(path) as number;
  if (fd < 0) fail('bpf_obj_get', fd, path);
  return fd;
}

// ---------------------------------------------------------------------------------------
// Object info

export interface BpfProgInfo {
  type: number;
  id: number;
  /** Kernel tag (hash of the instructions), 16 hex digits as bpftool shows it. */
  tag: string;
  name: string;
  jitedProgLen: number;
  xlatedProgLen: number;
  /** ns since boot (CLOCK_BOOTTIME) at load. */
  loadTime: bigint;
  createdByUid: number;
  mapIds: number[];
  ifindex: number;
  gplCompatible: boolean;
  /** Counted only while stats are enabled (enableRunTimeStats / kernel.bpf_stats_enabled). */
  runTimeNs: bigint;
  runCnt: bigint;
  recursionMisses: bigint;
  verifiedInsns: number;
}

export interface BpfMapInfo {
  type: number;
  id: number;
  keySize: number;
  valueSize: number;
  maxEntries: number;
  flags: number;
  name: string;
}

const PROG_INFO_SIZE = 232;
const MAP_INFO_SIZE = 88;

function cString(bytes: Uint8Array, offset: number, max: number): string {
  let end = offset;
  while (end < offset + max && bytes[end] !== 0) end++;
  return Buffer.from(bytes.buffer, bytes.byteOffset + offset, end - offset).toString('latin1');
}

function getInfo(fd: number, size: number, what: string): void {
  scratch.view.setUint32(SCRATCH_U32, size, true);
  const r = fn.obj_get_info_by_fd(fd, scratch.address + SCRATCH_INFO, scratch.address + SCRATCH_U32) as number;
  if (r < 0) fail('bpf_obj_get_info_by_fd', r, `${what} fd ${fd}`);
}

export function progInfo(fd: number): BpfProgInfo {
  const v = scratch.view;
  const b = scratch.bytes;
  const I = SCRATCH_INFO;
  zeroScratch(I, PROG_INFO_SIZE);
  // Ask for the map ids in the same call: nr_map_ids@52, map_ids@56 (pointer).
  v.setUint32(I + 52, MAX_INFO_MAP_IDS, true);
  v.setBigUint64(I + 56, BigInt(scratch.address + SCRATCH_IDS), true);
  getInfo(fd, PROG_INFO_SIZE, 'prog');
  const nrMaps = v.getUint32(I + 52, true);
  const mapIds: number[] = [];
  for (let i = 0; i < Math.min(nrMaps, MAX_INFO_MAP_IDS); i++) mapIds.push(v.getUint32(SCRATCH_IDS + 4 * i, true));
  return {
    type: v.getUint32(I + 0, true),
    id: v.getUint32(I + 4, true),
    tag: Buffer.from(b.subarray(I + 8, I + 16)).toString('hex'),
    jitedProgLen: v.getUint32(I + 16, true),
    xlatedProgLen: v.getUint32(I + 20, true),
    loadTime: v.getBigUint64(I + 40, true),
    createdByUid: v.getUint32(I + 48, true),
    mapIds,
    name: cString(b, I + 64, 16),
    ifindex: v.getUint32(I + 80, true),
    gplCompatible: (v.getUint32(I + 84, true) & 1) !== 0,
    runTimeNs: v.getBigUint64(I + 192, true),
    runCnt: v.getBigUint64(I + 200, true),
    recursionMisses: v.getBigUint64(I + 208, true),
    verifiedInsns: v.getUint32(I + 216, true),
  };
}

export function mapInfo(fd: number): BpfMapInfo {
  const v = scratch.view;
  const I = SCRATCH_INFO;
  zeroScratch(I, MAP_INFO_SIZE);
  getInfo(fd, MAP_INFO_SIZE, 'map');
  return {
    type: v.getUint32(I + 0, true),
    id: v.getUint32(I + 4, true),
    keySize: v.getUint32(I + 8, true),
    valueSize: v.getUint32(I + 12, true),
    maxEntries: v.getUint32(I + 16, true),
    flags: v.getUint32(I + 20, true),
    name: cString(scratch.bytes, I + 24, 16),
  };
}

/**
 * Turns on run_cnt/run_time_ns accounting for all programs while the returned fd stays
 * open (BPF_ENABLE_STATS); close it with closeBpfFd to turn accounting back off.
 */
export function enableRunTimeStats(): number {
  const fd = fn.enable_stats(0) as number;
  if (fd < 0) fail('bpf_enable_stats', fd);
  return fd;
}

// ---------------------------------------------------------------------------------------
// Kernel-wide ids: for leak checks and adopting objects

function nextId(f: (start: number, out: number) => unknown, op: string, start: number): number | null {
  const r = f(start, scratch.address + SCRATCH_U32) as number;
  if (r === -Errno.ENOENT) return null;
  if (r < 0) fail(op, r);
  return scratch.view.getUint32(SCRATCH_U32, true);
}

/** The next program id after start (0 = first); null when there is none. */
export function progGetNextId(start: number): number | null {
  return nextId(fn.prog_get_next_id, 'bpf_prog_get_next_id', start);
}

export function mapGetNextId(start: number): number | null {
  return nextId(fn.map_get_next_id, 'bpf_map_get_next_id', start);
}

/** Opens a program by id (ENOENT if it is gone); the caller owns the fd. */
export function progGetFdById(id: number): number {
  const fd = fn.prog_get_fd_by_id(id) as number;
  if (fd < 0) fail('bpf_prog_get_fd_by_id', fd, `id ${id}`);
  return fd;
}

export function mapGetFdById(id: number): number {
  const fd = fn.map_get_fd_by_id(id) as number;
  if (fd < 0) fail('bpf_map_get_fd_by_id', fd, `id ${id}`);
  return fd;
}

export function listProgIds(): number[] {
  const ids: number[] = [];
  for (let id = progGetNextId(0); id !== null; id = progGetNextId(id)) ids.push(id);
  return ids;
}

export function listMapIds(): number[] {
  const ids: number[] = [];
  for (let id = mapGetNextId(0); id !== null; id = mapGetNextId(id)) ids.push(id);
  return ids;
}

/**
 * How many programs and maps exist in the whole kernel right now. Other processes load
 * objects too, so leak checks should compare id sets (listProgIds/listMapIds) or counts
 * taken around code that is the only loader.
 */
export function countKernelObjects(): { progs: number; maps: number } {
  return { progs: listProgIds().length, maps: listMapIds().length };
}

/** Closes a program, map or stats fd (plain close(2)). */
export function closeBpfFd(fd: number): void {
  closeFd(fd);
}
