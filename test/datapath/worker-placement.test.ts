// serve --worker-cpus / --worker-nice: each datapath worker pins and prioritises its own thread,
// serve's other threads leave the worker CPUs, and a placement the kernel would refuse stops
// serve before it makes any port.
import { describe, test, expect, afterEach } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startBackend, tempDir, CLI, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { expectTraffic } from '../support/frontend/traffic.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, disableIpv6, linkExists } from '../support/netdev.js';
import { TEST_USER, capsFor, setprivArgs, handOver } from '../support/unprivileged.js';
import { getAffinity, getSlice, setSlice, getScheduler, setScheduler, SCHED_OTHER, SCHED_FIFO, SCHED_BATCH } from '../../src/sys/sched.js';
import { ArgumentError } from '../../src/errors.js';
import type { Placement } from '../../src/datapath/worker-pool.js';
import { DEFAULT_WORKER_SLICE_US } from '../../src/datapath/placement.js';

function cpusAllowed(pid: number, tid: number): string {
  return /^Cpus_allowed_list:\s*(\S+)/m.exec(fs.readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8'))![1]!;
}

/** Field N (1-based, proc(5)) of /proc/PID/task/TID/stat; the name in parentheses may hold spaces. */
function statField(pid: number, tid: number, n: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[n - 3]);
}
const niceOf = (pid: number, tid: number): number => statField(pid, tid, 19);
/** rt_priority (40) and policy (41): 1 is SCHED_FIFO. */
const fifoOf = (pid: number, tid: number): [number, number] => [statField(pid, tid, 41), statField(pid, tid, 40)];

const allowed = getAffinity(0);
// The highest CPU this runner may use for the workers, the rest for serve's other threads.
const workerCpu = allowed[allowed.length - 1]!;
const others = allowed.filter((c) => c !== workerCpu);

