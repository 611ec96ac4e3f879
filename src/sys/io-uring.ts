import koffi from 'koffi';
import { VxError } from '../errors.js';
import { NativeBuffer, SharedMapping, closeFd } from './libc.js';
import { errnoName, Errno } from './errors.js';
import { writeU64 } from './u64.js';

// io_uring through Debian's liburing2 (2.3): only its exported system-call wrappers
// (io_uring_setup, io_uring_enter, io_uring_register) are called. The rings are mapped and
// driven from JS over the kernel's documented layout (struct io_uring_params' offsets), as
// sys/xsk.ts drives AF_XDP rings, rather than through liburing's struct io_uring, whose layout
// is private to one liburing version and whose prep/advance helpers are static inline anyway.
// Nothing here is called per frame: SQEs are stored, CQEs read and the CQ head advanced in JS,
// and one io_uring_enter covers a burst.

/** liburing 2.3's wrappers return -errno (its own syscall stubs; errno is not set). */
interface Lib {
  setup: (entries: number, params: number) => number;
  enter: (fd: number, toSubmit: number, minComplete: number, flags: number, sig: number) => number;
  register: (fd: number, opcode: number, arg: number, nrArgs: number) => number;
}

let lib: Lib | null | undefined;
let libError = '';

function load(): Lib | null {
  if (lib !== undefined) return lib;
  try {
    const l = koffi.load('liburing.so.2');
    lib = {
      setup: l.func('io_uring_setup', 'int', ['uint', 'intptr_t']),
      enter: l.func('io_uring_enter', 'int', ['uint', 'uint', 'uint', 'uint', 'intptr_t']),
      register: l.func('io_uring_register', 'int', ['uint', 'uint', 'intptr_t', 'uint']),
    };
  } catch (e) {
    // liburing.so.2 older than 2.3 lacks the wrappers; no liburing at all: the same answer.
    libError = (e as Error).message;
    lib = null;
  }
  return lib;
}

/** A failed io_uring call; `code` is the errno name (ENOSYS, EPERM...) or 'no-liburing'. */
export class UringError extends VxError {
  constructor(readonly call: string, readonly errno: number, detail = '') {
    const code = errno > 0 ? errnoName(errno) : 'no-liburing';
    super(code, `${call}${detail ? ` (${detail})` : ''}: ${code}`);
  }
}

/** liburing's -errno as a positive errno: -1 is -EPERM (io_uring_disabled, seccomp), not a libc "see errno". */
function errnoOf(ret: number): number {
  return -ret;
}

export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
export const IORING_OP_POLL_ADD = 6;
export const IORING_OP_ASYNC_CANCEL = 14;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;

export const IOSQE_FIXED_FILE = 1 << 0;
export const IOSQE_IO_LINK = 1 << 2;
export const IOSQE_IO_HARDLINK = 1 << 3;
/** poll32_events of a POLL_ADD. */
export const POLLIN = 1;

/** async cancel: every request on the fd (sqe.fd), fixed-file index given. */
export const IORING_ASYNC_CANCEL_ALL = 1 << 0;
export const IORING_ASYNC_CANCEL_FD = 1 << 1;
export const IORING_ASYNC_CANCEL_FD_FIXED = 1 << 3;

const IORING_SETUP_SUBMIT_ALL = 1 << 7;
const IORING_SETUP_COOP_TASKRUN = 1 << 8;
const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
const IORING_FEAT_SINGLE_MMAP = 1 << 0;
const IORING_FEAT_NODROP = 1 << 1;
const IORING_ENTER_GETEVENTS = 1 << 0;
const IORING_OFF_SQ_RING = 0;
const IORING_OFF_CQ_RING = 0x8000000;
const IORING_OFF_SQES = 0x10000000;
const IORING_REGISTER_FILES = 2;
const IORING_UNREGISTER_FILES = 3;
const IORING_REGISTER_EVENTFD = 4;
const IORING_SQ_CQ_OVERFLOW = 1 << 1;

const SQE_SIZE = 64;
const CQE_SIZE = 16;

/**
 * Setup flags, best first. SUBMIT_ALL: a bad SQE must not stop the rest of a burst (5.18);
 * COOP_TASKRUN: completions run when we enter the kernel anyway, no IPI to interrupt the worker
 * (5.19); SINGLE_ISSUER (6.0): this thread alone submits. An older kernel refuses unknown flags
 * with EINVAL: the next set drops them.
 */
