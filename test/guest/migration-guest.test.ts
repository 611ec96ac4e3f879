// Guest-level live migration with QEMU 10 (TCG): two backends on this host, one port each, both
// ports in one Linux bridge that holds the host's address, so the guest keeps its address and
// the host's TCP sink across the move. One guest per port kind carries every case of its
// describe in order (boots are the expensive part):
//  - tap + --offload: a destination without --offload refuses the offloaded guest's state (the
//    source runs on with its program); a throttled migration cancelled half-way leaves the source
//    as it was; then a migration while the guest streams 16 MiB to the host and the host sends
//    UDP the offloaded program drops and counts: the stream, the program and its map arrive on
//    B, and A holds nothing once the source QEMU is gone; then the object path (`vxdp load` of
//    the realistic sample) on B, and the guest moved back to A with it: drops, per-CPU counters
//    and LRU flows carry over, `vxdp unload` on A leaves nothing, B holds nothing.
//  - xsk ports: the same move with a stream, then an idle guest moved back, which must be
//    reachable from the host at once (GUEST_ANNOUNCE / SEND_RARP).
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { countGuestMappings, mountPinDir, startBackend, tempDir, unmountPinDir, type Backend } from '../support/backend.js';
import { addAddress, addToBridge, CleanupStack, createBridge, fdbPort, freeTestSubnet, run as runHost, uniqueIfName } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { guestSh, type GuestVm, type GuestVmOptions } from '../support/guest/guest-vm.js';
import { sendUdp, TcpSink } from '../support/guest/host-endpoint.js';
import { bootWithQmp, migrate, quit, startIncoming, waitRunning, type MigrationOutcome, type QmpGuest } from '../support/guest/migration.js';
import { existsNow, type KernelObjectKind } from '../offload/helpers.js';

const MIB16 = 16 * 2 ** 20;
const CHUNK = 256 * 1024;

/** Host pings the guest; returns how many replies came back. */
function hostPing(addr: string, count: number): number {
  const out = runHost(['ping', '-c', String(count), '-i', '0.2', '-W', '2', addr], { allowFail: true, timeoutMs: 20_000 });
  return Number(/(\d+) received/.exec(out)?.[1] ?? 0);
}

/** Milliseconds until a one-shot host ping gets its reply (throws after timeoutMs). */
async function msUntilPingable(addr: string, timeoutMs: number): Promise<number> {
  const t0 = Date.now();
  await waitUntil(() => hostPing(addr, 1) === 1, timeoutMs, `${addr} answering the host`, 0);
  return Date.now() - t0;
}

/** Two backends on one bridge that holds the host address (.1); the guest is .2, .3 is a second host address. */
class Bridged {
  readonly cleanup = new CleanupStack();
  readonly dir: string;
  readonly bridge = uniqueIfName('vxbr');
  readonly net = freeTestSubnet(18);
  readonly udpFrom: string;
  readonly timings: string[] = [];
  sink!: TcpSink;

  constructor(tag: string) {
    this.dir = tempDir(tag);
    this.udpFrom = this.net.host.replace(/\.1$/, '.3');
  }

  async up(): Promise<void> {
    createBridge(this.bridge);
    this.cleanup.link(this.bridge);
    addAddress(this.bridge, `${this.net.host}/24`);
    addAddress(this.bridge, `${this.udpFrom}/24`);
    this.sink = await TcpSink.listen(this.net.host);
    this.cleanup.push('close sink', () => this.sink.close());
  }

  /** Addresses the guest on the bridge's subnet and checks it reaches the host. */
  async guestUp(vm: GuestVm): Promise<void> {
    await guestSh(vm, `ip addr add ${this.net.guest}/24 dev eth0 && ip link set eth0 up`);
    await guestSh(vm, `ping -c 2 -w 15 ${this.net.host}`, 30_000);
    this.timings.push(`boot ${vm.bootMs} ms`);
  }

