// Where and at what priority a thread runs: the datapath workers' placement (serve
// --worker-cpus, --worker-nice, --worker-fifo, --worker-slice). Linux applies affinity, nice,
// policy and slice per thread, so every call here names a kernel thread id (gettid), never a process.
import koffi from 'koffi';
import { check, raw, NativeBuffer, SysError, Errno } from './libc.js';
import { ArgumentError } from '../errors.js';

/** Bytes of the cpu_set_t handed to the kernel: 1024 CPUs, glibc's CPU_SETSIZE. */
const CPU_SET_BYTES = 128;
/** setpriority(2)'s `which` for one thread id. */
const PRIO_PROCESS = 0;
export const NICE_MIN = -20;
export const NICE_MAX = 19;
export const SCHED_OTHER = 0;
export const SCHED_FIFO = 1;
export const SCHED_BATCH = 3;
export const SCHED_IDLE = 5;
/** Threads and processes the thread makes start back at SCHED_OTHER, never inherit its real-time policy. */
const SCHED_RESET_ON_FORK = 0x40000000;
export const FIFO_MIN = 1;
export const FIFO_MAX = 99;

const mask = new NativeBuffer(4096);

/** The calling thread's kernel id (what /proc/PID/task/ lists). */
export function gettid(): number {
  return raw.gettid();
}

/** The CPUs thread `tid` (0: the caller) may run on, ascending. */
export function getAffinity(tid = 0): number[] {
  check(raw.sched_getaffinity(tid, CPU_SET_BYTES, mask.address), 'sched_getaffinity', `thread ${tid}`);
  const cpus: number[] = [];
  for (let i = 0; i < CPU_SET_BYTES * 8; i++) if (mask.bytes[i >> 3]! & (1 << (i & 7))) cpus.push(i);
  return cpus;
}

/** Pins thread `tid` (0: the caller) to `cpus`; EINVAL when none of them is usable (offline, outside the cpuset). */
export function setAffinity(tid: number, cpus: readonly number[]): void {
  mask.bytes.fill(0, 0, CPU_SET_BYTES);
  for (const c of cpus) {
    if (!Number.isInteger(c) || c < 0 || c >= CPU_SET_BYTES * 8) throw new ArgumentError(`CPU ${c} outside 0..${CPU_SET_BYTES * 8 - 1}`);
    mask.bytes[c >> 3]! |= 1 << (c & 7);
  }
  check(raw.sched_setaffinity(tid, CPU_SET_BYTES, mask.address), 'sched_setaffinity', `thread ${tid} to CPUs ${formatCpuList(cpus)}`);
}

/** Thread `tid`'s nice value (0: the caller). getpriority may return -1 as a value, so errno decides. */
export function getNice(tid = 0): number {
  koffi.errno(0);
  const n = raw.getpriority(PRIO_PROCESS, tid);
  if (n === -1 && koffi.errno() !== 0) check(-1, 'getpriority', `thread ${tid}`);
  return n;
}

/**
 * Sets thread `tid`'s nice value. Lowering it below the current one needs CAP_SYS_NICE or an
 * RLIMIT_NICE that allows it (EACCES/EPERM otherwise); raising it never does.
 */
export function setNice(tid: number, nice: number): void {
  check(raw.setpriority(PRIO_PROCESS, tid, nice), 'setpriority', `thread ${tid} to nice ${nice}`);
}

export interface SchedPolicy {
  policy: number;
  /** sched_param.sched_priority: 1..99 for SCHED_FIFO/RR, 0 otherwise. */
  priority: number;
}

/** Thread `tid`'s scheduling policy and real-time priority (0: the caller). */
export function getScheduler(tid = 0): SchedPolicy {
  const policy = check(raw.sched_getscheduler(tid), 'sched_getscheduler', `thread ${tid}`) & ~SCHED_RESET_ON_FORK;
  check(raw.sched_getparam(tid, mask.address), 'sched_getparam', `thread ${tid}`);
  return { policy, priority: mask.view.getInt32(0, true) };
}

/**
 * Sets thread `tid`'s policy. A real-time policy needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at
 * least `priority` (EPERM otherwise); going back to SCHED_OTHER never does.
 */
