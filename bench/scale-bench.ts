// The scale bench (issue 13): what N quiet devices cost in one `vhost-xdp serve` process — resident
// memory, threads and idle CPU — each device connected by a TS frontend with running vrings and
// then left alone. Only the backend's process is measured; the frontends live in this one.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os, { loadavg } from 'node:os';
import path from 'node:path';
import { CLI, startBackend } from '../test/support/backend.js';
import { TestFrontend } from '../test/support/frontend/test-frontend.js';
import { CleanupStack, deleteLink, disableIpv6, listLinks, uniqueIfName } from '../test/support/netdev.js';
import { sleep } from '../test/support/processes.js';
import { clockTick, cpuPct } from './proc-cpu.js';

/** Issue 13's targets. */
export const SCALE_TARGETS = { rssMbAt32: 100, perAddedDeviceMb: 2, idleCpuPctAt64: 1 } as const;

export interface ScaleOptions {
  /** Device counts, one serve process each, in ascending order. */
  devices: number[];
  /** Seconds of the idle-CPU window. */
  seconds: number;
  /** `serve --workers N`; undefined leaves serve's default. Refused when serve has no such option. */
  workers?: number;
  /** Pause after serve is ready and again after the frontends connected, before measuring. */
  settleMs?: number;
  /** Guest RAM per frontend: rings and 2 KiB slots of one queue pair need ~1.2 MiB. */
  frontendMemBytes?: number;
}

/** Memory and threads of a process, from /proc/PID/status (MB = MiB). */
export interface ProcStatus {
  rssMb: number;
  /** Heap, isolates, stacks: what the backend allocated itself. */
  anonMb: number;
  /** Mapped file pages (node's binary and libraries). */
  fileMb: number;
  /** Shared memory it touched: here the frontends' guest RAM (memfds) the backend mapped. */
  shmemMb: number;
  threads: number;
}

export interface ScaleRow extends ProcStatus {
  devices: number;
  /** RSS growth per device over the previous row; null on the first. */
  perAddedDeviceMb: number | null;
  /** The same process before any frontend connected: the devices alone, no sessions or rings. */
  unconnected: ProcStatus;
  idleCpuPct: number;
  /** From spawn to serve's ready line. */
  startMs: number;
  /** This process (all N frontends and their guest RAM), for comparison only. */
  benchRssMb: number;
  loadAvg1: number;
  /** Targets that apply to this row and failed, as text; empty when all applicable ones hold. */
  failed: string[];
  /** Whether any target applies to this row. */
  targeted: boolean;
  /** Our taps still present after serve stopped (deleted by the bench, but serve should have). */
  leftoverTaps: string[];
}

export interface ScaleResult {
  /** `serve --help` lists --workers (the worker pool) or not (per-device --threads). */
  workersOption: boolean;
  workers: number | null;
  windowSeconds: number;
  clockTick: number;
  frontendMemMb: number;
  rows: ScaleRow[];
}

const MB = 1024 * 1024;
const round1 = (x: number): number => Math.round(x * 10) / 10;
const round2 = (x: number): number => Math.round(x * 100) / 100;

/** Whether this build's serve has the worker pool's `--workers`: asked of the CLI, never assumed. */
export function serveHasWorkersOption(): boolean {
  const help = execFileSync(process.execPath, [CLI, 'serve', '--help'], { encoding: 'utf8' });
  return /--workers\b/.test(help);
}

export function procStatus(pid: number): ProcStatus {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string): number => {
    const m = new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text);
    if (!m) throw new Error(`/proc/${pid}/status has no ${name}`);
    return Number(m[1]);
  };
  const mb = (name: string): number => round1((field(name) * 1024) / MB);
  return { rssMb: mb('VmRSS'), anonMb: mb('RssAnon'), fileMb: mb('RssFile'), shmemMb: mb('RssShmem'), threads: field('Threads') };
}

