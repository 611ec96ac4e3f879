import { writeFileSync, rmSync } from 'node:fs';
import { loadavg } from 'node:os';
import { pathToFileURL } from 'node:url';
import { startTestpmd, type Testpmd, type PortStats } from '../test/support/dpdk.js';
import { spawnManaged, sleep, type ManagedProcess } from '../test/support/processes.js';
import {
  CleanupStack, createVethPair, deleteLink, disableIpv6, readLinkStats, uniqueIfName, vethXdpCounters, type LinkStats,
} from '../test/support/netdev.js';
import { XdpFlood } from '../test/support/xdp-flood.js';
import { defaultPeerName } from '../src/ports/xsk.js';
import { buildUdpFrame } from '../test/support/packet-socket.js';
import { CLI } from '../test/support/backend.js';
import { clockTick, coreCost, coreTicks, type CoreCost } from './proc-cpu.js';

/**
 * DPDK's own numbers for the paths vhost-xdp implements, measured in the same run as the
 * backend's benches so both see the same machine state.
 *
 *   testpmd A ("the backend"): net_vhost0 (vhost-user server) <-io-> host port PMD
 *                              (net_tap0 = a kernel tap, or net_af_xdp0 on one end of a veth)
 *   testpmd B ("the guest"):   net_virtio_user0 (client) in txonly (guest->host) or rxonly
 *                              (host->guest)
 *
 * Pinning on a 2-core machine (cores 0 and 1):
 *   core 1: A's forwarding lcore (A main lcore on core 0). This is the seat the vhost-xdp
 *           datapath worker gets in the matching bench, so the comparison is backend vs backend.
 *   core 0: B's forwarding lcore (B main lcore on core 1; mains only wake to print stats),
 *           and for host->guest also the generator (taskset -c 0, one process): trafgen on
 *           the tap, the live-frames XDP flood (test/support/xdp-flood.ts) on the veth.
 * In host->guest, the generator and B's busy-polling rxonly loop share core 0, so the offered
 * load is bounded by what the generator gets of that core; the result reports the offered rate beside
 * the delivered one so a generator-bound run is visible as such. Use the same pinning when
 * measuring vhost-xdp. fairHostToGuest adds a window with B's forwarding lcore moved to core 1
 * and core 0 left to the generator (FAIR_PLACEMENT).
 *
 * Counting: guest->host = packets the host kernel receives on the tap (or the veth peer),
 * from its own counters; host->guest = packets virtio-user (B) receives, from testpmd's
 * periodic NIC stats.
 */

export interface ReferenceOptions {
  /** Measurement window per direction (after warm-up). Default 5. */
  seconds?: number;
  /** Ethernet frame length without FCS. Default 64. */
  frameLen?: number;
  warmupSeconds?: number;
  /**
   * When set, a second guest->host window with frames of this length, on the same backend right
   * after the 64-byte one (details.guestToHostLarge): big frames cost the backend per byte, not per frame.
   */
  largeFrameLen?: number;
  /**
   * Also measure host->guest with the generator alone on core 0 and the guest's forwarding lcore
   * beside the backend on core 1 (details.hostToGuestFair); see FAIR_PLACEMENT.
   */
  fairHostToGuest?: boolean;
  /** More `serve` arguments for the vhost-xdp seat (e.g. --tap-io rw). */
  serveArgs?: string[];
}

export interface DirectionDetails {
  mpps: number;
  packets: number;
  seconds: number;
  /** Host->guest only: rate the generator pushed into the host port (tap: accepted + dropped; veth: frames that reached the backend's end). */
  offeredMpps?: number;
  /** Frames the kernel dropped on the host port during the window (tap queue full etc.). */
  hostPortDropped?: number;
  /** Guest->host with largeFrameLen: frame length and the bit rate the host received (Ethernet frames without FCS). */
  frameLen?: number;
  gbps?: number;
  /**
   * Guest->host only: what the backend's core (BACKEND_CORE) spent per frame the host received,
   * user space apart from the kernel. The frame takes the same kernel path in both seats (tun
   * write, AF_XDP copy-mode transmit into a veth): this shows how much of a ratio user space can move.
   */
  backendCore?: CoreCost;
}

