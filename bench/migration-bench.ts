// `npm run bench -- migration [--rounds N] [--json]`: live-migration downtime and total time
// (QEMU's own `query-migrate` figures) with vhost-xdp serve as both backends, beside the same
// migration with DPDK testpmd's vhost PMD as both backends, in the same run (issue 14's "Measure").
//
// One kind per turn, both kinds every round (who goes first alternates by round):
//   - Two backends of the kind, each with a kernel tap in one Linux bridge that holds the host's
//     address: `serve --port tap:IF` (A and B), or testpmd `net_vhost0 <-io-> net_tap0,iface=IF`.
//   - A guest (256 MiB, 1 vCPU, TCG, stock virtio_net) boots on A and is migrated over a unix
//     socket to a QEMU waiting with -incoming on B while idle; then, streaming /dev/zero over TCP
//     to a sink on the host (`dd | nc`), it is migrated back from B to a new QEMU on A.
//   - After each move the guest must work on its new backend: the idle guest pings the host, the
//     busy guest's stream must go on (bytes reach the sink) through the new backend's tap.
// Pinning (2 cores): backends on core 1 (serve under taskset; testpmd's forwarding lcores, whose
// busy polling would otherwise take CPU from the QEMUs), every QEMU on core 0. So both kinds
// give the guests the same CPU, and what differs is the backend.
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { loadavg } from 'node:os';
import path from 'node:path';
import { CLI, startBackend, tempDir } from '../test/support/backend.js';
import { startTestpmd, type Testpmd } from '../test/support/dpdk.js';
import { addAddress, addToBridge, CleanupStack, createBridge, freeTestSubnet, uniqueIfName } from '../test/support/netdev.js';
import { sleep, waitUntil } from '../test/support/processes.js';
import type { GuestVm, GuestVmOptions } from '../test/support/guest/guest-vm.js';
import { TcpSink } from '../test/support/guest/host-endpoint.js';
import { bootWithQmp, migrate, quit, startIncoming, waitRunning, type QmpGuest } from '../test/support/guest/migration.js';

export type MigrationBackendKind = 'vhost-xdp' | 'dpdk';
export type GuestLoad = 'idle' | 'busy';

export interface MigrationSample {
  kind: MigrationBackendKind;
  load: GuestLoad;
  /** QEMU's terminal status, or 'refused' when `migrate` itself was rejected (e.g. no LOG_SHMFD). */
  status: 'completed' | 'failed' | 'cancelled' | 'refused';
  /** query-migrate total-time / downtime / setup-time (ms); undefined unless completed. */
  totalMs?: number;
  downtimeMs?: number;
  setupMs?: number;
  ramBytes?: number;
  /** RAM passes QEMU needed (dirty-sync-count). */
  dirtySyncs?: number;
  /** QEMU's error text when the migration did not complete. */
  error?: string;
  /** The guest worked on its new backend: idle, a ping to the host; busy, its stream went on. */
  nicWorks?: boolean;
  /** Busy only: the stream's rate (MiB/s) at the host before the migration. */
  streamMiBps?: number;
  /** Busy only: ms from the completed status (as polled) until the stream's next 64 KiB reached the host. */
  streamResumedMs?: number;
}

export interface MigrationRound {
  /** Kinds in the order they ran this round. */
  order: MigrationBackendKind[];
  samples: MigrationSample[];
}

export interface MigrationBenchResult {
  loadAvgStart: number[];
  loadAvgEnd: number[];
  guest: string;
  pinning: string;
  rounds: MigrationRound[];
}

const GUEST_MAC = '52:54:00:5a:17:4d';
const PINNING = 'backends on core 1 (serve: taskset -c 1; testpmd: main lcore 0, forwarding lcore 1), every QEMU on core 0 (taskset -a)';

/** Every thread of a QEMU on `cpu` (threads it creates later inherit it). */
function pin(vm: GuestVm, cpu: number): void {
  if (vm.pid > 0) execFileSync('taskset', ['-a', '-p', '-c', String(cpu), String(vm.pid)], { stdio: 'ignore' });
}

async function sh(vm: GuestVm, cmd: string, timeoutMs = 30_000): Promise<string> {
  const r = await vm.run(cmd, timeoutMs);
  if (r.status !== 0) throw new Error(`${vm.name}: guest command failed (status ${r.status}): ${cmd}\n${r.output}`);
  return r.output;
}

/** One backend of a kind: its vhost-user socket and a way to wait for a QEMU to have connected. */
interface MigBackend {
  socket: string;
  /** Call before starting a QEMU on this backend: connected() then waits for that QEMU. */
  mark(): Promise<void>;
  /** Resolves once a QEMU has connected to this backend since mark(). */
  connected(timeoutMs: number): Promise<void>;
}

