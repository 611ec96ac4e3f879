import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { sleep } from '../test/support/processes.js';

/** Clock ticks per second, the unit of utime/stime in /proc/PID/stat. */
export function clockTick(): number {
  const t = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
  if (!Number.isInteger(t) || t <= 0) throw new Error(`getconf CLK_TCK gave '${t}'`);
  return t;
}

/** utime + stime of a whole process (all threads), in clock ticks. */
export function cpuTicks(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  // comm (field 2) may hold spaces and parentheses: count fields from the last ')'. What follows
  // starts at field 3 (state), so utime (14) and stime (15) are the 12th and 13th.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

/** CPU the process used over `seconds` of wall time, in % of one core. */
export async function cpuPct(pid: number, seconds: number, tick: number): Promise<number> {
  const c0 = cpuTicks(pid);
  const t0 = process.hrtime.bigint();
  await sleep(seconds * 1000);
  const used = (cpuTicks(pid) - c0) / tick;
  return Math.round((10000 * used) / (Number(process.hrtime.bigint() - t0) / 1e9)) / 100;
}

/** One core's time from /proc/stat, in clock ticks since boot. */
export interface CoreTicks {
  /** user + nice (guest time is inside user). */
  user: number;
  /** system + irq + softirq: the kernel's work, wherever the scheduler accounted it. */
  kernel: number;
  /** idle + iowait. */
  idle: number;
  /** Taken by the hypervisor from this (virtual) core. */
  steal: number;
}

export function coreTicks(cpu: number): CoreTicks {
  const row = fs.readFileSync('/proc/stat', 'utf8').split('\n').find((l) => l.startsWith(`cpu${cpu} `));
  if (!row) throw new Error(`/proc/stat has no cpu${cpu} line`);
  const [user, nice, system, idle, iowait, irq, softirq, steal] = row.trim().split(/\s+/).slice(1, 9).map(Number) as number[];
  return { user: user! + nice!, kernel: system! + irq! + softirq!, idle: idle! + iowait!, steal: steal ?? 0 };
}

/** A core's time per frame over a window, split between user space and the kernel. */
export interface CoreCost {
  userNsPerFrame: number;
  kernelNsPerFrame: number;
  /** Shares of the window the core was idle and stolen, in %. */
  idlePct: number;
  stealPct: number;
}

/** What a core spent per frame between two readings, `frames` frames apart. */
export function coreCost(before: CoreTicks, after: CoreTicks, frames: number, tick: number): CoreCost {
  const d = (k: keyof CoreTicks): number => after[k] - before[k];
  const total = d('user') + d('kernel') + d('idle') + d('steal');
  const ns = (ticks: number): number => (frames > 0 ? Math.round(((ticks / tick) * 1e9) / frames) : 0);
  const pct = (ticks: number): number => (total > 0 ? Math.round((1000 * ticks) / total) / 10 : 0);
  return { userNsPerFrame: ns(d('user')), kernelNsPerFrame: ns(d('kernel')), idlePct: pct(d('idle')), stealPct: pct(d('steal')) };
}
