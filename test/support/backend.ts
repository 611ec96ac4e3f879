import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnManaged, type ManagedProcess } from './processes.js';
import { callControl } from '../../src/control/control-client.js';
import { setprivArgs, handOver, type RunAs } from './unprivileged.js';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The repository root, whether this runs from test/ (vitest) or from dist/ (benches). */
export function repoRoot(): string {
  let d = here;
  while (!fs.existsSync(path.join(d, 'package.json'))) {
    const up = path.dirname(d);
    if (up === d) throw new Error(`no package.json above ${here}`);
    d = up;
  }
  return d;
}

/** The built CLI, the way users run it (`npm test` builds first). */
export const CLI = path.join(repoRoot(), 'dist/src/cli/main.js');

/**
 * The node options the CLI's shebang (`#!/usr/bin/env -S node OPTIONS`) gives it: tests run
 * it with them, as `vhost-xdp serve` runs for a user (the heap settings are part of what it costs).
 */
export const CLI_NODE_OPTIONS: string[] = (() => {
  const first = fs.readFileSync(path.join(repoRoot(), 'src/cli/main.ts'), 'utf8').split('\n', 1)[0]!;
  const m = /^#!\/usr\/bin\/env -S node(.*)$/.exec(first);
  return m ? m[1]!.trim().split(/\s+/).filter(Boolean) : [];
})();

export interface Backend {
  proc: ManagedProcess;
  control: string;
  dir: string;
  call(method: string, params?: Record<string, unknown>): Promise<any>;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** A fresh directory under /tmp (`vx-` prefix: test/global-setup.ts removes them after the run). */
export function tempDir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `vx-${tag}-`));
}

/** A private bpffs mounted at DIR/bpffs, for `--pin-dir`; unmountPinDir undoes it. */
export function mountPinDir(dir: string): string {
  const at = path.join(dir, 'bpffs');
  fs.mkdirSync(at, { recursive: true });
  execFileSync('mount', ['-t', 'bpf', 'bpf', at]);
  return at;
}

export function unmountPinDir(at: string): void {
  try { execFileSync('umount', [at]); } catch { /* not mounted */ }
}

export interface StartOptions {
  name?: string;
  dir?: string;
  env?: NodeJS.ProcessEnv;
  readyTimeoutMs?: number;
  /**
   * Run serve as this user with only these capabilities (setpriv: ambient + bounding set), as
   * a host's service manager would. DIR is handed to the user (its sockets are created there).
   */
  runAs?: RunAs;
  /** Open fds handed to serve as its fds 3, 4, ... (`--fd 3`, socket activation). */
  extraFds?: number[];
  /**
   * As systemd socket activation does: LISTEN_FDS = extraFds.length and LISTEN_PID = serve's own
   * pid (a shell exports its $$ and execs serve, so the pid is the one serve gets).
   */
  socketActivation?: boolean;
  /** The whole command line instead of `node CLI serve ARGS --control DIR/ctl.sock`; give `control` with it. */
  argv?: string[];
  /** The control socket the command line names (with argv). */
  control?: string;
  /** With socketActivation: the umask serve starts with (systemd's UMask=). */
  umask?: string;
}

/** Starts `vhost-xdp serve ARGS --control DIR/ctl` and waits for its ready line. */
export async function startBackend(args: string[], opts: StartOptions = {}): Promise<Backend> {
  if (!fs.existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build`);
  const dir = opts.dir ?? tempDir('be');
  const control = opts.control ?? path.join(dir, 'ctl.sock');
  let argv = opts.argv ?? [process.execPath, ...CLI_NODE_OPTIONS, CLI, 'serve', ...args, '--control', control];
  if (opts.runAs) {
    handOver(opts.runAs, dir);
    argv = ['setpriv', ...setprivArgs(opts.runAs, argv)];
  }
  if (opts.socketActivation) {
    argv = ['sh', '-c', `${opts.umask ? `umask ${opts.umask}; ` : ''}export LISTEN_PID=$$ LISTEN_FDS=${opts.extraFds?.length ?? 0}; exec "$@"`, 'sh', ...argv];
  }
  const [cmd, ...rest] = argv;
  const proc = spawnManaged(cmd!, rest, { name: opts.name ?? 'vhost-xdp', env: opts.env, extraFds: opts.extraFds });
  try {
    await proc.waitForLine(/^vhost-xdp ready:/, opts.readyTimeoutMs ?? 15_000);
  } catch (e) {
    await proc.stop('SIGKILL', 1000);
    throw new Error(`backend did not become ready: ${(e as Error).message}\n${proc.tail(30)}`);
  }
  return {
    proc, control, dir,
    call: (method, params = {}) => callControl(control, method, params) as Promise<any>,
    stop: async (signal = 'SIGTERM') => { await proc.stop(signal, 5000); },
  };
}

/** Open fds of a process. */
export function countFds(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/**
 * A process's fd count once it has held still for three reads 100 ms apart: a leak baseline
 * (control connections of status calls close asynchronously).
 */
export async function settledFdCount(pid: number): Promise<number> {
  let n = countFds(pid);
  for (let still = 0; still < 3;) {
    await new Promise((res) => setTimeout(res, 100));
    const m = countFds(pid);
    still = m === n ? still + 1 : 0;
    n = m;
  }
  return n;
}

/** Mappings of a process whose backing file looks like shared guest memory (memfd or hugetlbfs). */
export function countGuestMappings(pid: number): number {
  return fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').filter((l) => /memfd:|\/dev\/hugepages|\/hugepages\//.test(l)).length;
}
