// The parent side of object intake (docs/offload-protocol.md §8): runs libbpf over a guest's
// ELF object in a child process (child.ts), one per OBJ_LOAD, under a timeout and resource
// limits, and takes back the maps and programs it made: their fds over a unix socket
// (SCM_RIGHTS), their description as JSON on the child's stdout. A child that crashes, hangs,
// runs out of memory or reports nonsense is a refusal; the kernel objects it made die with it.
// Everything the child says is checked against what the kernel says about the fds.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { VxError } from '../../errors.js';
import { UnixSocket } from '../../sys/unix-socket.js';
import { closeBpfFd, BpfProgType } from '../../sys/bpf/programs.js';
import { mapInfo, progInfo } from '../../sys/bpf/info.js';
import type { ChildReport, ChildMapReport } from './report.js';

export interface LoaderOptions {
  /** Wall-clock limit for the child (SIGKILL after). */
  timeoutMs?: number;
  /** Verifier log bytes per program the child asks libbpf for. */
  logBytes?: number;
  /** RLIMIT_AS of the child. */
  addressSpaceBytes?: number;
  /** RLIMIT_CPU of the child, seconds. */
  cpuSeconds?: number;
}

export const DEFAULT_LOADER_OPTIONS: Required<LoaderOptions> = {
  timeoutMs: 10_000, logBytes: 64 * 1024, addressSpaceBytes: 2 * 1024 ** 3, cpuSeconds: 10,
};

export type LoaderErrorCode =
  | 'object-loader-crashed' | 'object-loader-timeout' | 'object-loader-report' | 'object-loader-aborted'
  | 'object-open-failed' | 'object-program-type' | 'object-load-failed';

/** A load that did not produce an object; `log` is the failing program's verifier log, when there is one. */
export class ObjectLoaderError extends VxError {
  constructor(code: LoaderErrorCode, message: string, readonly errno = 0, readonly program: string | null = null, readonly log: string | null = null) {
    super(code, message);
  }
}

export interface LoadedMap extends ChildMapReport { fd: number; id: number }
export interface LoadedProgramFd { name: string; section: string; insns: Uint8Array; fd: number; id: number; tag: string }
export interface LoadedObjectFds { maps: LoadedMap[]; programs: LoadedProgramFd[] }

/** dist/src/offload/object-loader/child.js, also when this module runs from its TypeScript source (tests). */
function childScript(): string {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.ts')) return here.replace(/\/src\/offload\/object-loader\/loader\.ts$/, '/dist/src/offload/object-loader/child.js');
  return join(dirname(here), 'child.js');
}

const MAX_REPORT_BYTES = 32 * 1024 * 1024;
const MAX_FDS = 4096;

function drainFds(sock: UnixSocket): number[] {
  const fds: number[] = [];
  const buf = new Uint8Array(4096);
  for (;;) {
    const r = sock.recv(buf, 0, buf.byteLength);
    if (r.n <= 0) { fds.push(...r.fds); break; }
    fds.push(...r.fds);
    if (fds.length > MAX_FDS) break;
  }
  return fds;
}

function isInt(x: unknown, lo = 0, hi = 0xffffffff): x is number {
  return typeof x === 'number' && Number.isInteger(x) && x >= lo && x <= hi;
}
function isStr(x: unknown, max: number): x is string {
  return typeof x === 'string' && x.length <= max;
}

/** Syntax of the child's report; the fds are judged against it afterwards. */
function decodeReport(text: string): ChildReport {
  let r: unknown;
  try { r = JSON.parse(text); } catch { throw new ObjectLoaderError('object-loader-report', 'the object loader wrote no report'); }
  const bad = (what: string): never => { throw new ObjectLoaderError('object-loader-report', `the object loader's report is malformed (${what})`); };
  if (typeof r !== 'object' || r === null) bad('not an object');
  const o = r as Record<string, unknown>;
  if (o.ok === false) {
    if (!['input', 'open', 'program-type', 'load'].includes(o.stage as string) || !isInt(o.errno, 0, 4095) || !isStr(o.reason, 4096)) bad('failure fields');
    if (o.program !== undefined && !isStr(o.program, 256)) bad('program');
    if (o.log !== undefined && !isStr(o.log, 1 << 24)) bad('log');
    return o as ChildReport;
  }
  if (o.ok !== true || !Array.isArray(o.maps) || !Array.isArray(o.programs) || o.maps.length > MAX_FDS || o.programs.length > MAX_FDS) bad('ok fields');
  for (const m of o.maps as unknown[]) {
    const x = m as Record<string, unknown>;
    if (!isStr(x.name, 256) || !isInt(x.type) || !isInt(x.keySize) || !isInt(x.valueSize) || !isInt(x.maxEntries) || !isInt(x.flags)
      || typeof x.internal !== 'boolean' || !isInt(x.childFd, 0, 1 << 20)) bad('map');
  }
  for (const p of o.programs as unknown[]) {
    const x = p as Record<string, unknown>;
    if (!isStr(x.name, 256) || !isStr(x.section, 256) || !isStr(x.insns, MAX_REPORT_BYTES)) bad('program');
  }
  return o as ChildReport;
}