/** A config file with one single-queue tap device per name (a file: 64 `--device` flags read badly in ps). */
function writeConfig(dir: string, taps: string[]): string {
  const devices = taps.map((t, i) => ({ name: `d${i}`, socket: path.join(dir, `d${i}.sock`), port: `tap:${t}`, queues: 1 }));
  const file = path.join(dir, 'scale.json');
  fs.writeFileSync(file, JSON.stringify({ devices }, null, 2));
  return file;
}

/** Our taps that are still there, deleted; the names are returned so the report can say serve left them. */
function sweepTaps(taps: string[]): string[] {
  const mine = new Set(taps);
  const left = listLinks().filter((l) => mine.has(l));
  for (const l of left) deleteLink(l);
  return left;
}

interface ServeStatus { pid: number; devices: { name: string; connected: boolean; runningVrings: number[] }[] }

/**
 * Serve's own word that every device has a session with both vrings of its pair running (an
 * idle figure for devices that never started their rings would flatter), and that the pid we
 * measure is the one serving them.
 */
async function requireAllRunning(status: ServeStatus, pid: number, n: number): Promise<void> {
  if (status.pid !== pid) throw new Error(`serve reports pid ${status.pid}, the bench measures ${pid}`);
  const idle = status.devices.filter((d) => !d.connected || d.runningVrings.length !== 2);
  if (status.devices.length !== n || idle.length > 0) {
    throw new Error(`${status.devices.length} of ${n} devices, not running: ${idle.map((d) => `${d.name} (vrings ${d.runningVrings.join(',') || 'none'})`).join(' ')}`);
  }
}

type Measured = Omit<ScaleRow, 'perAddedDeviceMb' | 'failed' | 'targeted'>;

/** One serve with n devices, n connected frontends, then quiet: its footprint. Leaves nothing behind. */
async function measureDevices(n: number, opts: Required<Omit<ScaleOptions, 'workers' | 'devices'>>, serveArgs: string[], tick: number): Promise<Measured> {
  const cleanup = new CleanupStack();
  // Not tempDir()'s `vx-` prefix: a vitest run of anyone on this machine removes every `vx-`
  // directory made while it ran, sockets and all, and a 64-device round lasts long enough to meet one.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vxbench-scale-'));
  cleanup.push('remove temp dir', () => fs.rmSync(dir, { recursive: true, force: true }));
  const taps = Array.from({ length: n }, () => uniqueIfName('vxsc'));
  // Filled in `finally`, after the row is built: the row holds this same array.
  const leftoverTaps: string[] = [];
  try {
    const t0 = Date.now();
    const be = await startBackend(['--config', writeConfig(dir, taps), '--log-level', 'warn', ...serveArgs], {
      name: `serve-${n}`, dir,
      // serve sets every device up (tap, datapath worker) before its ready line: 64 took 9 s at load 8 on 2 cores.
      readyTimeoutMs: 15_000 + 500 * n,
    });
    const startMs = Date.now() - t0;
    cleanup.push('stop serve', () => be.stop());
    // A tap with IPv6 sends router solicitations and MLD reports into the guest: not quiet.
    for (const t of taps) disableIpv6(t);
    await sleep(opts.settleMs);
    const unconnected = procStatus(be.proc.pid);
    const frontends: TestFrontend[] = [];
    cleanup.push('close frontends', () => { for (const fe of frontends) fe.close(); });
    for (let i = 0; i < n; i++) {
      frontends.push(await TestFrontend.connect(path.join(dir, `d${i}.sock`), { queuePairs: 1, memBytes: opts.frontendMemBytes }));
    }
    await requireAllRunning(await be.call('status'), be.proc.pid, n);
    await sleep(opts.settleMs);
    const status = procStatus(be.proc.pid);
    const loadAvg1 = round2(loadavg()[0]!);
    const idleCpuPct = await cpuPct(be.proc.pid, opts.seconds, tick);
    if (!be.proc.running) throw new Error(`serve with ${n} devices exited while idle:\n${be.proc.tail(20)}`);
    return { devices: n, ...status, unconnected, idleCpuPct, startMs, benchRssMb: round1(process.memoryUsage().rss / MB), loadAvg1, leftoverTaps };
  } finally {
    // Frontends close first, then serve stops (removing its taps), then the temp dir goes.
    await cleanup.run();
    leftoverTaps.push(...sweepTaps(taps));
    if (leftoverTaps.length > 0) process.stderr.write(`scale bench: serve left ${leftoverTaps.length} tap(s) behind (deleted): ${leftoverTaps.join(' ')}\n`);
  }
}