export interface ReferenceResult {
  guestToHostMpps: number;
  hostToGuestMpps: number;
  details: {
    kind: 'tap' | 'af_xdp';
    frameLen: number;
    pinning: string;
    /** 1-minute load average before the run: above ~2 on 2 cores means others competed for CPU. */
    loadAvg1: number;
    guestToHost: DirectionDetails;
    hostToGuest: DirectionDetails;
    /** With largeFrameLen: guest->host with frames of that length, same backend. */
    guestToHostLarge?: DirectionDetails;
    /** With fairHostToGuest: host->guest with FAIR_PLACEMENT. */
    hostToGuestFair?: DirectionDetails & { placement: string };
    /** af_xdp only: host->guest with the flood pinned to the backend's core (1) instead of the guest's (0). */
    hostToGuestFloodOnBackendCore?: DirectionDetails;
    /** vhost-xdp seat only: the warnings and errors it logged during the run. */
    backendWarnings?: string[];
  };
}

const PINNING = 'A(vhost PMD <-io-> host PMD): main lcore 0, forwarding lcore 1; B(virtio-user): main lcore 1, forwarding lcore 0; generator (trafgen on tap, XDP live-frames flood on veth): taskset -c 0, 1 process';
/**
 * Host->guest with the generator starved by nobody: on two cores it gets core 0 to itself
 * (trafgen, one process), and the guest's forwarding lcore (B: main lcore 0, forwarding lcore 1)
 * shares core 1 with the backend's seat (A's forwarding lcore, or every vhost-xdp thread), the
 * same for both backends. The offered load then no longer depends on who busy-polls the
 * generator's core (with the flood on the guest's core DPDK read 0.03 Mpps: the guest's time
 * slices, not either backend, set the figure). What remains shared is the backend's core: two
 * busy-pollers (DPDK's A and B) split it by the scheduler's time slices, an event-driven backend
 * takes it when it has work; that difference is the thing measured. The mains only wake to print stats.
 */
export const FAIR_PLACEMENT = 'generator alone on core 0; guest (virtio-user forwarding lcore) and backend share core 1; mains on core 0';
/** The backend seat's core: testpmd A's forwarding lcore, or every thread of serve. */
export const BACKEND_CORE = 1;
export const GUEST_MAC = '02:00:00:00:0b:01';
export const HOST_MAC = '02:00:00:00:0a:01';

function rateBetween(a: { at: number; ports: PortStats[] }, b: { at: number; ports: PortStats[] }, port: number, field: 'rxPackets' | 'txPackets'): { packets: number; seconds: number } {
  const pa = a.ports.find((p) => p.port === port);
  const pb = b.ports.find((p) => p.port === port);
  if (!pa || !pb) throw new Error(`no stats for port ${port}`);
  return { packets: pb[field] - pa[field], seconds: (b.at - a.at) / 1000 };
}

/** Trafgen config whose only packet is `frame` (literal bytes, so no cpp run is needed). */
export function trafgenConfig(frame: Uint8Array): string {
  return `{\n  ${Array.from(frame, (b) => `0x${b.toString(16).padStart(2, '0')}`).join(', ')}\n}\n`;
}

export function startTrafgen(ifname: string, cfgPath: string, cpu: number): ManagedProcess {
  // -P 1: one process (trafgen otherwise forks one per CPU); --no-sock-mem/--notouch-irq: leave socket memory
  // sysctls and IRQ affinities alone (they would stay changed if trafgen were killed);
  // -C: no CPU stats. Default TX_RING with qdisc bypass, infinite count until SIGINT.
  return spawnManaged('taskset', ['-c', String(cpu), 'trafgen', '-o', ifname, '-i', cfgPath, '-P', '1', '--no-sock-mem', '--notouch-irq', '-C'], { name: 'trafgen' });
}

export async function measureKernelRate(ifname: string, seconds: number, counter: 'rx' | 'tx'): Promise<{ packets: number; seconds: number; dropped: number }> {
  const s0: LinkStats = readLinkStats(ifname);
  const t0 = process.hrtime.bigint();
  await sleep(seconds * 1000);
  const s1: LinkStats = readLinkStats(ifname);
  const dt = Number(process.hrtime.bigint() - t0) / 1e9;
  return counter === 'rx'
    ? { packets: s1.rxPackets - s0.rxPackets, seconds: dt, dropped: s1.rxDropped - s0.rxDropped }
    : { packets: s1.txPackets - s0.txPackets, seconds: dt, dropped: s1.txDropped - s0.txDropped };
}

let tick: number | undefined;

/** Guest->host: what the host port received in the window, and what the backend's core spent per frame meanwhile. */
async function measureGuestToHost(hostIf: string, seconds: number): Promise<{ packets: number; seconds: number; dropped: number; core: CoreCost }> {
  tick ??= clockTick();
  const before = coreTicks(BACKEND_CORE);
  const r = await measureKernelRate(hostIf, seconds, 'rx');
  return { ...r, core: coreCost(before, coreTicks(BACKEND_CORE), r.packets, tick) };
}

