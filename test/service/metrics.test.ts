// `serve --metrics`: /metrics is read with the Prometheus project's own text-format parser
// (python3-prometheus-client), and its counters are checked against frames sent each way and
// the kernel's counters of the tap; drop reasons move when their drop is provoked; the offload's
// host objects carry the device's name.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { startBackend, tempDir, repoRoot, CLI, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { OffloadRig } from '../support/frontend/offload-rig.js';
import { offloadSample, requireOk } from '../support/frontend/offload-client.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf, GUEST_MAC, HOST_MAC } from '../support/frames.js';
import { uniqueIfName, disableIpv6, readLinkStats } from '../support/netdev.js';
import { bpfPrefix, hostObjectName } from '../../src/offload/host-names.js';
import { parseMetricsAddress } from '../../src/service/metrics.js';

/** One sample: metric name (as exposed, with _total), labels, value. */
type Sample = { name: string; labels: Record<string, string>; value: number };

const PARSE = `
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"name": s.name, "type": fam.type, "labels": s.labels, "value": s.value})
print(json.dumps(out))
`;

/** Parses Prometheus text with the reference parser (the system python: another may be first on PATH). */
function parseProm(text: string): (Sample & { type: string })[] {
  const r = spawnSync('/usr/bin/python3', ['-c', PARSE], { input: text, encoding: 'utf8', timeout: 20_000 });
  if (r.status !== 0) throw new Error(`prometheus_client parser refused the text: ${r.stderr}`);
  return JSON.parse(r.stdout) as (Sample & { type: string })[];
}

async function scrape(port: number): Promise<(Sample & { type: string })[]> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  return parseProm(await res.text());
}

