import { existsSync } from 'node:fs';
import path from 'node:path';
import { spawnManaged, type ManagedProcess } from '../processes.js';
import { repoRoot } from '../backend.js';

/**
 * A QEMU guest (vm-images/out) driven over its serial console.
 *
 * boot() starts QEMU through qemu-scripts/launch-guest.sh, the launcher users run, so its
 * command line is tested too; the launcher execs QEMU, so `pid` is QEMU's. attach() drives a
 * machine started by someone else (a libvirt domain) through any GuestConsole. Tests always
 * use TCG (KVM guests hang on these hosts).
 *
 * The console is busybox ash on ttyS0 with line editing: it echoes what we type, may wrap
 * long lines with redraw sequences, and asks the terminal for the cursor position (ESC[6n).
 * run() therefore never parses the echo: it brackets the command with markers that the
 * echo cannot contain (`__VX''B7__` is echoed, `__VXB7__` is printed) and reads `$?` from
 * the closing one.
 */

export const READY_MARKER = 'VHOST-XDP-GUEST-READY';
/** PS1 set by vm-images/init. */
const PROMPT = 'vxguest# ';

export const LAUNCHER = path.join(repoRoot(), 'qemu-scripts/launch-guest.sh');
export const IMAGES = path.join(repoRoot(), 'vm-images/out');

export interface GuestVmOptions {
  /** For logs and QEMU's process name. */
  name?: string;
  /** Guest RAM in MiB (a shared memfd). Default 512. */
  memMiB?: number;
  /** vCPUs. Default 1. */
  smp?: number;
  net?:
    | { kind: 'vhost-user'; socket: string; queues?: number; mac?: string; mtu?: number; reconnectMs?: number }
    | { kind: 'tap'; ifname: string; queues?: number; mac?: string; mtu?: number }
    | { kind: 'none' };
  /** Extra kernel command line, e.g. 'vxdp.nonet=1'. */
  append?: string;
  /** From spawn to the shell's ready marker. Default 90 000. */
  bootTimeoutMs?: number;
  /** Receives each console line (escape sequences removed). Default: stderr when HARNESS_VERBOSE=1. */
  log?: (line: string) => void;
  /** Extra QEMU arguments (after the launcher's `--`), e.g. a QMP socket. */
  qemuArgs?: string[];
}

/**
 * What a GuestVm drives: the guest's serial console and the machine behind it. QEMU started
 * by the launcher is one (console on its stdio); a libvirt domain whose serial port is a unix
 * socket is another.
 */
export interface GuestConsole {
  /** Subscribes to console output. */
  onData(cb: (chunk: string) => void): void;
  /** Types raw text on the console. */
  write(raw: string): void;
  readonly running: boolean;
  /** Resolves once the machine has ended (never rejects). */
  readonly exited: Promise<unknown>;
  /** How the machine ended, for error messages (null while running). */
  readonly exitInfo: unknown;
  /** Ends the machine for good (after `poweroff -f` had its chance); never throws. */
  kill(): Promise<void>;
  /** The last lines of the machine manager's own output (QEMU's stderr, libvirt's log). */
  tail(lines: number): string;
}

/** A QEMU process whose serial console is its stdio (the launcher's -chardev stdio). */
export function processConsole(proc: ManagedProcess): GuestConsole {
  return {
    onData: (cb) => proc.child.stdout!.on('data', (chunk: string | Buffer) => cb(chunk.toString())),
    write: (raw) => proc.child.stdin!.write(raw),
    get running() {
      return proc.running;
    },
    exited: proc.exited,
    get exitInfo() {
      return proc.exitInfo;
    },
    kill: async () => {
      await proc.stop('SIGTERM', 2000);
    },
    tail: (lines) => proc.tail(lines),
  };
}

export interface RunResult {
  output: string;
  status: number;
}

// Ash's line editor reads at most 1024 bytes per line (the command is sent twice, see runNow); longer or multi-line commands, and
// ones with control characters (a tab would trigger completion), go through a file.
const MAX_INLINE = 400;
const B64_CHUNK = 600;

/** Quotes s for a POSIX shell. */
export function shQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Runs cmd in the guest and returns its output; a non-zero status fails with the output. */
export async function guestSh(vm: GuestVm, cmd: string, timeoutMs = 30_000): Promise<string> {
  const r = await vm.run(cmd, timeoutMs);
  if (r.status !== 0) throw new Error(`guest command failed (status ${r.status}): ${cmd}\n${r.output}`);
  return r.output;
}

