import { VxError } from '../../errors.js';
import { NativeBuffer, closeFd } from '../libc.js';
import { libbpf, fail, checkObjName, BpfError, scratch, optsStruct } from './libbpf.js';
import { BPF_INSN_SIZE } from './insns.js';

// Programs: loading raw instructions (with the verifier log on refusal), opening by id, closing.

const fn = {
  prog_load: libbpf.func('bpf_prog_load', 'int', ['int', 'str', 'str', 'void *', 'size_t', 'intptr_t']),
  prog_get_fd_by_id: libbpf.func('bpf_prog_get_fd_by_id', 'int', ['uint32']),
};

export const BpfProgType = { SOCKET_FILTER: 1, KPROBE: 2, SCHED_CLS: 3, SCHED_ACT: 4, TRACEPOINT: 5, XDP: 6 } as const;

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
  /**
   * BTF func info: the BTF fd and one 8-byte record (u32 insn_off, u32 type_id) per subprogram,
   * in instruction order (sys/bpf/btf.ts builds a minimal one).
   */
  funcInfo?: { btfFd: number; records: Uint8Array };
}

const DEFAULT_LOG_SIZE = 64 * 1024;
const MAX_LOG_SIZE = 16 * 1024 * 1024;

function loadOnce(insns: Uint8Array, o: ProgLoadOptions, log: NativeBuffer | null, logLevel: number): number {
  // Func info records at a fixed address for the duration of the call.
  const fi = o.funcInfo ? new NativeBuffer(Math.max(8, o.funcInfo.records.byteLength)) : null;
  try {
    return loadOnceWith(insns, o, log, logLevel, fi);
  } finally {
    fi?.free();
  }
}

function loadOnceWith(insns: Uint8Array, o: ProgLoadOptions, log: NativeBuffer | null, logLevel: number, fi: NativeBuffer | null): number {
  // struct bpf_prog_load_opts (libbpf 1.1): sz@0 attempts@8 expected_attach_type@12
  // prog_btf_fd@16 prog_flags@20 prog_ifindex@24 kern_version@28 attach_btf_id@32
  // attach_prog_fd@36 attach_btf_obj_fd@40 fd_array@48 func_info@56 ... log_level@88
  // log_size@92 log_buf@96; 104 bytes.
  const address = optsStruct(104);
  const v = scratch.view;
  v.setUint32(12, o.expectedAttachType ?? 0, true);
  v.setUint32(20, o.progFlags ?? 0, true);
  if (o.funcInfo) {
    v.setUint32(16, o.funcInfo.btfFd, true);
    fi!.bytes.set(o.funcInfo.records);
    v.setBigUint64(56, BigInt(fi!.address), true);
    v.setUint32(64, o.funcInfo.records.byteLength / 8, true);
    v.setUint32(68, 8, true);
  }
  if (log) {
    log.bytes[0] = 0;
    v.setUint32(88, logLevel, true);
    v.setUint32(92, log.size, true);
    v.setBigUint64(96, BigInt(log.address), true);
  }
  return fn.prog_load(o.type ?? BpfProgType.XDP, o.name ? o.name : null, o.license, insns,
    insns.byteLength / BPF_INSN_SIZE, address) as number;
}

function readLog(log: NativeBuffer): string {
  let end = log.bytes.indexOf(0);
  if (end < 0) end = log.size;
  return Buffer.from(log.bytes.buffer, log.bytes.byteOffset, end).toString('utf8');
}

/** The caller's mistakes, refused with a code before the kernel sees them; returns the log size. */
function checkLoadArgs(insns: Uint8Array, o: ProgLoadOptions): number {
  if (insns.byteLength === 0 || insns.byteLength % BPF_INSN_SIZE !== 0) {
    throw new VxError('bad-insns-length', `bpf_prog_load: instructions are ${insns.byteLength} bytes, not a non-zero multiple of 8`);
  }
  checkObjName('bpf_prog_load', o.name ?? '');
  if (o.license.includes('\0')) throw new VxError('bad-license', 'bpf_prog_load: license contains NUL');
  const size = Math.floor(o.logSize ?? DEFAULT_LOG_SIZE);
  if (!(size >= 256 && size <= MAX_LOG_SIZE)) {
    throw new VxError('bad-log-size', `bpf_prog_load: log size ${o.logSize} outside 256..${MAX_LOG_SIZE}`);
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
      if (fd < 0) throw new BpfError('bpf_prog_load', -fd, opts.name, { verifierLog: text });
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
    throw new BpfError('bpf_prog_load', -fd, opts.name, { verifierLog: readLog(log) });
  } finally {
    log.free();
  }
}

/** Opens a program by id (ENOENT if it is gone); the caller owns the fd. */
export function progGetFdById(id: number): number {
  const fd = fn.prog_get_fd_by_id(id) as number;
  if (fd < 0) fail('bpf_prog_get_fd_by_id', fd, `id ${id}`);
  return fd;
}

/** Closes a program, map or stats fd (plain close(2)). */
export function closeBpfFd(fd: number): void {
  closeFd(fd);
}
