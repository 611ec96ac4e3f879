// Live migration end to end with QEMU 10 (TCG): one guest on backend A migrates over a unix
// socket to a second QEMU (-incoming) on backend B, each backend with its own tap. QEMU refuses
// to migrate a vhost-user device without LOG_SHMFD; here `migrate` must reach "completed", both
// backends must have moved the device state (DEVICE_STATE), the source must have logged while
// the rings ran, and the guest must answer on the destination's console.
// Data integrity across the migration needs the datapath to mark its writes (wired later); this
// shows the protocol and the switch-over.
import { describe, test, expect, afterAll } from 'vitest';
import net from 'node:net';
import path from 'node:path';
import { existsSync } from 'node:fs';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { spawnManaged, waitUntil, sleep, type ManagedProcess } from '../support/processes.js';
import { uniqueIfName, linkExists, deleteLink } from '../support/netdev.js';
import { LAUNCHER, READY_MARKER, launcherArgs } from '../support/guest/guest-vm.js';

/** A QMP connection: one command at a time, events skipped. */
class Qmp {
  private buf = '';
  private waiting: ((msg: any) => void) | null = null;
  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line);
        if (msg.event || msg.QMP) continue;
        const w = this.waiting;
        this.waiting = null;
        w?.(msg);
      }
    });
  }

  static async connect(file: string, timeoutMs = 20_000): Promise<Qmp> {
    await waitUntil(() => existsSync(file), timeoutMs, `QMP socket ${file}`);
    const sock = net.createConnection(file);
    await new Promise<void>((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
    const q = new Qmp(sock);
    await q.cmd('qmp_capabilities');
    return q;
  }

  cmd(execute: string, args?: Record<string, unknown>): Promise<any> {
    return new Promise((resolve, reject) => {
      this.waiting = (msg) => (msg.error ? reject(new Error(`${execute}: ${msg.error.desc}`)) : resolve(msg.return));
      this.sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    });
  }

  close(): void { this.sock.destroy(); }
}

const cleanups: (() => Promise<void> | void)[] = [];
afterAll(async () => {
  for (const c of cleanups.reverse()) { try { await c(); } catch { /* best effort */ } }
});

async function backend(dir: string, tag: string): Promise<{ be: Backend; sock: string; tap: string }> {
  const tap = uniqueIfName(`vxm${tag}`);
  const sock = path.join(dir, `${tag}.sock`);
  const be = await startBackend(['--device', `name=${tag},socket=${sock},port=tap:${tap},queues=1`], { dir: tempDir(`mig${tag}`) });
  cleanups.push(async () => { await be.stop(); if (linkExists(tap)) deleteLink(tap); });
  return { be, sock, tap };
}

function qemu(name: string, socket: string, extra: string[]): ManagedProcess {
  const args = [...launcherArgs({ memMiB: 256, net: { kind: 'vhost-user', socket, mac: '52:54:00:12:34:77' } }, name), '--', ...extra];
  const wrap = existsSync('/usr/bin/setpriv') ? ['/usr/bin/setpriv', '--pdeathsig', 'KILL', LAUNCHER] : [LAUNCHER];
  const p = spawnManaged(wrap[0]!, [...wrap.slice(1), ...args], { name, stdin: 'pipe', echo: process.env.HARNESS_VERBOSE === '1' });
  cleanups.push(() => p.stop('SIGKILL', 2000).then(() => undefined));
  return p;
}

const status = async (be: Backend, name: string) => (await be.call('status')).devices.find((d: { name: string }) => d.name === name);

describe('live migration between two backends (QEMU 10, TCG)', () => {
  test('migrate completes, the device state moves, and the guest answers on the destination', async () => {
    const dir = tempDir('migsmoke');
    const a = await backend(dir, 'a');
    const b = await backend(dir, 'b');
    const qmpA = path.join(dir, 'qmp-a.sock');
    const qmpB = path.join(dir, 'qmp-b.sock');
    const migSock = path.join(dir, 'mig.sock');

    const t0 = Date.now();
    const src = qemu('mig-src', a.sock, ['-qmp', `unix:${qmpA},server=on,wait=off`]);
    await src.waitForLine(new RegExp(READY_MARKER), 90_000);
    const bootMs = Date.now() - t0;
    // Bring the device up so rings run (and are logged) while memory is copied.
    src.write('dmesg -n 1; modprobe virtio_net; ip link set eth0 up; echo NET-$((40+2))\n');
    await src.waitForLine(/^NET-42/, 30_000);
    await waitUntil(async () => (await status(a.be, 'a')).runningVrings.length === 2, 20_000, 'source rings running');

    const dst = qemu('mig-dst', b.sock, ['-qmp', `unix:${qmpB},server=on,wait=off`, '-incoming', `unix:${migSock}`]);
    const qa = await Qmp.connect(qmpA);
    const qb = await Qmp.connect(qmpB);
    cleanups.push(() => { qa.close(); qb.close(); });
    await waitUntil(async () => (await status(b.be, 'b')).connected, 20_000, 'destination QEMU connected to backend B');
    await waitUntil(() => existsSync(migSock), 20_000, 'destination listening for the migration');

    const m0 = Date.now();
    await qa.cmd('migrate', { uri: `unix:${migSock}` });
    let sawLogging = false;
    let info: any;
    for (;;) {
      info = await qa.cmd('query-migrate');
      if ((await status(a.be, 'a')).logging) sawLogging = true;
      if (info.status === 'completed' || info.status === 'failed' || info.status === 'cancelled') break;
      if (Date.now() - m0 > 180_000) throw new Error(`migration still ${info.status} after 180 s`);
      await sleep(100);
    }
    const migrateMs = Date.now() - m0;
    expect(info.status, JSON.stringify(info)).toBe('completed');

    await waitUntil(async () => (await qb.cmd('query-status')).status === 'running', 30_000, 'destination running');
    const from = dst.lineCount;
    dst.write('\necho ALIVE-$((6*7)) $(cat /sys/class/net/eth0/operstate)\n');
    const alive = await dst.waitForLine(/^ALIVE-42 (\S+)/, 30_000, from);
    const aliveMs = Date.now() - m0;

    const sa = await status(a.be, 'a');
    const sb = await waitUntil(async () => { const s = await status(b.be, 'b'); return s.runningVrings.length === 2 ? s : null; }, 20_000, 'destination rings running');
    console.log(`[migration-smoke] boot ${bootMs} ms; migrate ${migrateMs} ms (QEMU: total ${info['total-time']} ms, downtime ${info.downtime} ms, ` +
      `${info.ram?.transferred} RAM bytes); guest answered ${aliveMs} ms after migrate (eth0 ${alive[1]}); ` +
      `source logging seen: ${sawLogging}; save ${JSON.stringify(sa.lastMigration)}; load ${JSON.stringify(sb.lastMigration)}`);
    expect(sawLogging).toBe(true);
    expect(sa.lastMigration).toMatchObject({ direction: 'save', ok: true });
    expect(sb.lastMigration).toMatchObject({ direction: 'load', ok: true });
    expect(sb.logging).toBe(false);
  }, 400_000);
});