/** `serve --port tap:IF` pinned to core 1, its tap in the bridge. */
async function vhostXdpBackend(tag: string, dir: string, bridge: string, cleanup: CleanupStack): Promise<MigBackend> {
  const ifname = uniqueIfName(`vxmb${tag}`);
  const socket = path.join(dir, `${tag}.sock`);
  const bdir = tempDir(`migbench${tag}`);
  const control = path.join(bdir, 'ctl.sock');
  cleanup.link(ifname);
  cleanup.push(`remove ${bdir}`, () => rmSync(bdir, { recursive: true, force: true }));
  const be = await startBackend([], {
    dir: bdir, control, name: `vx-migbench-${tag}`,
    argv: ['taskset', '-c', '1', process.execPath, CLI, 'serve', '--socket', socket, '--port', `tap:${ifname}`, '--queues', '1', '--name', tag, '--log-level', 'warn', '--control', control],
  });
  cleanup.push(`stop serve ${tag}`, () => be.stop());
  addToBridge(ifname, bridge);
  const connected = async (): Promise<boolean> => Boolean((await be.call('status')).devices[0]?.connected);
  return {
    socket,
    // The QEMU that left (quit) may not have been noticed yet.
    mark: () => waitUntil(async () => !(await connected()), 10_000, `serve ${tag} without a QEMU`).then(() => undefined),
    connected: (timeoutMs) => waitUntil(connected, timeoutMs, `a QEMU connected to serve ${tag}`).then(() => undefined),
  };
}

/** testpmd: vhost PMD (server) <-io-> tap PMD; forwarding lcore on core 1; its tap in the bridge. */
async function dpdkBackend(tag: string, dir: string, bridge: string, cleanup: CleanupStack): Promise<MigBackend> {
  const ifname = uniqueIfName(`vxmd${tag}`);
  const socket = path.join(dir, `${tag}.sock`);
  // The tap PMD removes its tap when it closes; this covers a killed testpmd.
  cleanup.link(ifname);
  const pmd: Testpmd = await startTestpmd({
    name: `migbench-dpdk-${tag}`, vdevs: [`net_vhost0,iface=${socket},queues=1`, `net_tap0,iface=${ifname}`],
    forwardMode: 'io', cores: '0,1', mainLcore: 0, memoryMb: 256,
  });
  cleanup.push(`stop testpmd ${tag}`, () => pmd.stop());
  cleanup.push(`remove ${socket}`, () => rmSync(socket, { force: true }));
  addToBridge(ifname, bridge);
  // The vhost library logs each accepted connection ("new vhost user connection is N").
  let accepted = 0;
  pmd.proc.onLine((l) => { if (/new vhost user connection/.test(l)) accepted++; });
  let seen = 0;
  return {
    socket,
    mark: async () => { seen = accepted; },
    connected: (timeoutMs) => waitUntil(() => accepted > seen, timeoutMs, `a QEMU connected to testpmd ${tag}`).then(() => undefined),
  };
}

interface Env {
  dir: string;
  bridge: string;
  net: { host: string; guest: string };
  sink: TcpSink;
}

const guestOpts = (name: string, socket: string): GuestVmOptions =>
  ({ name, memMiB: 256, smp: 1, append: 'vxdp.stock=1', net: { kind: 'vhost-user', socket, queues: 1, mac: GUEST_MAC } });

/** Starts the destination on `to`, pinned, and waits until it has connected to its backend. */
async function destination(name: string, to: MigBackend, dir: string): Promise<QmpGuest & { uri: string }> {
  await to.mark();
  const dst = await startIncoming(guestOpts(name, to.socket), dir);
  pin(dst.vm, 0);
  await to.connected(20_000);
  return dst;
}

/** Migrates src to dst and reads QEMU's figures; a rejected `migrate` is a 'refused' sample. */
async function measureMigration(kind: MigrationBackendKind, load: GuestLoad, src: QmpGuest, dst: QmpGuest & { uri: string }): Promise<MigrationSample> {
  let m;
  try {
    m = await migrate(src.qmp, dst.uri, { timeoutMs: 240_000 });
  } catch (e) {
    const msg = (e as Error).message;
    if (/^migrate: /.test(msg)) return { kind, load, status: 'refused', error: msg.replace(/^migrate: /, '') };
    throw e;
  }
  const i = m.info;
  if (m.status !== 'completed') return { kind, load, status: m.status, error: i['error-desc'] ?? JSON.stringify(i) };
  return {
    kind, load, status: 'completed',
    totalMs: i['total-time'], downtimeMs: i.downtime, setupMs: i['setup-time'], ramBytes: i.ram?.transferred, dirtySyncs: i.ram?.['dirty-sync-count'],
  };
}

/**
 * One kind's turn: two fresh backends, a guest booted on A, an idle move A->B, a busy move B->A.
 * Everything it started is gone when it returns.
 */
