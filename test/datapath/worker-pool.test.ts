import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf } from '../support/frames.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';

interface Placement { worker: number; queues: { device: string; pair: number }[] }

function threadsOf(pid: number): number {
  return Number(/^Threads:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

/** Frames sent by the guest on pair 0 reach the tap intact (the pair runs wherever it was put). */
async function passesTraffic(fe: TestFrontend, ps: PacketSocket, base: number): Promise<void> {
  ps.drain();
  const sent = Array.from({ length: 20 }, (_, i) => base + i);
  for (const s of sent) expect(fe.transmit(0, [udpFrame(s, 100)])).toBe(1);
  const got = new Set(ps.recvAll(sent.length, 5000, (f) => seqOf(f) !== null).map((f) => seqOf(f)!));
  expect(got).toEqual(new Set(sent));
}

describe('worker pool: many devices, a fixed set of datapath threads', () => {
  const names = ['pa', 'pb', 'pc'];
  let be: Backend;
  let dir: string;
  const taps: string[] = [];
  const fes = new Map<string, TestFrontend>();
  const sockets = new Map<string, PacketSocket>();

  beforeAll(async () => {
    dir = tempDir('pool');
    const args = ['--workers', '2'];
    for (const n of names) {
      const tap = uniqueIfName(`vx${n}`);
      taps.push(tap);
      args.push('--device', `name=${n},socket=${path.join(dir, `${n}.sock`)},port=tap:${tap}`);
    }
    be = await startBackend(args, { dir });
    for (const t of taps) disableIpv6(t);
  });

  afterAll(async () => {
    for (const s of sockets.values()) s.close();
    for (const f of fes.values()) f.close();
    await be?.stop();
  });

  test('threads do not grow with devices: a device is data on a worker, not a thread of its own', async () => {
    const idle = threadsOf(be.proc.pid);
    for (const [i, n] of names.entries()) {
      fes.set(n, await TestFrontend.connect(path.join(dir, `${n}.sock`), { queuePairs: 1 }));
      sockets.set(n, PacketSocket.open(taps[i]!));
    }
    const st = await be.call('status');
    const placed = (st.workers as Placement[]).map((w) => w.queues.length);
    // Three pairs on two workers, least busy first: 2 and 1, never 3 and 0.
    expect(placed.sort()).toEqual([1, 2]);
    // The two workers started on demand; three devices cost no further thread.
    expect(threadsOf(be.proc.pid) - idle).toBeLessThanOrEqual(2);
    for (const d of st.devices) expect(d.workers).toHaveLength(1);
  });

  test('every device passes traffic wherever its pair runs', async () => {
    let base = 100;
    for (const n of names) {
      await passesTraffic(fes.get(n)!, sockets.get(n)!, base);
      base += 100;
    }
  });

  test('when a device leaves the pool unbalanced, a running pair moves and keeps passing traffic', async () => {
    const st = await be.call('status');
    const alone = (st.workers as Placement[]).find((w) => w.queues.length === 1)!.queues[0]!.device;
    fes.get(alone)!.close();
    fes.delete(alone);
    // The frontend's hang-up stops its pair; the pool then moves one of the other worker's two.
    let placed: number[] = [];
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline) {
      placed = ((await be.call('status')).workers as Placement[]).map((w) => w.queues.length);
      if (placed[0] === 1 && placed[1] === 1) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(placed).toEqual([1, 1]);
    let base = 1000;
    for (const [n, fe] of fes) {
      await passesTraffic(fe, sockets.get(n)!, base);
      base += 100;
    }
  });
});
