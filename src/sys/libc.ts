import koffi from 'koffi';
import { check, SysError, lastErrno, Errno } from './errors.js';

// Raw libc entry points. Pointers travel as plain numbers (intptr_t): x86_64 user
// addresses fit in 47 bits, so a JS number holds them exactly and no BigInt is made per call.
const lib = koffi.load('libc.so.6');

export const raw = {
  close: lib.func('close', 'int', ['int']),
  read: lib.func('read', 'intptr_t', ['int', 'intptr_t', 'size_t']),
  write: lib.func('write', 'intptr_t', ['int', 'intptr_t', 'size_t']),
  readv: lib.func('readv', 'intptr_t', ['int', 'intptr_t', 'int']),
  writev: lib.func('writev', 'intptr_t', ['int', 'intptr_t', 'int']),
  open: lib.func('open', 'int', ['str', 'int', 'int']),
  unlink: lib.func('unlink', 'int', ['str']),
  fcntl: lib.func('fcntl', 'int', ['int', 'int', 'int']),
  ioctl: lib.func('ioctl', 'int', ['int', 'ulong', 'intptr_t']),
  socket: lib.func('socket', 'int', ['int', 'int', 'int']),
  socketpair: lib.func('socketpair', 'int', ['int', 'int', 'int', 'intptr_t']),
  bind: lib.func('bind', 'int', ['int', 'intptr_t', 'uint32']),
  connect: lib.func('connect', 'int', ['int', 'intptr_t', 'uint32']),
  listen: lib.func('listen', 'int', ['int', 'int']),
  accept4: lib.func('accept4', 'int', ['int', 'intptr_t', 'intptr_t', 'int']),
  shutdown: lib.func('shutdown', 'int', ['int', 'int']),
  recvmsg: lib.func('recvmsg', 'intptr_t', ['int', 'intptr_t', 'int']),
  sendmsg: lib.func('sendmsg', 'intptr_t', ['int', 'intptr_t', 'int']),
  memfd_create: lib.func('memfd_create', 'int', ['str', 'uint']),
  pipe2: lib.func('pipe2', 'int', ['intptr_t', 'int']),
  fstat: lib.func('fstat', 'int', ['int', 'intptr_t']),
  ftruncate: lib.func('ftruncate', 'int', ['int', 'int64']),
  mmap: lib.func('mmap', 'intptr_t', ['intptr_t', 'size_t', 'int', 'int', 'int', 'int64']),
  munmap: lib.func('munmap', 'int', ['intptr_t', 'size_t']),
  eventfd: lib.func('eventfd', 'int', ['uint', 'int']),
  epoll_create1: lib.func('epoll_create1', 'int', ['int']),
  epoll_ctl: lib.func('epoll_ctl', 'int', ['int', 'int', 'int', 'intptr_t']),
  epoll_wait: lib.func('epoll_wait', 'int', ['int', 'intptr_t', 'int', 'int']),
  if_nametoindex: lib.func('if_nametoindex', 'uint', ['str']),
  getpid: lib.func('getpid', 'int', []),
  flock: lib.func('flock', 'int', ['int', 'int']),
  dup: lib.func('dup', 'int', ['int']),
  sched_yield: lib.func('sched_yield', 'int', []),
  gettid: lib.func('gettid', 'int', []),
  sched_getaffinity: lib.func('sched_getaffinity', 'int', ['int', 'size_t', 'intptr_t']),
  sched_setaffinity: lib.func('sched_setaffinity', 'int', ['int', 'size_t', 'intptr_t']),
  getpriority: lib.func('getpriority', 'int', ['int', 'uint']),
  setpriority: lib.func('setpriority', 'int', ['int', 'uint', 'int']),
  sched_getscheduler: lib.func('sched_getscheduler', 'int', ['int']),
  sched_getparam: lib.func('sched_getparam', 'int', ['int', 'intptr_t']),
  sched_setscheduler: lib.func('sched_setscheduler', 'int', ['int', 'int', 'intptr_t']),
  // glibc 2.36 (bookworm) has no sched_setattr/sched_getattr wrappers: the raw syscall, variadic.
  syscall: lib.func('long syscall(long number, ...)'),
  memcpy: lib.func('memcpy', 'intptr_t', ['intptr_t', 'intptr_t', 'size_t']),
  strdup: lib.func('strdup', 'intptr_t', ['str']),
  setsockopt: lib.func('setsockopt', 'int', ['int', 'int', 'int', 'intptr_t', 'uint32']),
  getsockopt: lib.func('getsockopt', 'int', ['int', 'int', 'int', 'intptr_t', 'intptr_t']),
};