let nextVmId = 0;

export class GuestVm {
  readonly name: string;
  /** Milliseconds from starting the machine to the guest shell's ready marker. */
  bootMs = 0;
  private qemuPid = 0;
  private readonly con: GuestConsole;
  private transcript = '';
  private pendingRaw = '';
  private lineBuf = '';
  private readonly watchers = new Set<() => void>();
  private queue: Promise<unknown> = Promise.resolve();
  private seq = 0;
  private shutdownPromise: Promise<void> | null = null;
  private readonly log: ((line: string) => void) | undefined;

  private constructor(con: GuestConsole, name: string, log: ((line: string) => void) | undefined) {
    this.con = con;
    this.name = name;
    this.log = log;
    con.onData((chunk) => this.onData(chunk));
  }

  /** Starts QEMU and resolves once the guest shell is ready (kernel console quieted). */
  static async boot(opts: GuestVmOptions = {}): Promise<GuestVm> {
    const t0 = Date.now();
    return GuestVm.spawn(opts).ready(opts, t0);
  }

  /**
   * Drives a machine started elsewhere (e.g. by libvirt) over `con`, attached before the guest
   * can print its ready marker: resolves once the shell is ready, as boot() does. `since` is
   * when the machine was started (for bootMs). On failure the machine is killed.
   */
  static async attach(con: GuestConsole, opts: Pick<GuestVmOptions, 'name' | 'bootTimeoutMs' | 'log'> = {}, since = Date.now()): Promise<GuestVm> {
    const name = opts.name ?? `guest${nextVmId++}`;
    return new GuestVm(con, name, GuestVm.logger(name, opts.log)).ready(opts, since);
  }

  /**
   * Starts QEMU waiting for an incoming migration at `uri` (`-incoming`, e.g. unix:PATH): no
   * boot, the guest's console comes with its state. Resolves at once; run() works once the
   * migration has completed and the guest runs here.
   */
  static incoming(opts: GuestVmOptions, uri: string): GuestVm {
    return GuestVm.spawn({ ...opts, qemuArgs: [...(opts.qemuArgs ?? []), '-incoming', uri] });
  }

  private static logger(name: string, log: ((line: string) => void) | undefined): ((line: string) => void) | undefined {
    return log ?? (process.env.HARNESS_VERBOSE === '1' ? (l: string) => process.stderr.write(`[${name}] ${l}\n`) : undefined);
  }

  private static spawn(opts: GuestVmOptions): GuestVm {
    for (const f of ['vmlinuz', 'initrd.img']) {
      if (!existsSync(path.join(IMAGES, f))) throw new Error(`${IMAGES}/${f} is missing: run vm-images/build.sh`);
    }
    const name = opts.name ?? `guest${nextVmId++}`;
    const args = launcherArgs(opts, name);
    // setpriv --pdeathsig: QEMU dies with the test process even when that is SIGKILLed and no
    // exit hook runs. It execs the launcher, which execs QEMU: one pid throughout.
    const wrap = existsSync('/usr/bin/setpriv') ? ['/usr/bin/setpriv', '--pdeathsig', 'KILL', LAUNCHER] : [LAUNCHER];
    const proc = spawnManaged(wrap[0]!, [...wrap.slice(1), ...args], { name, stdin: 'pipe', echo: false });
    const vm = new GuestVm(processConsole(proc), name, GuestVm.logger(name, opts.log));
    vm.qemuPid = proc.pid;
    return vm;
  }

  /** Waits for the guest shell's ready marker, then quiets the kernel console. */
  private async ready(opts: Pick<GuestVmOptions, 'bootTimeoutMs'>, since: number): Promise<GuestVm> {
    try {
      await this.waitFor(new RegExp(READY_MARKER), opts.bootTimeoutMs ?? 90_000, 0);
      this.bootMs = Date.now() - since;
      // Kernel messages would land in the middle of command output.
      await this.run('dmesg -n 1', 30_000);
    } catch (e) {
      await this.shutdown();
      throw new Error(`${this.name}: boot failed: ${(e as Error).message}\nmachine output tail:\n${this.con.tail(20)}`);
    }
    return this;
  }

  /** QEMU's pid when boot() or incoming() started it (0 for an attached machine). */
  get pid(): number {
    return this.qemuPid;
  }

