import koffi from 'koffi';
import { VxError } from '../../errors.js';
import { errnoName } from '../errors.js';
import { NativeBuffer } from '../libc.js';

// The one handle to the system libbpf (1.1) that every module of src/sys/bpf/ binds its own
// functions from (bpf/bpf.h, bpf_xdp_* from libbpf.h). Pointers travel as numbers (intptr_t)
// or as Uint8Arrays that koffi passes by address, so no BigInt and no per-call struct
// marshalling. The library is loaded when this module is evaluated, and each worker thread
// evaluates its own copy of every module: that is what makes the bindings (and the scratch
// area below) usable from worker threads without sharing native state between them.
export const libbpf = koffi.load('libbpf.so.1');

/**
 * A failed libbpf call. libbpf returns -errno; `code` is the errno name ('ENOENT') so callers
 * branch on it. `verifierLog` is set for program loads, `processed` for batch operations (the
 * elements the kernel handled before it failed).
 */
export class BpfError extends VxError {
  readonly errno: number;
  readonly op: string;
  readonly verifierLog?: string;
  readonly processed?: number;
  constructor(op: string, errno: number, detail?: string, extra: { verifierLog?: string; processed?: number } = {}) {
    const code = errnoName(errno);
    const log = extra.verifierLog;
    super(code, `${op}${detail ? ` (${detail})` : ''}: ${code}${log ? `\n${log}` : ''}`);
    this.errno = errno;
    this.op = op;
    if (log !== undefined) this.verifierLog = log;
    if (extra.processed !== undefined) this.processed = extra.processed;
  }
}

/** Throws the BpfError for a libbpf return value of -errno. */
export function fail(op: string, ret: number, detail?: string): never {
  throw new BpfError(op, -ret, detail);
}

const OBJ_NAME_RE = /^[A-Za-z0-9_.]{0,15}$/;

/** Map and program names: the kernel rejects anything else with a bare EINVAL; say why instead. */
export function checkObjName(kind: string, name: string): void {
  if (!OBJ_NAME_RE.test(name)) throw new VxError('bad-object-name', `${kind}: name '${name}': at most 15 of [A-Za-z0-9_.]`);
}

// One scratch area per module instance (so per worker thread) for the small out-parameters
// and opts structs of control-path calls. Calls are synchronous, so reuse is safe.
export const scratch = new NativeBuffer(4096);
/** u32 out-parameters. Offsets below 128 hold the opts struct of the call in progress. */
export const SCRATCH_U32 = 128;
/** bpf_prog_info / bpf_map_info (up to 1 KiB). */
export const SCRATCH_INFO = 256;
/** map id arrays (up to 512 ids). */
export const SCRATCH_IDS = 2048;

export function zeroScratch(offset: number, len: number): void {
  scratch.bytes.fill(0, offset, offset + len);
}

/**
 * A zeroed libbpf opts struct of `size` bytes (at most 128) with its leading `size_t sz` set,
 * as every libbpf *_opts struct starts; returns its address for the call.
 */
export function optsStruct(size: number): number {
  zeroScratch(0, size);
  scratch.view.setBigUint64(0, BigInt(size), true);
  return scratch.address;
}
