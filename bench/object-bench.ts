// `npm run bench -- object [--rounds N] [--seconds N] [--json]` (issue 17's "Measure"): the object path
// (OBJ_BEGIN/CHUNK/LOAD, docs/offload-protocol.md §8) with the realistic sample bpf/xdp_filter_obj.o.
// - Load latency: OBJ_BEGIN to the first host frame the object drops, on a tap and on an xsk port,
//   the TS frontend playing `vxdp load` while this process sends matching frames into the host
//   interface between requests and polls the object's PERCPU drop counter (one offload round trip
//   per poll: that is the figure's resolution).
// - Drop rate on the xsk port (object composed natively on the veth peer, tail call included) vs the
//   ceiling: the same object bytes loaded by root with bpftool (libbpf fills the PROG_ARRAY from the
//   object's own initializer; `ip link … xdp obj` loads only one program, the wrong one here) and
//   attached with `ip link set dev PEER xdpdrv pinned …` to a plain veth pair. Same generator
//   (XdpFlood), same core, same frame, interleaved windows; drops counted at each peer (ethtool).
import fs from 'node:fs';
import path from 'node:path';
import { defaultPeerName } from '../src/ports/xsk.js';
import { spawnManaged, sleep, type ManagedProcess } from '../test/support/processes.js';
import { tempDir, CLI } from '../test/support/backend.js';
import { TestFrontend } from '../test/support/frontend/test-frontend.js';
import { OffloadClient, requireOk, filterObjectWithConfig, sumPerCpuU64 } from '../test/support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6, vethXdpCounters, createVethPair, deleteLink, run } from '../test/support/netdev.js';
import { PacketSocket, buildUdpFrame } from '../test/support/packet-socket.js';
import { XdpFlood } from '../test/support/xdp-flood.js';
import { connectClaimedGuest } from './offload-bench.js';
import {
  encodeObjLoad, encodeObjShow, encodeObjUnload, encodeElemLookup, objectUploadRequests, decodeObjShowBody, decodeObjLoadBody,
} from '../src/offload/guest/codec.js';

const GUEST_MAC = '02:00:00:00:0b:01';
const HOST_MAC = '02:00:00:00:0a:01';
/** The sample's config is patched to drop this UDP source port (its compiled default is 4003). */
const DROP_SPORT = 4005;
const C_DROPPED = 2;
const PINNING = 'backend (all threads): taskset -c 1; generator (XdpFlood, or its tc-egress fallback where live frames are refused; the same for both sides) on core 0; the veth peer\'s NAPI runs where the generator transmits';

export interface LoadLatency {
  /** OBJ_BEGIN sent to the last OBJ_CHUNK answered. */
  uploadMs: number;
  /** OBJ_LOAD sent to its answer. */
  loadMs: number;
  /** OBJ_LOAD answered to the first drop seen in the object's counter. */
  firstDropAfterLoadMs: number;
  /** OBJ_BEGIN to the first drop seen: the headline figure. */
  totalMs: number;
  /** Frames the host sent from OBJ_BEGIN to the detection. */
  framesSent: number;
}

export interface DropWindow { pps: number; offeredPps: number; }

export interface ObjectBenchResult {
  objectBytes: number;
  latency: { tap: LoadLatency[]; xsk: LoadLatency[] };
  /** Per round: [object on the xsk port, ceiling (native on a plain veth)]. */
  /** What flooded the veths (the same for both sides). */
  generator: string;
  drops: { xsk: DropWindow; ceiling: DropWindow; ratio: number; ceilingFirst: boolean }[];
  pinning: string;
}

interface Device { be: ManagedProcess; fe: TestFrontend; oc: OffloadClient; ps: PacketSocket; ifname: string; dir: string }

