import { raw, NativeBuffer, closeFd, check, SysError, lastErrno, Errno, SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC, setNonBlocking } from './libc.js';
import { ArgumentError, VxError } from '../errors.js';

const AF_UNIX = 1;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_CTRUNC = 0x8;
const MSG_NOSIGNAL = 0x4000;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SO_TYPE = 3;
const SO_ACCEPTCONN = 30;
const SO_DOMAIN = 39;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

/** An fd handed to us as a listening vhost-user socket is not one (`--fd N`, LISTEN_FDS). */
export class ListenFdError extends VxError {
  constructor(readonly fd: number, message: string) {
    super('bad-listen-fd', message);
  }
}

/** Most fds one message may carry; vhost-user's SET_MEM_TABLE carries at most 8. */
export const MAX_FDS_PER_MESSAGE = 32;

// Scratch layout (one per socket): msghdr @0 (56 B), iovec @64 (16 B),
// control @128 (cmsghdr 16 B + 4 B per fd), data @1024.
const MSGHDR = 0;
const IOV = 64;
const CONTROL = 128;
const CONTROL_LEN = 16 + 4 * MAX_FDS_PER_MESSAGE;
const DATA = 1024;

function sockaddrUn(buf: NativeBuffer, at: number, path: string): number {
  const bytes = Buffer.from(path, 'utf8');
  if (bytes.length >= 108) throw new ArgumentError(`sockaddr_un: path of ${bytes.length} bytes (at most 107): ${path}`);
  buf.bytes.fill(0, at, at + 110);
  buf.view.setUint16(at, AF_UNIX, true);
  buf.bytes.set(bytes, at + 2);
  return 2 + bytes.length + 1;
}

export interface Received {
  /** Bytes read; 0 means the peer closed. -1 means nothing available (EAGAIN). */
  n: number;
  fds: number[];
}

/** A stream unix socket driven through libc, so that fds can ride along (SCM_RIGHTS). */
export class UnixSocket {
  readonly fd: number;
  private readonly scratch: NativeBuffer;
  private closed = false;

  constructor(fd: number) {
    this.fd = fd;
    this.scratch = new NativeBuffer(DATA + 65536);
  }

