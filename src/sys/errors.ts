import koffi from 'koffi';
import { VxError } from '../errors.js';

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(koffi.os.errno)) {
  if (!errnoNames.has(value)) errnoNames.set(value, name);
}

export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `E${errno}`;
}

export const Errno = koffi.os.errno as Readonly<Record<string, number>> & {
  EAGAIN: number; EINTR: number; EBADF: number; ENOENT: number; EEXIST: number; EINVAL: number;
  EPERM: number; EBUSY: number; ENOSPC: number; E2BIG: number; ENOMEM: number; EFAULT: number;
  ECONNREFUSED: number; EPIPE: number; ECONNRESET: number; ENOTCONN: number; ENODEV: number;
  EOPNOTSUPP: number; EACCES: number; ERANGE: number; ENOTSUP: number; ENXIO: number;
  ENOBUFS: number; ENOPROTOOPT: number; EMSGSIZE: number; ENETDOWN: number; ECANCELED: number;
};

// The peer went away: the same call on a fresh connection may well succeed.
const HANG_UP_ERRNOS: ReadonlySet<number> = new Set([
  Errno.EPIPE, Errno.ECONNRESET, Errno.ENOTCONN, Errno.ECONNREFUSED,
]);

/**
 * A failed system call: carries errno and the call's name. `code` is the errno name ('EAGAIN')
 * so callers branch on it; a reconnect helps only when the peer hung up.
 */
export class SysError extends VxError {
  readonly errno: number;
  readonly syscall: string;
  constructor(syscall: string, errno: number, detail?: string) {
    const code = errnoName(errno);
    super(code, `${syscall}${detail ? ` (${detail})` : ''}: ${code}`, { reconnectHelps: HANG_UP_ERRNOS.has(errno) });
    this.errno = errno;
    this.syscall = syscall;
  }
}

/** Throws SysError when a libc call returned a negative value; returns the value otherwise. */
export function check(ret: number, syscall: string, detail?: string): number {
  if (ret < 0) throw new SysError(syscall, koffi.errno(), detail);
  return ret;
}

/** errno of the last libc call made on this thread. */
export function lastErrno(): number {
  return koffi.errno();
}