async function startDevice(kind: 'tap' | 'xsk'): Promise<Device> {
  const dir = tempDir(`objb${kind}`);
  const sock = path.join(dir, 'dev.sock');
  const ifname = uniqueIfName(kind === 'tap' ? 'vxbt' : 'vxbk');
  const be = spawnManaged('taskset', ['-c', '1', process.execPath, CLI, 'serve', '--socket', sock, '--port', `${kind}:${ifname}`, '--queues', '1', '--offload', '--name', `ob${kind}`, '--log-level', 'warn'], { name: 'vhost-xdp' });
  let fe: TestFrontend | null = null;
  try {
    await be.waitForLine(/^vhost-xdp ready:/, 15_000);
    if (kind === 'tap') disableIpv6(ifname);
    const guest = await connectClaimedGuest(sock);
    fe = guest.fe;
    return { be, fe, oc: guest.oc, ps: PacketSocket.open(ifname), ifname, dir };
  } catch (e) {
    fe?.close();
    await be.stop('SIGTERM', 5000);
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

async function stopDevice(d: Device | null): Promise<void> {
  if (!d) return;
  d.ps.close();
  d.fe.close();
  await d.be.stop('SIGTERM', 5000);
  fs.rmSync(d.dir, { recursive: true, force: true });
}

const ms = (t0: bigint, t1: bigint): number => Number(t1 - t0) / 1e6;

/**
 * One `vxdp load` as the guest does it, with the host sending frames from DROP_SPORT all along
 * (a burst before every request and every poll), until the object's PERCPU drop counter moves.
 */
async function measureLoad(d: Device, object: Uint8Array, round: number): Promise<LoadLatency> {
  const frame = buildUdpFrame({ srcMac: HOST_MAC, dstMac: GUEST_MAC, srcIp: '198.18.0.1', dstIp: '198.18.0.2', srcPort: DROP_SPORT, dstPort: 9, payload: new Uint8Array(22) });
  let sent = 0;
  const burst = () => {
    for (let i = 0; i < 4; i++) d.ps.send(frame);
    sent += 4;
    d.fe.receive(0); // frames that got through before the load: the guest drains them
  };
  const { oc } = d;
  const t0 = process.hrtime.bigint();
  for (const req of objectUploadRequests(object, () => oc.nextSeq(), `ob${round}`)) {
    burst();
    requireOk(await oc.call(req));
  }
  const t1 = process.hrtime.bigint();
  burst();
  decodeObjLoadBody(requireOk(await oc.call(encodeObjLoad(oc.nextSeq(), ''), 15_000)).body);
  const t2 = process.hrtime.bigint();
  // The counters' handle: one more round trip, inside the measured time (a guest would know it
  // from `vxdp show`; it costs what one poll costs).
  const show = decodeObjShowBody(requireOk(await oc.call(encodeObjShow(oc.nextSeq()))).body);
  const counters = show.maps.find((m) => m.name === 'counters')!.handle;
  const key = new Uint8Array(4);
  new DataView(key.buffer).setUint32(0, C_DROPPED, true);
  const deadline = Date.now() + 5000;
  for (;;) {
    burst();
    const v = requireOk(await oc.call(encodeElemLookup(oc.nextSeq(), counters, key))).body;
    if (sumPerCpuU64(v) > 0) break;
    if (Date.now() > deadline) throw new Error(`${d.ifname}: no drop within 5 s of OBJ_LOAD`);
  }
  const t3 = process.hrtime.bigint();
  return { uploadMs: ms(t0, t1), loadMs: ms(t1, t2), firstDropAfterLoadMs: ms(t2, t3), totalMs: ms(t0, t3), framesSent: sent };
}

async function unload(d: Device): Promise<void> {
  requireOk(await d.oc.call(encodeObjUnload(d.oc.nextSeq())));
  await sleep(50);
  d.fe.receive(0);
}

/**
 * Floods `ifname` with `frame` from core 0 for `seconds`: the live-frames XDP flood, or where the
 * kernel refuses live frames, its tc-egress fallback (the same for both sides of a round).
 */
/** XDP drops/s at `peer` while the generator (core 0) floods `ifname`, over `seconds`. */
async function dropWindow(ifname: string, peer: string, frame: Uint8Array, seconds: number, said: (generator: string) => void): Promise<DropWindow> {
  const flood = await XdpFlood.start(ifname, frame, 0);
  said(flood.describe());
  try {
    await sleep(500);
    const a = vethXdpCounters(peer);
    const t0 = Date.now();
    await sleep(seconds * 1000);
    const b = vethXdpCounters(peer);
    const dt = (Date.now() - t0) / 1000;
    return {
      pps: Math.round(((b.xdp_drops ?? 0) - (a.xdp_drops ?? 0)) / dt),
      offeredPps: Math.round(((b.xdp_packets ?? 0) - (a.xdp_packets ?? 0)) / dt),
    };
  } finally {
    await flood.stop().catch(() => undefined);
  }
}

export async function runObjectBench(o: { rounds: number; seconds: number; log?: (l: string) => void }): Promise<ObjectBenchResult> {
  const object = filterObjectWithConfig(DROP_SPORT);
  const latency: ObjectBenchResult['latency'] = { tap: [], xsk: [] };
  const drops: ObjectBenchResult['drops'] = [];
  let dev: Device | null = null;
  const generators = new Set<string>();
  const said = (g: string): void => {
    if (!generators.has(g)) o.log?.(`  generator: ${g}`);
    generators.add(g);
  };
  const dir = tempDir('objbceil');
  const pins = `/sys/fs/bpf/vxobj-${process.pid}`;
  const ceilA = uniqueIfName('vxca');
  const ceilB = uniqueIfName('vxcb');
  try {
    // Load latency on the tap port (test-run in the backend), then on the xsk port (native).
    for (const kind of ['tap', 'xsk'] as const) {
      dev = await startDevice(kind);
      for (let r = 0; r < o.rounds; r++) {
        const l = await measureLoad(dev, object, r);
        latency[kind].push(l);
        o.log?.(`  ${kind} round ${r + 1}: OBJ_BEGIN to first drop ${l.totalMs.toFixed(1)} ms (upload ${l.uploadMs.toFixed(1)}, load ${l.loadMs.toFixed(1)}, first drop ${l.firstDropAfterLoadMs.toFixed(1)})`);
        // The xsk device keeps its last load for the drop-rate windows.
        if (kind === 'tap' || r < o.rounds - 1) await unload(dev);
      }
      if (kind === 'tap') {
        await stopDevice(dev);
        dev = null;
      }
    }
    const xsk = dev!;

    // The ceiling: the same bytes, loaded by root with libbpf (bpftool), attached natively.
    const objPath = path.join(dir, 'xdp_filter_obj.o');
    fs.writeFileSync(objPath, object);
    createVethPair(ceilA, ceilB);
    fs.mkdirSync(pins);
    run(['bpftool', 'prog', 'loadall', objPath, `${pins}/progs`, 'type', 'xdp', 'pinmaps', `${pins}/maps`]);
    const jump = run(['bpftool', 'map', 'dump', 'pinned', `${pins}/maps/jump`]);
    if (!/Found 1 element/.test(jump)) {
      // Older libbpf leaves the PROG_ARRAY empty: fill it as a loader would.
      run(['bpftool', 'map', 'update', 'pinned', `${pins}/maps/jump`, 'key', '0', '0', '0', '0', 'value', 'pinned', `${pins}/progs/udp_filter`]);
    }
    run(['ip', 'link', 'set', 'dev', ceilB, 'xdpdrv', 'pinned', `${pins}/progs/xdp_filter`]);

    const frame = buildUdpFrame({ srcMac: HOST_MAC, dstMac: GUEST_MAC, srcIp: '198.18.0.1', dstIp: '198.18.0.2', srcPort: DROP_SPORT, dstPort: 9, payload: new Uint8Array(22) });
    const xskPeer = defaultPeerName(xsk.ifname);
    for (let r = 0; r < o.rounds; r++) {
      // Who goes first alternates, so a bias for either seat cancels out over rounds.
      const ceilingFirst = r % 2 === 0;
      let ceiling: DropWindow;
      let ours: DropWindow;
      if (ceilingFirst) {
        ceiling = await dropWindow(ceilA, ceilB, frame, o.seconds, said);
        ours = await dropWindow(xsk.ifname, xskPeer, frame, o.seconds, said);
      } else {
        ours = await dropWindow(xsk.ifname, xskPeer, frame, o.seconds, said);
        ceiling = await dropWindow(ceilA, ceilB, frame, o.seconds, said);
      }
      const ratio = Math.round((ours.pps / Math.max(1, ceiling.pps)) * 1000) / 1000;
      drops.push({ xsk: ours, ceiling, ratio, ceilingFirst });
      o.log?.(`  drop round ${r + 1}: ceiling ${ceiling.pps} pps (offered ${ceiling.offeredPps}), xsk port ${ours.pps} pps (offered ${ours.offeredPps}): ${ratio.toFixed(2)}x`);
    }
    await unload(xsk);
    return { objectBytes: object.byteLength, latency, drops, generator: [...generators].join(' / '), pinning: PINNING };
  } finally {
    await stopDevice(dev);
    deleteLink(ceilA);
    fs.rmSync(pins, { recursive: true, force: true });
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