/** Sum of the samples named `name` whose labels include `where`. */
function sum(samples: Sample[], name: string, where: Record<string, string> = {}): number {
  return samples.filter((s) => s.name === name && Object.entries(where).every(([k, v]) => s.labels[k] === v)).reduce((a, s) => a + s.value, 0);
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('--metrics address', () => {
  test('a port alone is loopback; HOST:PORT and [V6]:PORT as given; anything else refused with a code', () => {
    expect(parseMetricsAddress('9464')).toEqual({ host: '127.0.0.1', port: 9464 });
    expect(parseMetricsAddress('0.0.0.0:9464')).toEqual({ host: '0.0.0.0', port: 9464 });
    expect(parseMetricsAddress('[::1]:9464')).toEqual({ host: '::1', port: 9464 });
    for (const bad of ['', 'x', '1:2:3', '70000', 'host:']) {
      expect(() => parseMetricsAddress(bad)).toThrow(expect.objectContaining({ code: 'bad-metrics-address' }));
    }
  });
});

describe('metrics of a tap device, TypeScript frontend, 2 queue pairs', () => {
  let be: Backend;
  let fe: TestFrontend;
  let tap: string;
  let ps: PacketSocket;
  let port: number;
  const NAME = 'metr';

  beforeAll(async () => {
    [tap, port] = [uniqueIfName('vxq'), await freePort()];
    const dir = tempDir('metrics');
    const sock = path.join(dir, 'dev.sock');
    // 64-entry rings: the no-buffer test outruns them.
    be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--queues', '2', '--name', NAME, '--metrics', String(port)], { dir });
    disableIpv6(tap);
    [fe, ps] = [await TestFrontend.connect(sock, { queuePairs: 2, queueSize: 64 }), PacketSocket.open(tap)];
  });
  afterAll(async () => { ps?.close(); fe?.close(); await be?.stop(); });

  test('/metrics parses as Prometheus text: counters are counters, every vhost_xdp family is documented in docs/metrics.md', async () => {
    const s = await scrape(port);
    const ours = s.filter((x) => x.name.startsWith('vhost_xdp_'));
    expect(ours.length).toBeGreaterThan(0);
    for (const x of ours) {
      if (x.name.endsWith('_total')) expect(x.type).toBe('counter');
      expect(Number.isFinite(x.value)).toBe(true);
    }
    expect(sum(s, 'vhost_xdp_connected', { device: NAME })).toBe(1);
    // The frontend enabled both pairs' rings.
    expect(sum(s, 'vhost_xdp_host_queue_pairs', { device: NAME })).toBe(2);
    expect(new Set(ours.filter((x) => x.name === 'vhost_xdp_rx_packets_total').map((x) => x.labels.queue))).toEqual(new Set(['0', '1']));
    const doc = fs.readFileSync(path.join(repoRoot(), 'docs/metrics.md'), 'utf8');
    for (const n of new Set(ours.map((x) => x.name))) expect(doc.includes(`\`${n}\``), n).toBe(true);
  });

  test('after N frames each way the counters equal the frames sent and the tap\'s own counters', async () => {
    ps.drain();
    const s0 = await scrape(port);
    const k0 = readLinkStats(tap);
    // Guest → host: 60 frames over both pairs.
    const out = Array.from({ length: 60 }, (_, i) => udpFrame(50_000 + i, 64 + (i % 5) * 100));
    let sent = 0;
    for (let b = 0; b < 60; b += 20) {
      for (let i = b; i < b + 20; i++) expect(fe.transmit(i % 2, [out[i]!])).toBe(1);
      sent += ps.recvAll(20, 5000, (f) => (seqOf(f) ?? -1) >= 50_000).length;
    }
    expect(sent).toBe(60);
    // Host → guest: 40 frames.
    const inn = Array.from({ length: 40 }, (_, i) => udpFrame(60_000 + i, 32 + (i % 3) * 200, 2000 + (i % 8), HOST_MAC, GUEST_MAC));
    for (const f of inn) ps.send(f);
    const seen = new Set<number>();
    for (let t = 0; t < 500 && seen.size < 40; t++) {
      for (const p of [0, 1]) for (const f of fe.receive(p)) { const q = seqOf(f); if (q !== null) seen.add(q); }
      await sleep(5);
    }
    expect(seen.size).toBe(40);
    const s1 = await scrape(port);
    const k1 = readLinkStats(tap);
    const d = (name: string, where: Record<string, string> = {}) => sum(s1, name, { device: NAME, ...where }) - sum(s0, name, { device: NAME, ...where });
    const outBytes = out.reduce((a, f) => a + f.length, 0);
    const inBytes = inn.reduce((a, f) => a + f.length, 0);
    expect(d('vhost_xdp_tx_packets_total')).toBe(60);
    expect(d('vhost_xdp_tx_bytes_total')).toBe(outBytes);
    expect(d('vhost_xdp_rx_packets_total')).toBe(40);
    expect(d('vhost_xdp_rx_bytes_total')).toBe(inBytes);
    // Both pairs carried guest frames (30 each).
    expect(d('vhost_xdp_tx_packets_total', { queue: '0' })).toBe(30);
    expect(d('vhost_xdp_tx_packets_total', { queue: '1' })).toBe(30);
    // The kernel's view of the tap: what the guest sent is its rx, what it delivered its tx.
    expect(k1.rxPackets - k0.rxPackets).toBe(60);
    expect(k1.rxBytes - k0.rxBytes).toBe(outBytes);
    expect(k1.txPackets - k0.txPackets).toBe(40);
    expect(k1.txBytes - k0.txBytes).toBe(inBytes);
    // And the port families report those same kernel counters.
    expect(d('vhost_xdp_port_packets_total', { direction: 'from_guest' })).toBe(60);
    expect(d('vhost_xdp_port_packets_total', { direction: 'to_guest' })).toBe(40);
    expect(d('vhost_xdp_port_bytes_total', { direction: 'from_guest' })).toBe(outBytes);
    expect(d('vhost_xdp_drops_total')).toBe(0);
    expect(d('vhost_xdp_kicks_total')).toBeGreaterThan(0);
    expect(d('vhost_xdp_calls_total')).toBeGreaterThan(0);
    expect(d('vhost_xdp_copies_total')).toBe(0);
  });

  test('a guest frame too short for an Ethernet header counts as a tx bad_frame drop, on its queue', async () => {
    const s0 = await scrape(port);
    expect(fe.transmit(1, [new Uint8Array(10)])).toBe(1);
    let s1 = s0;
    for (let t = 0; t < 100; t++) {
      s1 = await scrape(port);
      if (sum(s1, 'vhost_xdp_drops_total', { device: NAME }) > sum(s0, 'vhost_xdp_drops_total', { device: NAME })) break;
      await sleep(10);
    }
    const where = { device: NAME, queue: '1', direction: 'tx', reason: 'bad_frame' };
    expect(sum(s1, 'vhost_xdp_drops_total', where) - sum(s0, 'vhost_xdp_drops_total', where)).toBe(1);
    expect(sum(s1, 'vhost_xdp_drops_total', { device: NAME }) - sum(s0, 'vhost_xdp_drops_total', { device: NAME })).toBe(1);
    expect(sum(s1, 'vhost_xdp_tx_packets_total', { device: NAME }) - sum(s0, 'vhost_xdp_tx_packets_total', { device: NAME })).toBe(0);
  });

  test('a guest out of receive buffers moves rx_no_buffer; the frames wait in the tap and arrive once it posts buffers', async () => {
    const s0 = await scrape(port);
    // 64-entry rings: 100 frames on both pairs outrun the 128 buffers posted... the guest does not
    // take any until the end, so it runs out on at least one pair.
    const n = 200;
    for (let i = 0; i < n; i++) ps.send(udpFrame(70_000 + i, 60, 3000 + (i % 16), HOST_MAC, GUEST_MAC));
    let s1 = s0;
    for (let t = 0; t < 100; t++) {
      await sleep(20);
      s1 = await scrape(port);
      if (sum(s1, 'vhost_xdp_rx_no_buffer_total', { device: NAME }) > sum(s0, 'vhost_xdp_rx_no_buffer_total', { device: NAME })) break;
    }
    expect(sum(s1, 'vhost_xdp_rx_no_buffer_total', { device: NAME })).toBeGreaterThan(sum(s0, 'vhost_xdp_rx_no_buffer_total', { device: NAME }));
    const seen = new Set<number>();
    for (let t = 0; t < 1000 && seen.size < n; t++) {
      for (const p of [0, 1]) for (const f of fe.receive(p)) { const q = seqOf(f); if (q !== null && q >= 70_000) seen.add(q); }
      await sleep(5);
    }
    const s2 = await scrape(port);
    // Nothing was lost by the backend: every frame the tap did not drop reached the guest.
    const tapDropped = sum(s2, 'vhost_xdp_port_dropped_total', { device: NAME, direction: 'to_guest' }) - sum(s0, 'vhost_xdp_port_dropped_total', { device: NAME, direction: 'to_guest' });
    expect(seen.size + tapDropped).toBe(n);
    expect(sum(s2, 'vhost_xdp_drops_total', { device: NAME, direction: 'rx' }) - sum(s0, 'vhost_xdp_drops_total', { device: NAME, direction: 'rx' })).toBe(0);
  });

  test('anything but GET /metrics is 404', async () => {
    expect((await fetch(`http://127.0.0.1:${port}/`)).status).toBe(404);
    expect((await fetch(`http://127.0.0.1:${port}/metrics`, { method: 'POST' })).status).toBe(404);
  });
});

describe('metrics and host names of an offloaded program (tap port)', () => {
  let rig: OffloadRig;
  let port: number;
  const NAME = 'metoff';
  const PROG = `mo${process.pid}`.slice(0, 12);

  beforeAll(async () => {
    port = await freePort();
    const tap = uniqueIfName('vxo');
    rig = await OffloadRig.start({ tag: 'metoff', port: 'tap', ifname: tap, name: NAME, hostMac: HOST_MAC, firstSeq: 900_000, afterStart: () => disableIpv6(tap), extraArgs: ['--metrics', String(port)] });
    requireOk(await rig.oc.claim());
    await offloadSample(rig.oc, 'xdp_drop', { prog: PROG });
  });

  afterAll(async () => {
    await rig?.close();
  });

  test('host frames dropped by the offloaded xdp_drop count as offload_drop, per queue, and as drop verdicts', async () => {
    const s0 = await scrape(port);
    expect(await rig.hostToGuest(10)).toBe(0);
    const s1 = await scrape(port);
    const drops = (s: Sample[]) => sum(s, 'vhost_xdp_drops_total', { device: NAME, direction: 'rx', reason: 'offload_drop' });
    expect(drops(s1) - drops(s0)).toBeGreaterThanOrEqual(10);
    // The tap may carry a stray frame of its own, never fewer than the ones sent.
    expect(drops(s1) - drops(s0)).toBeLessThanOrEqual(12);
    const verdicts = (s: Sample[]) => sum(s, 'vhost_xdp_offload_verdicts_total', { device: NAME, verdict: 'drop' });
    expect(verdicts(s1) - verdicts(s0)).toBe(drops(s1) - drops(s0));
    expect(sum(s1, 'vhost_xdp_offload_claimed', { device: NAME })).toBe(1);
    expect(sum(s1, 'vhost_xdp_offload_maps', { device: NAME })).toBe(1);
    expect(sum(s1, 'vhost_xdp_offload_map_memory_bytes', { device: NAME })).toBeGreaterThan(0);
    expect(sum(s1, 'vhost_xdp_offload_requests_total', { device: NAME, status: 'OK' })).toBeGreaterThanOrEqual(3);
  });

  test('bpftool prog show lists the program under a name naming the device; offload show --json has the host program id', async () => {
    const hostName = hostObjectName(bpfPrefix(NAME), PROG);
    expect(hostName.startsWith(`${NAME}_`)).toBe(true);
    const show = JSON.parse(execFileSync(process.execPath, [CLI, 'offload', 'show', NAME, '--json', '--control', rig.be.control], { encoding: 'utf8' }));
    expect(show.bpfPrefix).toBe(NAME);
    expect(show.program.name).toBe(PROG); // the guest's name stays the guest's
    expect(show.program.hostName).toBe(hostName);
    // On a tap the program runs translated at the tap's tc egress (issue 18): that host program is named for the device too.
    expect(show.host.program).toMatchObject({ id: show.program.id, hostName, runs: 'tap-tc', hostProgramName: hostObjectName(NAME, 'tap_tc') });
    expect(show.maps[0].hostName).toBe(hostObjectName(NAME, show.maps[0].name));
    const progs = JSON.parse(execFileSync('bpftool', ['-j', 'prog', 'show'], { encoding: 'utf8' })) as { id: number; name?: string }[];
    expect(progs.find((p) => p.id === show.program.id)?.name).toBe(hostName);
    expect(progs.find((p) => p.id === show.host.program.hostId)?.name).toBe(show.host.program.hostProgramName);
    const maps = JSON.parse(execFileSync('bpftool', ['-j', 'map', 'show'], { encoding: 'utf8' })) as { id: number; name?: string }[];
    expect(maps.find((m) => m.id === show.maps[0].id)?.name).toBe(show.maps[0].hostName);
    // Status names the prefix too; the metrics carry the same ids.
    const st = await rig.be.call('status');
    expect(st.devices[0].offload.bpfPrefix).toBe(NAME);
    const s = await scrape(port);
    // The host program that runs the offload: on a tap the tc egress program.
    expect(sum(s, 'vhost_xdp_offload_program_id', { device: NAME })).toBe(show.host.program.hostId);
    expect(s.find((x) => x.name === 'vhost_xdp_offload_program_info')?.labels).toMatchObject({ device: NAME, host_name: hostName, name: PROG, tag: show.program.tag, id: String(show.program.id) });
  });
});
