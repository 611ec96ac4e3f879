import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../harness/backend.js';
import { TestFrontend } from '../frontend/test-frontend.js';
import { PacketSocket, buildUdpFrame, patternPayload } from '../harness/packet-socket.js';
import { udpFrame, seqOf, GUEST_MAC, HOST_MAC } from '../harness/frames.js';
import { uniqueIfName, disableIpv6, linkExists } from '../harness/netdev.js';

describe('tap port datapath, TypeScript frontend, 2 queue pairs', () => {
  let be: Backend;
  let fe: TestFrontend;
  let tap: string;
  let ps: PacketSocket;

  beforeAll(async () => {
    tap = uniqueIfName('vxd');
    const dir = tempDir('tapdp');
    const sock = path.join(dir, 'dev.sock');
    // MTU 4000: frames larger than one 2 KiB receive slot must span mergeable buffers.
    be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--queues', '2', '--name', 'tapdp', '--mtu', '4000'], { dir });
    disableIpv6(tap);
    fe = await TestFrontend.connect(sock, { queuePairs: 2 });
    ps = PacketSocket.open(tap);
  });

  afterAll(async () => {
    ps?.close();
    fe?.close();
    await be?.stop();
  });

  test('frames the guest sends on either queue pair reach the tap with their payloads intact', async () => {
    ps.drain();
    const sent = new Set<number>();
    const seqs = new Set<number>();
    // Batches of 25: the packet socket's receive buffer would overflow if all 200 queued up.
    for (let b = 0; b < 8; b++) {
      for (let i = b * 25; i < (b + 1) * 25; i++) {
        expect(fe.transmit(i % 2, [udpFrame(i, 64 + (i % 7) * 100)])).toBe(1);
        sent.add(i);
      }
      for (const f of ps.recvAll(25, 5000, (f) => seqOf(f) !== null)) seqs.add(seqOf(f)!);
    }
    expect(seqs).toEqual(sent);
    const st = await be.call('stats', { name: 'tapdp' });
    expect(st[0].pairs[0].txPackets).toBeGreaterThanOrEqual(100);
    expect(st[0].pairs[1].txPackets).toBeGreaterThanOrEqual(100);
  });

  test('frames written to the tap by the host arrive in the guest RX queues with their payloads intact', async () => {
    const n = 200;
    for (let i = 0; i < n; i++) ps.send(udpFrame(1000 + i, 32 + (i % 11) * 120, 2000 + (i % 16), HOST_MAC, GUEST_MAC));
    const deadline = Date.now() + 5000;
    const seqs = new Set<number>();
    while (seqs.size < n && Date.now() < deadline) {
      for (const p of [0, 1]) for (const f of fe.receive(p)) {
        const s = seqOf(f);
        if (s !== null) seqs.add(s);
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(seqs.size).toBe(n);
    expect([...seqs].every((s) => s >= 1000 && s < 1000 + n)).toBe(true);
  });

  test('a frame larger than one receive buffer is delivered across mergeable buffers (num_buffers)', async () => {
    const big = buildUdpFrame({ srcMac: HOST_MAC, dstMac: GUEST_MAC, srcIp: '198.18.0.2', dstIp: '198.18.0.1', srcPort: 7, dstPort: 7, payload: patternPayload(4242, 3500) });
    expect(big.length).toBeGreaterThan(2048);
    ps.send(big);
    const frames: Uint8Array[] = [];
    const deadline = Date.now() + 3000;
    while (frames.length === 0 && Date.now() < deadline) {
      for (const p of [0, 1]) frames.push(...fe.receive(p).filter((f) => seqOf(f) === 4242));
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(frames.length).toBe(1);
    expect(frames[0]).toEqual(big);
  });

  test('status shows the negotiated features and running vrings', async () => {
    const st = await be.call('status');
    const d = st.devices[0];
    expect(d.connected).toBe(true);
    expect(d.runningVrings).toEqual([0, 1, 2, 3]);
    expect(d.features).toEqual(expect.arrayContaining(['VERSION_1', 'MRG_RXBUF', 'RING_EVENT_IDX', 'MQ']));
  });

  test('SIGTERM removes the tap and the socket the backend created', async () => {
    fe.close();
    await be.stop('SIGTERM');
    expect(be.proc.exitInfo?.code).toBe(0);
    expect(linkExists(tap)).toBe(false);
  });
});