/** prlimit's arguments around the child, and the child's environment (only PATH, and the tests' delay). */
function childCommand(o: Required<LoaderOptions>, name: string): { args: string[]; env: NodeJS.ProcessEnv } {
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? '/usr/bin:/bin' };
  // Tests make the loader slow deterministically; the child honours it, nothing else reads it.
  if (process.env.VX_OBJECT_LOADER_DELAY_MS) env.VX_OBJECT_LOADER_DELAY_MS = process.env.VX_OBJECT_LOADER_DELAY_MS;
  return {
    args: [
      `--as=${o.addressSpaceBytes}`, `--cpu=${o.cpuSeconds}`, '--core=0', '--nofile=256', '--fsize=0', '--nproc=4096',
      '--', process.execPath, '--max-old-space-size=256', childScript(), name, String(o.logBytes),
    ],
    env,
  };
}

/** How the child ended, whichever way it was run. */
interface ChildOutcome { timedOut: boolean; error: Error | null; status: number | null; signal: NodeJS.Signals | null; stdout: Buffer }

/**
 * The one judgement of a child's run: its exit, its report, the fds it sent against the
 * report and the kernel. `fds` are closed on any refusal; on success they are the caller's.
 */
function judgeChild(r: ChildOutcome, fds: number[], o: Required<LoaderOptions>): LoadedObjectFds {
  let owned = fds;
  try {
    if (r.timedOut) throw new ObjectLoaderError('object-loader-timeout', `the object loader did not finish within ${o.timeoutMs} ms`);
    if (r.error) throw new ObjectLoaderError('object-loader-crashed', `the object loader failed: ${r.error.message}`);
    if (r.status !== 0) {
      throw new ObjectLoaderError('object-loader-crashed',
        `the object loader ended with ${r.signal ? `signal ${r.signal}` : `status ${r.status}`} (libbpf could not handle this object)`);
    }
    const rep = decodeReport(r.stdout.toString('utf8'));
    if (!rep.ok) {
      const code = rep.stage === 'load' ? 'object-load-failed' : rep.stage === 'program-type' ? 'object-program-type' : 'object-open-failed';
      throw new ObjectLoaderError(code, rep.reason, rep.errno, rep.program ?? null, rep.log ?? null);
    }
    if (fds.length !== rep.maps.length + rep.programs.length) {
      throw new ObjectLoaderError('object-loader-report', `the object loader sent ${fds.length} fds for ${rep.maps.length} maps and ${rep.programs.length} programs`);
    }
    const maps: LoadedMap[] = rep.maps.map((m, i) => {
      const fd = fds[i]!;
      const info = mapInfo(fd);
      if (info.type !== m.type || info.keySize !== m.keySize || info.valueSize !== m.valueSize || info.maxEntries !== m.maxEntries) {
        throw new ObjectLoaderError('object-loader-report', `map '${m.name}': the report does not match the kernel's map`);
      }
      return { ...m, name: info.name, flags: info.flags, fd, id: info.id };
    });
    const programs: LoadedProgramFd[] = rep.programs.map((p, i) => {
      const fd = fds[rep.maps.length + i]!;
      const info = progInfo(fd);
      if (info.type !== BpfProgType.XDP) throw new ObjectLoaderError('object-loader-report', `program '${p.name}' is not an XDP program`);
      const insns = new Uint8Array(Buffer.from(p.insns, 'base64'));
      if (insns.byteLength === 0 || insns.byteLength % 8 !== 0) throw new ObjectLoaderError('object-loader-report', `program '${p.name}': no instructions`);
      return { name: p.name, section: p.section, insns, fd, id: info.id, tag: info.tag };
    });
    owned = [];
    return { maps, programs };
  } finally {
    for (const fd of owned) closeBpfFd(fd);
  }
}

