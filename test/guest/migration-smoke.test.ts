// Live migration end to end with QEMU 10 (TCG): one guest on backend A migrates over a unix
// socket to a second QEMU (-incoming) on backend B, each backend with its own tap. QEMU refuses
// to migrate a vhost-user device without LOG_SHMFD; here `migrate` must reach "completed", both
// backends must have moved the device state (DEVICE_STATE), the source must have logged while
// the rings ran, and the guest must answer on the destination's console.
// Data integrity across the migration needs the datapath to mark its writes (wired later); this
// shows the protocol and the switch-over.
import { describe, test, expect, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { waitUntil } from '../support/processes.js';
import { uniqueIfName, linkExists, deleteLink } from '../support/netdev.js';
import type { GuestVmOptions } from '../support/guest/guest-vm.js';
import { bootWithQmp, migrate, quit, startIncoming, waitRunning } from '../support/guest/migration.js';

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

const guestOpts = (name: string, socket: string): GuestVmOptions =>
  ({ name, memMiB: 256, net: { kind: 'vhost-user', socket, mac: '52:54:00:12:34:77' } });

const status = async (be: Backend, name: string) => (await be.call('status')).devices.find((d: { name: string }) => d.name === name);

describe('live migration between two backends (QEMU 10, TCG)', () => {
  test('migrate completes, the device state moves, and the guest answers on the destination', async () => {
    const dir = tempDir('migsmoke');
    const a = await backend(dir, 'a');
    const b = await backend(dir, 'b');
    const src = await bootWithQmp(guestOpts('mig-src', a.sock), dir);
    cleanups.push(() => quit(src));
    const bootMs = src.vm.bootMs;
    // Bring the device up so rings run (and are logged) while memory is copied.
    await src.vm.run('ip link set eth0 up');
    await waitUntil(async () => (await status(a.be, 'a')).runningVrings.length === 2, 20_000, 'source rings running');

    const dst = await startIncoming(guestOpts('mig-dst', b.sock), dir);
    cleanups.push(() => quit(dst));
    await waitUntil(async () => (await status(b.be, 'b')).connected, 20_000, 'destination QEMU connected to backend B');

    let sawLogging = false;
    const m0 = Date.now();
    const m = await migrate(src.qmp, dst.uri, {
      timeoutMs: 180_000,
      onPoll: async () => { if ((await status(a.be, 'a')).logging) sawLogging = true; },
    });
    const { info, ms: migrateMs } = m;
    expect(m.status, JSON.stringify(info)).toBe('completed');

    await waitRunning(dst);
    const alive = await dst.vm.run('echo ALIVE $(cat /sys/class/net/eth0/operstate)');
    expect(alive.output).toMatch(/^ALIVE (\S+)/);
    const aliveMs = Date.now() - m0;

    const sa = await status(a.be, 'a');
    const sb = await waitUntil(async () => { const s = await status(b.be, 'b'); return s.runningVrings.length === 2 ? s : null; }, 20_000, 'destination rings running');
    console.log(`[migration-smoke] boot ${bootMs} ms; migrate ${migrateMs} ms (QEMU: total ${info['total-time']} ms, downtime ${info.downtime} ms, ` +
      `${info.ram?.transferred} RAM bytes); guest answered ${aliveMs} ms after migrate (${alive.output}); ` +
      `source logging seen: ${sawLogging}; save ${JSON.stringify(sa.lastMigration)}; load ${JSON.stringify(sb.lastMigration)}`);
    expect(sawLogging).toBe(true);
    expect(sa.lastMigration).toMatchObject({ direction: 'save', ok: true });
    expect(sb.lastMigration).toMatchObject({ direction: 'load', ok: true });
    expect(sb.logging).toBe(false);
  }, 400_000);
});