  get running(): boolean {
    return this.con.running;
  }

  /** Everything the console printed so far, without \r and terminal escape sequences. */
  get console(): string {
    return this.transcript;
  }

  /** Resolves when QEMU has exited. */
  get exited(): Promise<unknown> {
    return this.con.exited;
  }

  /** Types raw text on the console (no newline added). */
  write(raw: string): void {
    if (!this.con.running) throw new Error(`${this.name}: QEMU is not running`);
    this.con.write(raw);
  }

  /**
   * Resolves with the first match of re in the console text from offset `from` (default:
   * what arrives after this call). Rejects on timeout or when QEMU exits first.
   */
  waitFor(re: RegExp, timeoutMs: number, from = this.transcript.length): Promise<RegExpMatchArray> {
    const rx = new RegExp(re.source, re.flags.replace(/[gy]/g, ''));
    return this.waitUntil((text) => text.match(rx), `${re}`, timeoutMs, from);
  }

  /** Resolves with the first non-null test(console text from `from`); index is made absolute. */
  private waitUntil(
    test: (text: string) => RegExpMatchArray | null,
    what: string,
    timeoutMs: number,
    from: number,
  ): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const check = (): void => {
        const m = test(this.transcript.slice(from));
        if (m) {
          m.index = (m.index ?? 0) + from;
          done();
          resolve(m);
        } else if (!this.con.running) {
          done();
          reject(new Error(`${this.name}: QEMU exited (${JSON.stringify(this.con.exitInfo)}) before ${what}\n${this.tail()}`));
        }
      };
      const done = (): void => {
        clearTimeout(timer);
        this.watchers.delete(check);
      };
      timer = setTimeout(() => {
        done();
        reject(new Error(`${this.name}: no ${what} on the console within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      this.watchers.add(check);
      // 'exit' can precede the last stdout chunk: re-check once the output has drained.
      void this.con.exited.then(() => setTimeout(check, 100));
      check();
    });
  }

  /**
   * Runs cmd in the guest shell (the same shell every time: `cd` and variables persist) and
   * returns its output (\r removed, without the final newline) and exit status. Calls are
   * serialized. On timeout the command is interrupted with Ctrl-C and the call rejects.
   */
  run(cmd: string, timeoutMs = 30_000): Promise<RunResult> {
    const p = this.queue.then(() => this.runNow(cmd, timeoutMs));
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async runNow(cmd: string, timeoutMs: number): Promise<RunResult> {
    const id = ++this.seq;
    const deadline = Date.now() + timeoutMs;
    const remaining = (): number => Math.max(1, deadline - Date.now());
    let body: string;
    // eslint-disable-next-line no-control-regex
    if (cmd.length <= MAX_INLINE && !/[\x00-\x1f\x7f-\uffff]/.test(cmd)) {
      // A syntax error inside eval would abort the whole line, end marker included, so the
      // command is parsed first by a throwaway shell (-n: parse only).
      body = `sh -n -c ${shQuote(cmd)} && eval ${shQuote(cmd)}`;
    } else {
      const b64 = Buffer.from(cmd, 'utf8').toString('base64');
      const file = `/tmp/.vxrun${id}`;
      for (let i = 0, n = 0; i < b64.length; i += B64_CHUNK, n++) {
        const from = this.transcript.length;
        this.write(`echo -n ${b64.slice(i, i + B64_CHUNK)} >>${file}.b64; echo __VX''C${id}_${n}__\n`);
        await this.waitFor(new RegExp(`__VXC${id}_${n}__`), remaining(), from);
      }
      body = `base64 -d ${file}.b64 >${file}; rm -f ${file}.b64; sh -n ${file} && . ${file}`;
    }
    const from = this.transcript.length;
    this.write(`echo __VX''B${id}__; ${body}; echo __VX''E${id}_$?__\n`);
    let end: RegExpMatchArray;
    try {
      // Either our end marker, or (after the begin marker) a bare prompt at the very end of
      // the console: ash abandons the rest of the line on a runtime syntax error (in an
      // eval or `.` inside cmd), so the end marker never comes.
      const endRx = new RegExp(`__VXE${id}_(\\d+)__`);
      const abortRx = new RegExp(`__VXB${id}__\\n(?:[\\s\\S]*\\n)?${PROMPT}$`);
      end = await this.waitUntil((t) => t.match(endRx) ?? t.match(abortRx), `end of command ${id}`, remaining(), from);
    } catch (e) {
      if (this.con.running) this.write('\x03');
      throw new Error(`${this.name}: command timed out or failed: ${cmd}\n${(e as Error).message}`);
    }
    const begin = this.transcript.indexOf(`__VXB${id}__\n`, from);
    const start = begin < 0 ? from : begin + `__VXB${id}__\n`.length;
    if (end[1] === undefined) {
      const aborted = this.transcript.slice(start, this.transcript.length - PROMPT.length).replace(/\n$/, '');
      return { output: aborted, status: 2 };
    }
    const output = this.transcript.slice(start, end.index).replace(/\n$/, '');
    return { output, status: Number(end[1]) };
  }

  /**
   * Reboots the guest (`reboot -f`, no clean shutdown: there is nothing to sync) and waits
   * for the new shell, as boot() does. Resolves with the milliseconds it took.
   */
  async reboot(timeoutMs = 90_000): Promise<number> {
    const t0 = Date.now();
    await this.queue;
    const from = this.transcript.length;
    this.write('reboot -f\n');
    await this.waitFor(new RegExp(READY_MARKER), timeoutMs, from);
    await this.run('dmesg -n 1', 30_000);
    return Date.now() - t0;
  }

  /**
   * Powers the guest off (poweroff -f), then SIGTERM, then SIGKILL to QEMU. Idempotent;
   * never throws.
   */
  shutdown(): Promise<void> {
    this.shutdownPromise ??= (async () => {
      if (!this.con.running) return;
      try {
        // Ctrl-C first: a command still running would otherwise swallow the poweroff.
        this.write('\x03\npoweroff -f\n');
      } catch {
        /* stdin already closed */
      }
      const off = await Promise.race([this.con.exited.then(() => true), new Promise<null>((r) => setTimeout(() => r(null), 3000).unref())]);
      if (!off) await this.con.kill();
      // Wake waiters so nothing hangs on a dead console.
      for (const w of [...this.watchers]) w();
    })();
    return this.shutdownPromise;
  }

  /** Last lines of the console, for error messages. */
  tail(lines = 30): string {
    return this.transcript.split('\n').slice(-lines).join('\n');
  }

  private onData(chunk: string): void {
    let raw = this.pendingRaw + chunk;
    // Hold back an escape sequence cut by the chunk boundary.
    const esc = raw.lastIndexOf('\x1b');
    if (esc >= 0 && esc >= raw.length - 16 && !/^\x1b(\[[0-9;?]*[ -/]*[@-~]|[^[])/.test(raw.slice(esc))) {
      this.pendingRaw = raw.slice(esc);
      raw = raw.slice(0, esc);
    } else {
      this.pendingRaw = '';
    }
    // eslint-disable-next-line no-control-regex
    const clean = raw.replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, '').replace(/\x1b[^[]/g, '').replace(/\r/g, '');
    if (clean.length === 0) return;
    this.transcript += clean;
    if (this.log) {
      this.lineBuf += clean;
      let nl: number;
      while ((nl = this.lineBuf.indexOf('\n')) >= 0) {
        this.log(this.lineBuf.slice(0, nl));
        this.lineBuf = this.lineBuf.slice(nl + 1);
      }
    }
    for (const w of [...this.watchers]) w();
  }
}

/** The launcher's arguments for opts (always TCG). */
export function launcherArgs(opts: GuestVmOptions, name: string): string[] {
  const args = ['--accel', 'tcg', '--name', name, '--mem', String(opts.memMiB ?? 512), '--smp', String(opts.smp ?? 1)];
  const net = opts.net ?? { kind: 'none' };
  if (net.kind === 'none') {
    args.push('--no-net');
  } else {
    if (net.kind === 'tap') args.push('--tap', net.ifname);
    else {
      args.push('--socket', net.socket);
      if (net.reconnectMs !== undefined) args.push('--reconnect-ms', String(net.reconnectMs));
    }
    if (net.queues !== undefined) args.push('--queues', String(net.queues));
    if (net.mac !== undefined) args.push('--mac', net.mac);
    if (net.mtu !== undefined) args.push('--mtu', String(net.mtu));
  }
  if (opts.append) args.push('--append', opts.append);
  if (opts.qemuArgs?.length) args.push('--', ...opts.qemuArgs);
  return args;
}