  /** Prints what the cases measured and undoes the setup (afterAll). */
  async finish(tag: string): Promise<void> {
    console.log(`[migration-guest ${tag}] ${this.timings.join('; ')}`);
    await this.cleanup.run();
  }

  /** `serve ARGS` with its port (tap:IF or xsk:IF) in the bridge unless `bridged` is false. */
  async backend(tag: string, kind: 'tap' | 'xsk', args: string[], bridged = true): Promise<{ be: Backend; socket: string; ifname: string; name: string }> {
    const ifname = uniqueIfName(`vxm${tag}`);
    const socket = path.join(this.dir, `${tag}.sock`);
    const be = await startBackend(['--socket', socket, '--port', `${kind}:${ifname}`, '--name', tag, ...args], { dir: tempDir(`mig${tag}`), name: `vx-mig-${tag}` });
    // The backend removes the port it created; the link entry is the fallback.
    this.cleanup.link(ifname);
    this.cleanup.push(`stop backend ${tag}`, () => be.stop());
    if (bridged) addToBridge(ifname, this.bridge);
    return { be, socket, ifname, name: tag };
  }
}

async function devStatus(be: Backend): Promise<any> {
  return (await be.call('status')).devices[0];
}

/**
 * The guest sends 16 MiB of urandom to the sink, 256 KiB at a time with a pause between chunks,
 * so the stream lasts seconds and spans the migration. Resolves with the file's sha256 once
 * the stream started (the host has bytes).
 */
async function startStream(vm: GuestVm, b: Bridged): Promise<{ sum: string; done: Promise<{ bytes: number; sha256: string; ms: number }> }> {
  await guestSh(vm, `dd if=/dev/urandom of=/tmp/up bs=1M count=${MIB16 / 2 ** 20} 2>/dev/null`, 60_000);
  const sum = (await guestSh(vm, 'sha256sum /tmp/up', 60_000)).split(/\s+/)[0]!;
  const done = b.sink.next(180_000);
  const received0 = b.sink.received;
  await guestSh(vm, `(i=0; while [ $i -lt ${MIB16 / CHUNK} ]; do dd if=/tmp/up bs=${CHUNK} skip=$i count=1 2>/dev/null; usleep 30000; i=$((i+1)); done) ` +
    `| nc ${b.net.host} ${b.sink.port} >/dev/null 2>&1 &`);
  await waitUntil(() => b.sink.received - received0 > 1 << 20, 30_000, 'the stream under way');
  return { sum, done };
}

function report(tag: string, m: MigrationOutcome): string {
  return `${tag}: ${m.status} in ${m.ms} ms (QEMU total ${m.info['total-time'] ?? '-'} ms, downtime ${m.info.downtime ?? '-'} ms, RAM ${m.info.ram?.transferred ?? '-'} B)`;
}

/** No kernel object has this id any more (a freed program drops its maps after an RCU grace period). */
function gone(kind: KernelObjectKind, id: number): Promise<boolean> {
  return waitUntil(() => !existsNow(kind, id), 3000, `kernel ${kind} ${id} freed`).then(() => true, () => false);
}

function filesUnder(dir: string): string[] {
  let entries;
  try { entries = readdirSync(dir, { withFileTypes: true }); } catch { return []; }
  return entries.flatMap((e) => (e.isDirectory() ? filesUnder(path.join(dir, e.name)) : [path.join(dir, e.name)]));
}

/** The blocklist hits the guest's bpftool reads (the map lives on the host) for `addr`. */
async function guestHits(vm: GuestVm, addr: string): Promise<number> {
  const dump = JSON.parse(await guestSh(vm, 'bpftool -j map dump name blocklist')) as { key: string[]; value: string[] }[];
  const want = addr.split('.').map(Number);
  const e = dump.find((d) => d.key.every((k, i) => Number.parseInt(k, 16) === want[i]));
  return e ? e.value.reduce((acc, b, i) => acc + Number.parseInt(b, 16) * 256 ** i, 0) : -1;
}

