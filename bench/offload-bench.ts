import fs from 'node:fs';
import { loadavg } from 'node:os';
import { defaultPeerName } from '../src/ports/xsk.js';
import path from 'node:path';
import { spawnManaged, sleep, type ManagedProcess } from '../test/support/processes.js';
import { tempDir, CLI } from '../test/support/backend.js';
import { TestFrontend } from '../test/support/frontend/test-frontend.js';
import { OffloadClient, offloadSample, requireOk } from '../test/support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6, vethXdpCounters } from '../test/support/netdev.js';
import { buildUdpFrame } from '../test/support/packet-socket.js';
import { XdpFlood, TcEgressFlood } from '../test/support/xdp-flood.js';
import { Epoll, EPOLLIN } from '../src/sys/libc.js';
import { callControl } from '../src/control/control-client.js';
import { clockTick, cpuTicks } from './proc-cpu.js';
import { encodeMapCreate, encodeProgUnset, encodeElemUpdate, encodeElemLookup, encodeUpdateBatch, decodeMapCreateBody } from '../src/offload/guest/codec.js';

const GUEST_MAC = '02:00:00:00:0b:01';
const HOST_MAC = '02:00:00:00:0a:01';


/** Map round trips through the offload queue: the broker's path, the same whatever the port. */
export interface MapOpsResult {
  singleUpdatesPerSec: number;
  singleLookupsPerSec: number;
  batchedElementOpsPerSec: number;
  batchSize: number;
}

export interface OffloadBenchResult {
  /** Measured on the tap port only (the xsk port would repeat the same broker path). */
  maps?: MapOpsResult;
  hostToGuest: {
    deliveredPps: number; offloadDropPps: number; ratio: number; offeredPps: { delivered: number; dropped: number };
    /** The backend's CPU in each window, % of one core (utime + stime of the serve process): what a frame costs it. */
    backendCpuPct: { delivered: number; dropped: number };
    /**
     * xsk, and a tap whose program runs at tc egress: the drop rate with a second generator on
     * the backend's core, which idles while every frame dies in the kernel: the drop path's
     * capacity, as far as two cores can offer.
     */
    dropCapacity?: { pps: number; offeredPps: number; ratioToDelivered: number };
  };
  /** Where XDP_DROP ran: tap-tc (the tap's tc egress), tap-test-run (per frame in the backend), xdp-native (xsk). */
  path: string;
  pinning: string;
  /** What flooded the host port in this run (XdpFlood falls back where the kernel refuses live frames). */
  generator: string;
  /** 1-minute load average when the round started (2 cores: above ~2 other tenants competed). */
  loadAvg1: number;
}

const PINNING = 'backend (all threads): taskset -c 1; TS frontend (this process) and the generator (tap: test-run bpf_clone_redirect through the tap\'s tc egress; xsk: the live-frames XDP flood): core 0; drop capacity (xsk; tap at tc egress): a second generator of the same kind on core 1';

async function rate(seconds: number, op: () => Promise<number>): Promise<number> {
  const end = Date.now() + seconds * 1000;
  let n = 0;
  const t0 = process.hrtime.bigint();
  while (Date.now() < end) n += await op();
  return n / (Number(process.hrtime.bigint() - t0) / 1e9);
}

async function measureMapOps(oc: OffloadClient, seconds: number): Promise<MapOpsResult> {
  const map = decodeMapCreateBody(requireOk(await oc.call(encodeMapCreate(oc.nextSeq(), { type: 1, keySize: 4, valueSize: 8, maxEntries: 65536, name: 'bench' }))).body).handle;
  const key = new Uint8Array(4);
  const kv = new DataView(key.buffer);
  const value = new Uint8Array(8);
  let i = 0;
  const singleUpdatesPerSec = await rate(seconds, async () => {
    kv.setUint32(0, i++ & 0xffff, true);
    requireOk(await oc.call(encodeElemUpdate(oc.nextSeq(), map, key, value)));
    return 1;
  });
  const written = Math.min(i, 65536);
  let j = 0;
  const singleLookupsPerSec = await rate(seconds, async () => {
    kv.setUint32(0, j++ % written, true);
    requireOk(await oc.call(encodeElemLookup(oc.nextSeq(), map, key)));
    return 1;
  });
  const batchSize = 1024;
  const keys = new Uint8Array(batchSize * 4);
  const values = new Uint8Array(batchSize * 8);
  const kd = new DataView(keys.buffer);
  const batchedElementOpsPerSec = await rate(seconds, async () => {
    for (let k = 0; k < batchSize; k++) kd.setUint32(k * 4, (i++ & 0xffff), true);
    requireOk(await oc.call(encodeUpdateBatch(oc.nextSeq(), map, keys, values, batchSize)));
    return batchSize;
  });
  return {
    singleUpdatesPerSec: Math.round(singleUpdatesPerSec), singleLookupsPerSec: Math.round(singleLookupsPerSec),
    batchedElementOpsPerSec: Math.round(batchedElementOpsPerSec), batchSize,
  };
}