describe('serve --worker-cpus / --worker-nice / --worker-fifo / --worker-slice', () => {
  let be: Backend | undefined;
  let fe: TestFrontend | undefined;
  let ps: PacketSocket | undefined;

  afterEach(async () => {
    ps?.close();
    ps = undefined;
    fe?.close();
    fe = undefined;
    await be?.stop();
    be = undefined;
  });

  /** Serves a frontend with the options and returns the worker's placement as status reports it. */
  async function serveWith(args: string[], tag: string, caps?: string[]): Promise<Placement> {
    const ifname = uniqueIfName(`vx${tag}`);
    const dir = tempDir(tag);
    const sock = path.join(dir, 'dev.sock');
    be = await startBackend(['--socket', sock, '--port', `tap:${ifname}`, ...args], { dir, runAs: caps ? { user: TEST_USER, caps } : undefined });
    disableIpv6(ifname);
    fe = await TestFrontend.connect(sock);
    ps = PacketSocket.open(ifname);
    await expectTraffic(fe, ps, 820_000);
    // Workers start as queues need them: the one serving the pair (of as many as --workers says).
    const serving = ((await be.call('status')).workers as Placement[]).filter((w) => w.queues.length > 0);
    expect(serving).toHaveLength(1);
    return serving[0]!;
  }

  test('the worker thread runs on its CPU under SCHED_FIFO; serve\'s other threads leave that CPU and stay normal', async () => {
    const w = await serveWith(['--worker-cpus', String(workerCpu), '--worker-fifo', '1'], 'wp');
    const pid = be!.proc.pid;
    expect(w.cpu).toBe(workerCpu);
    expect(w.fifo).toBe(1);
    // A real-time thread has no slice: the default is not applied beside --worker-fifo.
    expect(w.slice).toBeNull();
    expect(fs.existsSync(`/proc/${pid}/task/${w.threadId}`)).toBe(true);
    expect(cpusAllowed(pid, w.threadId)).toBe(String(workerCpu));
    expect(fifoOf(pid, w.threadId)).toEqual([1, 1]);
    // The permission probe put the main thread back as it was.
    expect(fifoOf(pid, pid)).toEqual([0, 0]);
    // The main thread (and V8's, made at startup) keep off the worker's CPU when another is allowed.
    if (others.length > 0) {
      for (const t of fs.readdirSync(`/proc/${pid}/task`).map(Number).filter((t) => t !== w.threadId)) {
        expect(cpusAllowed(pid, t).split(',').includes(String(workerCpu)), `thread ${t}`).toBe(false);
      }
    }
  });

  test('without the options the worker inherits the process\'s CPUs and priority but takes the default slice, and status says so', async () => {
    const w = await serveWith([], 'wq');
    expect(w.cpu).toBeNull();
    expect(w.nice).toBeNull();
    expect(w.fifo).toBeNull();
    expect(w.slice).toBe(DEFAULT_WORKER_SLICE_US);
    expect(getSlice(w.threadId)).toBe(DEFAULT_WORKER_SLICE_US);
    expect(niceOf(be!.proc.pid, w.threadId)).toBe(niceOf(be!.proc.pid, be!.proc.pid));
    expect(fifoOf(be!.proc.pid, w.threadId)).toEqual([0, 0]);
  });

  test('a CPU serve may not run on, or a bad list, is refused with bad-worker-cpus (status 2) before any port exists', () => {
    const dir = tempDir('wbad');
    for (const cpus of ['4095', '1-0', `${workerCpu},${workerCpu}`, 'one']) {
      const ifname = uniqueIfName('vxwb');
      const r = spawnSync(process.execPath, [CLI, 'serve', '--socket', path.join(dir, 's'), '--port', `tap:${ifname}`, '--worker-cpus', cpus, '--control', path.join(dir, 'ctl')],
        { encoding: 'utf8', timeout: 15_000 });
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr).toContain('[bad-worker-cpus]');
      expect(linkExists(ifname)).toBe(false);
    }
    const nice = spawnSync(process.execPath, [CLI, 'serve', '--socket', path.join(dir, 's'), '--port', 'tap:vxwn', '--worker-nice', '-21'], { encoding: 'utf8', timeout: 15_000 });
    expect(nice.status).toBe(2);
    expect(nice.stderr).toContain('[bad-worker-nice]');
    for (const slice of [['50'], ['100001'], ['1.5'], ['100', '--worker-fifo', '1']]) {
      const r = spawnSync(process.execPath, [CLI, 'serve', '--socket', path.join(dir, 's'), '--port', 'tap:vxwn', '--worker-slice', ...slice], { encoding: 'utf8', timeout: 15_000 });
      expect(r.status, slice.join(' ')).toBe(2);
      expect(r.stderr).toContain('[bad-worker-slice]');
    }
    const spin = spawnSync(process.execPath, [CLI, 'serve', '--socket', path.join(dir, 's'), '--port', 'tap:vxwn', '--worker-fifo', '1', '--busy-poll'], { encoding: 'utf8', timeout: 15_000 });
    expect(spin.status).toBe(2);
    expect(spin.stderr).toContain('[bad-worker-fifo]');
  });

  test('a worker that cannot take its CPU (the cpuset changed since serve checked) answers every request with why, not a timeout', async () => {
    // The built pool: its worker thread runs dist/src/datapath/worker.js, as serve's does.
    const { WorkerPool } = await import(new URL('../../dist/src/datapath/worker-pool.js', import.meta.url).href) as typeof import('../../src/datapath/worker-pool.js');
    // An online-looking CPU number no test machine has: sched_setaffinity answers EINVAL.
    const pool = new WorkerPool({ workers: 1, busyPoll: false, placement: { cpus: [1023] } });
    try {
      const t0 = Date.now();
      expect(() => pool.worker(0).request({ op: 'attach', device: 1, name: 'x', stats: new SharedArrayBuffer(4096) }))
        .toThrow(/attach: cannot take its CPU or priority: sched_setaffinity .*EINVAL/);
      expect(Date.now() - t0).toBeLessThan(4000);
    } finally {
      await pool.close();
    }
  });

  test('unprivileged: a higher priority without CAP_SYS_NICE is refused with worker-priority-denied (status 1) before any port exists; with it, the worker gets it', async () => {
    const dir = tempDir('wunpriv');
    handOver({ user: TEST_USER, caps: [] }, dir);
    for (const opt of [['--worker-nice', '-5'], ['--worker-fifo', '1']]) {
      const ifname = uniqueIfName('vxwu');
      const argv = [process.execPath, CLI, 'serve', '--socket', path.join(dir, 's'), '--port', `tap:${ifname}`, ...opt, '--control', path.join(dir, 'ctl')];
      const r = spawnSync('setpriv', setprivArgs({ user: TEST_USER, caps: capsFor('tap') }, argv), { encoding: 'utf8', timeout: 15_000 });
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr).toContain('[worker-priority-denied]');
      expect(r.stderr).toContain('CAP_SYS_NICE');
      expect(linkExists(ifname)).toBe(false);
    }

    const w = await serveWith(['--worker-nice', '-5'], 'wv', [...capsFor('tap'), 'sys_nice']);
    expect(w.nice).toBe(-5);
    expect(niceOf(be!.proc.pid, w.threadId)).toBe(-5);
  });

  test('a slice keeps the thread\'s own fair policy (serve under chrt -b stays SCHED_BATCH) and is refused on a real-time thread', () => {
    try {
      setScheduler(0, { policy: SCHED_BATCH, priority: 0 });
      setSlice(0, 200);
      expect(getScheduler(0)).toEqual({ policy: SCHED_BATCH, priority: 0 });
      expect(getSlice(0)).toBe(200);
      setScheduler(0, { policy: SCHED_FIFO, priority: 1 });
      expect(() => setSlice(0, 200)).toThrow(ArgumentError);
      expect(getScheduler(0)).toEqual({ policy: SCHED_FIFO, priority: 1 });
    } finally {
      setScheduler(0, { policy: SCHED_OTHER, priority: 0 });
      setSlice(0, 0);
    }
  });

  test('unprivileged, --worker-slice gives the worker its EEVDF slice and leaves every other thread\'s as it was', async () => {
    // Read before serve starts: this runner's own (base) slice, what serve's other threads keep.
    const base = getSlice(0);
    const w = await serveWith(['--worker-slice', '150'], 'ws', capsFor('tap'));
    const pid = be!.proc.pid;
    expect(w.slice).toBe(150);
    expect(w.fifo).toBeNull();
    // The kernel's own record (Linux 6.12 on; ENV-FACTS: 6.18 here), not serve's word.
    expect(getSlice(w.threadId)).toBe(150);
    // The probe (set on the main thread, read back, reset) left the main thread at the base slice.
    expect(getSlice(pid)).toBe(base);
    expect(niceOf(pid, w.threadId)).toBe(niceOf(pid, pid));
    ps?.close();
    fe?.close();
    await be!.stop();
    [ps, fe, be] = [undefined, undefined, undefined];

    // 0: the kernel's base slice, as before the default existed.
    const w0 = await serveWith(['--worker-slice', '0'], 'ws0');
    expect(w0.slice).toBeNull();
    expect(getSlice(w0.threadId)).toBe(base);
  });
});
