import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { Request, u64Payload, vringStatePayload } from '../../src/vhost-user/protocol.js';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { PacketSocket, buildUdpFrame, patternPayload } from '../support/packet-socket.js';
import { udpFrame, seqOf, GUEST_MAC, HOST_MAC } from '../support/frames.js';
import { uniqueIfName, disableIpv6, linkExists } from '../support/netdev.js';

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

  /** Sends `n` host frames over 32 flows (UDP source ports) and returns how many each pair received. */
  async function hostFramesPerPair(first: number, n: number): Promise<number[]> {
    for (const p of [0, 1]) fe.receive(p);
    for (let i = 0; i < n; i++) ps.send(udpFrame(first + i, 64, 3000 + (i % 32), HOST_MAC, GUEST_MAC));
    const per = [0, 0];
    const deadline = Date.now() + 3000;
    while (per[0]! + per[1]! < n && Date.now() < deadline) {
      for (const p of [0, 1]) per[p]! += fe.receive(p).filter((f) => (seqOf(f) ?? -1) >= first && seqOf(f)! < first + n).length;
      await new Promise((r) => setTimeout(r, 5));
    }
    return per;
  }

  test('a pair whose rings the frontend disables is taken out of the host\'s use (no flow hashed to its tap queue is lost) and given back when they are enabled again', async () => {
    expect((await be.call('status')).devices[0].hostPairs).toEqual([0, 1]);
    const spread = await hostFramesPerPair(5000, 64);
    expect(spread[0]! + spread[1]!).toBe(64);
    expect(spread[1]).toBeGreaterThan(0);
    // As QEMU does when a 1-vCPU guest uses one of two pairs.
    for (const index of [2, 3]) await fe.request(Request.SET_VRING_ENABLE, vringStatePayload(index, 0));
    const d = (await be.call('status')).devices[0];
    expect(d.hostPairs).toEqual([0]);
    expect(d.runningVrings).toEqual([0, 1]);
    expect(await hostFramesPerPair(6000, 64)).toEqual([64, 0]);
    for (const index of [2, 3]) await fe.request(Request.SET_VRING_ENABLE, vringStatePayload(index, 1));
    expect((await be.call('status')).devices[0].hostPairs).toEqual([0, 1]);
    const again = await hostFramesPerPair(7000, 64);
    expect(again[0]! + again[1]!).toBe(64);
    expect(again[1]).toBeGreaterThan(0);
  });

  test('SIGTERM removes the tap and the socket the backend created', async () => {
    fe.close();
    await be.stop('SIGTERM');
    expect(be.proc.exitInfo?.code).toBe(0);
    expect(linkExists(tap)).toBe(false);
  });
});

describe('datapath modes and MTU', () => {
  test('busy-poll with two worker threads passes traffic on both pairs, and NET_SET_MTU reaches the tap', async () => {
    const tap = uniqueIfName('vxb');
    const dir = tempDir('busy');
    const sock = path.join(dir, 'dev.sock');
    const be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--queues', '2', '--workers', '2', '--busy-poll', '--name', 'busy'], { dir });
    let fe: TestFrontend | undefined;
    let ps: PacketSocket | undefined;
    try {
      disableIpv6(tap);
      fe = await TestFrontend.connect(sock, { queuePairs: 2 });
      ps = PacketSocket.open(tap);
      await fe.request(Request.NET_SET_MTU, u64Payload(1400));
      expect(Number(fs.readFileSync(`/sys/class/net/${tap}/mtu`, 'utf8'))).toBe(1400);
      for (let i = 0; i < 40; i++) fe.transmit(i % 2, [udpFrame(9000 + i, 200)]);
      expect(new Set(ps.recvAll(40, 5000, (f) => (seqOf(f) ?? 0) >= 9000).map(seqOf)).size).toBe(40);
      for (let i = 0; i < 40; i++) ps.send(udpFrame(9100 + i, 200, 6000 + i, HOST_MAC, GUEST_MAC));
      const got = new Set<number>();
      const deadline = Date.now() + 5000;
      while (got.size < 40 && Date.now() < deadline) {
        for (const p of [0, 1]) for (const f of fe.receive(p)) if ((seqOf(f) ?? 0) >= 9100) got.add(seqOf(f)!);
        await new Promise((r) => setTimeout(r, 5));
      }
      expect(got.size).toBe(40);
      const st = (await be.call('stats', { name: 'busy' }))[0];
      expect(st.pairs[0].txPackets).toBeGreaterThan(0);
      expect(st.pairs[1].txPackets).toBeGreaterThan(0);
      // An MTU outside 68..65535 is refused (REPLY_ACK failure), and the tap keeps its MTU.
      await expect(fe.request(Request.NET_SET_MTU, u64Payload(20))).rejects.toThrow(/refused/);
      expect(Number(fs.readFileSync(`/sys/class/net/${tap}/mtu`, 'utf8'))).toBe(1400);
    } finally {
      ps?.close();
      fe?.close();
      await be.stop();
    }
  });
});
