import { execFile, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { tempDir } from '../backend.js';
import { sleep, waitUntil } from '../processes.js';
import type { GuestConsole } from './guest-vm.js';

/**
 * libvirt for guest tests: Debian's libvirtd/virtlogd (9.0) without systemd, `virsh` against
 * qemu:///system, and a domain's serial console as a GuestConsole.
 *
 * The console is a unix socket we listen on; the domain's `<serial type='unix'>` connects to
 * it (mode='connect') while QEMU starts, before the guest runs, so no output is lost. When
 * QEMU ends, the connection closes: that is how the console knows the machine is gone.
 */

const execFileAsync = promisify(execFile);

export const VIRSH_URI = 'qemu:///system';
/** The user and group libvirt runs QEMU as (Debian's qemu.conf defaults). */
export const QEMU_USER = 'libvirt-qemu';
export const QEMU_GROUP = 'kvm';
const LIBVIRT_SOCK = '/run/libvirt/libvirt-sock';
const VIRTLOGD_SOCK = '/run/libvirt/virtlogd-sock';
const QEMU_LOG_DIR = '/var/log/libvirt/qemu';

/** The libvirt binaries a test needs that are not installed (empty when all are). */
export function missingLibvirtBinaries(): string[] {
  const dirs = ['/usr/sbin', '/usr/bin', ...(process.env.PATH ?? '').split(':')];
  return ['virsh', 'libvirtd', 'virtlogd'].filter((b) => !dirs.some((d) => d && fs.existsSync(path.join(d, b))));
}

/** Runs virsh against qemu:///system; throws with its stderr on failure. */
export function virsh(args: readonly string[], opts: { timeoutMs?: number; allowFail?: boolean } = {}): string {
  const r = spawnSync('virsh', ['-c', VIRSH_URI, ...args], { encoding: 'utf8', timeout: opts.timeoutMs ?? 30_000 });
  if ((r.error || r.status !== 0) && !opts.allowFail) {
    throw new Error(`virsh ${args.join(' ')} failed (${r.error?.message ?? `status ${r.status}`}): ${(r.stderr ?? '').trim()}`);
  }
  return r.stdout ?? '';
}

function connectable(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(sock);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function processAlive(pid: number, comm: string): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === comm;
  } catch {
    return false;
  }
}

/** SIGTERM, then SIGKILL after graceMs; only if /proc/pid/comm is still `comm`. */
async function stopDaemon(pid: number, comm: string, graceMs = 10_000): Promise<void> {
  if (!processAlive(pid, comm)) return;
  process.kill(pid, 'SIGTERM');
  try {
    await waitUntil(() => !processAlive(pid, comm), graceMs, `${comm} (pid ${pid}) to exit`, 100);
  } catch {
    if (processAlive(pid, comm)) process.kill(pid, 'SIGKILL');
  }
}

export interface LibvirtDaemons {
  /** What this call started ([] when libvirtd and virtlogd were already running). */
  started: { name: string; pid: number }[];
  /** Milliseconds until `virsh version` answered. */
  readyMs: number;
  /** Stops what this call started (newest first); leaves alone what was there. Never throws. */
  stop(): Promise<void>;
}

/**
 * Makes sure virtlogd and libvirtd serve qemu:///system: each one whose socket does not
 * answer is started in daemon mode (`-d`) with a pid file of ours, so stop() ends exactly
 * those. The first libvirtd start probes QEMU's capabilities (~8 s here; cached afterwards).
 */