export function setScheduler(tid: number, s: SchedPolicy): void {
  mask.view.setInt32(0, s.priority, true);
  const policy = s.policy === SCHED_OTHER ? s.policy : s.policy | SCHED_RESET_ON_FORK;
  check(raw.sched_setscheduler(tid, policy, mask.address), 'sched_setscheduler', `thread ${tid} to policy ${s.policy} priority ${s.priority}`);
}

/** sched_setattr(2) / sched_getattr(2): glibc before 2.41 wraps neither, so they go through syscall(2). */
const SYS_SCHED_ATTR: Partial<Record<string, [set: number, get: number]>> = { x64: [314, 315], arm64: [274, 275] };
/** struct sched_attr up to sched_period (SCHED_ATTR_SIZE_VER0): the fields a fair-class slice needs. */
const SCHED_ATTR_SIZE = 48;
/** The kernel clamps a custom slice to 0.1..100 ms (kernel/sched/syscalls.c, __setparam_fair). */
export const SLICE_MIN_US = 100;
export const SLICE_MAX_US = 100_000;

function schedAttrCall(which: 0 | 1, tid: number, what: string): void {
  const nr = SYS_SCHED_ATTR[process.arch];
  if (!nr) throw new SysError(which === 0 ? 'sched_setattr' : 'sched_getattr', Errno.ENOSYS!, `${what}: no syscall number for ${process.arch}`);
  const r = which === 0
    ? raw.syscall(nr[0], 'int', tid, 'intptr_t', mask.address, 'uint', 0)
    : raw.syscall(nr[1], 'int', tid, 'intptr_t', mask.address, 'uint', SCHED_ATTR_SIZE, 'uint', 0);
  check(Number(r), which === 0 ? 'sched_setattr' : 'sched_getattr', what);
}

/**
 * Thread `tid`'s EEVDF request size in microseconds (sched_getattr's sched_runtime for a fair
 * task, Linux 6.12 on); 0 from a kernel that does not report it.
 */
export function getSlice(tid = 0): number {
  mask.bytes.fill(0, 0, SCHED_ATTR_SIZE);
  schedAttrCall(1, tid, `thread ${tid}`);
  return Math.round(Number(mask.view.getBigUint64(24, true)) / 1000);
}

/** The fair-class policies a slice applies to: SCHED_OTHER, SCHED_BATCH, SCHED_IDLE. */
const FAIR_POLICIES: readonly number[] = [SCHED_OTHER, SCHED_BATCH, SCHED_IDLE];

/**
 * Gives thread `tid` an EEVDF request size of `us` microseconds (0: the kernel's base slice),
 * keeping its policy and nice value (serve started under `chrt -b` or `-i` stays there). A
 * shorter slice than the running task's earns wake-up preemption (Linux 6.12, "sched/eevdf:
 * Allow shorter slices to wakeup-preempt") without a real-time policy and without a privilege:
 * only a lower nice or a real-time policy needs one. Kernels before 6.12 accept and ignore it;
 * getSlice then reads 0. A real-time thread has no slice: refused here, not sent.
 */
export function setSlice(tid: number, us: number): void {
  const { policy } = getScheduler(tid);
  if (!FAIR_POLICIES.includes(policy)) throw new ArgumentError(`thread ${tid} runs under real-time policy ${policy}: a slice applies to normal threads only`);
  const nice = getNice(tid);
  mask.bytes.fill(0, 0, SCHED_ATTR_SIZE);
  mask.view.setUint32(0, SCHED_ATTR_SIZE, true);
  mask.view.setUint32(4, policy, true);
  mask.view.setInt32(16, nice, true);
  mask.view.setBigUint64(24, BigInt(us) * 1000n, true);
  schedAttrCall(0, tid, `thread ${tid} to a ${us} µs slice`);
}

/** `0-2,5`: the kernel's list format (Cpus_allowed_list, cpuset.cpus), which taskset -c reads. */
export function formatCpuList(cpus: readonly number[]): string {
  const sorted = [...new Set(cpus)].sort((a, b) => a - b);
  const out: string[] = [];
  for (let i = 0; i < sorted.length;) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j]! + 1) j++;
    out.push(i === j ? `${sorted[i]}` : `${sorted[i]}-${sorted[j]}`);
    i = j + 1;
  }
  return out.join(',');
}
