import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

/**
 * Child processes for tests and benches: output kept as lines (bounded), waits on a line
 * pattern with a timeout, stops with SIGTERM (or a chosen signal) then SIGKILL, and is
 * killed when the test process exits for any reason, so a failing test never leaves a
 * busy-polling testpmd or a backend holding a tap behind.
 */

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface SpawnOptions {
  /** Label used in log lines and errors. */
  name?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** 'pipe' when the caller writes commands to stdin; the default gives the child /dev/null. */
  stdin?: 'pipe' | 'ignore';
  /**
   * Echo each output line to stderr as `[name] line`. Default: only when HARNESS_VERBOSE=1,
   * because testpmd prints stats every second and would drown vitest's output.
   */
  echo?: boolean;
  /** Lines kept for waitForLine/tail (oldest dropped first). */
  keepLines?: number;
  /** Open fds of this process handed to the child as its fds 3, 4, ... (e.g. a listening socket). */
  extraFds?: number[];
}

const live = new Set<ManagedProcess>();
let hooksInstalled = false;

function installExitHooks(): void {
  if (hooksInstalled) return;
  hooksInstalled = true;
  process.on('exit', () => killAllManagedSync());
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const handler = (): void => {
      killAllManagedSync();
      // Keep the default "die on this signal" behaviour when nobody else listens: our handler
      // is removed first so re-raising is not caught again.
      process.removeListener(sig, handler);
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.on(sig, handler);
  }
}

/** SIGKILLs every still-running child (and its process group) at once. Used on exit. */
export function killAllManagedSync(): void {
  for (const p of live) p.killNow('SIGKILL');
}

export class ManagedProcess {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  /** Resolves once when the process has exited (never rejects). */
  readonly exited: Promise<ExitStatus>;
  private exitStatus: ExitStatus | null = null;
  private readonly lines: string[] = [];
  private linesDropped = 0;
  private readonly keep: number;
  private readonly listeners = new Set<(line: string, index: number) => void>();
  private readonly echo: boolean;