export async function ensureLibvirtDaemons(timeoutMs = 60_000): Promise<LibvirtDaemons> {
  const t0 = Date.now();
  const started: { name: string; pid: number }[] = [];
  let pidDir: string | undefined;
  const stop = async (): Promise<void> => {
    for (const d of [...started].reverse()) await stopDaemon(d.pid, d.name).catch(() => undefined);
    started.length = 0;
    if (pidDir) fs.rmSync(pidDir, { recursive: true, force: true });
  };
  exitHooks.add(() => {
    for (const d of started) if (processAlive(d.pid, d.name)) process.kill(d.pid, 'SIGKILL');
  });
  try {
    for (const [name, sock] of [['virtlogd', VIRTLOGD_SOCK], ['libvirtd', LIBVIRT_SOCK]] as const) {
      if (await connectable(sock)) continue;
      pidDir ??= tempDir('libvirtd');
      const pidFile = path.join(pidDir, `${name}.pid`);
      // -d: the command returns once the daemon has forked and written its pid file.
      const r = spawnSync(name, ['-d', '-p', pidFile], { encoding: 'utf8', timeout: 30_000 });
      if (r.status !== 0) throw new Error(`${name} -d failed (status ${r.status}): ${r.stderr}`);
      const pid = Number(await waitUntil(() => fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim(), 10_000, `${pidFile}`));
      started.push({ name, pid });
      await waitUntil(() => connectable(sock), 15_000, `${sock} to accept connections`, 100);
    }
    await waitUntil(() => virsh(['version'], { allowFail: true, timeoutMs: timeoutMs }).includes('Running hypervisor'), timeoutMs, 'virsh version', 200);
  } catch (e) {
    await stop();
    throw e;
  }
  return { started, readyMs: Date.now() - t0, stop };
}

/** Whether `name` is a domain libvirt knows (running or defined). */
export function domainExists(name: string): boolean {
  return spawnSync('virsh', ['-c', VIRSH_URI, 'domstate', name], { encoding: 'utf8', timeout: 10_000 }).status === 0;
}

/** `virsh destroy` if the domain exists; never throws. */
export function destroyDomain(name: string): void {
  if (domainExists(name)) virsh(['destroy', name], { allowFail: true });
}

/** The QEMU log libvirt keeps for a domain (command line, QEMU's stderr). */
export function domainLogPath(name: string): string {
  return path.join(QEMU_LOG_DIR, `${name}.log`);
}