export const O_RDWR = 2;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const O_ACCMODE = 3;
export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 1;
export const MAP_PRIVATE = 2;
export const MAP_ANONYMOUS = 0x20;
export const MAP_FAILED = -1;
export const MFD_CLOEXEC = 1;
/** The kernel's limit on iovecs per readv/writev (UIO_MAXIOV). */
export const IOV_MAX = 1024;
export const SOCK_STREAM = 1;
export const SOCK_RAW = 3;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const EPOLLIN = 0x1;
export const EPOLLOUT = 0x4;
export const EPOLLERR = 0x8;
export const EPOLLHUP = 0x10;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLL_CLOEXEC = 0o2000000;

/**
 * Memory outside the JS heap with a fixed address, for structures the kernel reads through
 * pointers (msghdr, iovec arrays, sockaddr). JS Buffers may not stay put; these do.
 */
export class NativeBuffer {
  readonly address: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  readonly size: number;
  private freed = false;

  constructor(size: number) {
    const addr = raw.mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (addr === MAP_FAILED) throw new SysError('mmap', lastErrno(), `anonymous ${size} bytes`);
    this.address = addr;
    this.size = size;
    // SAFETY: a private anonymous mapping of exactly `size` bytes, owned by this object.
    const ab = koffi.view(addr, size);
    this.bytes = new Uint8Array(ab);
    this.view = new DataView(ab);
  }

  free(): void {
    if (this.freed) return;
    this.freed = true;
    raw.munmap(this.address, this.size);
  }
}

export function closeFd(fd: number): void {
  if (fd >= 0) raw.close(fd);
}

const F_DUPFD_CLOEXEC = 1030;

/** A second fd (close-on-exec) for the same open file: the copy a thread can own and close. */
export function dupCloexec(fd: number, what = 'fd'): number {
  return check(raw.fcntl(fd, F_DUPFD_CLOEXEC, 0), 'fcntl(F_DUPFD_CLOEXEC)', what);
}

export function setNonBlocking(fd: number): void {
  const flags = check(raw.fcntl(fd, F_GETFL, 0), 'fcntl(F_GETFL)');
  check(raw.fcntl(fd, F_SETFL, flags | O_NONBLOCK), 'fcntl(F_SETFL)');
}

/** Faults the pages in at mmap time. */
export const MAP_POPULATE = 0x8000;

export interface MappingOptions {
  /**
   * MAP_POPULATE: for rings the kernel and a datapath thread share, so the first frames do not
   * pay page faults (and a mapping that cannot be backed fails here, not mid-burst).
   */
  populate?: boolean;
  /** What is mapped, for the error message ('io_uring SQ ring'). */
  what?: string;
}

/** A MAP_SHARED mapping of an fd; the view lets JS read and write the shared memory in place. */
export class SharedMapping {
  readonly address: number;
  readonly size: number;
  readonly buffer: ArrayBuffer;
  private unmapped = false;

  /** Throws SysError (code: the errno name) when the kernel refuses the mapping. */
  constructor(fd: number, size: number, offset: number, opts: MappingOptions = {}) {
    const addr = raw.mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED | (opts.populate ? MAP_POPULATE : 0), fd, offset);
    if (addr === MAP_FAILED) {
      throw new SysError(opts.what ? `mmap(${opts.what})` : 'mmap', lastErrno(), `fd ${fd} size ${size} offset ${offset}`);
    }
    this.address = addr;
    this.size = size;
    // SAFETY: the mapping covers [addr, addr+size) and lives until unmap(); views made from
    // this buffer must not be used after that (owners drop them first).
    this.buffer = koffi.view(addr, size);
  }

  unmap(): void {
    if (this.unmapped) return;
    this.unmapped = true;
    raw.munmap(this.address, this.size);
  }
}

export type FdKind = 'file' | 'fifo' | 'socket' | 'other';

/** What fstat says about an fd: size, st_blksize (2 MiB on hugetlbfs), kind, and O_ACCMODE. */
export interface FdInfo {
  size: number;
  blockSize: number;
  kind: FdKind;
  /** O_RDONLY, O_WRONLY or O_RDWR. */
  access: number;
}

const statBuf = new NativeBuffer(4096);

