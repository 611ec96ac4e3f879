import { rmSync } from 'node:fs';
import { startTestpmd } from '../test/support/dpdk.js';
import { CleanupStack, deleteLink, disableIpv6, uniqueIfName } from '../test/support/netdev.js';
import { startVhostXdp, type BackendSeat } from './reference-dpdk.js';

/**
 * The backend seat of a tap bench, either side: DPDK testpmd A (vhost PMD <-io-> tap PMD, main
 * lcore 0, forwarding lcore 1) or `serve --port tap:` with every thread on core 1, listening on
 * `sock` for the guest, the tap named `hostIf`. The same seat reference-dpdk.ts measures
 * throughput in, for the benches that put a different guest or load in front of it.
 */
export interface TapSeat {
  seat: BackendSeat;
  sock: string;
  hostIf: string;
  /** The process whose CPU time is the backend's (testpmd A, or serve: taskset execs it). */
  pid: number;
  /** vhost-xdp only: warnings and errors it logged (a round where it broke must not pass as a slow one). */
  warnings(): string[];
  stop(): Promise<void>;
}

/** `serveArgs`: extra `serve` options for the vhost-xdp seat (e.g. --tap-io rw). */
export async function startTapSeat(seat: BackendSeat, tag: string, serveArgs: string[] = []): Promise<TapSeat> {
  const cleanup = new CleanupStack();
  const sock = `/tmp/vx${tag}-${process.pid}-${seat}.sock`;
  const hostIf = uniqueIfName(`vx${tag}`);
  // The tap PMD and serve remove their taps; this covers one that was killed.
  cleanup.push(`delete ${hostIf}`, () => deleteLink(hostIf));
  cleanup.push('remove socket', () => rmSync(sock, { force: true }));
  try {
    let pid: number;
    let warnings = (): string[] => [];
    if (seat === 'vhost-xdp') {
      const be = await startVhostXdp(sock, `tap:${hostIf}`, cleanup, serveArgs);
      pid = be.pid;
      warnings = () => be.tail(200).split('\n').filter((l) => / (warn|error) /.test(l));
    } else {
      const a = await startTestpmd({
        name: `${tag}-A`, vdevs: [`net_vhost0,iface=${sock},queues=1`, `net_tap0,iface=${hostIf}`],
        forwardMode: 'io', cores: '0,1', mainLcore: 0,
      });
      cleanup.push('stop A', () => a.stop());
      pid = a.proc.pid;
    }
    disableIpv6(hostIf);
    return { seat, sock, hostIf, pid, warnings, stop: async () => { await cleanup.run(); } };
  } catch (e) {
    await cleanup.run();
    throw e;
  }
}