/** Frames the XDP program on a veth end saw in the window (all reached the backend's end). */
async function measureXdpArrivals(ifname: string, seconds: number): Promise<{ packets: number; seconds: number; dropped: number }> {
  const c0 = vethXdpCounters(ifname).xdp_packets ?? 0;
  const t0 = process.hrtime.bigint();
  await sleep(seconds * 1000);
  const c1 = vethXdpCounters(ifname).xdp_packets ?? 0;
  return { packets: c1 - c0, seconds: Number(process.hrtime.bigint() - t0) / 1e9, dropped: 0 };
}

/** Who sits in the backend seat (core 1): DPDK's testpmd, or vhost-xdp serve. */
export type BackendSeat = 'dpdk' | 'vhost-xdp';

/** vhost-xdp serve pinned to BACKEND_CORE (all its threads), the seat testpmd A has in the reference. */
export async function startVhostXdp(sock: string, port: string, cleanup: CleanupStack, extra: string[] = []): Promise<ManagedProcess> {
  // Its own control socket: the default one may be held by another serve on this machine,
  // which makes this one refuse to start.
  const control = `${sock}.ctl`;
  const be = spawnManaged('taskset', ['-c', String(BACKEND_CORE), process.execPath, CLI, 'serve', '--socket', sock, '--port', port, '--control', control, '--log-level', 'warn', ...extra], { name: 'vhost-xdp' });
  cleanup.push('stop vhost-xdp', () => be.stop('SIGTERM', 5000));
  await be.waitForLine(/^vhost-xdp ready:/, 15_000);
  return be;
}