async function oneKind(kind: MigrationBackendKind, env: Env, round: number): Promise<MigrationSample[]> {
  const cleanup = new CleanupStack();
  const tag = `${kind === 'dpdk' ? 'd' : 'x'}${round}`;
  const guests: QmpGuest[] = [];
  cleanup.push('quit the QEMUs', async () => { for (const g of guests) await quit(g); });
  try {
    const make = kind === 'dpdk' ? dpdkBackend : vhostXdpBackend;
    const A = await make(`${tag}a`, env.dir, env.bridge, cleanup);
    const B = await make(`${tag}b`, env.dir, env.bridge, cleanup);
    const src = await bootWithQmp(guestOpts(`vx-migbench-${tag}-1`, A.socket), env.dir);
    guests.push(src);
    pin(src.vm, 0);
    await sh(src.vm, `ip addr add ${env.net.guest}/24 dev eth0 && ip link set eth0 up`);
    await sh(src.vm, `ping -c 2 -w 20 ${env.net.host}`, 40_000);

    // Idle: nothing runs in the guest but its shell.
    const mid = await destination(`vx-migbench-${tag}-2`, B, env.dir);
    guests.push(mid);
    const idle = await measureMigration(kind, 'idle', src, mid);
    if (idle.status !== 'completed') return [idle];
    await waitRunning(mid);
    idle.nicWorks = (await mid.vm.run(`ping -c 1 -w 10 ${env.net.host}`, 20_000)).status === 0;
    await quit(src);

    // Busy: a TCP stream of zeros to the host's sink for as long as it runs.
    await sh(mid.vm, `(dd if=/dev/zero bs=64k 2>/dev/null | nc ${env.net.host} ${env.sink.port} >/dev/null 2>&1 &)`);
    await waitUntil(() => env.sink.received > 0, 20_000, 'the stream under way', 50).catch(() => undefined);
    const r0 = env.sink.received;
    const t0 = Date.now();
    await sleep(2000);
    const streamMiBps = (env.sink.received - r0) / 2 ** 20 / ((Date.now() - t0) / 1000);
    const back = await destination(`vx-migbench-${tag}-3`, A, env.dir);
    guests.push(back);
    const busy = await measureMigration(kind, 'busy', mid, back);
    busy.streamMiBps = Math.round(streamMiBps * 10) / 10;
    if (busy.status === 'completed') {
      const done = Date.now();
      const before = env.sink.received;
      busy.nicWorks = await waitUntil(() => env.sink.received >= before + 65536, 30_000, 'the stream going on after the migration', 10).then(() => true, () => false);
      if (busy.nicWorks) busy.streamResumedMs = Date.now() - done;
      await waitRunning(back);
      await back.vm.run('killall nc dd', 10_000).catch(() => undefined);
    }
    return [idle, busy];
  } finally {
    await cleanup.run();
  }
}

export async function runMigrationBench(rounds: number, log: (l: string) => void = () => undefined): Promise<MigrationBenchResult> {
  const loadAvgStart = loadavg().map((x) => Math.round(x * 100) / 100);
  const cleanup = new CleanupStack();
  const dir = tempDir('migbench');
  cleanup.push(`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true }));
  const bridge = uniqueIfName('vxmbbr');
  const net = freeTestSubnet(18);
  const all: MigrationRound[] = [];
  try {
    createBridge(bridge);
    cleanup.link(bridge);
    addAddress(bridge, `${net.host}/24`);
    const sink = await TcpSink.listen(net.host);
    cleanup.push('close the sink', () => sink.close());
    const env: Env = { dir, bridge, net, sink };
    for (let r = 0; r < rounds; r++) {
      const order: MigrationBackendKind[] = r % 2 === 0 ? ['dpdk', 'vhost-xdp'] : ['vhost-xdp', 'dpdk'];
      const samples: MigrationSample[] = [];
      for (const kind of order) {
        const got = await oneKind(kind, env, r);
        samples.push(...got);
        for (const s of got) log(`  round ${r + 1} ${describeSample(s)}`);
      }
      all.push({ order, samples });
    }
  } finally {
    await cleanup.run();
  }
  return {
    loadAvgStart, loadAvgEnd: loadavg().map((x) => Math.round(x * 100) / 100),
    guest: '256 MiB, 1 vCPU, TCG, stock virtio_net, 1 queue pair; busy = dd if=/dev/zero | nc to a host TCP sink', pinning: PINNING, rounds: all,
  };
}

export function describeSample(s: MigrationSample): string {
  const who = `${s.kind === 'dpdk' ? 'DPDK vhost PMD' : 'vhost-xdp serve'}, ${s.load}:`.padEnd(28);
  if (s.status !== 'completed') return `${who} ${s.status}: ${s.error}`;
  const stream = s.load === 'busy' ? `; stream ${s.streamMiBps} MiB/s before, ${s.nicWorks ? `on again after ${s.streamResumedMs} ms` : 'NOT resumed'}` : `; ping after: ${s.nicWorks ? 'ok' : 'FAILED'}`;
  return `${who} downtime ${s.downtimeMs} ms, total ${s.totalMs} ms (setup ${s.setupMs} ms, ${((s.ramBytes ?? 0) / 2 ** 20).toFixed(0)} MiB RAM, ${s.dirtySyncs} syncs)${stream}`;
}