/** The object-path sample (bpf/xdp_filter_obj.c, default config): drops UDP from source port 4003, passes the rest. */
const SAMPLE = '/bpf/xdp_filter_obj.o';
const DROP_SPORT = 4003;
const PASS_SPORT = 4004;
/** Counter indexes of the sample's PERCPU_ARRAY (enum C_* in xdp_filter_obj.c). */
const C_PASSED = 1;
const C_DROPPED = 2;

interface VxdpShow { loaded: boolean; program: string; tag: string; maps: { name: string; type: string }[] }

/** Little-endian bytes (bpftool's hex strings) as a number. */
const le = (b: string[]): number => b.reduce((acc, x, i) => acc + Number.parseInt(x, 16) * 256 ** i, 0);

/** `vxdp map dump counters`: each counter's per-CPU values, by index. */
async function perCpuCounters(vm: GuestVm): Promise<Map<number, number[]>> {
  const dump = JSON.parse(await guestSh(vm, 'vxdp map dump counters --json')) as { key: string[]; values: { cpu: number; value: string[] }[] }[];
  return new Map(dump.map((e) => [le(e.key), e.values.map((v) => le(v.value))]));
}

/** `vxdp map dump flows`: packets per (source port, destination port) of the LRU's flows (struct flow_key: saddr, daddr, then ports in host order). */
async function flowCounts(vm: GuestVm): Promise<Map<string, number>> {
  const dump = JSON.parse(await guestSh(vm, 'vxdp map dump flows --json')) as { key: string[]; value: string[] }[];
  return new Map(dump.map((e) => [`${le(e.key.slice(8, 10))}>${le(e.key.slice(10, 12))}`, le(e.value)]));
}

/** UDP datagrams the guest's stack took in (delivered, to no listener, or in error): /proc/net/snmp's Udp row. */
async function guestUdpIn(vm: GuestVm): Promise<number> {
  const rows = (await guestSh(vm, 'grep ^Udp: /proc/net/snmp')).trim().split('\n').map((l) => l.trim().split(/\s+/));
  const [names, values] = [rows[0]!, rows[1]!];
  return ['InDatagrams', 'NoPorts', 'InErrors'].reduce((n, k) => n + Number(values[names.indexOf(k)]), 0);
}

