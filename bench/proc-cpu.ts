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