async function measure(kind: 'tap' | 'af_xdp', opts: ReferenceOptions, seat: BackendSeat = 'dpdk'): Promise<ReferenceResult> {
  const seconds = opts.seconds ?? 5;
  const frameLen = opts.frameLen ?? 64;
  const warmup = opts.warmupSeconds ?? 1;
  if (frameLen < 60 || frameLen > 1514) throw new RangeError('frameLen must be within 60..1514');
  const loadAvg1 = Math.round(loadavg()[0]! * 100) / 100;
  const cleanup = new CleanupStack();
  const sock = `/tmp/vxref-${process.pid}-${kind}.sock`;
  const cfg = `/tmp/vxref-${process.pid}-${kind}.trafgen`;
  let a: Testpmd | undefined;
  let backend: ManagedProcess | undefined;
  let b: Testpmd | undefined;
  try {
    // hostIf: where the host kernel sees traffic; trafgen injects there too.
    let hostIf: string;
    let portVdev: string;
    /** The veth end the backend reads (af_xdp): where host->guest frames arrive. */
    let backendEnd: string | undefined;
    if (kind === 'tap') {
      hostIf = uniqueIfName('vxrt');
      portVdev = `net_tap0,iface=${hostIf}`;
      // The tap PMD creates and removes the tap; this only covers a testpmd that was killed.
      cleanup.push(`delete ${hostIf}`, () => deleteLink(hostIf));
    } else if (seat === 'vhost-xdp') {
      // `--port xsk:IF` makes the veth pair itself; IF is the end the host uses.
      hostIf = uniqueIfName('vxrp');
      backendEnd = defaultPeerName(hostIf);
      portVdev = '';
      cleanup.push(`delete ${hostIf}`, () => deleteLink(hostIf));
    } else {
      const pmdEnd = uniqueIfName('vxrx');
      hostIf = uniqueIfName('vxrp');
      createVethPair(pmdEnd, hostIf);
      backendEnd = pmdEnd;
      cleanup.link(pmdEnd);
      portVdev = `net_af_xdp0,iface=${pmdEnd},start_queue=0,queue_count=1`;
    }
    cleanup.push('remove socket', () => rmSync(sock, { force: true }));
    if (seat === 'vhost-xdp') {
      backend = await startVhostXdp(sock, `${kind === 'tap' ? 'tap' : 'xsk'}:${hostIf}`, cleanup, opts.serveArgs);
    } else {
      a = await startTestpmd({
        name: `ref-${kind}-A`, vdevs: [`net_vhost0,iface=${sock},queues=1`, portVdev],
        forwardMode: 'io', cores: '0,1', mainLcore: 0,
      });
      cleanup.push('stop A', () => a?.stop());
    }
    if (kind === 'tap') disableIpv6(hostIf);

    // Guest -> host: B transmits as fast as it can; count what the kernel receives.
    b = await startTestpmd({
      name: `ref-${kind}-B-tx`,
      vdevs: [`net_virtio_user0,path=${sock},queues=1,queue_size=256,mac=${GUEST_MAC}`],
      forwardMode: 'txonly', txpkts: frameLen, cores: '0,1', mainLcore: 1, ethPeers: [HOST_MAC],
    });
    await sleep(warmup * 1000);
    const g2h = await measureGuestToHost(hostIf, seconds);
    await b.stop();
    b = undefined;
    const g2hLarge = opts.largeFrameLen === undefined ? null : await (async () => {
      b = await startTestpmd({
        name: `ref-${kind}-B-tx${opts.largeFrameLen}`,
        vdevs: [`net_virtio_user0,path=${sock},queues=1,queue_size=256,mac=${GUEST_MAC}`],
        forwardMode: 'txonly', txpkts: opts.largeFrameLen, cores: '0,1', mainLcore: 1, ethPeers: [HOST_MAC],
      });
      await sleep(warmup * 1000);
      const r = await measureGuestToHost(hostIf, seconds);
      await b.stop();
      b = undefined;
      return r;
    })();

    // Host -> guest: trafgen into the host port; count what virtio-user receives.
    const frame = buildUdpFrame({
      srcMac: HOST_MAC, dstMac: GUEST_MAC, srcIp: '198.19.0.1', dstIp: '198.19.0.2', srcPort: 9, dstPort: 9,
      payload: new Uint8Array(frameLen - 42), minFrameLen: frameLen,
    });
    writeFileSync(cfg, trafgenConfig(frame));
    cleanup.push('remove trafgen config', () => rmSync(cfg, { force: true }));
    b = await startTestpmd({
      name: `ref-${kind}-B-rx`,
      vdevs: [`net_virtio_user0,path=${sock},queues=1,queue_size=256,mac=${GUEST_MAC}`],
      forwardMode: 'rxonly', cores: '0,1', mainLcore: 1,
    });
    // A veth's receiving end takes frames at XDP speed, faster than trafgen can push them
    // through a socket from a shared core (it topped out near 0.2 Mpps): flood it with the
    // live-frames XDP generator and count what reached the backend's end (its XDP counters).
    // A tap has no such path; trafgen is the flood there.
    const hostToGuestWindow = async (genCpu: number, guest: Testpmd): Promise<{ h2g: { packets: number; seconds: number }; offered: { packets: number; seconds: number; dropped: number } }> => {
      let stopGen: () => Promise<unknown>;
      if (kind === 'af_xdp') {
        const flood = await XdpFlood.start(hostIf, frame, genCpu);
        stopGen = () => flood.stop();
      } else {
        const gen = startTrafgen(hostIf, cfg, genCpu);
        stopGen = () => gen.stop('SIGINT', 3000);
      }
      cleanup.push('stop the generator', stopGen);
      await sleep(warmup * 1000);
      const histStart = guest.history.length;
      const offered = kind === 'af_xdp' ? await measureXdpArrivals(backendEnd!, seconds) : await measureKernelRate(hostIf, seconds, 'tx');
      // Wait for one more stats period so the window is covered by two snapshots.
      await guest.waitForStats(() => guest.history.length >= histStart + seconds, 3000).catch(() => undefined);
      const first = guest.history[histStart - 1] ?? guest.history[histStart];
      const last = guest.history.at(-1);
      if (!first || !last || first === last) throw new Error('testpmd B printed no stats during the host->guest window');
      const h2g = rateBetween(first, last, 0, 'rxPackets');
      await stopGen();
      return { h2g, offered };
    };
    const { h2g, offered } = await hostToGuestWindow(0, b);
    // On two cores the flood shares a core with someone. On the guest's core (above) it starves
    // the guest, and the result mostly says how much a backend buffers between the guest's time
    // slices. On the backend's core it competes with the backend itself: the other view.
    const onBackendCore = kind === 'af_xdp' ? await hostToGuestWindow(1, b) : null;
    await b.stop();
    b = undefined;
    let fair: Awaited<ReturnType<typeof hostToGuestWindow>> | null = null;
    if (opts.fairHostToGuest) {
      // FAIR_PLACEMENT: the same guest, its forwarding lcore moved beside the backend.
      b = await startTestpmd({
        name: `ref-${kind}-B-rx-fair`,
        vdevs: [`net_virtio_user0,path=${sock},queues=1,queue_size=256,mac=${GUEST_MAC}`],
        forwardMode: 'rxonly', cores: '0,1', mainLcore: 0,
      });
      fair = await hostToGuestWindow(0, b);
    }

    const mpps = (p: number, s: number): number => Math.round((p / s / 1e6) * 1000) / 1000;
    return {
      guestToHostMpps: mpps(g2h.packets, g2h.seconds),
      hostToGuestMpps: mpps(h2g.packets, h2g.seconds),
      details: {
        kind,
        frameLen,
        pinning: PINNING,
        loadAvg1,
        guestToHost: { mpps: mpps(g2h.packets, g2h.seconds), packets: g2h.packets, seconds: g2h.seconds, hostPortDropped: g2h.dropped, backendCore: g2h.core },
        ...(g2hLarge ? {
          guestToHostLarge: {
            mpps: mpps(g2hLarge.packets, g2hLarge.seconds), packets: g2hLarge.packets, seconds: g2hLarge.seconds, hostPortDropped: g2hLarge.dropped,
            frameLen: opts.largeFrameLen, gbps: Math.round((g2hLarge.packets * opts.largeFrameLen! * 8) / g2hLarge.seconds / 1e6) / 1000,
            backendCore: g2hLarge.core,
          },
        } : {}),
        ...(fair ? {
          hostToGuestFair: {
            mpps: mpps(fair.h2g.packets, fair.h2g.seconds), packets: fair.h2g.packets, seconds: fair.h2g.seconds,
            offeredMpps: mpps(fair.offered.packets + fair.offered.dropped, fair.offered.seconds), hostPortDropped: fair.offered.dropped,
            placement: FAIR_PLACEMENT,
          },
        } : {}),
        hostToGuest: {
          mpps: mpps(h2g.packets, h2g.seconds), packets: h2g.packets, seconds: h2g.seconds,
          offeredMpps: mpps(offered.packets + offered.dropped, offered.seconds), hostPortDropped: offered.dropped,
        },
        ...(onBackendCore ? {
          hostToGuestFloodOnBackendCore: {
            mpps: mpps(onBackendCore.h2g.packets, onBackendCore.h2g.seconds), packets: onBackendCore.h2g.packets, seconds: onBackendCore.h2g.seconds,
            offeredMpps: mpps(onBackendCore.offered.packets, onBackendCore.offered.seconds),
          },
        } : {}),
        // A round where the backend broke (a ring reset, say) must say so, not pass as a slow one.
        ...(backend ? { backendWarnings: backend.tail(200).split('\n').filter((l) => / (warn|error) /.test(l)) } : {}),
      },
    };
  } finally {
    if (b) await b.stop();
    await cleanup.run();
  }
}