  static listen(path: string, backlog = 8): UnixSocket {
    const fd = check(raw.socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), 'socket');
    const s = new UnixSocket(fd);
    try {
      const len = sockaddrUn(s.scratch, DATA, path);
      check(raw.bind(fd, s.scratch.address + DATA, len), 'bind', path);
      check(raw.listen(fd, backlog), 'listen', path);
    } catch (e) {
      s.close();
      throw e;
    }
    return s;
  }

  /**
   * Takes over a listening socket this process inherited (QEMU's backend convention `--fd N`,
   * systemd socket activation): it must be a listening AF_UNIX stream socket. It becomes
   * non-blocking (accept runs on the event loop) and close-on-exec (children such as `ip` must
   * not hold it open).
   */
  static adoptListener(fd: number): UnixSocket {
    if (!Number.isInteger(fd) || fd < 0) throw new ListenFdError(fd, `--fd ${fd}: not a file descriptor number`);
    const b = new NativeBuffer(4096);
    try {
      const opt = (name: number, what: string): number => {
        b.view.setUint32(8, 4, true);
        if (raw.getsockopt(fd, SOL_SOCKET, name, b.address, b.address + 8) < 0) {
          const e = lastErrno();
          const why = e === Errno.EBADF ? 'is not open' : e === Errno.ENOTSOCK ? 'is not a socket' : `getsockopt(${what}) failed (errno ${e})`;
          throw new ListenFdError(fd, `fd ${fd} ${why}: expected the listening vhost-user socket`);
        }
        return b.view.getInt32(0, true);
      };
      if (opt(SO_DOMAIN, 'SO_DOMAIN') !== AF_UNIX) throw new ListenFdError(fd, `fd ${fd} is not an AF_UNIX socket`);
      if (opt(SO_TYPE, 'SO_TYPE') !== SOCK_STREAM) throw new ListenFdError(fd, `fd ${fd} is not a stream socket`);
      if (opt(SO_ACCEPTCONN, 'SO_ACCEPTCONN') !== 1) throw new ListenFdError(fd, `fd ${fd} is not listening (listen() was not called on it)`);
    } finally {
      b.free();
    }
    setNonBlocking(fd);
    check(raw.fcntl(fd, F_SETFD, FD_CLOEXEC), 'fcntl(F_SETFD)', `fd ${fd}`);
    return new UnixSocket(fd);
  }

  /**
   * A connected pair (socketpair(2), AF_UNIX stream, close-on-exec, non-blocking): e.g. one end
   * handed to a child process as an inherited fd, which sends fds back over it.
   */
  static pair(): [UnixSocket, UnixSocket] {
    const b = new NativeBuffer(8);
    try {
      check(raw.socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, b.address), 'socketpair');
      return [new UnixSocket(b.view.getInt32(0, true)), new UnixSocket(b.view.getInt32(4, true))];
    } finally {
      b.free();
    }
  }

  /** Connects (blocking), then switches the socket to non-blocking. */
  static connect(path: string): UnixSocket {
    const fd = check(raw.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), 'socket');
    const s = new UnixSocket(fd);
    try {
      const len = sockaddrUn(s.scratch, DATA, path);
      check(raw.connect(fd, s.scratch.address + DATA, len), 'connect', path);
      const flags = raw.fcntl(fd, 3, 0);
      raw.fcntl(fd, 4, flags | 0o4000);
    } catch (e) {
      s.close();
      throw e;
    }
    return s;
  }

  /** Accepts one pending connection; null when none is pending. */
  accept(): UnixSocket | null {
    const fd = raw.accept4(this.fd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      const e = lastErrno();
      if (e === Errno.EAGAIN || e === Errno.EINTR) return null;
      throw new SysError('accept4', e);
    }
    return new UnixSocket(fd);
  }

  /**
   * Reads up to `max` bytes into `into` at `offset`, collecting any fds sent with them.
   * A truncated fd list is a protocol error: the fds that did arrive are closed.
   */
  recv(into: Uint8Array, offset: number, max: number): Received {
    const s = this.scratch;
    const want = Math.min(max, 65536);
    const v = s.view;
    s.bytes.fill(0, 0, CONTROL + CONTROL_LEN);
    v.setBigUint64(IOV, BigInt(s.address + DATA), true);
    v.setBigUint64(IOV + 8, BigInt(want), true);
    v.setBigUint64(MSGHDR + 16, BigInt(s.address + IOV), true); // msg_iov
    v.setBigUint64(MSGHDR + 24, 1n, true); // msg_iovlen
    v.setBigUint64(MSGHDR + 32, BigInt(s.address + CONTROL), true); // msg_control
    v.setBigUint64(MSGHDR + 40, BigInt(CONTROL_LEN), true); // msg_controllen
    const n = raw.recvmsg(this.fd, s.address + MSGHDR, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      const e = lastErrno();
      if (e === Errno.EAGAIN || e === Errno.EINTR) return { n: -1, fds: [] };
      throw new SysError('recvmsg', e);
    }
    const fds = this.parseRights(Number(v.getBigUint64(MSGHDR + 40, true)));
    const flags = v.getInt32(MSGHDR + 48, true);
    if (flags & MSG_CTRUNC) {
      for (const fd of fds) closeFd(fd);
      throw new SysError('recvmsg', Errno.EMSGSIZE!, `more than ${MAX_FDS_PER_MESSAGE} fds in one message`);
    }
    into.set(s.bytes.subarray(DATA, DATA + n), offset);
    return { n, fds };
  }

  private parseRights(controlLen: number): number[] {
    const fds: number[] = [];
    const v = this.scratch.view;
    let off = 0;
    while (off + 16 <= controlLen) {
      const len = Number(v.getBigUint64(CONTROL + off, true));
      const level = v.getInt32(CONTROL + off + 8, true);
      const type = v.getInt32(CONTROL + off + 12, true);
      if (len < 16 || off + len > controlLen) break;
      if (level === SOL_SOCKET && type === SCM_RIGHTS) {
        for (let p = 16; p + 4 <= len; p += 4) fds.push(v.getInt32(CONTROL + off + p, true));
      }
      off += (len + 7) & ~7;
    }
    return fds;
  }

  /** Sends all of `data` with `fds` attached to its first byte; throws on a short write. */
  send(data: Uint8Array, fds: readonly number[] = []): void {
    if (fds.length > MAX_FDS_PER_MESSAGE) throw new ArgumentError(`sendmsg: ${fds.length} fds (at most ${MAX_FDS_PER_MESSAGE})`);
    if (data.length > 65536) throw new ArgumentError(`sendmsg: message of ${data.length} bytes (at most 65536)`);
    const s = this.scratch;
    const v = s.view;
    s.bytes.fill(0, 0, CONTROL + CONTROL_LEN);
    s.bytes.set(data, DATA);
    v.setBigUint64(IOV, BigInt(s.address + DATA), true);
    v.setBigUint64(IOV + 8, BigInt(data.length), true);
    v.setBigUint64(MSGHDR + 16, BigInt(s.address + IOV), true);
    v.setBigUint64(MSGHDR + 24, 1n, true);
    if (fds.length > 0) {
      const clen = 16 + 4 * fds.length;
      v.setBigUint64(CONTROL, BigInt(clen), true);
      v.setInt32(CONTROL + 8, SOL_SOCKET, true);
      v.setInt32(CONTROL + 12, SCM_RIGHTS, true);
      fds.forEach((fd, i) => v.setInt32(CONTROL + 16 + 4 * i, fd, true));
      v.setBigUint64(MSGHDR + 32, BigInt(s.address + CONTROL), true);
      v.setBigUint64(MSGHDR + 40, BigInt((clen + 7) & ~7), true);
    }
    let sent = 0;
    let spins = 0;
    while (sent < data.length) {
      const n = raw.sendmsg(this.fd, s.address + MSGHDR, MSG_NOSIGNAL);
      if (n < 0) {
        const e = lastErrno();
        // Control messages are small; a full socket buffer means a stuck peer. Bounded retry.
        if ((e === Errno.EAGAIN || e === Errno.EINTR) && spins++ < 1000) { raw.sched_yield(); continue; }
        throw new SysError('sendmsg', e);
      }
      sent += n;
      if (sent < data.length) {
        // fds went with the first chunk; the rest is plain data.
        v.setBigUint64(MSGHDR + 32, 0n, true);
        v.setBigUint64(MSGHDR + 40, 0n, true);
        v.setBigUint64(IOV, BigInt(s.address + DATA + sent), true);
        v.setBigUint64(IOV + 8, BigInt(data.length - sent), true);
      }
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    raw.close(this.fd);
    this.scratch.free();
  }

  get isClosed(): boolean { return this.closed; }
}

export function unlinkPath(path: string): void {
  raw.unlink(path);
}
