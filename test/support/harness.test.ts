import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { existsSync, rmSync } from 'node:fs';
import {
  CleanupStack, createNetns, createVethPair, deleteLink, diffLinkStats, disableIpv6, getMac, linkExists, listLinks,
  netnsExists, readLinkStats, run, uniqueIfName, uniqueNetnsName,
} from './netdev.js';
import {
  PacketSocket, PacketType, buildUdpFrame, checkPatternPayload, ipv4HeaderChecksum, parseUdpFrame, patternPayload,
} from './packet-socket.js';
import { dpdkLeftovers, isTxonlyFrame, pcapVdev, readPcap, startTestpmd } from './dpdk.js';
import { spawnManaged, sleep, waitUntil } from './processes.js';
import { Pinger, percentile } from './pinger.js';
import { TcEgressFlood, XdpFlood } from './xdp-flood.js';
import { TapPort } from '../../src/ports/tap.js';
import { TcProgram, TapTcAttachment } from '../../src/ports/tap-tc-program.js';
import { encodeInsns, returnImm } from '../../src/sys/bpf/insns.js';
import { XDP_DROP, XDP_PASS } from '../../src/sys/bpf/xdp.js';
import { ifNameToIndex } from '../../src/sys/libc.js';

// The helpers other tests stand on, exercised against real kernel objects.

describe('netdev + PacketSocket on a veth pair into a fresh netns', () => {
  const cleanup = new CleanupStack();
  const ns = uniqueNetnsName('vxh');
  const hostEnd = uniqueIfName('vxh');
  const nsEnd = uniqueIfName('vxn');
  let hostSock: PacketSocket | undefined;
  let nsSock: PacketSocket | undefined;

  beforeAll(() => {
    createNetns(ns);
    cleanup.netns(ns);
    createVethPair(hostEnd, nsEnd, { netns: ns });
    cleanup.link(hostEnd);
    hostSock = PacketSocket.open(hostEnd);
    cleanup.push('close host socket', () => hostSock?.close());
    nsSock = PacketSocket.open(nsEnd, { netns: ns });
    cleanup.push('close netns socket', () => nsSock?.close());
  });

  afterAll(async () => {
    await cleanup.run();
  });

  test('a built UDP frame crosses the veth with payload and checksums intact', () => {
    const frames = Array.from({ length: 5 }, (_, i) =>
      buildUdpFrame({
        srcMac: getMac(hostEnd), dstMac: getMac(nsEnd, ns), srcIp: '10.77.0.1', dstIp: '10.77.0.2',
        srcPort: 4000 + i, dstPort: 5000, payload: patternPayload(i, 100),
      }),
    );
    nsSock!.drain();
    for (const f of frames) hostSock!.send(f);
    const got = nsSock!.recvAll(5, 3000, (f) => parseUdpFrame(f)?.dstPort === 5000);
    expect(got.length).toBe(5);
    const seqs = got.map((f) => {
      const p = parseUdpFrame(f)!;
      expect(p.ipChecksumOk).toBe(true);
      expect(p.udpChecksumOk).toBe(true);
      expect(p.srcIp).toBe('10.77.0.1');
      return checkPatternPayload(p.payload);
    });
    expect(seqs).toEqual([0, 1, 2, 3, 4]);
  });

  test('the sender does not see its own frames unless it asks for outgoing ones', () => {
    const f = buildUdpFrame({
      srcMac: '02:00:00:00:00:01', dstMac: '02:00:00:00:00:02', srcIp: '10.77.0.1', dstIp: '10.77.0.2',
      srcPort: 1, dstPort: 6001, payload: patternPayload(42, 20),
    });
    hostSock!.drain();
    hostSock!.send(f);
    expect(hostSock!.recvAll(1, 300, (x) => parseUdpFrame(x)?.dstPort === 6001)).toEqual([]);
    const withOut = PacketSocket.open(hostEnd, { includeOutgoing: true });
    try {
      hostSock!.send(f);
      const seen = withOut.recvAll(1, 1000, (x) => parseUdpFrame(x)?.dstPort === 6001);
      expect(seen.length).toBe(1);
      expect(Array.from(seen[0]!)).toEqual(Array.from(f));
    } finally {
      withOut.close();
    }
  });

  test('link stats move by the frames sent (sysfs and inside the netns)', () => {
    const hostBefore = readLinkStats(hostEnd);
    const nsBefore = readLinkStats(nsEnd, ns);
    const f = buildUdpFrame({
      srcMac: '02:00:00:00:00:01', dstMac: '02:00:00:00:00:02', srcIp: '10.77.0.1', dstIp: '10.77.0.2',
      srcPort: 1, dstPort: 6002, payload: patternPayload(1, 64),
    });
    for (let i = 0; i < 10; i++) hostSock!.send(f);
    expect(nsSock!.recvAll(10, 3000, (x) => parseUdpFrame(x)?.dstPort === 6002).length).toBe(10);
    const tx = diffLinkStats(readLinkStats(hostEnd), hostBefore);
    const rx = diffLinkStats(readLinkStats(nsEnd, ns), nsBefore);
    expect(tx.txPackets).toBeGreaterThanOrEqual(10);
    expect(tx.txBytes).toBeGreaterThanOrEqual(10 * f.length);
    expect(rx.rxPackets).toBeGreaterThanOrEqual(10);
  });
});

