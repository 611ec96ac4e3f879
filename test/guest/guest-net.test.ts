import { rmSync } from 'node:fs';
import type { DeviceStatus } from '../../src/service/device.js';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { countFds, countGuestMappings, startBackend, tempDir, type Backend } from '../support/backend.js';
import { addAddress, freeTestSubnet, CleanupStack, disableIpv6, getMtu, linkIdentity, run as runHost, setLinkUp, uniqueIfName } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { GuestVm, guestSh } from '../support/guest/guest-vm.js';
import { mibPerSec, sendRandom, TcpSink, type TransferResult } from '../support/guest/host-endpoint.js';
import { formatTimings, killAndRestart, streamAcross } from '../support/guest/restart.js';

/**
 * A real Debian guest (stock virtio_net) against `vhost-xdp serve`, then the same transfer
 * through QEMU's own tap networking for comparison. Boots are the expensive part under TCG,
 * so one guest (2 vCPUs, 2 queue pairs, MTU 1400) carries every vhost-user case in order;
 * each case (re)configures the guest's address itself, so one failure does not cascade.
 * Traffic stays on the taps this file creates.
 */

/**
 * Host end .1, guest .2 of a /24 in 198.18.0.0/15 (benchmark range). The third octet starts
 * from our pid and skips /24s the host already uses (other tests pick from the same range).
 */
interface Subnet {
  host: string;
  guest: string;
}
const VHOST_NET: Subnet = freeTestSubnet(18);
const TAP_NET: Subnet = freeTestSubnet(19);
const MAC = '52:54:00:5a:17:01';
const MTU = 1400;
const QUEUES = 2;
const MIB20 = 20 * 2 ** 20;
const MIB32 = 32 * 2 ** 20;

const timings: string[] = [];
const note = (key: string, value: string): void => {
  timings.push(`${key}: ${value}`);
  console.log(`[guest-net] ${key}: ${value}`);
};
const rate = (r: TransferResult): string => `${r.bytes} B in ${r.ms} ms = ${mibPerSec(r).toFixed(1)} MiB/s`;

async function configureGuest(vm: GuestVm, net: Subnet): Promise<void> {
  await guestSh(vm, `ip addr flush dev eth0 && ip addr add ${net.guest}/24 dev eth0 && ip link set eth0 up`);
}

function configureHostTap(ifname: string, net: Subnet): void {
  disableIpv6(ifname);
  addAddress(ifname, `${net.host}/24`);
  setLinkUp(ifname);
}

/**
 * Pings both ways; throws unless each direction gets a reply. One lost echo is tolerated: the
 * first one may wait for neighbour resolution.
 */
async function pingBothWays(vm: GuestVm, net: Subnet, count = 3): Promise<void> {
  // Without a deadline (-w) both pings exit 0 when at least one reply came back.
  await guestSh(vm, `ping -c ${count} -W 5 ${net.host}`, 60_000);
  runHost(['ping', '-c', String(count), '-i', '0.5', '-W', '5', net.guest], { timeoutMs: 30_000 });
}

async function makeGuestFile(vm: GuestVm, file: string, bytes: number): Promise<string> {
  const t0 = Date.now();
  await guestSh(vm, `dd if=/dev/urandom of=${file} bs=1M count=${bytes / 2 ** 20} 2>/dev/null`, 120_000);
  note(`guest dd ${bytes / 2 ** 20} MiB of urandom`, `${Date.now() - t0} ms`);
  return file;
}

async function guestSha(vm: GuestVm, file: string): Promise<string> {
  return (await guestSh(vm, `sha256sum ${file}`, 60_000)).split(/\s+/)[0]!;
}

/** The guest sends `file` to the sink; checksums compared at both ends. */
async function guestToHost(vm: GuestVm, net: Subnet, sink: TcpSink, file: string): Promise<TransferResult> {
  const sum = await guestSha(vm, file);
  const got = sink.next(180_000);
  await guestSh(vm, `nc ${net.host} ${sink.port} < ${file}`, 180_000);
  const r = await got;
  expect(r.sha256).toBe(sum);
  return r;
}

let nextPort = 5001;
/** The host sends `bytes` random bytes to a guest `nc -l`; checksums compared at both ends. */
async function hostToGuest(vm: GuestVm, net: Subnet, bytes: number): Promise<TransferResult> {
  const port = nextPort++;
  const guest = vm.run(`nc -l -p ${port} </dev/null >/tmp/h2g && sha256sum /tmp/h2g && rm /tmp/h2g`, 180_000);
  const sent = await sendRandom(net.guest, port, bytes, { connectTimeoutMs: 20_000, timeoutMs: 180_000 });
  const g = await guest;
  expect(g.status).toBe(0);
  expect(g.output.split(/\s+/)[0]).toBe(sent.sha256);
  return sent;
}

