// Where the datapath workers run and at what priority (serve --worker-cpus, --worker-fifo,
// --worker-nice), the way OVS-DPDK's pmd-cpu-mask and DPDK's -l give each polling thread a core
// of its own.
// Checked once at startup, before any device exists: a placement the kernel would refuse must
// stop serve there, not fail the first queue a guest starts.
import { readdirSync } from 'node:fs';
import { VxError } from '../errors.js';
import { SpecError } from '../service/device-spec.js';
import { getAffinity, setAffinity, getNice, setNice, getScheduler, setScheduler, getSlice, setSlice, gettid, formatCpuList, NICE_MIN, NICE_MAX, FIFO_MIN, FIFO_MAX, SCHED_FIFO, SLICE_MIN_US, SLICE_MAX_US } from '../sys/sched.js';
import { SysError, Errno } from '../sys/libc.js';

/** What each worker applies to its own thread when it starts (null: inherit). */
export interface WorkerPlacement {
  /** Worker i runs on cpus[i % cpus.length]. */
  cpus?: readonly number[];
  nice?: number;
  /** SCHED_FIFO at this priority: a woken worker preempts every normal thread on its CPU. */
  fifo?: number;
  /** EEVDF request size in µs (0: the kernel's base slice): a shorter one than a running normal thread's wins wake-up preemption. */
  slice?: number;
}

/** `1`, `2-3`, `0,2-3`: taskset -c's list syntax. Duplicates are an error: each CPU names one seat. */
export function parseCpuList(text: string, option = '--worker-cpus'): number[] {
  const cpus: number[] = [];
  for (const part of text.split(',')) {
    const m = /^(\d{1,4})(?:-(\d{1,4}))?$/.exec(part.trim());
    const lo = m ? Number(m[1]) : NaN;
    const hi = m?.[2] === undefined ? lo : Number(m[2]);
    if (!m || hi < lo) throw new SpecError('bad-worker-cpus', `${option} '${text}': a CPU list such as 1 or 2-3,6`);
    for (let c = lo; c <= hi; c++) cpus.push(c);
  }
  const dup = cpus.find((c, i) => cpus.indexOf(c) !== i);
  if (dup !== undefined) throw new SpecError('bad-worker-cpus', `${option} '${text}': CPU ${dup} is listed twice`);
  return cpus;
}

/**
 * The worker CPUs must be ones this process may run on (its affinity as started: taskset,
 * systemd's CPUAffinity=, the cpuset): a worker pinned elsewhere would fail with EINVAL when a
 * guest starts its first queue, or run where the operator fenced serve out.
 */
export function checkWorkerCpus(cpus: readonly number[], allowed: readonly number[] = getAffinity(0), option = '--worker-cpus'): void {
  const outside = cpus.filter((c) => !allowed.includes(c));
  if (outside.length > 0) {
    throw new SpecError('bad-worker-cpus', `${option}: CPU ${formatCpuList(outside)} is not one this process may run on (${formatCpuList(allowed)})`);
  }
}

export function checkNiceRange(nice: number, option = '--worker-nice'): void {
  if (!Number.isInteger(nice) || nice < NICE_MIN || nice > NICE_MAX) {
    throw new SpecError('bad-worker-nice', `${option} ${nice} outside ${NICE_MIN}..${NICE_MAX}`);
  }
}

/**
 * A real-time worker must sleep when it has no work: a spinning one (--busy-poll) would keep
 * every normal thread off its CPU but for the kernel's RT throttling (5 % of each second by
 * default), serve's own main loop included if it shares the CPU. Nice does not apply to it.
 */
export function checkFifo(fifo: number, busyPoll: boolean, nice: number | undefined): void {
  if (!Number.isInteger(fifo) || fifo < FIFO_MIN || fifo > FIFO_MAX) {
    throw new SpecError('bad-worker-fifo', `--worker-fifo ${fifo} outside ${FIFO_MIN}..${FIFO_MAX}`);
  }
  if (busyPoll) throw new SpecError('bad-worker-fifo', '--worker-fifo with --busy-poll: a spinning real-time thread would starve its CPU; choose one');
  if (nice !== undefined) throw new SpecError('bad-worker-fifo', '--worker-fifo and --worker-nice: a SCHED_FIFO thread has no nice value; choose one');
}

/**
 * The slice a datapath worker asks for unless told otherwise (serve --worker-slice). A worker
 * sleeps until a frame or a kick wakes it and then runs a short burst (256 frames of 64 B take
 * about 250 µs), so a request that size costs it nothing, while the kernel's base slice (1.4 ms on
 * these 2-CPU machines) is what a woken worker waited behind when a normal thread held its CPU.
 * Measured in the latency bench (2026-12-07, 9 rounds each, same runs): p99 above 140 µs in 5 of
 * 9 rounds with the base slice, in 1 of 9 with 100 µs, 1 of 5 with 300 µs; guest->host tap and
 * xsk throughput unchanged; host->guest with the worker sharing a CPU with a busy-polling guest
 * about 5 % lower (more, shorter turns).
 */
export const DEFAULT_WORKER_SLICE_US = 300;