/**
 * Loads `object` through libbpf in a child process. Returns the maps and programs it made, now
 * owned by this process (the caller closes the fds), with the programs' final instructions (map
 * references still hold the child's fd numbers: LoadedMap.childFd). Throws ObjectLoaderError.
 * Blocks the thread until the child ends (tests, migration import); the serving path uses
 * loadObjectInChildAsync.
 */
export function loadObjectInChild(object: Uint8Array, name: string, options: LoaderOptions = {}): LoadedObjectFds {
  const o = { ...DEFAULT_LOADER_OPTIONS, ...options };
  const cmd = childCommand(o, name);
  const [mine, theirs] = UnixSocket.pair();
  try {
    const r = spawnSync('prlimit', cmd.args, {
      input: object, stdio: ['pipe', 'pipe', 'pipe', theirs.fd], timeout: o.timeoutMs, killSignal: 'SIGKILL',
      maxBuffer: MAX_REPORT_BYTES, env: cmd.env, windowsHide: true,
    });
    theirs.close();
    // Whatever it sent before it ended is ours to close, whatever happens next.
    const fds = drainFds(mine);
    const err = (r.error as NodeJS.ErrnoException | undefined) ?? null;
    const timedOut = err?.code === 'ETIMEDOUT' || (r.signal === 'SIGKILL' && err !== null);
    return judgeChild({ timedOut, error: err, status: r.status, signal: r.signal, stdout: r.stdout ?? Buffer.alloc(0) }, fds, o);
  } finally {
    theirs.close();
    mine.close();
  }
}

/**
 * loadObjectInChild without blocking the thread: the same child, limits, fd passing and
 * judgement, run with spawn; the promise settles when the child has ended (killed with SIGKILL
 * after the timeout, or when `signal` aborts: whoever asked no longer wants the result).
 * Rejects with ObjectLoaderError ('object-loader-aborted' after an abort, whatever the child made closed).
 */
export function loadObjectInChildAsync(object: Uint8Array, name: string, options: LoaderOptions = {}, signal?: AbortSignal): Promise<LoadedObjectFds> {
  const o = { ...DEFAULT_LOADER_OPTIONS, ...options };
  const aborted = () => new ObjectLoaderError('object-loader-aborted', 'the object load was abandoned (the device was reset or closed)');
  if (signal?.aborted) return Promise.reject(aborted());
  const cmd = childCommand(o, name);
  const [mine, theirs] = UnixSocket.pair();
  return new Promise<LoadedObjectFds>((resolve, reject) => {
    let child: ChildProcess;
    try {
      child = spawn('prlimit', cmd.args, { stdio: ['pipe', 'pipe', 'ignore', theirs.fd], env: cmd.env, windowsHide: true });
    } catch (e) {
      theirs.close();
      mine.close();
      reject(new ObjectLoaderError('object-loader-crashed', `the object loader failed: ${(e as Error).message}`));
      return;
    }
    // The child has its copy; ours would keep the socket open after it ends.
    theirs.close();
    let timedOut = false;
    let error: Error | null = null;
    const chunks: Buffer[] = [];
    let outBytes = 0;
    const kill = () => { try { child.kill('SIGKILL'); } catch { /* already gone */ } };
    const timer = setTimeout(() => { timedOut = true; kill(); }, o.timeoutMs);
    signal?.addEventListener('abort', kill, { once: true });
    child.stdout!.on('data', (b: Buffer) => {
      outBytes += b.byteLength;
      if (outBytes > MAX_REPORT_BYTES) {
        if (!error) error = new Error(`stdout over ${MAX_REPORT_BYTES} bytes`);
        kill();
        return;
      }
      chunks.push(b);
    });
    child.stdin!.on('error', () => { /* a child that ends without reading its input: judged by its exit */ });
    child.on('error', (e) => { if (!error) error = e; });
    child.on('close', (status, exitSignal) => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', kill);
      try {
        const fds = drainFds(mine);
        if (signal?.aborted) {
          // Whatever it made in the kernel dies with these fds.
          for (const fd of fds) closeBpfFd(fd);
          throw aborted();
        }
        resolve(judgeChild({ timedOut, error, status, signal: exitSignal, stdout: Buffer.concat(chunks) }, fds, o));
      } catch (e) {
        reject(e);
      } finally {
        mine.close();
      }
    });
    child.stdin!.end(Buffer.from(object.buffer, object.byteOffset, object.byteLength));
  });
}