const SETUP_TRIES = [IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER,
  IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN, 0];
/**
 * The set the kernel took the first time: it does not change while we run, so later rings skip
 * the refused ones (one or two failed io_uring_setup calls per ring before 6.0). Module state, so
 * one per thread (each worker has its own); undefined until a ring was made.
 */
let acceptedFlags: number | undefined;

/** Where io_uring_setup reports what it can do and how to map the rings. */
export interface UringInfo {
  sqEntries: number;
  cqEntries: number;
  features: number;
  flags: number;
}

/**
 * One io_uring instance (submission and completion rings, no SQPOLL), used by one thread: the
 * one that made it (SINGLE_ISSUER where the kernel knows it). Indexes are the kernel's
 * free-running u32s, kept as int32 like the AF_XDP rings (same bits, no doubles after 2^31).
 */
export class IoUring {
  readonly fd: number;
  readonly info: UringInfo;
  private readonly sqMask: number;
  private readonly cqMask: number;
  private readonly sqHead: Int32Array;
  private readonly sqTail: Int32Array;
  private readonly sqFlags: Uint32Array;
  private readonly cqHead: Int32Array;
  private readonly cqTail: Int32Array;
  /** The SQE array (64 bytes each). */
  private readonly sqes: DataView;
  private readonly sqeBytes: Uint8Array;
  private readonly cqes: DataView;
  /** Two or three: SQ and CQ rings share one where the kernel has IORING_FEAT_SINGLE_MMAP. */
  private readonly maps: SharedMapping[];
  /** Our producer index: SQEs written past the tail the kernel sees, published by submit(). */
  private sqLocalTail: number;
  private cqLocalHead: number;
  private closed = false;
  private filesRegistered = false;

  private constructor(fd: number, info: UringInfo, maps: SharedMapping[],
                      params: DataView, sqRing: SharedMapping, cqRing: SharedMapping, sqesMap: SharedMapping) {
    this.fd = fd;
    this.info = info;
    this.maps = maps;
    const so = 40;
    const co = 80;
    // SAFETY: the mappings are owned by this object and unmapped only by close(); the views
    // below are dropped with it (owners close the ring after their last use).
    const sq = sqRing.buffer;
    const cq = cqRing.buffer;
    this.sqHead = new Int32Array(sq, params.getUint32(so, true), 1);
    this.sqTail = new Int32Array(sq, params.getUint32(so + 4, true), 1);
    this.sqMask = new Uint32Array(sq, params.getUint32(so + 8, true), 1)[0]!;
    this.sqFlags = new Uint32Array(sq, params.getUint32(so + 16, true), 1);
    // The SQ array maps ring slots to SQE indexes: identity, set once here.
    const array = new Uint32Array(sq, params.getUint32(so + 24, true), info.sqEntries);
    for (let i = 0; i < info.sqEntries; i++) array[i] = i;
    this.cqHead = new Int32Array(cq, params.getUint32(co, true), 1);
    this.cqTail = new Int32Array(cq, params.getUint32(co + 4, true), 1);
    this.cqMask = new Uint32Array(cq, params.getUint32(co + 8, true), 1)[0]!;
    this.cqes = new DataView(cq, params.getUint32(co + 20, true), info.cqEntries * CQE_SIZE);
    const sqeAb = sqesMap.buffer;
    this.sqes = new DataView(sqeAb);
    this.sqeBytes = new Uint8Array(sqeAb);
    // Zero once: prep() writes only the fields our requests use (see there).
    this.sqeBytes.fill(0);
    this.sqLocalTail = this.sqTail[0]!;
    this.cqLocalHead = this.cqHead[0]!;
  }