describe('live migration of an offloaded guest between two tap backends in one bridge (QEMU 10, TCG)', () => {
  const b = new Bridged('migoff');
  const MAC = '52:54:00:5a:17:21';
  let pins = '';
  let A: Awaited<ReturnType<Bridged['backend']>>;
  let B: Awaited<ReturnType<Bridged['backend']>>;
  let C: Awaited<ReturnType<Bridged['backend']>>;
  /** The guest's QEMU now, and the backend that serves it (the busy case moves it from A to B). */
  let src: QmpGuest | undefined;
  let at: Awaited<ReturnType<Bridged['backend']>>;
  /** Datagrams from udpFrom the program dropped so far (every case adds to it). */
  let dropped = 0;
  const timings = b.timings;
  const opts = (name: string, socket: string): GuestVmOptions => ({ name, memMiB: 256, smp: 1, net: { kind: 'vhost-user', socket, queues: 2, mac: MAC } });
  const guest = (): QmpGuest => { if (!src) throw new Error('guest did not boot'); return src; };

  /** Sends n datagrams from the blocked address; the guest's map must count every one. */
  async function dropMore(vm: GuestVm, n: number): Promise<void> {
    const rx0 = Number(await guestSh(vm, 'cat /sys/class/net/eth0/statistics/rx_packets'));
    await sendUdp(b.udpFrom, b.net.guest, 9, n);
    dropped += n;
    await waitUntil(async () => (await guestHits(vm, b.udpFrom)) >= dropped, 10_000, `${dropped} drops counted`).catch(() => undefined);
    expect(await guestHits(vm, b.udpFrom)).toBe(dropped);
    // Dropped on the host: none of them reached the guest (a stray frame may: ARP, TCP).
    expect(Number(await guestSh(vm, 'cat /sys/class/net/eth0/statistics/rx_packets')) - rx0).toBeLessThan(n);
  }

  beforeAll(async () => {
    await b.up();
    pins = mountPinDir(b.dir);
    b.cleanup.push('unmount pins', () => unmountPinDir(pins));
    A = await b.backend('miga', 'tap', ['--queues', '1', '--offload', '--pin-dir', pins]);
    B = await b.backend('migb', 'tap', ['--queues', '1', '--offload', '--pin-dir', pins]);
    // The same queue count as the guest's (1 data pair + the offload pair), no --offload.
    C = await b.backend('migc', 'tap', ['--queues', '2'], false);
    at = A;
    b.cleanup.push('quit the source QEMU', () => src && quit(src));
    // The image's init loads the offload-aware driver, which claims pair 1 of a --offload backend.
    src = await bootWithQmp(opts('vx-migoff-a', A.socket), b.dir);
    await b.guestUp(src.vm);
    await guestSh(src.vm, 'ip link set dev eth0 xdpoffload obj /bpf/xdp_blocklist.o sec xdp 2>&1', 30_000);
    await guestSh(src.vm, `bpftool map update name blocklist key ${b.udpFrom.split('.').join(' ')} value 0 0 0 0 0 0 0 0`);
    await dropMore(src.vm, 20);
  }, 180_000);

  afterAll(() => b.finish('offload'), 60_000);

  test('a destination without --offload refuses the offloaded state: migrate fails, the source runs on with its program and map', async () => {
    const g = guest();
    const before = (await A.be.call('offload.show', { name: 'miga' })).program;
    expect(before?.name).toBe('xdp_blocklist_p');
    const dst = await startIncoming(opts('vx-migoff-c', C.socket), b.dir);
    let m: MigrationOutcome;
    try {
      m = await migrate(g.qmp, dst.uri, { timeoutMs: 90_000 });
      timings.push(report('refused', m));
      await Promise.race([dst.vm.exited, new Promise((r) => setTimeout(r, 10_000))]);
    } finally {
      await quit(dst);
    }
    expect(m.status, JSON.stringify(m.info)).toBe('failed');
    expect((await devStatus(C.be)).lastMigration).toMatchObject({ direction: 'load', ok: false, code: 'offload-not-enabled' });
    await waitRunning(g);
    // The source as it was: the same kernel program, attached; traffic both ways; drops counted.
    const after = await A.be.call('offload.show', { name: 'miga' });
    expect(after).toMatchObject({ claimed: true, program: { id: before.id, name: 'xdp_blocklist_p' } });
    expect(await guestSh(g.vm, 'ip link show dev eth0')).toMatch(/xdpoffload/);
    expect(hostPing(b.net.guest, 3)).toBe(3);
    await dropMore(g.vm, 10);
    expect((await devStatus(A.be)).logging).toBe(false);
  }, 120_000);

  test('a throttled migration cancelled half-way: the source is as it was (logging off, no log mapping left, traffic and offload on)', async () => {
    const g = guest();
    const mappings0 = countGuestMappings(A.be.proc.pid);
    const dst = await startIncoming(opts('vx-migoff-b0', B.socket), b.dir);
    let sawLogging = false;
    let mappingsDuring = 0;
    let m: MigrationOutcome;
    await g.qmp.cmd('migrate-set-parameters', { 'max-bandwidth': 2 * 2 ** 20 });
    try {
      m = await migrate(g.qmp, dst.uri, {
        timeoutMs: 60_000,
        onPoll: async (info) => {
          if (sawLogging || info.status !== 'active') return;
          if ((await devStatus(A.be)).logging) {
            sawLogging = true;
            mappingsDuring = countGuestMappings(A.be.proc.pid);
            await g.qmp.cmd('migrate_cancel');
          }
        },
      });
      timings.push(report('cancelled', m));
    } finally {
      await g.qmp.cmd('migrate-set-parameters', { 'max-bandwidth': 0 }).catch(() => undefined);
      await Promise.race([dst.vm.exited, new Promise((r) => setTimeout(r, 10_000))]);
      await quit(dst);
    }
    expect(m.status).toBe('cancelled');
    expect(sawLogging).toBe(true);
    // The log QEMU handed over is one more shared-memory mapping while logging.
    expect(mappingsDuring).toBe(mappings0 + 1);
    await waitUntil(async () => !(await devStatus(A.be)).logging, 10_000, 'logging off on A');
    expect(countGuestMappings(A.be.proc.pid)).toBe(mappings0);
    await waitRunning(g);
    expect(hostPing(b.net.guest, 3)).toBe(3);
    expect(await guestSh(g.vm, 'ip link show dev eth0')).toMatch(/xdpoffload/);
    await dropMore(g.vm, 10);
    // Nothing was saved: the cancel came before the switch-over.
    expect((await devStatus(A.be)).lastMigration?.direction ?? 'save').toBe('save');
  }, 120_000);

  test('migration during a 16 MiB guest→host stream: the stream arrives intact on B, the program and its map (count included) move, A holds nothing after', async () => {
    const g = guest();
    const onA = await A.be.call('offload.show', { name: 'miga' });
    const aIds = { prog: onA.program.id as number, maps: (onA.maps as { id: number }[]).map((x) => x.id) };
    expect(filesUnder(path.join(pins, 'miga')).length).toBeGreaterThan(0);
    const dst = await startIncoming(opts('vx-migoff-b', B.socket), b.dir);
    b.cleanup.push('quit the destination QEMU', () => quit(dst));
    const stream = await startStream(g.vm, b);
    const m = await migrate(g.qmp, dst.uri, { timeoutMs: 120_000 });
    timings.push(report('busy', m));
    expect(m.status, JSON.stringify(m.info)).toBe('completed');
    await waitRunning(dst);
    const pingMs = await msUntilPingable(b.net.guest, 10_000);
    timings.push(`host ping answered ${pingMs} ms after completion`);
    const r = await stream.done;
    timings.push(`stream ${r.bytes} B in ${r.ms} ms`);
    expect(r.bytes).toBe(MIB16);
    expect(r.sha256).toBe(stream.sum);
    expect(fdbPort(b.bridge, MAC)).toBe(B.ifname);

    // On B: the program attached, the map with the count from A, counting on.
    expect(await guestSh(dst.vm, 'ip link show dev eth0')).toMatch(/xdpoffload[\s\S]*prog\/xdp id \d+ name xdp_blocklist/);
    expect(await guestHits(dst.vm, b.udpFrom)).toBe(dropped);
    await dropMore(dst.vm, 25);
    const onB = await B.be.call('offload.show', { name: 'migb' });
    expect(onB).toMatchObject({ claimed: true, program: { name: 'xdp_blocklist_p' } });
    const sb = await devStatus(B.be);
    expect(sb.lastMigration).toMatchObject({ direction: 'load', ok: true });
    expect(sb.lastMigration.bytes).toBeGreaterThan(8);
    expect(sb.lastMigration.ms).toBeGreaterThanOrEqual(0);
    expect(sb.refusedRequests).toBe(0);
    timings.push(`B features ${sb.features.includes('GUEST_ANNOUNCE') ? 'with' : 'without'} GUEST_ANNOUNCE; load ${JSON.stringify(sb.lastMigration)}`);
    expect((await devStatus(A.be)).lastMigration).toMatchObject({ direction: 'save', ok: true });

    // The source QEMU gone, A has no program, map or pin of the guest's left.
    await quit(g);
    src = dst;
    at = B;
    await waitUntil(async () => !(await devStatus(A.be)).connected, 10_000, 'A disconnected');
    expect(await A.be.call('offload.show', { name: 'miga' })).toMatchObject({ claimed: false, program: null, maps: [] });
    expect(await gone('prog', aIds.prog)).toBe(true);
    for (const id of aIds.maps) expect(await gone('map', id)).toBe(true);
    expect(filesUnder(path.join(pins, 'miga'))).toEqual([]);
    expect(filesUnder(path.join(pins, 'migb')).length).toBeGreaterThan(0);
    expect(hostPing(b.net.guest, 3)).toBe(3);
  }, 180_000);
  test('the object path (vxdp load of the sample) moves too: the drops go on at the destination, per-CPU counters and LRU flows carry over, unload there leaves nothing, the source holds nothing', async () => {
    const g = guest();
    // The guest is wherever the cases before left it (B after the busy case).
    const from = at;
    const to = from === A ? B : A;
    const showOf = async (side: typeof A): Promise<any> => side.be.call('offload.show', { name: side.name });
    const drops = async (side: typeof A): Promise<number> => (await showOf(side)).verdicts.drop as number;
    // vxdp load is refused while the kernel path owns the device's program: that one goes first.
    await guestSh(g.vm, 'ip link set dev eth0 xdpoffload off');
    await waitUntil(async () => (await showOf(from)).program === null, 10_000, 'the kernel-path program gone');
    // The host loads the object in a libbpf child: slower than the driver's 3 s default on this machine.
    const timeout = (await guestSh(g.vm, 'cat /sys/module/virtio_net/parameters/offload_timeout_ms')).trim();
    await guestSh(g.vm, 'echo 20000 > /sys/module/virtio_net/parameters/offload_timeout_ms');
    const load = await guestSh(g.vm, `vxdp load ${SAMPLE}`, 60_000);
    const tag = /tag ([0-9a-f]{16})/.exec(load)?.[1];
    expect(tag).toBeDefined();
    const shown = JSON.parse(await guestSh(g.vm, 'vxdp show --json')) as VxdpShow;
    expect(shown).toMatchObject({ loaded: true, program: 'xdp_filter', tag });

    /** The dropped flow dies on the host (its counter rises, the guest's stack sees none); the passed one arrives. */
    async function flowsOn(vm: GuestVm, side: typeof A, n: number): Promise<void> {
      const d0 = await drops(side);
      const udp0 = await guestUdpIn(vm);
      await sendUdp(b.udpFrom, b.net.guest, 9, n, { sport: DROP_SPORT, gapMs: 10 });
      await waitUntil(async () => (await drops(side)) >= d0 + n, 10_000, `${n} drops on ${side.name}`);
      expect(await guestUdpIn(vm)).toBe(udp0);
      await sendUdp(b.udpFrom, b.net.guest, 10, n, { sport: PASS_SPORT, gapMs: 10 });
      await waitUntil(async () => (await guestUdpIn(vm)) >= udp0 + n, 10_000, `${n} datagrams through to the guest`);
    }
    await flowsOn(g.vm, from, 20);
    const c0 = await perCpuCounters(g.vm);
    const sum = (v: number[] | undefined): number => (v ?? []).reduce((a, x) => a + x, 0);
    expect(sum(c0.get(C_DROPPED))).toBeGreaterThanOrEqual(20);
    expect(sum(c0.get(C_PASSED))).toBeGreaterThanOrEqual(20);
    const f0 = await flowCounts(g.vm);
    expect(f0.get(`${DROP_SPORT}>9`)).toBeGreaterThanOrEqual(20);
    expect(f0.get(`${PASS_SPORT}>10`)).toBeGreaterThanOrEqual(20);
    const onFrom = await showOf(from);
    expect(onFrom.object).not.toBeNull();
    const fromIds = { progs: (onFrom.object.programs as { id: number }[]).map((x) => x.id), maps: (onFrom.maps as { id: number }[]).map((x) => x.id) };

    const dst = await startIncoming(opts('vx-migoff-obj', to.socket), b.dir);
    b.cleanup.push('quit the object case\'s destination QEMU', () => quit(dst));
    const t0 = Date.now();
    const m = await migrate(g.qmp, dst.uri, { timeoutMs: 120_000 });
    timings.push(report('object', m));
    expect(m.status, JSON.stringify(m.info)).toBe('completed');
    expect((await devStatus(from.be)).lastMigration).toMatchObject({ direction: 'save', ok: true });
    expect((await devStatus(to.be)).lastMigration).toMatchObject({ direction: 'load', ok: true });
    await waitRunning(dst);
    await quit(g);
    src = dst;
    at = to;

    // The source: nothing of the device's left once its QEMU is gone (kernel objects by id, pins).
    await waitUntil(async () => !(await devStatus(from.be)).connected, 10_000, `${from.name} disconnected`);
    expect(await showOf(from)).toMatchObject({ claimed: false, program: null, object: null, maps: [] });
    for (const id of fromIds.progs) expect(await gone('prog', id)).toBe(true);
    for (const id of fromIds.maps) expect(await gone('map', id)).toBe(true);
    expect(filesUnder(path.join(pins, from.name))).toEqual([]);

    // The destination: the same object, its maps' contents as they were, dropping on this host.
    timings.push(`object case: host ping answered ${await msUntilPingable(b.net.guest, 10_000)} ms after completion (${Date.now() - t0} ms after migrate)`);
    const moved = JSON.parse(await guestSh(dst.vm, 'vxdp show --json')) as VxdpShow;
    expect(moved).toMatchObject({ loaded: true, program: 'xdp_filter', tag });
    expect(moved.maps.map((x) => [x.name, x.type])).toEqual(shown.maps.map((x) => [x.name, x.type]));
    const c1 = await perCpuCounters(dst.vm);
    for (const [k, v] of c0) v.forEach((x, cpu) => expect(c1.get(k)?.[cpu], `counter ${k} CPU ${cpu}`).toBeGreaterThanOrEqual(x));
    const f1 = await flowCounts(dst.vm);
    for (const [k, n] of f0) expect(f1.get(k), `flow ${k}`).toBeGreaterThanOrEqual(n);
    const onTo = await showOf(to);
    expect(onTo).toMatchObject({ claimed: true, program: { tag: onFrom.program.tag, name: onFrom.program.name } });
    expect(onTo.object.programs.map((x: { name: string; tag: string }) => [x.name, x.tag]))
      .toEqual(onFrom.object.programs.map((x: { name: string; tag: string }) => [x.name, x.tag]));
    await flowsOn(dst.vm, to, 15);
    expect(sum((await perCpuCounters(dst.vm)).get(C_DROPPED))).toBeGreaterThanOrEqual(sum(c0.get(C_DROPPED)) + 15);

    // vxdp unload on the destination: no program, map or pin of the object stays on that host.
    const handles = new Set<number>(onTo.object.mapHandles);
    // Only the object's maps: one the kernel path left may still be on its way out.
    const toIds = {
      progs: (onTo.object.programs as { id: number }[]).map((x) => x.id),
      maps: (onTo.maps as { id: number; handle: number }[]).filter((x) => handles.has(x.handle)).map((x) => x.id),
    };
    expect(toIds.maps.length).toBe(shown.maps.length);
    expect(await guestSh(dst.vm, 'vxdp unload')).toMatch(/eth0: object unloaded/);
    await guestSh(dst.vm, `echo ${timeout} > /sys/module/virtio_net/parameters/offload_timeout_ms`);
    const unloaded = await showOf(to);
    expect(unloaded).toMatchObject({ claimed: true, program: null, object: null });
    expect(unloaded.maps.filter((x: { handle: number }) => handles.has(x.handle))).toEqual([]);
    for (const id of toIds.progs) expect(await gone('prog', id)).toBe(true);
    for (const id of toIds.maps) expect(await gone('map', id)).toBe(true);
    const left = filesUnder(path.join(pins, to.name)).map((f) => path.basename(f));
    expect(left.filter((f) => /^(obj\d+_|meta_obj$|prog$)/.test(f) || [...handles].some((h) => f === `map_${h}` || f === `meta_${h}`))).toEqual([]);
    expect(await guestSh(dst.vm, 'vxdp show')).toMatch(/eth0: no object offloaded/);
  }, 240_000);
});