/** 0 (the kernel's base slice) or what the kernel keeps unclamped; not beside SCHED_FIFO, which has no slice. */
export function checkSlice(us: number, fifo: number | undefined): void {
  if (!Number.isInteger(us) || (us !== 0 && (us < SLICE_MIN_US || us > SLICE_MAX_US))) {
    throw new SpecError('bad-worker-slice', `--worker-slice ${us}: 0 (the kernel's base slice) or ${SLICE_MIN_US}..${SLICE_MAX_US} µs`);
  }
  if (fifo !== undefined) throw new SpecError('bad-worker-slice', '--worker-slice and --worker-fifo: a SCHED_FIFO thread runs until it sleeps and has no slice; choose one');
}

/**
 * Whether the kernel keeps a custom slice (Linux 6.12 on): the calling thread takes `us`, reads
 * it back, and goes back to the base slice (what a thread has until it asks). An older kernel
 * accepts the call and ignores it; a real-time main thread (serve under `chrt -f`) is refused.
 */
export function kernelKeepsSlice(us: number): boolean {
  const tid = gettid();
  try {
    setSlice(tid, us);
    return getSlice(tid) === us;
  } finally {
    // 0, not the slice read before: that read gives the base slice, and setting it would pin it as custom.
    setSlice(tid, 0);
  }
}

function denied(option: string, what: string, e: SysError, limit: string): VxError {
  return new VxError('worker-priority-denied', `${option}: this process may not ${what} (${e.code}); grant CAP_SYS_NICE `
    + `(systemd: AmbientCapabilities=CAP_SYS_NICE) or raise ${limit}, or leave ${option} out`);
}

const isPermission = (e: unknown): e is SysError => e instanceof SysError && (e.errno === Errno.EACCES || e.errno === Errno.EPERM);

/**
 * Asks the kernel whether this process may give a thread the placement's priority: it sets the
 * calling thread to it and back. Only a higher priority needs a privilege (CAP_SYS_NICE, or
 * RLIMIT_NICE / RLIMIT_RTPRIO: systemd's LimitNICE= / LimitRTPRIO=), and going back down never
 * does, so the probe leaves the thread as it was. The kernel's answer covers what a rule copied
 * here would miss (user namespaces, LSMs, a cgroup without real-time runtime). A refusal is an
 * error, not a warning: an operator who asked for a priority and silently ran without it would
 * chase the latency it was meant to remove.
 */
export function checkPriorityPermitted(p: WorkerPlacement): void {
  const tid = gettid();
  const before = getNice(tid);
  if (p.nice !== undefined && p.nice < before) {
    try {
      setNice(tid, p.nice);
    } catch (e) {
      if (isPermission(e)) throw denied('--worker-nice', `lower a thread's nice value below ${before} to ${p.nice}`, e, `RLIMIT_NICE (systemd: LimitNICE=${p.nice})`);
      throw e;
    }
    setNice(tid, before);
  }
  if (p.fifo !== undefined) {
    const policy = getScheduler(tid);
    try {
      setScheduler(tid, { policy: SCHED_FIFO, priority: p.fifo });
    } catch (e) {
      // EPERM also comes from a cgroup that grants no real-time runtime (cgroup v1 cpu.rt_runtime_us 0), whatever the capability.
      if (isPermission(e)) throw denied('--worker-fifo', `run a thread under SCHED_FIFO at priority ${p.fifo}`, e, `RLIMIT_RTPRIO (systemd: LimitRTPRIO=${p.fifo}); under cgroup v1 the cgroup also needs real-time runtime (cpu.rt_runtime_us > 0)`);
      throw e;
    }
    setScheduler(tid, policy);
  }
}

/**
 * Moves every thread serve has now (main loop, V8's compiler and GC threads, libuv's) off the
 * worker CPUs when any other allowed CPU remains, as DPDK keeps its main lcore off the
 * forwarding lcores: a worker woken on its core must not wait behind a compile job. Threads
 * made later inherit the narrowed set from the main thread; each worker then pins itself.
 * Returns the CPUs the other threads got, or null when the worker CPUs are all there is.
 */
export function moveOtherThreads(workerCpus: readonly number[]): number[] | null {
  const rest = getAffinity(0).filter((c) => !workerCpus.includes(c));
  if (rest.length === 0) return null;
  for (const t of readdirSync('/proc/self/task')) {
    try {
      setAffinity(Number(t), rest);
    } catch (e) {
      // A thread that ended since the listing.
      if (!(e instanceof SysError && e.errno === Errno.ESRCH)) throw e;
    }
  }
  return rest;
}

/** Run by worker `index` on its own thread `tid` before it serves anything. */
export function applyWorkerPlacement(tid: number, index: number, p: WorkerPlacement): void {
  if (p.cpus && p.cpus.length > 0) setAffinity(tid, [p.cpus[index % p.cpus.length]!]);
  if (p.nice !== undefined) setNice(tid, p.nice);
  if (p.fifo !== undefined) setScheduler(tid, { policy: SCHED_FIFO, priority: p.fifo });
  else if (p.slice) setSlice(tid, p.slice);
}