export function fdInfo(fd: number): FdInfo {
  check(raw.fstat(fd, statBuf.address), 'fstat', `fd ${fd}`);
  // struct stat on x86_64: st_mode u32 @24, st_size i64 @48, st_blksize i64 @56.
  const mode = statBuf.view.getUint32(24, true) & 0o170000;
  const size = Number(statBuf.view.getBigInt64(48, true));
  const b = Number(statBuf.view.getBigInt64(56, true));
  const kind: FdKind = mode === 0o100000 ? 'file' : mode === 0o010000 ? 'fifo' : mode === 0o140000 ? 'socket' : 'other';
  const access = check(raw.fcntl(fd, F_GETFL, 0), 'fcntl(F_GETFL)') & O_ACCMODE;
  return { size, blockSize: b > 0 && b <= 1 << 30 ? b : 4096, kind, access };
}

/** A pipe: [read end, write end], both close-on-exec. */
export function pipe(flags = 0): [number, number] {
  check(raw.pipe2(statBuf.address + 1024, O_CLOEXEC | flags), 'pipe2');
  return [statBuf.view.getInt32(1024, true), statBuf.view.getInt32(1028, true)];
}

export function memfdCreate(name: string, size: number): number {
  const fd = check(raw.memfd_create(name, MFD_CLOEXEC), 'memfd_create');
  if (raw.ftruncate(fd, size) < 0) {
    const e = lastErrno();
    raw.close(fd);
    throw new SysError('ftruncate', e);
  }
  return fd;
}

// eventfd: kick/call notifications between frontend and backend.
const eventScratch = new NativeBuffer(4096);

export function eventfdCreate(nonblocking = true): number {
  return check(raw.eventfd(0, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0)), 'eventfd');
}

/** Adds 1 to an eventfd counter. */
export function eventfdSignal(fd: number): void {
  eventScratch.view.setBigUint64(0, 1n, true);
  const r = raw.write(fd, eventScratch.address, 8);
  if (r < 0) {
    const e = lastErrno();
    if (e !== Errno.EAGAIN) throw new SysError('write(eventfd)', e);
  }
}

/** Reads and clears an eventfd counter; returns 0 when nothing was pending (non-blocking fd). */
export function eventfdDrain(fd: number): number {
  const r = raw.read(fd, eventScratch.address + 8, 8);
  if (r < 0) {
    const e = lastErrno();
    if (e === Errno.EAGAIN) return 0;
    throw new SysError('read(eventfd)', e);
  }
  return Number(eventScratch.view.getBigUint64(8, true));
}

export function ifNameToIndex(name: string): number {
  const idx = raw.if_nametoindex(name);
  if (idx === 0) throw new SysError('if_nametoindex', lastErrno(), name);
  return idx;
}

/** epoll set; events carry a 32-bit token chosen by the caller. */
export class Epoll {
  readonly fd: number;
  private readonly ev: NativeBuffer;
  private readonly maxEvents: number;

  constructor(maxEvents = 64) {
    this.fd = check(raw.epoll_create1(EPOLL_CLOEXEC), 'epoll_create1');
    this.maxEvents = maxEvents;
    // struct epoll_event is packed on x86_64: u32 events + u64 data = 12 bytes.
    this.ev = new NativeBuffer(Math.max(4096, maxEvents * 12));
  }

  private ctl(op: number, fd: number, events: number, token: number): void {
    this.ev.view.setUint32(0, events, true);
    this.ev.view.setUint32(4, token >>> 0, true);
    this.ev.view.setUint32(8, 0, true);
    check(raw.epoll_ctl(this.fd, op, fd, this.ev.address), 'epoll_ctl', `fd ${fd}`);
  }

  add(fd: number, events: number, token: number): void { this.ctl(EPOLL_CTL_ADD, fd, events, token); }
  modify(fd: number, events: number, token: number): void { this.ctl(EPOLL_CTL_MOD, fd, events, token); }
  remove(fd: number): void {
    raw.epoll_ctl(this.fd, EPOLL_CTL_DEL, fd, this.ev.address);
  }

  /**
   * Waits up to timeoutMs; calls onEvent(token, events) for each ready fd and returns the count.
   * EINTR counts as zero events.
   */
  wait(timeoutMs: number, onEvent: (token: number, events: number) => void): number {
    const n = raw.epoll_wait(this.fd, this.ev.address, this.maxEvents, timeoutMs);
    if (n < 0) {
      const e = lastErrno();
      if (e === Errno.EINTR) return 0;
      throw new SysError('epoll_wait', e);
    }
    const v = this.ev.view;
    for (let i = 0; i < n; i++) onEvent(v.getUint32(i * 12 + 4, true), v.getUint32(i * 12, true));
    return n;
  }

  close(): void {
    raw.close(this.fd);
    this.ev.free();
  }
}

export { SysError, Errno, check, lastErrno };
