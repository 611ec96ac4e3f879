// The tap port's default I/O (io_uring) through the whole datapath, with buffers a read each can
// fill (MTU 1500, 2 KiB mergeable slots): host frames reach the guest in the order the host
// sent them, guest frames reach the host, and the frontend's kicks and the ring's eventfd keep
// both moving.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf, HOST_MAC, GUEST_MAC } from '../support/frames.js';
import { uniqueIfName, disableIpv6, run, deleteLink } from '../support/netdev.js';

describe('tap port over io_uring, TypeScript frontend', () => {
  let be: Backend;
  let fe: TestFrontend;
  let ps: PacketSocket;

  beforeAll(async () => {
    const tap = uniqueIfName('vxur');
    const dir = tempDir('tapur');
    const sock = path.join(dir, 'dev.sock');
    be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--name', 'tapur'], { dir });
    disableIpv6(tap);
    fe = await TestFrontend.connect(sock, { queuePairs: 1 });
    ps = PacketSocket.open(tap);
  });

  afterAll(async () => {
    ps?.close();
    fe?.close();
    await be?.stop();
  });

  test('status says io_uring', async () => {
    const st = await be.call('status');
    expect(st.devices[0].port.io).toEqual({ mode: 'uring', reason: null });
  });

  test('host frames arrive in the guest in the order the host sent them', async () => {
    const n = 300;
    const seqs: number[] = [];
    for (let b = 0; b < n / 50; b++) {
      for (let i = b * 50; i < (b + 1) * 50; i++) ps.send(udpFrame(5000 + i, 60 + (i % 13) * 100, 2000, HOST_MAC, GUEST_MAC));
      const deadline = Date.now() + 5000;
      while (seqs.length < (b + 1) * 50 && Date.now() < deadline) {
        for (const f of fe.receive(0)) {
          const s = seqOf(f);
          if (s !== null && s >= 5000) seqs.push(s);
        }
        await new Promise((r) => setTimeout(r, 2));
      }
    }
    expect(seqs).toEqual(Array.from({ length: n }, (_, i) => 5000 + i));
  });

  test('guest frames reach the host', async () => {
    ps.drain();
    for (let i = 0; i < 100; i++) expect(fe.transmit(0, [udpFrame(7000 + i, 64 + (i % 5) * 300)])).toBe(1);
    const got = ps.recvAll(100, 5000, (f) => (seqOf(f) ?? 0) >= 7000).map(seqOf);
    expect(got).toEqual(Array.from({ length: 100 }, (_, i) => 7000 + i));
  });
});

describe('tap port over io_uring, a guest that posts only a few buffers at a time', () => {
  test('once every posted buffer is used, the next buffers the guest posts are read into (it asks for the kick)', async () => {
    const tap = uniqueIfName('vxur');
    const dir = tempDir('tapur');
    const sock = path.join(dir, 'dev.sock');
    // Made here with IPv6 off before it is up: no link-up chatter takes buffers the test counts.
    // serve attaches to a tap it did not make and leaves it; the test deletes it.
    run(['ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap', 'vnet_hdr']);
    disableIpv6(tap);
    let be: Backend | undefined;
    let fe: TestFrontend | undefined;
    let ps: PacketSocket | undefined;
    try {
      be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--name', 'tapur2'], { dir });
      fe = await TestFrontend.connect(sock, { queuePairs: 1, rxFill: 'manual' });
      ps = PacketSocket.open(tap);
      const area = fe.alloc(16 * 2048);
      for (let round = 0; round < 3; round++) {
        // Exactly 8 buffers, then 8 frames: all used, none left posted, nothing read in the kernel.
        expect(fe.postRx(0, Array.from({ length: 8 }, (_, i) => [{ gpa: area + ((round % 2) * 8 + i) * 2048, len: 2048, writable: true }]))).toBe(8);
        for (let i = 0; i < 8; i++) ps.send(udpFrame(6000 + round * 8 + i, 100, 2000, HOST_MAC, GUEST_MAC));
        const got = await fe.waitForFrames(0, 8, 3000, (f) => (seqOf(f) ?? 0) >= 6000);
        expect(got.map(seqOf)).toEqual(Array.from({ length: 8 }, (_, i) => 6000 + round * 8 + i));
      }
    } finally {
      ps?.close();
      fe?.close();
      await be?.stop();
      deleteLink(tap);
    }
  });
});