/**
 * The TS frontend as the guest of `serve --offload --queues 1` at `sock` (a data pair and the
 * reserved pair), its offload client spinning and the channel claimed. Closes the frontend on failure.
 */
export async function connectClaimedGuest(sock: string): Promise<{ fe: TestFrontend; oc: OffloadClient }> {
  const fe = await TestFrontend.connect(sock, { queuePairs: 2, queueSize: 1024, memBytes: 64 << 20 });
  try {
    const oc = new OffloadClient(fe, 1);
    oc.spin = true;
    requireOk(await oc.claim());
    return { fe, oc };
  } catch (e) {
    fe.close();
    throw e;
  }
}

/**
 * The XDP_DROP effect on a host->guest flood through `kind`'s port, and on the tap port also
 * map round trips through the offload queue.
 */
export async function runOffloadBench(seconds = 3, kind: 'tap' | 'xsk' = 'tap'): Promise<OffloadBenchResult> {
  const dir = tempDir('obench');
  const sock = path.join(dir, 'dev.sock');
  const tap = uniqueIfName('vxob');
  const ctl = path.join(dir, 'ctl.sock');
  let be: ManagedProcess | null = null;
  let flood: XdpFlood | TcEgressFlood | null = null;
  let flood2: XdpFlood | TcEgressFlood | null = null;
  let idle: Epoll | null = null;
  let fe: TestFrontend | null = null;
  const loadAvg1 = loadavg()[0]!;
  try {
    be = spawnManaged('taskset', ['-c', '1', process.execPath, CLI, 'serve', '--socket', sock, '--port', `${kind}:${tap}`, '--queues', '1', '--offload', '--control', ctl, '--name', 'bench', '--log-level', 'warn'], { name: 'vhost-xdp' });
    await be.waitForLine(/^vhost-xdp ready:/, 15_000);
    if (kind === 'tap') disableIpv6(tap);
    const guest = await connectClaimedGuest(sock);
    fe = guest.fe;
    const oc = guest.oc;
    const maps = kind === 'tap' ? await measureMapOps(oc, seconds) : undefined;

    // Host -> guest flood: delivered to the guest without offload vs dropped on the host with XDP_DROP.
    const frame = buildUdpFrame({ srcMac: HOST_MAC, dstMac: GUEST_MAC, srcIp: '198.19.0.1', dstIp: '198.19.0.2', srcPort: 9, dstPort: 9, payload: new Uint8Array(22) });
    // Both generators repeat a test-run program in the kernel, many frames per syscall. The xsk
    // port's drops happen at the veth's XDP, which the live-frames XDP flood reaches. The tap
    // runs the program at its tc egress, which ndo_xdp_xmit (and trafgen's default
    // PACKET_QDISC_BYPASS) skip: its flood sends skb clones through dev_queue_xmit, as host
    // traffic goes. The drop runs inside the sender's transmit, so the sender must cost little
    // beside it (trafgen -q made the drop window its own socket path's rate: docs/benchmarks.md).
    // The same flood feeds both windows: the ratio compares the paths, not two generators.
    const startFlood = (cpu: number) => (kind === 'xsk' ? XdpFlood.start(tap, frame, cpu) : TcEgressFlood.start(tap, frame, cpu));
    flood = await startFlood(0);
    const counters = async () => (await callControl(ctl, 'stats', { name: 'bench' }) as Array<{ total: Record<string, number>; port: Record<string, number> }>)[0]!;
    // On the xsk port drops happen in the kernel (the veth's XDP counters), not in the backend.
    const vethXdp = (what: 'drops' | 'packets') => vethXdpCounters(defaultPeerName(tap))[`xdp_${what}`] ?? 0;
    const idleWait = new Epoll(4);
    idle = idleWait;
    idleWait.add(fe.pairs[0]!.call[0], EPOLLIN, 0);
    idleWait.add(fe.pairs[1]!.call[0], EPOLLIN, 1);
    let runsAt = 'none';
    const tick = clockTick();
    const cpuSeconds = (): number => cpuTicks(be!.pid) / tick;
    const window = async (field: string) => {
      const v0 = kind === 'xsk' && field === 'xdpDrop' ? vethXdp('drops') : 0;
      const o0 = kind === 'xsk' ? vethXdp('packets') : 0;
      const a = await counters();
      const c0 = cpuSeconds();
      const t0 = Date.now();
      // The guest drains its RX queue meanwhile (that is what delivery costs it) and, like a
      // guest driver re-arming its interrupt, sleeps on the call eventfd when nothing came:
      // frames that never reach it cost it nothing.
      while (Date.now() - t0 < seconds * 1000) {
        const got = fe!.receive(0).length + fe!.receive(1).length;
        if (got === 0 && fe!.pairs[0]!.rx.enableInterrupts() && fe!.pairs[1]!.rx.enableInterrupts()) idleWait.wait(2, () => undefined);
        await new Promise((r) => setImmediate(r));
      }
      const c1 = cpuSeconds();
      const b = await counters();
      const dt = (Date.now() - t0) / 1000;
      const n = kind === 'xsk' && field === 'xdpDrop' ? vethXdp('drops') - v0 : b.total[field]! - a.total[field]!;
      // Offered: what reached the host port (the tap's transmit side; the veth end's XDP). At the
      // tap's tc egress the program's drops and bounces never reach its transmit: add them.
      const beforeTap = (c: typeof a) => c.total.xdpDrop! + c.total.xdpTx! + c.total.xdpAborted!;
      const offered = kind === 'xsk' ? vethXdp('packets') - o0
        : b.port.txPackets! + b.port.txDropped! - a.port.txPackets! - a.port.txDropped! + (runsAt === 'tap-tc' ? beforeTap(b) - beforeTap(a) : 0);
      return { pps: n / dt, offered: offered / dt, cpuPct: ((c1 - c0) / dt) * 100 };
    };
    await sleep(500);
    const delivered = await window('rxPackets');
    await offloadSample(oc, 'xdp_drop');
    const host = (await callControl(ctl, 'offload.show', { name: 'bench' }) as { host: { program: { runs: string } | null } | null }).host;
    runsAt = host?.program?.runs ?? 'none';
    await sleep(500);
    const dropped = await window('xdpDrop');
    let capacity: { pps: number; offered: number; cpuPct: number } | null = null;
    // Where frames die in the kernel (xsk; a tap whose program runs at tc egress) the backend's
    // core idles while dropping: a second generator there shows the drop path's capacity.
    if (kind === 'xsk' || runsAt === 'tap-tc') {
      flood2 = await startFlood(1);
      await sleep(500);
      capacity = await window('xdpDrop');
      await flood2.stop();
      flood2 = null;
    }
    requireOk(await oc.call(encodeProgUnset(oc.nextSeq())));
    return {
      ...(maps ? { maps } : {}),
      hostToGuest: {
        deliveredPps: Math.round(delivered.pps), offloadDropPps: Math.round(dropped.pps),
        ratio: Math.round((dropped.pps / Math.max(1, delivered.pps)) * 100) / 100,
        offeredPps: { delivered: Math.round(delivered.offered), dropped: Math.round(dropped.offered) },
        backendCpuPct: { delivered: Math.round(delivered.cpuPct), dropped: Math.round(dropped.cpuPct) },
        ...(capacity ? { dropCapacity: {
          pps: Math.round(capacity.pps), offeredPps: Math.round(capacity.offered),
          ratioToDelivered: Math.round((capacity.pps / Math.max(1, delivered.pps)) * 100) / 100,
        } } : {}),
      },
      path: runsAt,
      pinning: PINNING,
      // An xsk run whose kernel refused live frames flooded through tc egress, far slower.
      generator: flood.describe(),
      loadAvg1,
    };
  } finally {
    await flood?.stop();
    await flood2?.stop();
    idle?.close();
    fe?.close();
    await be?.stop('SIGTERM', 5000);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
