import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, countFds, countGuestMappings, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, disableIpv6, listLinks } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { udpFrame, seqOf } from '../support/frames.js';

describe('frontend disconnect and reconnect', () => {
  let be: Backend;
  let tap: string;
  let sock: string;
  let ps: PacketSocket;

  beforeAll(async () => {
    tap = uniqueIfName('vxr');
    const dir = tempDir('recon');
    sock = path.join(dir, 'dev.sock');
    be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--queues', '2', '--name', 'recon'], { dir });
    disableIpv6(tap);
    ps = PacketSocket.open(tap);
  });

  afterAll(async () => {
    ps?.close();
    await be?.stop();
  });

  async function cycle(i: number, how: 'close' | 'reset' | 'stop-rings'): Promise<void> {
    const fe = await TestFrontend.connect(sock, { queuePairs: 2 });
    try {
      ps.drain();
      const base = i * 1000;
      for (let k = 0; k < 20; k++) fe.transmit(k % 2, [udpFrame(base + k, 100)]);
      const got = ps.recvAll(20, 3000, (f) => (seqOf(f) ?? -1) >= base && (seqOf(f) ?? -1) < base + 20);
      expect(got.length).toBe(20);
      if (how === 'reset') await fe.resetDevice();
      if (how === 'stop-rings') for (let q = 0; q < 4; q++) await fe.getVringBase(q);
    } finally {
      fe.close();
    }
    await waitUntil(async () => (await be.call('status')).devices[0].connected === false, 3000, 'backend to notice the disconnect');
  }

  test('repeated connect/traffic/disconnect leaves no fds, guest mappings or taps behind', async () => {
    const tapsBefore = listLinks().filter((l) => l.startsWith('vx')).length;
    await cycle(0, 'close'); // warm up: lazily created scratch buffers, worker threads
    const fdsBefore = countFds(be.proc.pid);
    for (let i = 1; i <= 15; i++) await cycle(i, (['close', 'reset', 'stop-rings'] as const)[i % 3]!);
    await waitUntil(() => countFds(be.proc.pid) === fdsBefore, 3000, 'fd count back to its baseline').catch(() => undefined);
    const fdsAfter = countFds(be.proc.pid);
    const status = (await be.call('status')).devices[0];
    expect(status.connections).toBe(16);
    expect(status.runningVrings).toEqual([]);
    expect(countGuestMappings(be.proc.pid)).toBe(0);
    expect(fdsAfter).toBe(fdsBefore);
    expect(listLinks().filter((l) => l.startsWith('vx')).length).toBe(tapsBefore);
  });

  test('a second frontend is refused while one is connected, and the first keeps working', async () => {
    const first = await TestFrontend.connect(sock, { queuePairs: 2 });
    try {
      await expect(TestFrontend.connect(sock, { queuePairs: 2, connectTimeoutMs: 1000 })).rejects.toThrow();
      ps.drain();
      first.transmit(0, [udpFrame(777_000, 64)]);
      expect(ps.recvAll(1, 3000, (f) => seqOf(f) === 777_000).length).toBe(1);
    } finally {
      first.close();
    }
  });
});