describe('live migration between two xsk backends in one bridge (QEMU 10, TCG)', () => {
  const b = new Bridged('migxsk');
  const MAC = '52:54:00:5a:17:22';
  let X: Awaited<ReturnType<Bridged['backend']>>;
  let Y: Awaited<ReturnType<Bridged['backend']>>;
  let on: QmpGuest | undefined;
  const timings = b.timings;
  const opts = (name: string, socket: string): GuestVmOptions =>
    ({ name, memMiB: 256, smp: 1, append: 'vxdp.stock=1', net: { kind: 'vhost-user', socket, queues: 1, mac: MAC } });

  beforeAll(async () => {
    await b.up();
    X = await b.backend('migx', 'xsk', ['--queues', '1']);
    Y = await b.backend('migy', 'xsk', ['--queues', '1']);
    b.cleanup.push('quit the guest', () => on && quit(on));
    on = await bootWithQmp(opts('vx-migxsk-x', X.socket), b.dir);
    await b.guestUp(on.vm);
  }, 180_000);

  afterAll(() => b.finish('xsk'), 60_000);

  /** Migrates the running guest to a new QEMU on `socket` (after `meanwhile`); the old QEMU quits. */
  async function moveTo(name: string, socket: string, tag: string, meanwhile?: (g: QmpGuest) => Promise<void>): Promise<QmpGuest> {
    const g = on!;
    const dst = await startIncoming(opts(name, socket), b.dir);
    await meanwhile?.(g);
    const m = await migrate(g.qmp, dst.uri, { timeoutMs: 120_000 });
    timings.push(report(tag, m));
    expect(m.status, JSON.stringify(m.info)).toBe('completed');
    await quit(g);
    on = dst;
    await waitRunning(dst);
    return dst;
  }

  test('migration during a 16 MiB guest→host stream: the stream arrives intact through the destination\'s AF_XDP port', async () => {
    let stream: Awaited<ReturnType<typeof startStream>> | undefined;
    await moveTo('vx-migxsk-y', Y.socket, 'busy', async (g) => { stream = await startStream(g.vm, b); });
    const r = await stream!.done;
    timings.push(`stream ${r.bytes} B in ${r.ms} ms`);
    expect(r.bytes).toBe(MIB16);
    expect(r.sha256).toBe(stream!.sum);
    expect(hostPing(b.net.guest, 3)).toBe(3);
    expect((await devStatus(Y.be)).lastMigration).toMatchObject({ direction: 'load', ok: true });
    // The source's UMEM pin went with its QEMU.
    await waitUntil(async () => (await devStatus(X.be)).port.pinnedBytes === 0, 10_000, 'X unpinned the guest RAM');
  }, 180_000);

  test('an idle guest moved back announces itself: the bridge learns its new port and the host reaches it at once', async () => {
    const dst = await moveTo('vx-migxsk-x2', X.socket, 'idle');
    // Nothing sent by the host yet: only the guest (GUEST_ANNOUNCE) or the backend (SEND_RARP)
    // can have told the bridge that the MAC now lives behind X's port.
    const t0 = Date.now();
    await waitUntil(() => fdbPort(b.bridge, MAC) === X.ifname, 5_000, 'the bridge learning the guest on X');
    timings.push(`bridge learned the guest on X ${Date.now() - t0} ms after running; features ${(await devStatus(X.be)).features.includes('GUEST_ANNOUNCE') ? 'with' : 'without'} GUEST_ANNOUNCE`);
    timings.push(`host ping answered ${await msUntilPingable(b.net.guest, 3_000)} ms later`);
    expect(await guestSh(dst.vm, `ping -c 1 -w 5 ${b.net.host}`)).toMatch(/1 packets received/);
  }, 120_000);
});