  /**
   * Sets up a ring of `entries` submission slots (the kernel gives twice as many completion
   * slots). Throws UringError: ENOSYS (no io_uring in this kernel, or seccomp's default
   * answer), EPERM (io_uring_disabled = 2, or = 1 and not in io_uring_group; some seccomp
   * filters), ENOMEM, 'no-liburing'; SysError (code: the errno name) when the rings cannot be
   * mapped.
   */
  static create(entries: number): IoUring {
    const l = load();
    if (!l) throw new UringError('dlopen(liburing.so.2)', 0, libError);
    const p = new NativeBuffer(4096);
    try {
      let fd = -1;
      let flags = 0;
      for (const f of acceptedFlags === undefined ? SETUP_TRIES : [acceptedFlags]) {
        p.bytes.fill(0, 0, 120);
        p.view.setUint32(8, f, true);
        const r = l.setup(entries, p.address);
        if (r >= 0) { fd = r; flags = f; break; }
        const e = errnoOf(r);
        if (e !== Errno.EINVAL || f === 0) throw new UringError('io_uring_setup', e, `${entries} entries`);
      }
      acceptedFlags = flags;
      const v = p.view;
      const info: UringInfo = { sqEntries: v.getUint32(0, true), cqEntries: v.getUint32(4, true), features: v.getUint32(20, true), flags };
      const maps: SharedMapping[] = [];
      const map = (length: number, off: number, what: string): SharedMapping => {
        const m = new SharedMapping(fd, length, off, { populate: true, what });
        maps.push(m);
        return m;
      };
      try {
        if ((info.features & IORING_FEAT_NODROP) === 0) throw new UringError('io_uring_setup', Errno.EOPNOTSUPP, 'kernel without IORING_FEAT_NODROP (before 5.5)');
        const sqLen = v.getUint32(40 + 24, true) + info.sqEntries * 4;
        const cqLen = v.getUint32(80 + 20, true) + info.cqEntries * CQE_SIZE;
        let sqRing: SharedMapping;
        let cqRing: SharedMapping;
        if (info.features & IORING_FEAT_SINGLE_MMAP) {
          sqRing = cqRing = map(Math.max(sqLen, cqLen), IORING_OFF_SQ_RING, 'io_uring SQ/CQ rings');
        } else {
          sqRing = map(sqLen, IORING_OFF_SQ_RING, 'io_uring SQ ring');
          cqRing = map(cqLen, IORING_OFF_CQ_RING, 'io_uring CQ ring');
        }
        const sqes = map(info.sqEntries * SQE_SIZE, IORING_OFF_SQES, 'io_uring SQEs');
        return new IoUring(fd, info, maps, v, sqRing, cqRing, sqes);
      } catch (e) {
        for (const m of maps) m.unmap();
        closeFd(fd);
        throw e;
      }
    } finally {
      p.free();
    }
  }

  private register(opcode: number, what: string, values: number[]): void {
    const b = new NativeBuffer(4096);
    try {
      values.forEach((x, i) => b.view.setInt32(i * 4, x, true));
      const r = load()!.register(this.fd, opcode, b.address, values.length);
      if (r < 0) throw new UringError(`io_uring_register(${what})`, errnoOf(r));
    } finally {
      b.free();
    }
  }

  /** Registers fds: SQEs then name them by index with IOSQE_FIXED_FILE (no fd lookup per request). */
  registerFiles(fds: number[]): void {
    this.register(IORING_REGISTER_FILES, 'FILES', fds);
    this.filesRegistered = true;
  }

  /** The kernel signals `efd` whenever it posts a completion: what an epoll loop waits on. */
  registerEventfd(efd: number): void {
    this.register(IORING_REGISTER_EVENTFD, 'EVENTFD', [efd]);
  }

  // ---------------------------------------------------------------------------------------
  // Submission

  /** Free submission slots: the ring's size less what the kernel has not consumed yet (its head, read each call). */
  sqFree(): number {
    return this.info.sqEntries - ((this.sqLocalTail - this.sqHead[0]!) >>> 0);
  }

  /** SQEs written and not yet submitted. */
  get unsubmitted(): number {
    return (this.sqLocalTail - this.sqTail[0]!) >>> 0;
  }

  /**
   * Writes the next SQE (the caller checked sqFree()): one read or write of `len` iovecs (or
   * bytes) at `addr` on `fd` (a registered index with IOSQE_FIXED_FILE in `flags`), tagged
   * with `userData` (below 2^32: kept in one word).
   */
  prep(opcode: number, flags: number, fd: number, addr: number, len: number, userData: number, opFlags = 0): void {
    const o = (this.sqLocalTail & this.sqMask) * SQE_SIZE;
    const v = this.sqes;
    // Only the fields some request of ours sets are written: off (0: a tap is a stream and takes
    // no position), the high word of user_data, buf_index, personality, file_index and addr3 are
    // zero in every SQE we make, the array was zeroed when the ring was made, and the kernel
    // never writes SQEs. Half the stores of a full fill, per frame.
    v.setUint32(o, opcode | (flags << 8), true); // opcode, flags, ioprio = 0
    v.setInt32(o + 4, fd, true);
    writeU64(v, o + 16, addr);
    v.setUint32(o + 24, len, true);
    v.setUint32(o + 28, opFlags, true);
    v.setUint32(o + 32, userData, true);
    this.sqLocalTail = (this.sqLocalTail + 1) | 0;
  }