describe('frame helpers', () => {
  test('IPv4 header checksum matches a known header (DPDK txonly capture)', () => {
    const hdr = Uint8Array.from([0x45, 0, 0, 0x32, 0, 0, 0, 0, 0x40, 0x11, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
    expect(ipv4HeaderChecksum(hdr)).toBe(0xee93);
  });

  test('isTxonlyFrame accepts the captured txonly frame and rejects a changed one', () => {
    const f = new Uint8Array(64);
    f.set([2, 0, 0, 0, 0, 0, 0xde, 0x87, 0x5a, 0x44, 0xf5, 0xc2, 8, 0, 0x45, 0, 0, 0x32, 0, 0, 0, 0, 0x40, 0x11, 0xee, 0x93,
      198, 18, 0, 1, 198, 18, 0, 2, 0, 9, 0, 9, 0, 0x1e, 0, 0]);
    expect(isTxonlyFrame(f, { frameLen: 64, srcMac: 'de:87:5a:44:f5:c2', zeroPayload: true })).toBe(true);
    const g = f.slice();
    g[30] = 9;
    expect(isTxonlyFrame(g)).toBe(false);
    expect(parseUdpFrame(f)?.ipChecksumOk).toBe(true);
  });

  test('parseUdpFrame refuses truncated and inconsistent frames', () => {
    const f = buildUdpFrame({
      srcMac: '02:00:00:00:00:01', dstMac: '02:00:00:00:00:02', srcIp: '1.2.3.4', dstIp: '5.6.7.8',
      srcPort: 1, dstPort: 2, payload: patternPayload(7, 30),
    });
    expect(parseUdpFrame(f)).not.toBeNull();
    expect(parseUdpFrame(f.subarray(0, 40))).toBeNull();
    const bad = f.slice();
    bad[17] = 0xff; // IP total length beyond the frame
    expect(parseUdpFrame(bad)).toBeNull();
  });

  test('uniqueIfName stays within IFNAMSIZ and does not repeat', () => {
    const names = new Set(Array.from({ length: 200 }, () => uniqueIfName('vxtest')));
    expect(names.size).toBe(200);
    for (const n of names) expect(n.length).toBeLessThanOrEqual(15);
  });
});

test('CleanupStack removes every link and namespace it registered, even after a failing step', async () => {
  const cleanup = new CleanupStack();
  const ns = uniqueNetnsName('vxc');
  const a = uniqueIfName('vxc');
  const b = uniqueIfName('vxc');
  const c = uniqueIfName('vxc');
  const d = uniqueIfName('vxc');
  createNetns(ns);
  cleanup.netns(ns);
  createVethPair(a, b);
  cleanup.link(a);
  cleanup.push('a step that throws', () => {
    throw new Error('boom');
  });
  createVethPair(c, d, { netns: ns });
  cleanup.link(c);
  expect(linkExists(a) && linkExists(b) && linkExists(c) && linkExists(d, ns)).toBe(true);
  const errs = await cleanup.run();
  expect(errs.map((e) => e.message)).toEqual(['cleanup "a step that throws" failed: boom']);
  const left = listLinks();
  for (const n of [a, b, c]) expect(left).not.toContain(n);
  expect(netnsExists(ns)).toBe(false);
  deleteLink(a); // idempotent, no throw
});

test('ManagedProcess waits for a line and escalates to SIGKILL when SIGTERM is ignored', async () => {
  const p = spawnManaged('sh', ['-c', 'trap "" TERM; echo ready; while :; do sleep 0.1; done'], { name: 'stubborn' });
  await p.waitForLine(/^ready$/, 5000);
  const t0 = Date.now();
  const st = await p.stop('SIGTERM', 300);
  expect(st.signal).toBe('SIGKILL');
  expect(Date.now() - t0).toBeLessThan(3000);
  await expect(p.waitForLine(/never/, 1000, p.lineCount)).rejects.toThrow(/exited/);
});

test('testpmd with a vhost PMD vdev starts, reports stats and leaves no hugepage files or runtime dir', async () => {
  const sock = `/tmp/vxh-${process.pid}.sock`;
  const pmd = await startTestpmd({ vdevs: [`net_vhost0,iface=${sock},queues=1`], forwardMode: 'rxonly', cores: '0,1', mainLcore: 0 });
  try {
    expect(dpdkLeftovers(pmd.filePrefix).length).toBeGreaterThan(0);
    const s = await pmd.waitForStats((ports) => ports.length === 1, 5000);
    expect(s[0]!.rxPackets).toBe(0);
  } finally {
    const r = await pmd.stop();
    expect(r.code).toBe(0);
    expect(r.forward[0]?.rxPackets).toBe(0);
  }
  expect(dpdkLeftovers(pmd.filePrefix)).toEqual([]);
  expect(existsSync(sock)).toBe(false);
}, 30_000);

describe('testpmd against a kernel tap (net_tap PMD)', () => {
  const cleanup = new CleanupStack();
  afterAll(async () => {
    await cleanup.run();
  });

  test('txonly frames reaching the host side of a tap are recognised by isTxonlyFrame', async () => {
    const tap = uniqueIfName('vxtt');
    cleanup.link(tap); // the PMD removes its tap; this covers a killed testpmd
    const pmd = await startTestpmd({
      vdevs: [`net_tap0,iface=${tap}`], forwardMode: 'txonly', txpkts: 80, ethPeers: ['02:00:00:00:00:99'],
    });
    cleanup.push('stop txonly testpmd', () => pmd.stop());
    const sock = PacketSocket.open(tap);
    cleanup.push('close tap socket', () => sock.close());
    const frames = sock.recvAll(20, 5000, (f) => parseUdpFrame(f)?.dstPort === 9);
    expect(frames.length).toBe(20);
    for (const f of frames) {
      expect(isTxonlyFrame(f, { frameLen: 80, dstMac: '02:00:00:00:00:99', srcMac: pmd.portMacs.get(0), zeroPayload: true })).toBe(true);
    }
    sock.close();
    await pmd.stop();
    expect(linkExists(tap)).toBe(false);
  });

  test('frames injected on the host side of a tap are captured byte-exact through a pcap port', async () => {
    const tap = uniqueIfName('vxtp');
    const pcap = `/tmp/vxh-${process.pid}-cap.pcap`;
    cleanup.link(tap);
    cleanup.push('remove pcap', () => rmSync(pcap, { force: true }));
    const pmd = await startTestpmd({ vdevs: [`net_tap0,iface=${tap}`, pcapVdev(0, [pcap])], forwardMode: 'io' });
    cleanup.push('stop io testpmd', () => pmd.stop());
    disableIpv6(tap);
    const sock = PacketSocket.open(tap);
    cleanup.push('close tap socket', () => sock.close());
    const sent = Array.from({ length: 8 }, (_, i) =>
      buildUdpFrame({
        srcMac: '02:00:00:00:00:0a', dstMac: pmd.portMacs.get(0)!, srcIp: '10.88.0.1', dstIp: '10.88.0.2',
        srcPort: 7000, dstPort: 7001, payload: patternPayload(i, 58 + i * 50),
      }),
    );
    for (const f of sent) sock.send(f);
    await pmd.waitForStats((p) => (p[1]?.txPackets ?? 0) >= sent.length, 5000);
    const r = await pmd.stop();
    expect(r.code).toBe(0);
    const got = readPcap(pcap).filter((f) => parseUdpFrame(f)?.dstPort === 7001);
    expect(got.map((f) => Array.from(f))).toEqual(sent.map((f) => Array.from(f)));
  });
});

const PING_HOST_MAC = '02:00:00:00:0a:01';
const PING_GUEST_MAC = '02:00:00:00:0b:01';

// The latency bench's pinger: every echo is counted once and timed, what never comes back is lost.
describe('pinger on a veth pair', () => {
  const a = uniqueIfName('vxpa');
  const b = uniqueIfName('vxpb');
  beforeAll(() => {
    createVethPair(a, b);
    disableIpv6(a);
    disableIpv6(b);
  });
  afterAll(() => deleteLink(a));

  test('percentile is the nearest rank', () => {
    const xs = Array.from({ length: 100 }, (_, i) => i + 1);
    expect(percentile(xs, 50)).toBe(50);
    expect(percentile(xs, 99)).toBe(99);
    expect(percentile([7], 99)).toBe(7);
    expect(percentile([], 50)).toBe(0);
  });

  test('a bouncer that swaps MACs answers every ping: all received, none lost, round trips timed, warm-up pings not counted', async () => {
    const echo = PacketSocket.open(b);
    let bouncing = true;
    let bounced = 0;
    // The far end of the veth plays testpmd's macswap: same frame back, MACs swapped.
    const bouncer = (async () => {
      while (bouncing) {
        for (let f = echo.recvFrame(0); f; f = echo.recvFrame(0)) {
          if (f.pktType === PacketType.OUTGOING) continue;
          const out = f.frame.slice();
          out.set(f.frame.subarray(6, 12), 0);
          out.set(f.frame.subarray(0, 6), 6);
          echo.send(out);
          bounced++;
        }
        await new Promise((r) => setTimeout(r, 0));
      }
    })();
    try {
      // Warm-up pings go out and come back like the rest, and none of them is counted.
      const r = await Pinger.run({ ifname: a, srcMac: PING_HOST_MAC, dstMac: PING_GUEST_MAC, rate: 200, seconds: 1, warmupSeconds: 0.5 }, 0);
      expect(r.sent).toBe(200);
      expect(r.received).toBe(200);
      expect(r.lost).toBe(0);
      expect(bounced).toBeGreaterThanOrEqual(300);
      expect(r.p50Us).toBeGreaterThan(0);
      expect(r.p99Us).toBeGreaterThanOrEqual(r.p50Us);
      expect(r.maxUs).toBeGreaterThanOrEqual(r.p99Us);
    } finally {
      bouncing = false;
      await bouncer;
      echo.close();
    }
  });

  test('with nobody bouncing every ping is lost and no round trip is made up', async () => {
    const r = await Pinger.run({ ifname: a, srcMac: PING_HOST_MAC, dstMac: PING_GUEST_MAC, rate: 100, seconds: 0.5 }, 0);
    expect(r.sent).toBe(50);
    expect(r.received).toBe(0);
    expect(r.lost).toBe(50);
    expect(r.p99Us).toBe(0);
  });
});

describe('TcEgressFlood into a tap', () => {
  const cleanup = new CleanupStack();
  const tap = uniqueIfName('vxfl');
  let ifindex = 0;
  let att: TapTcAttachment;
  // The offload's own translated programs and verdict counters stand at the tap's tc egress.
  const tcProgram = (verdict: number, name: string) =>
    TcProgram.load({ code: encodeInsns(returnImm(verdict)), license: 'GPL' }, { ifindex, name, countersName: `${name}_c` });
  const reachedTap = () => {
    const s = readLinkStats(tap);
    return s.txPackets + s.txDropped;
  };

  beforeAll(() => {
    // Our fd keeps the tap's carrier up, so what passes tc egress reaches the tap's queue.
    const port = TapPort.open(tap, 1);
    cleanup.push('close tap', () => port.close());
    disableIpv6(tap);
    ifindex = ifNameToIndex(tap);
    att = new TapTcAttachment(ifindex, tap);
    cleanup.push('detach tc program', () => att.clear());
  });

  afterAll(async () => {
    await cleanup.run();
  });

  test('its frames pass the tap\'s tc egress program and reach the tap byte for byte; dropped there, they never reach it', async () => {
    const frame = buildUdpFrame({
      srcMac: '02:00:00:00:0c:01', dstMac: '02:00:00:00:0c:02', srcIp: '10.77.1.1', dstIp: '10.77.1.2',
      srcPort: 9, dstPort: 6003, payload: patternPayload(7, 40),
    });
    att.set(tcProgram(XDP_PASS, 'vxt_fl_pass'));
    const watch = PacketSocket.open(tap, { includeOutgoing: true });
    cleanup.push('close watcher', () => watch.close());
    const flood = await TcEgressFlood.start(tap, frame, 0);
    cleanup.push('stop flood', () => flood.stop());
    const seen = watch.recvAll(1, 3000, (f) => parseUdpFrame(f)?.dstPort === 6003);
    expect(seen.length).toBe(1);
    expect(Array.from(seen[0]!)).toEqual(Array.from(frame));
    watch.close();
    const passed0 = att.verdicts().pass;
    const tap0 = reachedTap();
    await waitUntil(() => att.verdicts().pass > passed0 + 1000 && reachedTap() > tap0 + 1000, 5000, 'frames passed at tc egress reaching the tap');

    att.set(tcProgram(XDP_DROP, 'vxt_fl_drop'));
    // Frames past tc egress before the swap may still be on their way to the tap's queue.
    await sleep(100);
    const dropped0 = att.verdicts().drop;
    const tap1 = reachedTap();
    await waitUntil(() => att.verdicts().drop > dropped0 + 1000, 5000, 'drops at tc egress');
    expect(reachedTap()).toBe(tap1);

    await flood.stop();
    const after = att.verdicts().drop;
    await sleep(100);
    expect(att.verdicts().drop).toBe(after);
  });
});

describe('XdpFlood into a veth', () => {
  test('its frames reach the peer on the path it names: live frames, or tc egress where the kernel refuses them', async () => {
    const cleanup = new CleanupStack();
    const a = uniqueIfName('vxxa');
    const b = uniqueIfName('vxxb');
    try {
      createVethPair(a, b);
      cleanup.push('delete veth', () => deleteLink(a));
      const frame = buildUdpFrame({
        srcMac: '02:00:00:00:0d:01', dstMac: '02:00:00:00:0d:02', srcIp: '10.77.2.1', dstIp: '10.77.2.2',
        srcPort: 9, dstPort: 6004, payload: patternPayload(3, 40),
      });
      // XdpFlood's contract: the receiving end has NAPI (an XDP program or GRO), or the live
      // frames die at a's xmit. Kernels that refuse live frames send through tc, which needs none.
      run(['ethtool', '-K', b, 'gro', 'on']);
      const watch = PacketSocket.open(b);
      cleanup.push('close watcher', () => watch.close());
      const flood = await XdpFlood.start(a, frame, 0);
      cleanup.push('stop flood', () => flood.stop());
      expect(['xdp', 'tc-egress']).toContain(flood.path);
      // A fallback always says why; the path asked for never does.
      expect(flood.fallback === null).toBe(flood.path === 'xdp');
      const seen = watch.recvAll(1, 3000, (f) => parseUdpFrame(f)?.dstPort === 6004);
      expect(Array.from(seen[0]!)).toEqual(Array.from(frame));
      const rx0 = readLinkStats(b).rxPackets;
      await waitUntil(() => readLinkStats(b).rxPackets > rx0 + 10_000, 5000, 'the flood arriving at the peer');
      await flood.stop();
    } finally {
      await cleanup.run();
    }
  });
});
