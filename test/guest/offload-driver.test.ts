import { execFileSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { mountPinDir, startBackend, tempDir, unmountPinDir, type Backend } from '../support/backend.js';
import { addAddress, freeTestSubnet, CleanupStack, disableIpv6, linkIdentity, run as runHost, setLinkUp, uniqueIfName } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { PacketSocket, bytesToMac } from '../support/packet-socket.js';
import { udpFrame, seqOf } from '../support/frames.js';
import { GuestVm, guestSh } from '../support/guest/guest-vm.js';
import { sendRandom, TcpSink } from '../support/guest/host-endpoint.js';
import { formatTimings, killAndRestart } from '../support/guest/restart.js';

/**
 * The offload-aware guest driver (vm-images/virtio-net-offload.patch, built by
 * vm-images/build-driver.sh) in a real guest. Each guest boots with vxdp.nonet=1 (no
 * virtio_net loaded) and gets the module over its console.
 *
 * 1. Against a plain `vhost-xdp serve` without --offload nobody answers the claim, so the
 *    driver must behave like the stock virtio_net — the last queue pair is a data pair,
 *    traffic flows on every pair — and offload attempts fail at once with a reason. 2 vCPUs
 *    and 2 data pairs: the unanswered claim leaves the driver's offload buffers at the head
 *    of pair 1's receive ring and its CLAIM frame in pair 1's transmit ring, and both must be
 *    handled as the pair carries data.
 * 2. Against `serve --offload` (1 data pair + the offload pair) the driver claims the pair
 *    and `ip`/`bpftool` in the guest offload programs and maps to the host.
 */

const here = path.dirname(fileURLToPath(import.meta.url));
const VM_IMAGES = path.resolve(here, '../../vm-images');
const MODULE = path.join(VM_IMAGES, 'out/virtio_net_offload.ko');
/** The image carries the module (vm-images/build.sh); nonet=1 lets the test choose when to load it. */
const GUEST_KO = '/lib/vxdp/virtio_net_offload.ko';
const MAC = '52:54:00:5a:17:05';
const QUEUES = 2;
const net = freeTestSubnet(18);

interface PairCounters { rxPackets: number; txPackets: number; rxBytes: number; txBytes: number }

async function pairStats(be: Backend): Promise<PairCounters[]> {
  const [dev] = (await be.call('stats')) as { pairs: PairCounters[] }[];
  return dev!.pairs;
}

async function runningVrings(be: Backend): Promise<number[]> {
  return ((await be.call('status')).devices[0] as { runningVrings: number[] }).runningVrings;
}

interface OffloadShow {
  claimed: boolean;
  program: { name: string; insns: number } | null;
  maps: { handle: number; type: string }[];
  verdicts: { pass: number; drop: number; tx: number; aborted: number };
}

async function offloadShow(be: Backend, name: string): Promise<OffloadShow> {
  return (await be.call('offload.show', { name })) as OffloadShow;
}

/** Host pings the guest; returns how many replies came back. */
function hostPing(addr: string, count: number): number {
  const out = runHost(['ping', '-c', String(count), '-i', '0.2', '-w', '5', addr], { allowFail: true, timeoutMs: 15_000 });
  return Number(/(\d+) received/.exec(out)?.[1] ?? 0);
}

/** Id of the newest map called `name` (a detached program's maps may linger a moment). */
async function mapId(vm: GuestVm, name: string): Promise<number> {
  const maps = JSON.parse(await guestSh(vm, 'bpftool -j map show')) as { id: number; name: string }[];
  const ids = maps.filter((m) => m.name === name).map((m) => m.id);
  if (ids.length === 0) throw new Error(`no map named ${name} in the guest`);
  return Math.max(...ids);
}

describe('offload-aware virtio_net against a backend without --offload (2 vCPUs, 2 queue pairs)', () => {
  const cleanup = new CleanupStack();
  const dir = tempDir('offdrv');
  const socket = path.join(dir, 'vhost.sock');
  const tap = uniqueIfName('vxo');
  let be: Backend | undefined;
  let vm: GuestVm | undefined;
  let sink: TcpSink | undefined;
  const guest = (): GuestVm => {
    if (!vm) throw new Error('guest did not boot');
    return vm;
  };

  beforeAll(async () => {
    cleanup.push(`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true }));
    // The image (built by the bootstrap) carries the module at GUEST_KO.
    if (!existsSync(MODULE)) throw new Error(`${MODULE} was not built (vm-images/build.sh builds it)`);
    cleanup.link(tap);
    cleanup.push('stop backend', () => be?.stop());
    be = await startBackend(['--socket', socket, '--port', `tap:${tap}`, '--queues', String(QUEUES), '--name', 'offdrv'], { dir, name: 'vx-offdrv' });
    disableIpv6(tap);
    addAddress(tap, `${net.host}/24`);
    setLinkUp(tap);
    sink = await TcpSink.listen(net.host);
    cleanup.push('close sink', () => sink?.close());
    cleanup.push('shut the guest down', () => vm?.shutdown());
    vm = await GuestVm.boot({
      name: 'vx-offdrv',
      smp: 2,
      append: 'vxdp.nonet=1',
      net: { kind: 'vhost-user', socket, queues: QUEUES, mac: MAC, reconnectMs: 1000 },
    });
    const t0 = Date.now();
    console.log(`[offload-driver] boot ${vm.bootMs} ms, module copied over the console in ${Date.now() - t0} ms`);
  }, 150_000);

  afterAll(async () => {
    await cleanup.run();
  }, 60_000);

  test('the patched module loads in place of the stock one, binds the device, and gives up the claim within about a second', async () => {
    const vm = guest();
    expect((await vm.run('test -d /sys/class/net/eth0')).status).not.toBe(0);
    await guestSh(vm, 'modprobe net_failover');
    const t0 = Date.now();
    await guestSh(vm, `insmod ${GUEST_KO}`, 20_000);
    const loadMs = Date.now() - t0;
    expect(await guestSh(vm, 'basename $(readlink /sys/class/net/eth0/device/driver)')).toBe('virtio_net');
    // Only the patched module has these parameters.
    expect(await guestSh(vm, 'cat /sys/module/virtio_net/parameters/offload')).toBe('Y');
    const dmesg = await guestSh(vm, 'dmesg | grep -i "offload"');
    console.log(`[offload-driver] insmod took ${loadMs} ms; dmesg:\n${dmesg}`);
    expect(dmesg).toMatch(/did not answer the offload claim.*queue pair 1 stays a data pair/);
    expect(loadMs).toBeLessThan(15_000);
    expect(await guestSh(vm, 'cat /sys/class/net/eth0/address')).toBe(MAC);
  }, 60_000);

  test('with the claim unanswered the last pair is a data pair: both pairs carry traffic, ping and TCP both ways work', async () => {
    const vm = guest();
    expect((await guestSh(vm, 'ls /sys/class/net/eth0/queues')).split(/\s+/).sort()).toEqual(['rx-0', 'rx-1', 'tx-0', 'tx-1']);
    expect(await runningVrings(be!)).toEqual([0, 1, 2, 3]);
    const before = await pairStats(be!);
    await guestSh(vm, `ip addr add ${net.guest}/24 dev eth0 && ip link set eth0 up`);
    const first = await vm.run(`ping -c 3 -w 20 ${net.host}`, 30_000);
    if (first.status !== 0) {
      console.log(`[offload-driver] DEBUG ping failed:\n${first.output}\n${await guestSh(vm, 'ip -s link show eth0; ip neigh; dmesg | tail -5')}\n` +
        `${JSON.stringify(await pairStats(be!))}\n${runHost(['ip', '-s', 'link', 'show', tap])}`);
    }
    expect(first.status).toBe(0);
    runHost(['ping', '-c', '3', '-w', '15', '-i', '0.3', net.guest], { timeoutMs: 20_000 });
    // One flow from each vCPU: XPS sends CPU n's traffic on tx queue n, so pair 1 — where the
    // claim frame and the offload buffers were left — carries a flow in both directions.
    await guestSh(vm, 'dd if=/dev/urandom of=/tmp/up bs=64k count=32 2>/dev/null');
    const sum = (await guestSh(vm, 'sha256sum /tmp/up')).split(/\s+/)[0];
    const a = sink!.next(60_000);
    const b = sink!.next(60_000);
    await guestSh(vm, `taskset 1 nc ${net.host} ${sink!.port} </tmp/up & taskset 2 nc ${net.host} ${sink!.port} </tmp/up & wait`, 60_000);
    for (const r of await Promise.all([a, b])) expect(r.sha256).toBe(sum);
    const port = 5301;
    const down = vm.run(`nc -l -p ${port} </dev/null | sha256sum`, 60_000);
    const sent = await sendRandom(net.guest, port, 2 << 20, { connectTimeoutMs: 20_000, timeoutMs: 60_000 });
    const got = await down;
    expect(got.status).toBe(0);
    expect(got.output.split(/\s+/)[0]).toBe(sent.sha256);
    const after = await pairStats(be!);
    const delta = after.map((p, i) => ({
      rxPackets: p.rxPackets - before[i]!.rxPackets, txPackets: p.txPackets - before[i]!.txPackets,
      rxBytes: p.rxBytes - before[i]!.rxBytes, txBytes: p.txBytes - before[i]!.txBytes,
    }));
    console.log(`[offload-driver] backend per-pair deltas: ${JSON.stringify(delta)}`);
    // Guest→host: a 2 MiB flow from each vCPU, one per pair; host→guest: ACKs and data.
    for (const d of delta) {
      expect(d.txBytes).toBeGreaterThan(1 << 20);
      expect(d.rxPackets).toBeGreaterThan(20);
    }
  }, 120_000);

  test('xdpoffload fails at once with a message that offload is not available, and nothing is attached', async () => {
    const vm = guest();
    const t0 = Date.now();
    const r = await vm.run('ip link set dev eth0 xdpoffload obj /bpf/xdp_drop.o sec xdp 2>&1', 30_000);
    const ms = Date.now() - t0;
    console.log(`[offload-driver] xdpoffload without a claimed pair (${ms} ms, status ${r.status}):\n${r.output}`);
    expect(r.status).not.toBe(0);
    expect(ms).toBeLessThan(10_000);
    const why = `${r.output}\n${await guestSh(vm, 'dmesg | tail -n 20')}`;
    expect(why).toMatch(/offload is not available/i);
    expect(await guestSh(vm, 'ip link show dev eth0')).not.toMatch(/xdpoffload|prog\/xdp/);
    // The device still passes traffic.
    await guestSh(vm, `ping -c 2 -w 10 ${net.host}`, 20_000);
  }, 60_000);

  test('unloading the module with offload buffers still in a data ring frees them cleanly; loading it again binds the device', async () => {
    const vm = guest();
    await guestSh(vm, 'rmmod virtio_net', 20_000);
    expect((await vm.run('test -d /sys/class/net/eth0')).status).not.toBe(0);
    // The reset reached the backend: it stopped every ring.
    await waitUntil(async () => (await runningVrings(be!)).length === 0, 10_000, 'the backend to stop the vrings');
    await guestSh(vm, `insmod ${GUEST_KO}`, 20_000);
    expect(await guestSh(vm, 'basename $(readlink /sys/class/net/eth0/device/driver)')).toBe('virtio_net');
    const bad = await vm.run('dmesg | grep -E "BUG|WARNING|Oops|general protection|refcount|list_del"');
    expect(bad.output).toBe('');
  }, 60_000);
});

describe('offload-aware virtio_net against serve --offload (1 data pair + the offload pair)', () => {
  const cleanup = new CleanupStack();
  const dir = tempDir('offe2e');
  const socket = path.join(dir, 'vhost.sock');
  const tap = uniqueIfName('vxo');
  const name = 'offe2e';
  const e2e = freeTestSubnet(19);
  let args: string[] = [];
  let be: Backend | undefined;
  let vm: GuestVm | undefined;
  const guest = (): GuestVm => {
    if (!vm) throw new Error('guest did not boot');
    return vm;
  };
  const rxPackets = async (): Promise<number> => Number(await guestSh(guest(), 'cat /sys/class/net/eth0/statistics/rx_packets'));

  beforeAll(async () => {
    cleanup.push(`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true }));
    execFileSync(path.join(VM_IMAGES, 'build-driver.sh'), { stdio: ['ignore', 'inherit', 'inherit'], timeout: 300_000 });
    cleanup.link(tap);
    const pinRoot = mountPinDir(dir);
    cleanup.push(`unmount ${pinRoot}`, () => unmountPinDir(pinRoot));
    args = ['--socket', socket, '--port', `tap:${tap}`, '--queues', '1', '--offload', '--pin-dir', pinRoot, '--name', name];
    cleanup.push('stop backend', () => be?.stop());
    be = await startBackend(args, { dir, name: 'vx-offe2e' });
    disableIpv6(tap);
    addAddress(tap, `${e2e.host}/24`);
    setLinkUp(tap);
    cleanup.push('shut the guest down', () => vm?.shutdown());
    vm = await GuestVm.boot({
      name: 'vx-offe2e',
      // Two vCPUs: the last test swaps in the stock driver, which enables one pair per vCPU.
      smp: 2,
      append: 'vxdp.nonet=1',
      net: { kind: 'vhost-user', socket, queues: 2, mac: MAC, reconnectMs: 1000 },
    });
  }, 150_000);

  afterAll(async () => {
    await cleanup.run();
  }, 60_000);

  test('the driver claims the last pair at probe and keeps the other one for data', async () => {
    const vm = guest();
    await guestSh(vm, `modprobe net_failover && insmod ${GUEST_KO}`, 20_000);
    expect(await guestSh(vm, 'dmesg | grep "XDP offload"')).toMatch(/claimed queue pair 1 .*1 data queue pairs/);
    expect((await guestSh(vm, 'ls /sys/class/net/eth0/queues')).split(/\s+/).sort()).toEqual(['rx-0', 'tx-0']);
    expect((await offloadShow(be!, name)).claimed).toBe(true);
    await guestSh(vm, `ip addr add ${e2e.guest}/24 dev eth0 && ip link set eth0 up`);
    await guestSh(vm, `ping -c 2 -w 15 ${e2e.host}`, 30_000);
    expect(hostPing(e2e.guest, 3)).toBe(3);
  }, 60_000);

  test('xdpoffload of xdp_drop.o runs on the host: host→guest frames are dropped there, the guest sees none, bpftool reads and writes the host map', async () => {
    const vm = guest();
    await guestSh(vm, 'ip link set dev eth0 xdpoffload obj /bpf/xdp_drop.o sec xdp 2>&1', 30_000);
    expect(await guestSh(vm, 'ip link show dev eth0')).toMatch(/xdpoffload[\s\S]*prog\/xdp id \d+ name xdp_drop/);
    const show = await offloadShow(be!, name);
    expect(show.program?.name).toBe('xdp_drop_prog');
    expect(show.maps.map((m) => m.type)).toEqual(['ARRAY']);
    const rx0 = await rxPackets();
    const drop0 = show.verdicts.drop;
    expect(hostPing(e2e.guest, 5)).toBe(0);
    const drops = (await offloadShow(be!, name)).verdicts.drop - drop0;
    expect(drops).toBeGreaterThanOrEqual(5);
    expect(await rxPackets()).toBe(rx0);
    // The guest's map is the host's: its counter matches the host's verdict counter.
    const dump = await guestSh(vm, 'bpftool -j map dump name drop_count');
    const value = (JSON.parse(dump) as { value: string[] }[])[0]!.value;
    // A stray host frame (ARP) may be dropped between reading the verdicts and the dump.
    const mapped = Number.parseInt(value[0]!, 16) + 256 * Number.parseInt(value[1]!, 16);
    expect(mapped).toBeGreaterThanOrEqual(drop0 + drops);
    expect(mapped).toBeLessThanOrEqual(drop0 + drops + 5);
    // Written from the guest, counted on by the host program (stray host frames may add a few).
    const counter = async (): Promise<number> => {
      const v = (JSON.parse(await guestSh(vm, 'bpftool -j map lookup name drop_count key 0 0 0 0')) as { value: string[] }).value;
      return v.reduce((acc, b, i) => acc + Number.parseInt(b, 16) * 256 ** i, 0);
    };
    await guestSh(vm, 'bpftool map update name drop_count key 0 0 0 0 value 0 0 0 0 1 0 0 0');
    const written = await counter();
    expect(written).toBeGreaterThanOrEqual(2 ** 32);
    expect(written).toBeLessThan(2 ** 32 + 5);
    // Two frames straight into the tap: ping's own frames depend on the host's neighbour state
    // for the guest (its ARP requests are dropped too), and on the tap's tc egress a dropped
    // frame is ENOBUFS to its local sender, which ping retries at its own pace.
    const ps = PacketSocket.open(tap);
    try {
      for (let i = 0; i < 2; i++) ps.send(udpFrame(6_000 + i, 64, 9999, '52:54:00:0f:0f:0e', MAC), { dropOk: true });
    } finally {
      ps.close();
    }
    await waitUntil(async () => (await counter()) >= written + 2, 10_000, 'two more drops counted in the guest\'s map');
  }, 60_000);

  test('with --pin-dir, SIGKILL and a restart with the same command line keep the offload: host UDP still dies on the host and is counted, the guest\'s bpftool map dump still works', async () => {
    const vm = guest();
    await guestSh(vm, 'ip -force link set dev eth0 xdpoffload obj /bpf/xdp_drop.o sec xdp 2>&1', 30_000);
    const hostSide = linkIdentity(tap);
    const before = (await be!.call('offload.show', { name })) as OffloadShow & { program: { id: number } };
    expect(before.program?.name).toBe('xdp_drop_prog');
    let seq = 7_000;
    /** n UDP frames from the host into the tap: each one dropped by the program on the host (the verdict counter moves), none reaches the guest. */
    const allDropped = async (n: number): Promise<void> => {
      const rx0 = await rxPackets();
      const d0 = (await offloadShow(be!, name)).verdicts.drop;
      const ps = PacketSocket.open(tap);
      try {
        // Dropped at the tap's tc egress, a frame is NET_XMIT_DROP (ENOBUFS) to its sender.
        for (let i = 0; i < n; i++) ps.send(udpFrame(seq++, 64, 9999, '52:54:00:0f:0f:0e', MAC), { dropOk: true });
      } finally {
        ps.close();
      }
      await waitUntil(async () => (await offloadShow(be!, name)).verdicts.drop - d0 >= n, 10_000, `${n} drops counted on the host`);
      expect(await rxPackets()).toBe(rx0);
    };
    /** drop_count[0] as the guest reads it: `bpftool map dump` goes through the driver to the host's map. */
    const guestCount = async (): Promise<number> => {
      const dump = JSON.parse(await guestSh(vm, `bpftool -j map dump id ${await mapId(vm, 'drop_count')}`)) as { value: string[] }[];
      return dump[0]!.value.reduce((acc, b, i) => acc + Number.parseInt(b, 16) * 256 ** i, 0);
    };
    await allDropped(10);
    const counted = await guestCount();
    expect(counted).toBeGreaterThanOrEqual(10);
    const { be: restarted, timings } = await killAndRestart({ old: be!, vrings: 4, start: () => startBackend(args, { dir, name: 'vx-offe2e-2' }) });
    be = restarted;
    console.log(`[offload-driver] restart with a program offloaded: ${formatTimings(timings)}`);
    const after = (await be.call('offload.show', { name })) as OffloadShow & { program: { id: number } };
    expect(after.claimed).toBe(true);
    expect(after.program).toMatchObject({ name: 'xdp_drop_prog', id: before.program.id });
    expect(after.maps.map((m) => m.handle)).toEqual(before.maps.map((m) => m.handle));
    await allDropped(10);
    // The same kernel map, its count carried across the restart, read by the guest's unchanged handle.
    const recounted = await guestCount();
    expect(recounted).toBeGreaterThanOrEqual(counted + 10);
    expect(recounted).toBeLessThanOrEqual(counted + 15);
    expect(await guestSh(vm, 'ip link show dev eth0')).toMatch(/xdpoffload[\s\S]*prog\/xdp id \d+ name xdp_drop/);
    expect(linkIdentity(tap)).toEqual(hostSide);
  }, 120_000);

  test('a program with a forbidden helper is refused with the host\'s reason; xdpoffload off restores delivery', async () => {
    const vm = guest();
    await guestSh(vm, 'ip link set dev eth0 xdpoffload off');
    const r = await vm.run('ip link set dev eth0 xdpoffload obj /bpf/bad_trace_printk.o sec xdp 2>&1', 30_000);
    expect(r.status).not.toBe(0);
    expect(r.output).toMatch(/host refused the program: helper bpf_trace_printk \(6\) is not allowed/);
    expect((await offloadShow(be!, name)).program).toBeNull();
    const rx0 = await rxPackets();
    expect(hostPing(e2e.guest, 3)).toBe(3);
    expect(await rxPackets()).toBeGreaterThanOrEqual(rx0 + 3);
  }, 60_000);

  test('xdp_tx.o offloaded bounces host frames back to the host with swapped MACs', async () => {
    const vm = guest();
    await guestSh(vm, 'ip -force link set dev eth0 xdpoffload obj /bpf/xdp_tx.o sec xdp 2>&1', 30_000);
    const tx0 = (await offloadShow(be!, name)).verdicts.tx;
    const ps = PacketSocket.open(tap);
    try {
      const peer = '52:54:00:0f:0f:0f';
      const frame = udpFrame(31337, 100, 7, peer, MAC);
      ps.drain();
      ps.send(frame);
      const back = ps.recvAll(1, 3000, (f) => seqOf(f) === 31337);
      expect(back.length).toBe(1);
      expect(bytesToMac(back[0]!, 0)).toBe(peer);
      expect(bytesToMac(back[0]!, 6)).toBe(MAC);
    } finally {
      ps.close();
    }
    expect((await offloadShow(be!, name)).verdicts.tx).toBeGreaterThan(tx0);
    await guestSh(vm, 'ip link set dev eth0 xdpoffload off');
  }, 60_000);

  test('a silent host costs a bounded wait and -ETIMEDOUT; its late answer is told apart by seq once it is back', async () => {
    const vm = guest();
    await guestSh(vm, 'ip -force link set dev eth0 xdpoffload obj /bpf/xdp_drop.o sec xdp 2>&1', 30_000);
    const pid = be!.proc.pid;
    process.kill(pid, 'SIGSTOP');
    let r;
    const t0 = Date.now();
    const id = await mapId(vm, 'drop_count');
    try {
      r = await vm.run(`bpftool map lookup id ${id} key 0 0 0 0 2>&1`, 30_000);
    } finally {
      process.kill(pid, 'SIGCONT');
    }
    const ms = Date.now() - t0;
    console.log(`[offload-driver] lookup with the backend stopped: status ${r.status} after ${ms} ms: ${r.output}`);
    expect(r.status).not.toBe(0);
    expect(r.output).toMatch(/timed out/i);
    expect(ms).toBeLessThan(15_000);
    // The stale answer to the timed-out request arrives first and is skipped.
    expect(await guestSh(vm, `bpftool map lookup id ${id} key 0 0 0 0`)).toMatch(/value:/);
    await guestSh(vm, 'ip link set dev eth0 xdpoffload off');
  }, 60_000);

  test('unloading the driver with a program and a map offloaded leaves nothing on the host', async () => {
    const vm = guest();
    await guestSh(vm, 'ip -force link set dev eth0 xdpoffload obj /bpf/xdp_blocklist.o sec xdp 2>&1', 30_000);
    const before = await offloadShow(be!, name);
    expect(before.program?.name).toBe('xdp_blocklist_p');
    expect(before.maps.map((m) => m.type)).toContain('HASH');
    await guestSh(vm, 'rmmod virtio_net', 20_000);
    const after = await offloadShow(be!, name);
    expect(after).toMatchObject({ claimed: false, program: null, maps: [] });
    const bad = await vm.run('dmesg | grep -E "BUG|WARNING|Oops|general protection|refcount|list_del"');
    expect(bad.output).toBe('');
  }, 60_000);

  test('a stock virtio_net against the --offload backend uses the reserved pair for data', async () => {
    const vm = guest();
    // The offload-aware driver was unloaded above; the stock one takes the same device.
    await guestSh(vm, 'modprobe virtio_net', 20_000);
    await waitUntil(async () => (await be!.call('status')).devices[0].runningVrings.length === 4, 20_000, 'all four vrings running');
    expect((await be!.call('status')).devices[0].offload).toMatchObject({ claimed: false });
    expect((await guestSh(vm, 'ls /sys/class/net/eth0/queues')).split(/\s+/).sort()).toEqual(['rx-0', 'rx-1', 'tx-0', 'tx-1']);
    await guestSh(vm, `ip addr add ${e2e.guest}/24 dev eth0 && ip link set eth0 up`);
    await guestSh(vm, `ping -c 2 -w 15 ${e2e.host}`, 30_000);
    const sink = await TcpSink.listen(e2e.host);
    try {
      const before = (await be!.call('stats', { name }))[0].pairs as { txBytes: number; rxPackets: number }[];
      await guestSh(vm, 'dd if=/dev/urandom of=/tmp/up bs=64k count=32 2>/dev/null');
      const sum = (await guestSh(vm, 'sha256sum /tmp/up')).split(/\s+/)[0];
      const a = sink.next(60_000);
      const b = sink.next(60_000);
      // One flow per vCPU: XPS puts CPU n's flow on tx queue n, so pair 1 carries one.
      await guestSh(vm, `taskset 1 nc ${e2e.host} ${sink.port} </tmp/up & taskset 2 nc ${e2e.host} ${sink.port} </tmp/up & wait`, 60_000);
      for (const r of await Promise.all([a, b])) expect(r.sha256).toBe(sum);
      const after = (await be!.call('stats', { name }))[0].pairs as { txBytes: number; rxPackets: number }[];
      const delta = after.map((p, i) => ({ txBytes: p.txBytes - before[i]!.txBytes, rxPackets: p.rxPackets - before[i]!.rxPackets }));
      console.log(`[offload-driver] stock driver on the offload backend, per-pair deltas: ${JSON.stringify(delta)}`);
      for (const d of delta) {
        expect(d.txBytes).toBeGreaterThan(1 << 20);
        expect(d.rxPackets).toBeGreaterThan(20);
      }
    } finally {
      sink.close();
    }
  }, 120_000);
});