interface PairCounters {
  rxPackets: number;
  txPackets: number;
  rxBytes: number;
  txBytes: number;
}

async function pairStats(be: Backend): Promise<PairCounters[]> {
  const [dev] = (await be.call('stats')) as { pairs: PairCounters[] }[];
  return dev!.pairs;
}


async function deviceStatus(be: Backend): Promise<DeviceStatus> {
  return (await be.call('status')).devices[0];
}

/** What a backend holds for one guest: compared before and after a reset to find leftovers. */
interface Holdings {
  fds: number;
  guestMappings: number;
  connections: number;
  runningVrings: number[];
}

async function holdings(be: Backend): Promise<Holdings> {
  const st = await deviceStatus(be);
  return { fds: countFds(be.proc.pid), guestMappings: countGuestMappings(be.proc.pid), connections: st.connections, runningVrings: st.runningVrings };
}

/** Results of the vhost-xdp path, printed next to QEMU's tap at the end. */
const comparison: { vhostUp?: TransferResult; vhostDown?: TransferResult; tapUp?: TransferResult; tapDown?: TransferResult } = {};

afterAll(() => {
  const fmt = (r?: TransferResult): string => (r ? `${(r.ms / 1000).toFixed(2)} s (${mibPerSec(r).toFixed(1)} MiB/s)` : 'n/a');
  console.log(
    [
      '[guest-net] 20 MiB TCP transfer times, TCG guest with 2 vCPUs, 2 queue pairs, MTU 1400:',
      `  vhost-xdp  guest→host ${fmt(comparison.vhostUp)}  host→guest ${fmt(comparison.vhostDown)}`,
      `  QEMU tap   guest→host ${fmt(comparison.tapUp)}  host→guest ${fmt(comparison.tapDown)}`,
      ...timings.map((t) => `  ${t}`),
    ].join('\n'),
  );
});