/** The targets that apply to a row (given the row before it) and which of them failed. */
function judge(row: Measured, perAdded: number | null): { targeted: boolean; failed: string[] } {
  const failed: string[] = [];
  let targeted = false;
  if (row.devices === 32) {
    targeted = true;
    if (row.rssMb > SCALE_TARGETS.rssMbAt32) failed.push(`RSS ${row.rssMb} > ${SCALE_TARGETS.rssMbAt32} MB`);
  }
  if (perAdded !== null) {
    targeted = true;
    if (perAdded > SCALE_TARGETS.perAddedDeviceMb) failed.push(`${perAdded} > ${SCALE_TARGETS.perAddedDeviceMb} MB/device`);
  }
  if (row.devices === 64) {
    targeted = true;
    if (row.idleCpuPct >= SCALE_TARGETS.idleCpuPctAt64) failed.push(`idle ${row.idleCpuPct}% >= ${SCALE_TARGETS.idleCpuPctAt64}%`);
  }
  return { targeted, failed };
}

export async function runScaleBench(opts: ScaleOptions): Promise<ScaleResult> {
  const workersOption = serveHasWorkersOption();
  if (opts.workers !== undefined && !workersOption) {
    throw new Error(`--workers ${opts.workers}: this build's serve has no --workers option (per-device --threads only); run without it`);
  }
  const serveArgs = opts.workers !== undefined ? ['--workers', String(opts.workers)] : [];
  const full = { seconds: opts.seconds, settleMs: opts.settleMs ?? 2000, frontendMemBytes: opts.frontendMemBytes ?? 4 * MB };
  const tick = clockTick();
  const rows: ScaleRow[] = [];
  for (const n of opts.devices) {
    const m = await measureDevices(n, full, serveArgs, tick);
    const prev = rows[rows.length - 1];
    const perAddedDeviceMb = prev ? round2((m.rssMb - prev.rssMb) / (n - prev.devices)) : null;
    rows.push({ ...m, perAddedDeviceMb, ...judge(m, perAddedDeviceMb) });
  }
  return { workersOption, workers: opts.workers ?? null, windowSeconds: opts.seconds, clockTick: tick, frontendMemMb: full.frontendMemBytes / MB, rows };
}

/** The table `npm run bench -- scale` prints. */
export function scaleTable(r: ScaleResult): string[] {
  const cols = ['devices', 'RSS MB', '+MB/device', 'anon MB', 'shmem MB', 'unconn. MB', 'threads', 'idle CPU %', 'targets'];
  const widths = [7, 8, 10, 8, 8, 10, 7, 10];
  const cells = (vals: string[]): string => `  ${vals.map((v, i) => (i < widths.length ? v.padStart(widths[i]!) : v)).join('  ')}`;
  const lines = [cells(cols)];
  for (const row of r.rows) {
    const verdict = !row.targeted ? '-' : row.failed.length === 0 ? 'met' : `NOT met: ${row.failed.join('; ')}`;
    lines.push(cells([
      String(row.devices), row.rssMb.toFixed(1), row.perAddedDeviceMb === null ? '-' : row.perAddedDeviceMb.toFixed(2),
      row.anonMb.toFixed(1), row.shmemMb.toFixed(1), row.unconnected.rssMb.toFixed(1), String(row.threads), row.idleCpuPct.toFixed(2), verdict,
    ]));
  }
  return lines;
}
