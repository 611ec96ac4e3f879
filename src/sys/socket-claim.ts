import fs from 'node:fs';
import { VxError } from '../errors.js';
import { raw, lastErrno, Errno, O_RDWR, O_CLOEXEC, closeFd } from './libc.js';
import { UnixSocket } from './unix-socket.js';

const O_CREAT = 0o100;
const LOCK_EX = 2;
const LOCK_NB = 4;

/** The path is served by a live process: starting a second server on it would orphan the first. */
export class SocketInUseError extends VxError {
  constructor(readonly path: string, readonly pid: number | null, message: string) {
    super('socket-in-use', message);
  }
}

/** Ownership of a unix socket path for as long as this process serves it. */
export interface SocketClaim {
  readonly path: string;
  /** Removes the socket file and the lock beside it (call after closing the listener). */
  release(): void;
}

function readPid(lockPath: string): number | null {
  try {
    const pid = Number.parseInt(fs.readFileSync(lockPath, 'utf8').trim(), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/** Takes the advisory lock at lockPath (PATH.lock); the lock file's inode must still be the one at the path. */
function lockBeside(path: string, lockPath: string): number {
  for (let attempt = 0; attempt < 3; attempt++) {
    const fd = raw.open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600);
    if (fd < 0) throw new VxError('socket-lock-failed', `cannot open the lock file ${lockPath} (errno ${lastErrno()})`);
    if (raw.flock(fd, LOCK_EX | LOCK_NB) < 0) {
      const e = lastErrno();
      closeFd(fd);
      if (e !== Errno.EAGAIN) throw new VxError('socket-lock-failed', `cannot lock ${lockPath} (errno ${e})`);
      const pid = readPid(lockPath);
      throw new SocketInUseError(path, pid, `${path} is in use by ${pid ? `pid ${pid}` : 'another process'} (it holds ${lockPath}): stop it first or choose another path`);
    }
    // A releasing owner unlinks the lock file while it still holds the lock: if we locked an
    // inode that is no longer at the path, our lock guards nothing. Open the new file instead.
    let same = false;
    try { same = fs.fstatSync(fd).ino === fs.statSync(lockPath).ino; } catch { same = false; }
    if (same) return fd;
    closeFd(fd);
  }
  throw new VxError('socket-lock-failed', `the lock file ${lockPath} keeps changing under us`);
}

/**
 * Claims a unix socket path before binding it, as DPDK's vhost library refuses to bind over a
 * live socket: an advisory lock beside it names the owning pid, and a connect test catches a
 * live listener that holds no lock (another program, an older vhost-xdp). A socket file with no
 * listener is stale (its owner died) and is replaced; `onStale` is told so.
 */
export function claimSocketPath(path: string, onStale: (line: string) => void = () => {}): SocketClaim {
  const lockPath = `${path}.lock`;
  const fd = lockBeside(path, lockPath);
  try {
    if (fs.existsSync(path)) {
      if (!fs.lstatSync(path).isSocket()) throw new VxError('not-a-socket', `${path} exists and is not a socket; refusing to replace it`);
      let live = false;
      try {
        UnixSocket.connect(path).close();
        live = true;
      } catch {
        live = false; // ECONNREFUSED (no listener) or gone in between: stale
      }
      if (live) throw new SocketInUseError(path, null, `${path} has a live listener that holds no vhost-xdp lock: refusing to take it over`);
      fs.unlinkSync(path);
      onStale(`replaced a stale socket file at ${path} (no process listened on it)`);
    }
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
  } catch (e) {
    closeFd(fd);
    throw e;
  }
  let released = false;
  return {
    path,
    release() {
      if (released) return;
      released = true;
      try { fs.unlinkSync(path); } catch { /* gone already */ }
      // Unlinked while still locked, so a waiting process re-checks the inode (lockBeside).
      try { fs.unlinkSync(lockPath); } catch { /* gone already */ }
      closeFd(fd);
    },
  };
}