describe('a stock virtio_net guest on vhost-xdp serve (2 vCPUs, 2 queue pairs)', () => {
  const net = VHOST_NET;
  const cleanup = new CleanupStack();
  const dir = tempDir('guestnet');
  const socket = path.join(dir, 'vhost.sock');
  const tap = uniqueIfName('vxg');
  let be: Backend | undefined;
  let vm: GuestVm | undefined;
  let sink: TcpSink | undefined;
  const backendArgs = ['--socket', socket, '--port', `tap:${tap}`, '--queues', String(QUEUES), '--name', 'guestnet'];

  const guest = (): GuestVm => {
    if (!vm) throw new Error('guest did not boot');
    return vm;
  };
  const backend = (): Backend => {
    if (!be) throw new Error('backend is not running');
    return be;
  };
  /** Waits until the frontend is connected with every vring running; a timeout shows the backend's side. */
  const waitAllRunning = async (what: string, timeoutMs: number): Promise<void> => {
    let st: DeviceStatus | undefined;
    try {
      await waitUntil(async () => {
        st = await deviceStatus(backend());
        return st.connected && st.runningVrings.length === 2 * QUEUES;
      }, timeoutMs, what);
    } catch (e) {
      throw new Error(`${(e as Error).message}\nstatus: ${JSON.stringify(st)}\nbackend log:\n${backend().proc.tail(25)}`);
    }
  };

  beforeAll(async () => {
    cleanup.push(`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true }));
    // SIGTERM makes the backend remove its tap; this catches a backend that died first.
    cleanup.link(tap);
    cleanup.push('stop backend', () => be?.stop());
    be = await startBackend(backendArgs, { dir, name: 'vx-guestnet' });
    configureHostTap(tap, net);
    sink = await TcpSink.listen(net.host);
    cleanup.push('close sink', () => sink?.close());
    cleanup.push('shut the guest down', () => vm?.shutdown());
    vm = await GuestVm.boot({
      name: 'vx-guestnet',
      smp: 2,
      net: { kind: 'vhost-user', socket, queues: QUEUES, mac: MAC, mtu: MTU, reconnectMs: 1000 },
      // Issue 3 is about the stock driver; the image's default is the offload-aware one.
      append: 'vxdp.stock=1',
    });
    note('boot (vhost-user, TCG, 2 vCPUs)', `${vm.bootMs} ms`);
  }, 150_000);

  afterAll(async () => {
    await cleanup.run();
  }, 60_000);

  test('virtio_net binds with the MAC and host_mtu from the QEMU command line; the MTU reaches the tap; ping works both ways', async () => {
    const vm = guest();
    expect(await guestSh(vm, 'basename $(readlink /sys/class/net/eth0/device/driver)')).toBe('virtio_net');
    expect(await guestSh(vm, 'cat /sys/class/net/eth0/address')).toBe(MAC);
    expect(await guestSh(vm, 'cat /sys/class/net/eth0/mtu')).toBe(String(MTU));
    await waitUntil(() => backend().proc.tail(500).includes(`MTU ${MTU} applied to ${tap}`), 5000, 'the NET_SET_MTU log line');
    expect(getMtu(tap)).toBe(MTU);
    expect((await deviceStatus(backend())).mtu).toBe(MTU);
    await configureGuest(vm, net);
    await pingBothWays(vm, net);
  }, 90_000);

  test('20 MiB each way over TCP arrive with matching sha256, with checksum and TSO offloads negotiated', async () => {
    const vm = guest();
    const st = await deviceStatus(backend());
    console.log(`[guest-net] negotiated features ${st.featureBits}: ${st.features.join(' ')}`);
    for (const f of ['CSUM', 'GUEST_CSUM', 'HOST_TSO4', 'HOST_TSO6', 'GUEST_TSO4', 'GUEST_TSO6', 'MRG_RXBUF', 'VERSION_1', 'MQ']) {
      expect(st.features).toContain(f);
    }
    // The guest's side of the same negotiation: one character per feature bit.
    const bits = await guestSh(vm, 'cat /sys/class/net/eth0/device/features');
    console.log(`[guest-net] guest's virtio feature bits: ${bits}`);
    for (const b of [0, 1, 7, 8, 11, 12, 15, 22, 32]) expect(bits[b], `guest feature bit ${b}`).toBe('1');
    await makeGuestFile(vm, '/tmp/g2h', MIB20);
    comparison.vhostUp = await guestToHost(vm, net, sink!, '/tmp/g2h');
    note('vhost-xdp guest→host', rate(comparison.vhostUp));
    comparison.vhostDown = await hostToGuest(vm, net, MIB20);
    note('vhost-xdp host→guest', rate(comparison.vhostDown));
  }, 300_000);

  test('with 2 vCPUs the guest uses both queue pairs in both directions', async () => {
    const vm = guest();
    await configureGuest(vm, net);
    console.log(`[guest-net] guest queues: ${(await guestSh(vm, 'ls /sys/class/net/eth0/queues | tr "\\n" " "'))}`);
    console.log(`[guest-net] guest XPS: ${(await guestSh(vm, 'for q in /sys/class/net/eth0/queues/tx-*; do echo -n "${q##*/}=$(cat $q/xps_cpus) "; done'))}`);
    const before = await pairStats(backend());
    const sum = await guestSha(vm, '/tmp/g2h');
    // One flow sent from each vCPU: XPS maps CPU n to tx queue n. The tap answers each flow
    // on the queue it came from (tun's flow table), so ACKs exercise both rx queues too.
    const a = sink!.next(180_000);
    const b = sink!.next(180_000);
    await guestSh(vm, `taskset 1 nc ${net.host} ${sink!.port} < /tmp/g2h & taskset 2 nc ${net.host} ${sink!.port} < /tmp/g2h & wait`, 180_000);
    for (const r of await Promise.all([a, b])) expect(r.sha256).toBe(sum);
    const after = await pairStats(backend());
    const delta = after.map((p, i) => ({
      rxPackets: p.rxPackets - before[i]!.rxPackets,
      txPackets: p.txPackets - before[i]!.txPackets,
      txBytes: p.txBytes - before[i]!.txBytes,
    }));
    console.log(`[guest-net] per-pair deltas for two pinned flows: ${JSON.stringify(delta)}`);
    for (const d of delta) {
      expect(d.txBytes).toBeGreaterThan(MIB20 / 2);
      expect(d.rxPackets).toBeGreaterThan(50);
    }
  }, 240_000);

  test('unbinding and rebinding virtio_net in the guest resets the device: traffic works again, no state left behind', async () => {
    const vm = guest();
    await configureGuest(vm, net);
    await pingBothWays(vm, net, 1);
    const before = await holdings(backend());
    expect(before.runningVrings).toEqual([0, 1, 2, 3]);
    const dev = await guestSh(vm, 'basename $(readlink /sys/class/net/eth0/device)');
    await guestSh(vm, `echo ${dev} > /sys/bus/virtio/drivers/virtio_net/unbind`);
    await waitUntil(async () => (await deviceStatus(backend())).runningVrings.length === 0, 10_000, 'the backend to stop its vrings');
    await guestSh(vm, `echo ${dev} > /sys/bus/virtio/drivers/virtio_net/bind`);
    await waitAllRunning('the vrings to run again', 15_000);
    await configureGuest(vm, net);
    await pingBothWays(vm, net);
    await guestToHost(vm, net, sink!, '/tmp/g2h');
    await hostToGuest(vm, net, MIB20);
    const after = await holdings(backend());
    console.log(`[guest-net] backend before/after unbind+bind: ${JSON.stringify(before)} / ${JSON.stringify(after)}`);
    expect(after).toEqual(before);
  }, 180_000);

  test('a guest reboot resets the device: traffic works again, no state left behind', async () => {
    const vm = guest();
    await configureGuest(vm, net);
    await pingBothWays(vm, net, 1);
    const before = await holdings(backend());
    const ms = await vm.reboot();
    note('guest reboot (vhost-user)', `${ms} ms`);
    await waitAllRunning('the vrings to run after the reboot', 15_000);
    await configureGuest(vm, net);
    await pingBothWays(vm, net);
    await makeGuestFile(vm, '/tmp/g2h', MIB20);
    await guestToHost(vm, net, sink!, '/tmp/g2h');
    await hostToGuest(vm, net, MIB20);
    const after = await holdings(backend());
    console.log(`[guest-net] backend before/after reboot: ${JSON.stringify(before)} / ${JSON.stringify(after)}`);
    expect(after).toEqual(before);
  }, 240_000);

  test('SIGKILL during a 32 MiB guest→host stream: the same command line re-adopts the tap untouched (ifindex, MAC, address); QEMU reconnects; the stream completes intact', async () => {
    const vm = guest();
    await configureGuest(vm, net);
    const old = backend();
    const { connections } = await deviceStatus(old);
    expect(connections).toBeGreaterThanOrEqual(1);
    const hostSide = linkIdentity(tap);
    expect(hostSide.addresses).toBe(`${net.host}/24`);
    const { result, sent, atInterrupt, during } = await streamAcross({
      vm, host: net.host, bytes: MIB32,
      during: async () => {
        const r = await killAndRestart({
          old, vrings: 2 * QUEUES, guestAddr: net.guest,
          start: () => startBackend(backendArgs, { dir, name: 'vx-guestnet-2' }),
        });
        be = r.be;
        return r.timings;
      },
    });
    note('restart under a 32 MiB stream (tap)', formatTimings(during));
    note('interrupted stream', `${atInterrupt} B at the kill; ${rate(result)}`);
    expect(atInterrupt).toBeLessThan(MIB32);
    expect(result.bytes).toBe(MIB32);
    expect(result.sha256).toBe(sent);
    // Nobody touched the host side: the restarted serve found its tap as the operator left it.
    expect(linkIdentity(tap)).toEqual(hostSide);
    const st = await deviceStatus(backend());
    expect(st.port).toMatchObject({ adopted: true, created: true });
    expect(st.mtu).toBe(MTU);
    expect(st.connections).toBe(1);
    // A sane bound only: the figure itself is the bench's (npm run bench -- restart).
    expect(during.flowingMs).toBeLessThan(10_000);
    await pingBothWays(vm, net);
  }, 300_000);
});

describe("the same transfer through QEMU's own tap networking, for comparison", () => {
  const net = TAP_NET;
  const cleanup = new CleanupStack();
  const tap = uniqueIfName('vxq');
  let vm: GuestVm | undefined;
  let sink: TcpSink | undefined;

  beforeAll(async () => {
    // Same shape as the vhost-user guest: 2 queue pairs on a multi-queue tap, 2 vCPUs.
    cleanup.link(tap);
    runHost(['ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap', 'multi_queue']);
    runHost(['ip', 'link', 'set', 'dev', tap, 'mtu', String(MTU)]);
    configureHostTap(tap, net);
    sink = await TcpSink.listen(net.host);
    cleanup.push('close sink', () => sink?.close());
    cleanup.push('shut the guest down', () => vm?.shutdown());
    vm = await GuestVm.boot({ name: 'vx-qemutap', smp: 2, net: { kind: 'tap', ifname: tap, queues: QUEUES, mac: MAC, mtu: MTU }, append: 'vxdp.stock=1' });
    note('boot (QEMU tap, TCG, 2 vCPUs)', `${vm.bootMs} ms`);
  }, 150_000);

  afterAll(async () => {
    await cleanup.run();
  }, 60_000);

  test('20 MiB each way with matching sha256 over -netdev tap (times logged next to vhost-xdp)', async () => {
    if (!vm) throw new Error('guest did not boot');
    await configureGuest(vm, net);
    await pingBothWays(vm, net);
    await makeGuestFile(vm, '/tmp/g2h', MIB20);
    comparison.tapUp = await guestToHost(vm, net, sink!, '/tmp/g2h');
    note('QEMU tap guest→host', rate(comparison.tapUp));
    comparison.tapDown = await hostToGuest(vm, net, MIB20);
    note('QEMU tap host→guest', rate(comparison.tapDown));
  }, 240_000);
});
