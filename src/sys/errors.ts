import koffi from 'koffi';

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
  ENOBUFS: number; ENOPROTOOPT: number; EMSGSIZE: number; ENETDOWN: number;
};

/** A failed system call: carries errno and the call's name, so callers can branch on `code`. */
export class SysError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly syscall: string;
  constructor(syscall: string, errno: number, detail?: string) {
    const code = errnoName(errno);
    super(`${syscall}${detail ? ` (${detail})` : ''}: ${code}`);
    this.name = 'SysError';
    this.errno = errno;
    this.code = code;
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
