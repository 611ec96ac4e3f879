import { loadavg } from 'node:os';
import { sleep } from '../test/support/processes.js';
import { HOST_MAC, measureKernelRate, type BackendSeat } from './reference-dpdk.js';
import { startTapSeat } from './tap-seat.js';
import { PacedGuest } from './paced-guest.js';
import { clockTick, cpuPct } from './proc-cpu.js';

/**
 * Backend CPU at a fixed guest->host rate (issue 18): a paced TS-frontend guest (bench/paced-guest.ts)
 * sends 64-byte frames at `rate` into the tap seat; over the window, the backend process's
 * utime + stime (all threads, /proc/PID/stat) as % of one core, and what the tap received
 * (a backend that does not keep up shows as a lower delivered rate, not as a low CPU figure).
 */
export const CPU_PINNING = 'backend seat: core 1 (testpmd A forwarding lcore, main 0 / every serve thread); paced guest (TS frontend, sleeps between bursts): core 0';

export interface CpuSample {
  seat: BackendSeat;
  offeredPps: number;
  deliveredPps: number;
  /** Backend CPU over the window, % of one core. */
  cpuPct: number;
  /** Frames the guest's ring had no room for when due during the window (the backend fell behind). */
  behind: number;
  loadAvg1: number;
  backendWarnings: string[];
}

export async function measureBackendCpu(seat: BackendSeat, rate: number, seconds: number): Promise<CpuSample> {
  const loadAvg1 = Math.round(loadavg()[0]! * 100) / 100;
  const tick = clockTick();
  const s = await startTapSeat(seat, 'cpu');
  let guest: PacedGuest | undefined;
  try {
    guest = await PacedGuest.start(s.sock, rate, HOST_MAC, 0);
    await sleep(1000);
    const g0 = await guest.counts();
    const [pct, rx] = await Promise.all([cpuPct(s.pid, seconds, tick), measureKernelRate(s.hostIf, seconds, 'rx')]);
    const g1 = await guest.counts();
    return {
      seat, offeredPps: rate, deliveredPps: Math.round(rx.packets / rx.seconds), cpuPct: pct, behind: g1.behind - g0.behind, loadAvg1, backendWarnings: s.warnings(),
    };
  } finally {
    await guest?.stop();
    await s.stop();
  }
}
