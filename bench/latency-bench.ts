import { loadavg } from 'node:os';
import { startTestpmd, type Testpmd } from '../test/support/dpdk.js';
import { getMac } from '../test/support/netdev.js';
import { Pinger, type PingResult } from '../test/support/pinger.js';
import { GUEST_MAC, type BackendSeat } from './reference-dpdk.js';
import { startTapSeat } from './tap-seat.js';
import { pinSelf } from './pin-self.js';

/**
 * Round-trip latency (issue 18): host -> tap -> guest -> tap -> host. The guest is DPDK
 * testpmd on virtio-user in macswap (every frame goes straight back with its MACs swapped);
 * the backend seat is `serve --port tap:` or DPDK's vhost PMD <-io-> tap PMD; the host side is
 * the pinger (test/support/pinger.ts) on the tap, at a modest fixed rate, timing each echo by
 * its kernel receive stamp.
 */
export const LATENCY_PINNING = 'backend seat: core 1 (testpmd A forwarding lcore / every serve thread); guest (virtio-user macswap): forwarding lcore 0, main 1; pinger: core 0 beside the guest, sleeping between pings; the bench process: core 0 while the pings run';
/**
 * The second serve line: the same seat (every serve thread on core 1), the datapath worker under
 * SCHED_FIFO. Woken by a frame, it preempts whatever normal thread holds core 1 (a kernel thread
 * such as kdamond, a compile job of its own process, another tenant) instead of waiting for
 * its turn; testpmd A's forwarding lcore never sleeps, so it has no wake-up to lose.
 */
export const LATENCY_FIFO_ARGS = ['--worker-fifo', '1'];
/**
 * serve without its reply window (the default before DEFAULT_REPLY_POLL_US): what the window
 * buys. (What the worker's EEVDF slice bought, measured the same way with --worker-slice 0, is
 * in docs/benchmarks.md.)
 */
export const LATENCY_NO_REPLY_POLL_ARGS = ['--reply-poll', '0'];
export const LATENCY_FIFO_PINNING = `serve ${LATENCY_FIFO_ARGS.join(' ')}: the same seats, serve's datapath worker under SCHED_FIFO priority 1 (its other threads normal)`;
/** Pings per second: far below either backend's capacity, so queueing is not what is measured. */
export const PING_RATE = 1000;
/**
 * Seconds of uncounted pings first. Not just first touch of rings and mbufs: at 1000 pings/s
 * serve's datapath functions reach TurboFan over seconds, and V8 compiles them on its platform
 * threads, which share core 1 with the datapath worker; a worker woken while one compiles
 * waits its turn (perf sched, 2026-12-07: the worker's slow round trips in the first seconds
 * sat behind 0.3-0.5 ms compile jobs of its own process). With 0.5 s of warm-up they were in
 * the counted window and made most of its p99.
 */
export const LATENCY_WARMUP_S = 5;

export interface LatencySample extends PingResult {
  seat: BackendSeat;
  loadAvg1: number;
  backendWarnings: string[];
}

export async function measureLatency(seat: BackendSeat, seconds: number, serveArgs: string[] = []): Promise<LatencySample> {
  const loadAvg1 = Math.round(loadavg()[0]! * 100) / 100;
  const s = await startTapSeat(seat, 'lt', serveArgs);
  let guest: Testpmd | undefined;
  try {
    guest = await startTestpmd({
      name: `lt-${seat}-guest`,
      vdevs: [`net_virtio_user0,path=${s.sock},queues=1,queue_size=256,mac=${GUEST_MAC}`],
      forwardMode: 'macswap', cores: '0,1', mainLcore: 1, portTopology: 'loop',
    });
    // Warm-up pings, not counted, from the same pinger process (its JIT and first GCs on core 0
    // too) and long enough for serve's: see LATENCY_WARMUP_S.
    // This process waits out the window on core 0 too: left unpinned, its own threads (V8's
    // compile and GC, testpmd's output) ran on the backend's core 1 for 1-3 ms at a time
    // (perf sched, 2026-12-07), in front of whichever backend sat there.
    const unpin = pinSelf('0');
    let r: PingResult;
    try {
      r = await Pinger.run({ ifname: s.hostIf, srcMac: getMac(s.hostIf), dstMac: GUEST_MAC, rate: PING_RATE, seconds, warmupSeconds: LATENCY_WARMUP_S }, 0);
    } finally {
      unpin();
    }
    return { ...r, seat, loadAvg1, backendWarnings: s.warnings() };
  } finally {
    await guest?.stop();
    await s.stop();
  }
}
