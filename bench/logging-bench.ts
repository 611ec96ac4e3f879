// Throughput while migration dirty logging is on, against the same device with it off (issue 14:
// "throughput while logging is on >= 0.8x of throughput with it off"). The TS frontend is the
// guest: DPDK virtio-user could negotiate LOG_ALL but cannot hand over a log.
//
// One `serve --port tap` (all threads on core 1, the backend seat of bench/reference-dpdk.ts),
// one frontend in this process (core 0, with the generator). The log is set once (SET_LOG_BASE,
// VHOST_VRING_F_LOG on both rings); each window turns LOG_ALL on or off with the rings running.
// Rounds interleave the two (off first in odd rounds, on first in even ones) and each round's
// on/off ratio compares two windows that sat side by side; the median ratio is what to read.
//
// Counting as in the tap reference: guest->host = frames the tap's kernel side receives;
// host->guest = buffers the guest got back from the device while trafgen floods the tap.
import { writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { loadavg } from 'node:os';
import path from 'node:path';
import { CLI, tempDir } from '../test/support/backend.js';
import { spawnManaged, sleep, type ManagedProcess } from '../test/support/processes.js';
import { CleanupStack, disableIpv6, readLinkStats, uniqueIfName } from '../test/support/netdev.js';
import { TestFrontend } from '../test/support/frontend/test-frontend.js';
import type { GuestLog } from '../test/support/frontend/guest-log.js';
import { buildUdpFrame } from '../test/support/packet-socket.js';
import { callControl } from '../src/control/control-client.js';
import { ProtocolFeature, bit } from '../src/vhost-user/protocol.js';
import { measureKernelRate, startTrafgen, trafgenConfig, GUEST_MAC, HOST_MAC } from './reference-dpdk.js';

const PINNING = 'serve (all threads): taskset -c 1; TS frontend (this process) and trafgen: core 0';

export interface LoggingWindow {
  logging: boolean;
  guestToHostMpps: number;
  hostToGuestMpps: number;
  /** Host->guest: rate trafgen pushed into the tap (accepted + dropped). */
  offeredMpps: number;
  /** Pages the log held dirty after the window (0 with logging off: nothing may be marked). */
  dirtyPages: number;
}

export interface LoggingBenchResult {
  frameLen: number;
  seconds: number;
  pinning: string;
  loadAvg1: number;
  /** Per round: [logging off, logging on]. */
  rounds: [LoggingWindow, LoggingWindow][];
  guestToHostRatios: number[];
  hostToGuestRatios: number[];
}

const mpps = (packets: number, seconds: number): number => Math.round((packets / seconds / 1e6) * 1000) / 1000;

/** Guest->host for `seconds`: the frontend transmits as fast as the ring takes frames. */
function guestToHost(fe: TestFrontend, tap: string, frame: Uint8Array, seconds: number): number {
  const batch = Array.from({ length: 64 }, () => frame);
  const until = (ms: number): void => {
    const end = Date.now() + ms;
    while (Date.now() < end) fe.transmit(0, batch);
  };
  until(300); // warm-up
  const s0 = readLinkStats(tap).rxPackets;
  const t0 = process.hrtime.bigint();
  until(seconds * 1000);
  const s1 = readLinkStats(tap).rxPackets;
  return mpps(s1 - s0, Number(process.hrtime.bigint() - t0) / 1e9);
}

/** Host->guest for `seconds`: trafgen floods the tap, the frontend takes buffers back and reposts them. */
async function hostToGuest(fe: TestFrontend, tap: string, cfg: string, seconds: number, cleanup: CleanupStack): Promise<{ mpps: number; offered: number }> {
  const gen = startTrafgen(tap, cfg, 0);
  cleanup.push('stop trafgen', () => gen.stop('SIGINT', 3000));
  try {
    const drainFor = async (ms: number): Promise<number> => {
      let n = 0;
      const end = Date.now() + ms;
      // Yield now and then: the timer that ends the offered-rate window needs the event loop.
      for (let i = 0; Date.now() < end; i++) {
        n += fe.drainRx(0);
        if (i % 16 === 0) await new Promise((r) => setImmediate(r));
      }
      return n;
    };
    await drainFor(500); // warm-up
    const t0 = process.hrtime.bigint();
    const offered = measureKernelRate(tap, seconds, 'tx');
    const got = await drainFor(seconds * 1000);
    const o = await offered;
    return { mpps: mpps(got, Number(process.hrtime.bigint() - t0) / 1e9), offered: mpps(o.packets + o.dropped, o.seconds) };
  } finally {
    await gen.stop('SIGINT', 3000);
  }
}

export async function runLoggingBench(opts: { seconds?: number; rounds?: number; frameLen?: number } = {}): Promise<LoggingBenchResult> {
  const seconds = opts.seconds ?? 5;
  const rounds = opts.rounds ?? 1;
  const frameLen = opts.frameLen ?? 64;
  const loadAvg1 = Math.round(loadavg()[0]! * 100) / 100;
  const cleanup = new CleanupStack();
  const dir = tempDir('logbench');
  const sock = path.join(dir, 'dev.sock');
  const ctl = path.join(dir, 'ctl.sock');
  const tap = uniqueIfName('vxlb');
  // This process plays the guest on core 0 (as virtio-user does in the reference); restored after.
  const affinity = execFileSync('taskset', ['-pc', String(process.pid)], { encoding: 'utf8' }).trim().split(' ').at(-1)!;
  execFileSync('taskset', ['-apc', '0', String(process.pid)], { stdio: 'ignore' });
  cleanup.push('restore affinity', () => execFileSync('taskset', ['-apc', affinity, String(process.pid)], { stdio: 'ignore' }));
  let be: ManagedProcess | null = null;
  let fe: TestFrontend | null = null;
  let log: GuestLog | null = null;
  try {
    be = spawnManaged('taskset', ['-c', '1', process.execPath, CLI, 'serve', '--socket', sock, '--port', `tap:${tap}`, '--queues', '1',
      '--control', ctl, '--name', 'logbench', '--log-level', 'warn'], { name: 'vhost-xdp' });
    const backend = be;
    cleanup.push('stop vhost-xdp', () => backend.stop('SIGTERM', 5000));
    await be.waitForLine(/^vhost-xdp ready:/, 15_000);
    disableIpv6(tap);
    fe = await TestFrontend.connect(sock, { queueSize: 1024, memBytes: 64 << 20, protocolFeatures: bit(ProtocolFeature.LOG_SHMFD) });
    const frontend = fe;
    cleanup.push('close the frontend', () => frontend.close());
    log = await fe.startDirtyLog();
    const theLog = log;
    cleanup.push('close the log', () => theLog.close());
    const logging = async (): Promise<boolean> => ((await callControl(ctl, 'status', {})) as { devices: { logging: boolean }[] }).devices[0]!.logging;

    const frame = buildUdpFrame({ srcMac: HOST_MAC, dstMac: GUEST_MAC, srcIp: '198.19.0.1', dstIp: '198.19.0.2', srcPort: 9, dstPort: 9,
      payload: new Uint8Array(frameLen - 42), minFrameLen: frameLen });
    const out = buildUdpFrame({ srcMac: GUEST_MAC, dstMac: HOST_MAC, srcIp: '198.19.0.2', dstIp: '198.19.0.1', srcPort: 9, dstPort: 9,
      payload: new Uint8Array(frameLen - 42), minFrameLen: frameLen });
    const cfg = path.join(dir, 'flood.trafgen');
    writeFileSync(cfg, trafgenConfig(frame));

    const windowWith = async (on: boolean): Promise<LoggingWindow> => {
      // As QEMU does: the backend lets go of the log when logging goes off, and gets a log base
      // again before LOG_ALL comes back on.
      if (on) await fe!.setLogBase(log!.fd, log!.size);
      await fe!.setLogAll(on);
      if ((await logging()) !== on) throw new Error(`the backend did not turn logging ${on ? 'on' : 'off'}`);
      log!.clear();
      const g2h = guestToHost(fe!, tap, out, seconds);
      const h2g = await hostToGuest(fe!, tap, cfg, seconds, cleanup);
      await sleep(100);
      return { logging: on, guestToHostMpps: g2h, hostToGuestMpps: h2g.mpps, offeredMpps: h2g.offered, dirtyPages: log!.dirtyPages().size };
    };

    const result: LoggingBenchResult = { frameLen, seconds, pinning: PINNING, loadAvg1, rounds: [], guestToHostRatios: [], hostToGuestRatios: [] };
    for (let r = 0; r < rounds; r++) {
      let off: LoggingWindow;
      let on: LoggingWindow;
      if (r % 2 === 0) {
        off = await windowWith(false);
        on = await windowWith(true);
      } else {
        on = await windowWith(true);
        off = await windowWith(false);
      }
      if (off.dirtyPages !== 0) throw new Error(`${off.dirtyPages} pages marked with logging off`);
      if (on.dirtyPages === 0) throw new Error('nothing marked with logging on');
      result.rounds.push([off, on]);
      result.guestToHostRatios.push(off.guestToHostMpps > 0 ? on.guestToHostMpps / off.guestToHostMpps : 0);
      result.hostToGuestRatios.push(off.hostToGuestMpps > 0 ? on.hostToGuestMpps / off.hostToGuestMpps : 0);
    }
    const warnings = be.tail(200).split('\n').filter((l) => / (warn|error) /.test(l));
    for (const w of warnings) console.error(`  vhost-xdp logged: ${w}`);
    return result;
  } finally {
    await cleanup.run();
  }
}