  /** Clears the link flag of the last SQE written (the end of a chain). */
  endChain(): void {
    const o = (((this.sqLocalTail - 1) | 0) & this.sqMask) * SQE_SIZE;
    this.sqeBytes[o + 1] = this.sqeBytes[o + 1]! & ~(IOSQE_IO_LINK | IOSQE_IO_HARDLINK);
  }

  /**
   * Publishes the written SQEs and enters the kernel once for all of them, waiting for
   * `waitFor` completions (0: none). The SQE stores precede the tail store in program order
   * and x86 keeps stores in order, so the tail store is a release. Returns how many SQEs the
   * kernel took; EINTR/EAGAIN/EBUSY return 0 (the SQEs stay published: the next enter takes them).
   */
  submit(waitFor = 0): number {
    const n = this.unsubmitted;
    this.sqTail[0] = this.sqLocalTail;
    if (n === 0 && waitFor === 0 && (this.sqFlags[0]! & IORING_SQ_CQ_OVERFLOW) === 0) return 0;
    const r = load()!.enter(this.fd, n, waitFor, waitFor > 0 || n === 0 ? IORING_ENTER_GETEVENTS : 0, 0);
    if (r >= 0) return r;
    const e = errnoOf(r);
    if (e === Errno.EINTR || e === Errno.EAGAIN || e === Errno.EBUSY) return 0;
    throw new UringError('io_uring_enter', e);
  }

  // ---------------------------------------------------------------------------------------
  // Completion

  /**
   * Completions ready, up to max, from cqIndex on. Reading the tail before the entries is a
   * load-acquire on x86 (loads are not reordered with older loads).
   */
  cqReady(): number {
    return (this.cqTail[0]! - this.cqLocalHead) >>> 0;
  }

  /** Index (free-running) of the next completion to read. */
  get cqIndex(): number { return this.cqLocalHead; }

  cqeUserData(index: number): number {
    return this.cqes.getUint32((index & this.cqMask) * CQE_SIZE, true);
  }

  cqeRes(index: number): number {
    return this.cqes.getInt32((index & this.cqMask) * CQE_SIZE + 8, true);
  }

  /** Gives n completions back (the CQ head store; our loads of them precede it, TSO). */
  cqAdvance(n: number): void {
    this.cqLocalHead = (this.cqLocalHead + n) | 0;
    this.cqHead[0] = this.cqLocalHead;
  }

  /** Cancels every request on registered file `index` (answers come as CQEs tagged `userData`). */
  prepCancelFixed(index: number, userData: number): void {
    this.prep(IORING_OP_ASYNC_CANCEL, 0, index, 0, 0, userData,
      IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_FD | IORING_ASYNC_CANCEL_FD_FIXED);
  }

  /**
   * Unmaps the rings and closes the fd: the kernel cancels what is still in flight. The
   * registered files are let go first, synchronously: the kernel tears a ring down later, from a
   * work item, and until then its file table holds a reference to the tap, which would outlive
   * the process's last fd (a tap we made then lingers after a clean shutdown).
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.filesRegistered) load()!.register(this.fd, IORING_UNREGISTER_FILES, 0, 0);
    for (const m of this.maps) m.unmap();
    closeFd(this.fd);
  }
}

/**
 * Whether io_uring can be set up here, and why not, by making and closing an 8-entry ring
 * (io_uring_disabled, seccomp, an old kernel or no liburing all show as a refusal here). It
 * caches nothing: TapPort keeps the answer per process.
 */
export function probeIoUring(): { ok: true } | { ok: false; code: string; reason: string } {
  try {
    IoUring.create(8).close();
    return { ok: true };
  } catch (e) {
    const err = e as UringError;
    return { ok: false, code: err.code ?? 'unknown', reason: err.message };
  }
}