  constructor(command: string, args: readonly string[], opts: SpawnOptions = {}) {
    this.name = opts.name ?? command.split('/').pop() ?? command;
    this.keep = opts.keepLines ?? 5000;
    this.echo = opts.echo ?? process.env.HARNESS_VERBOSE === '1';
    // A process group of its own, so escalation also reaches anything it forks (trafgen
    // forks one worker per CPU) and a Ctrl-C on the terminal reaches it only through us.
    this.child = spawn(command, args, {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: [opts.stdin ?? 'ignore', 'pipe', 'pipe', ...(opts.extraFds ?? [])],
      detached: true,
    });
    if (this.child.pid === undefined) {
      // spawn reports ENOENT asynchronously; make the failure synchronous and clear (and keep
      // the later 'error' event from becoming an uncaught exception).
      this.child.on('error', () => undefined);
      throw new Error(`spawn ${command} failed (not found or not executable)`);
    }
    this.pid = this.child.pid;
    installExitHooks();
    live.add(this);
    this.exited = new Promise<ExitStatus>((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exitStatus = { code, signal };
        live.delete(this);
        resolve(this.exitStatus);
      });
      this.child.on('error', (err) => this.pushLine(`[process error] ${err.message}`));
    });
    this.attachLineReader(this.child.stdout!);
    this.attachLineReader(this.child.stderr!);
  }

  private attachLineReader(stream: NodeJS.ReadableStream): void {
    let partial = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      partial += chunk;
      let nl: number;
      while ((nl = partial.indexOf('\n')) >= 0) {
        this.pushLine(partial.slice(0, nl).replace(/\r$/, ''));
        partial = partial.slice(nl + 1);
      }
    });
    stream.on('end', () => {
      if (partial.length > 0) this.pushLine(partial);
      partial = '';
    });
  }

  private pushLine(line: string): void {
    this.lines.push(line);
    if (this.lines.length > this.keep) {
      this.lines.shift();
      this.linesDropped++;
    }
    const index = this.linesDropped + this.lines.length - 1;
    if (this.echo) process.stderr.write(`[${this.name}] ${line}\n`);
    for (const l of this.listeners) l(line, index);
  }

  /** Index the next output line will get; pass it to waitForLine to skip older lines. */
  get lineCount(): number {
    return this.linesDropped + this.lines.length;
  }

  get running(): boolean {
    return this.exitStatus === null;
  }

  get exitInfo(): ExitStatus | null {
    return this.exitStatus;
  }

  /** Subscribes to every later output line (stdout and stderr). Returns an unsubscribe. */
  onLine(cb: (line: string, index: number) => void): () => void {
    this.listeners.add(cb);
    return () => this.listeners.delete(cb);
  }

  /** Last n kept lines, for error messages. */
  tail(n = 40): string {
    return this.lines.slice(-n).join('\n');
  }

  /**
   * Resolves with the first line at index ≥ fromLine matching re (kept lines are searched
   * first, so a line printed before the call still counts). Rejects on timeout or when the
   * process exits first; the error carries the output tail.
   */
  waitForLine(re: RegExp, timeoutMs: number, fromLine = 0): Promise<RegExpMatchArray> {
    const start = Math.max(0, fromLine - this.linesDropped);
    for (let i = start; i < this.lines.length; i++) {
      const m = this.lines[i]!.match(re);
      if (m) return Promise.resolve(m);
    }
    return new Promise((resolve, reject) => {
      let done = false;
      const finish = (fn: () => void): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        off();
        fn();
      };
      const off = this.onLine((line) => {
        const m = line.match(re);
        if (m) finish(() => resolve(m));
      });
      const timer = setTimeout(
        () => finish(() => reject(new Error(`${this.name}: no line matching ${re} within ${timeoutMs} ms\n${this.tail()}`))),
        timeoutMs,
      );
      void this.exited.then((st) =>
        // 'exit' can precede the last stdout chunks; let them drain before giving up.
        setTimeout(() =>
          finish(() =>
            reject(new Error(`${this.name}: exited (code ${st.code}, signal ${st.signal}) before a line matching ${re}\n${this.tail()}`)),
          ),
        100),
      );
    });
  }

  /** Writes to stdin (spawned with stdin: 'pipe'). */
  write(text: string): void {
    if (!this.child.stdin) throw new Error(`${this.name}: stdin is not a pipe`);
    this.child.stdin.write(text);
  }

  /** Sends a signal to the whole process group; ignores "already gone". */
  killNow(signal: NodeJS.Signals): void {
    if (!this.running) return;
    try {
      process.kill(-this.pid, signal);
    } catch {
      try {
        process.kill(this.pid, signal);
      } catch {
        /* already exited */
      }
    }
  }

  /**
   * Asks the process to stop with `signal` and waits up to graceMs, then SIGKILLs the group.
   * Always resolves with the exit status.
   */
  async stop(signal: NodeJS.Signals = 'SIGTERM', graceMs = 5000): Promise<ExitStatus> {
    if (!this.running) return this.exitStatus!;
    this.killNow(signal);
    const graceful = await Promise.race([
      this.exited,
      new Promise<null>((r) => setTimeout(() => r(null), graceMs).unref()),
    ]);
    if (graceful) return graceful;
    this.killNow('SIGKILL');
    return this.exited;
  }
}

export function spawnManaged(command: string, args: readonly string[], opts: SpawnOptions = {}): ManagedProcess {
  return new ManagedProcess(command, args, opts);
}

/** Stops several processes concurrently (escalating each); never throws. */
export async function stopAll(procs: Iterable<ManagedProcess | undefined | null>, graceMs = 5000): Promise<void> {
  await Promise.all([...procs].filter((p): p is ManagedProcess => !!p).map((p) => p.stop('SIGTERM', graceMs).catch(() => undefined)));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls cond every intervalMs until it is truthy or timeoutMs passes (then throws with `what`). */
export async function waitUntil<T>(cond: () => T | Promise<T>, timeoutMs: number, what: string, intervalMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/**
 * The object loader children (node …/object-loader/child.js, under prlimit) among the
 * descendants of `root`: whether an OBJ_LOAD is pending, and that none is left after one ends.
 */
export function objectLoadersBelow(root: number): number[] {
  const parent = new Map<number, number>();
  const loaders: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      parent.set(Number(d), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
      if (readFileSync(`/proc/${d}/cmdline`, 'utf8').includes('object-loader/child.js')) loaders.push(Number(d));
    } catch { /* gone meanwhile */ }
  }
  return loaders.filter((pid) => {
    for (let p = parent.get(pid), n = 0; p !== undefined && n < 64; p = parent.get(p), n++) if (p === root) return true;
    return false;
  });
}