function logTail(name: string, lines: number): string {
  try {
    return fs.readFileSync(domainLogPath(name), 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return `(no ${domainLogPath(name)})`;
  }
}

/** Transient domains created in this process, destroyed on exit if a test did not get to it. */
const liveDomains = new Set<string>();
const exitHooks = new Set<() => void>();
process.once('exit', () => {
  for (const d of liveDomains) spawnSync('virsh', ['-c', VIRSH_URI, 'destroy', d], { timeout: 10_000 });
  for (const h of exitHooks) h();
});

/**
 * `virsh create FILE` (a transient domain: gone once destroyed). With a vhost-user client
 * interface QEMU waits for the backend's socket during startup, so this returns only once
 * QEMU has connected to it (and blocks, retrying every reconnect timeout, while the socket
 * refuses QEMU's user).
 */
export async function createDomain(name: string, xmlFile: string, timeoutMs = 60_000): Promise<void> {
  liveDomains.add(name);
  try {
    // Asynchronously: the console socket of this process must accept QEMU meanwhile.
    await execFileAsync('virsh', ['-c', VIRSH_URI, 'create', xmlFile], { timeout: timeoutMs });
  } catch (e) {
    const err = e as Error & { stderr?: string };
    throw new Error(`virsh create ${xmlFile} failed: ${(err.stderr ?? '').trim() || err.message}\nQEMU log (${domainLogPath(name)}):\n${logTail(name, 15)}`);
  }
}

/** Destroys the domain if it still runs and forgets it. Never throws. */
export function removeDomain(name: string): void {
  destroyDomain(name);
  liveDomains.delete(name);
}

/**
 * A unix socket the domain's serial port connects to (`<serial type='unix'><source
 * mode='connect' path=…/>`), as a GuestConsole for GuestVm.attach. Listen before creating the
 * domain; output that arrives before attach() subscribes is kept for it.
 */
export class DomainConsole implements GuestConsole {
  readonly path: string;
  private readonly server: net.Server;
  private socket: net.Socket | null = null;
  private readonly subscribers: ((chunk: string) => void)[] = [];
  private early: string[] = [];
  private closed = false;
  private resolveExit!: () => void;
  readonly exited: Promise<void> = new Promise((r) => (this.resolveExit = r));

  private constructor(readonly domain: string, sockPath: string, server: net.Server) {
    this.path = sockPath;
    this.server = server;
    server.on('connection', (s) => {
      if (this.socket) {
        s.destroy();
        return;
      }
      this.socket = s;
      s.setEncoding('utf8');
      s.on('data', (chunk: string) => {
        if (this.subscribers.length === 0) this.early.push(chunk);
        for (const cb of this.subscribers) cb(chunk);
      });
      s.on('close', () => {
        this.closed = true;
        server.close();
        this.resolveExit();
      });
      s.on('error', () => undefined);
    });
  }

  /**
   * Listens on sockPath, owned by root:kvm with mode 0660 so that QEMU (libvirt-qemu:kvm)
   * can connect; its directory must let that user through (see assertTraversable).
   */
  static async listen(domain: string, sockPath: string): Promise<DomainConsole> {
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(sockPath, () => resolve());
    });
    chownToQemuGroup(sockPath, 0o660);
    return new DomainConsole(domain, sockPath, server);
  }

  /** Resolves once QEMU has connected (it does so while `virsh create` starts it). */
  async waitConnected(timeoutMs = 5000): Promise<void> {
    await waitUntil(() => this.socket !== null, timeoutMs, `QEMU of ${this.domain} to connect to the console socket ${this.path}`);
  }

  onData(cb: (chunk: string) => void): void {
    this.subscribers.push(cb);
    const early = this.early;
    this.early = [];
    for (const chunk of early) cb(chunk);
  }

  write(raw: string): void {
    if (!this.socket || this.closed) throw new Error(`${this.domain}: console is not connected`);
    this.socket.write(raw);
  }

  get running(): boolean {
    return this.socket !== null && !this.closed;
  }

  get exitInfo(): unknown {
    return this.closed ? { console: 'closed', state: virsh(['domstate', this.domain], { allowFail: true }).trim() || 'gone' } : null;
  }

  async kill(): Promise<void> {
    destroyDomain(this.domain);
    await Promise.race([this.exited, sleep(5000)]);
    this.close();
  }

  tail(lines: number): string {
    return logTail(this.domain, lines);
  }

  /** Stops listening and drops the connection. Never throws. */
  close(): void {
    this.socket?.destroy();
    this.server.close();
    fs.rmSync(this.path, { force: true });
  }
}

/** chgrp kvm + chmod: lets QEMU, running as libvirt-qemu:kvm, open or connect to `file`. */
export function chownToQemuGroup(file: string, mode: number): void {
  const gid = Number(spawnSync('getent', ['group', QEMU_GROUP], { encoding: 'utf8' }).stdout.split(':')[2]);
  if (!Number.isInteger(gid)) throw new Error(`group ${QEMU_GROUP} does not exist (is libvirt-daemon-system installed?)`);
  fs.chownSync(file, 0, gid);
  fs.chmodSync(file, mode);
}

/**
 * Throws unless every directory above `file` lets others search it (o+x): QEMU runs as
 * libvirt-qemu and must reach the sockets and images we put there.
 */
export function assertTraversable(file: string): void {
  for (let dir = path.dirname(path.resolve(file)); ; dir = path.dirname(dir)) {
    if ((fs.statSync(dir).mode & 0o001) === 0) throw new Error(`${dir} is not searchable by ${QEMU_USER} (mode ${(fs.statSync(dir).mode & 0o777).toString(8)}): QEMU could not reach ${file}`);
    if (dir === '/') return;
  }
}