/** DPDK vhost PMD <-io-> tap PMD, virtio-user as the guest (ENV-FACTS: ~1.19 Mpps guest->host). */
export function measureDpdkTapReference(opts: ReferenceOptions = {}): Promise<ReferenceResult> {
  return measure('tap', opts);
}

/** vhost-xdp serve --port tap in the backend seat: same guest, generator, pinning and counting. */
export function measureVhostXdpTap(opts: ReferenceOptions = {}): Promise<ReferenceResult> {
  return measure('tap', opts, 'vhost-xdp');
}

/** vhost-xdp serve --port xsk (AF_XDP over guest RAM) in the backend seat. */
export function measureVhostXdpXsk(opts: ReferenceOptions = {}): Promise<ReferenceResult> {
  return measure('af_xdp', opts, 'vhost-xdp');
}

/** DPDK vhost PMD <-io-> af_xdp PMD on a veth pair (ENV-FACTS: ~1.34 Mpps guest->host). */
export function measureDpdkAfXdpReference(opts: ReferenceOptions = {}): Promise<ReferenceResult> {
  return measure('af_xdp', opts);
}

async function main(): Promise<void> {
  const argSeconds = Number(process.argv[2] ?? '5');
  const seconds = Number.isFinite(argSeconds) && argSeconds > 0 ? argSeconds : 5;
  const tap = await measureDpdkTapReference({ seconds });
  let afXdp: ReferenceResult | { error: string };
  try {
    afXdp = await measureDpdkAfXdpReference({ seconds });
  } catch (e) {
    afXdp = { error: (e as Error).message.split('\n')[0]! };
  }
  process.stdout.write(`${JSON.stringify({ tap, afXdp }, null, 2)}\n`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e: unknown) => {
    process.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
    process.exit(1);
  });
}
