// A guest that sends at a fixed rate (issue 18's "backend CPU at a fixed 100 kpps"): DPDK 22.11
// testpmd's txonly has no rate limit (no --tx-pps; `set port ... rate` needs a PMD that shapes,
// which virtio-user does not), so the TS frontend plays the guest here, for both backends.
// Every tick it tops the frames sent up to rate x elapsed, in one burst (64-byte UDP frames
// like txonly's), then sleeps (Atomics.wait: a thread sleep, not a busy loop; a paced guest
// leaves its core mostly idle). Run as a script:
//   node paced-guest.js SOCKET RATE DST_MAC
// prints `pacing` once connected and, at each SIGUSR1, `{"sent":N,"behind":M}` (M: frames not
// sent when due: the ring was full, or the guest itself was off its core); SIGTERM ends it.
import { pathToFileURL, fileURLToPath } from 'node:url';
import { TestFrontend } from '../test/support/frontend/test-frontend.js';
import { buildUdpFrame } from '../test/support/packet-socket.js';
import { spawnManaged, type ManagedProcess } from '../test/support/processes.js';
import { GUEST_MAC } from './reference-dpdk.js';

const SELF = fileURLToPath(import.meta.url);
/** Sleep between bursts: 100 kpps comes out as bursts of ~25 frames. */
const TICK_MS = 0.25;

export class PacedGuest {
  private constructor(private readonly proc: ManagedProcess) {}

  /** Connects a paced TS-frontend guest to `sock` from a process pinned to `cpu`. */
  static async start(sock: string, rate: number, dstMac: string, cpu: number): Promise<PacedGuest> {
    const proc = spawnManaged('taskset', ['-c', String(cpu), process.execPath, SELF, sock, String(rate), dstMac], { name: 'paced-guest' });
    await proc.waitForLine(/^pacing$/, 20_000);
    return new PacedGuest(proc);
  }

  /** What it has sent so far and how many frames found the ring full when due (SIGUSR1 makes it print them). */
  async counts(): Promise<{ sent: number; behind: number }> {
    const from = this.proc.lineCount;
    this.proc.child.kill('SIGUSR1');
    const m = await this.proc.waitForLine(/^\{"sent".*\}$/, 5000, from);
    return JSON.parse(m[0]) as { sent: number; behind: number };
  }

  async stop(): Promise<void> {
    await this.proc.stop('SIGTERM', 5000);
  }
}

async function pacedMain(sock: string, rate: number, dstMac: string): Promise<void> {
  // 1024 descriptors: ~10 ms of frames at 100 kpps, so a backend the scheduler leaves off its
  // core for a few milliseconds catches up instead of the ring overflowing (same for both).
  const fe = await TestFrontend.connect(sock, { queueSize: 1024 });
  const frame = buildUdpFrame({
    srcMac: GUEST_MAC, dstMac, srcIp: '198.18.0.1', dstIp: '198.18.0.2', srcPort: 9, dstPort: 9, payload: new Uint8Array(22), udpChecksum: false,
  });
  const burst = Array.from({ length: 1024 }, () => frame);
  let stopping = false;
  process.on('SIGTERM', () => { stopping = true; });
  process.on('SIGINT', () => { stopping = true; });
  process.on('SIGUSR1', () => process.stdout.write(`${JSON.stringify({ sent, behind })}\n`));
  const nap = new Int32Array(new SharedArrayBuffer(4));
  const t0 = process.hrtime.bigint();
  let sent = 0;
  let behind = 0;
  process.stdout.write('pacing\n');
  while (!stopping) {
    const due = Math.floor((Number(process.hrtime.bigint() - t0) / 1e9) * rate) - sent - behind;
    if (due > 0) {
      const n = fe.transmit(0, burst.slice(0, Math.min(due, burst.length)));
      sent += n;
      // What did not fit (ring full, or more due than one burst after the guest was off its
      // core) is not sent late: a fixed rate means late frames are lost, and counted.
      behind += due - n;
    }
    Atomics.wait(nap, 0, 0, TICK_MS);
    // Signals are delivered between turns of the event loop.
    await new Promise((r) => setImmediate(r));
  }
  fe.close();
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [sock, rate, dstMac] = process.argv.slice(2);
  if (!sock || !(Number(rate) > 0) || !dstMac) {
    process.stderr.write('usage: paced-guest SOCKET RATE DST_MAC\n');
    process.exit(2);
  }
  pacedMain(sock, Number(rate), dstMac).catch((e: unknown) => {
    process.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
    process.exit(1);
  });
}
