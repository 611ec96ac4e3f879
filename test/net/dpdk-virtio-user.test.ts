import { describe, test, expect, afterEach } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { startTestpmd, ensureHugepages, isTxonlyFrame, pcapVdev, readPcap, type Testpmd } from '../support/dpdk.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, disableIpv6, readLinkStats } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { udpFrame, seqOf, GUEST_MAC } from '../support/frames.js';

// DPDK's virtio-user is an independent vhost-user frontend: it checks our protocol handling,
// ring layout and vnet header against someone else's implementation.
describe.each([['tap', 1], ['tap', 2], ['xsk', 1], ['xsk', 2]] as const)('DPDK virtio-user against serve --port %s (%i queue pair(s))', (kind, queues) => {
  let be: Backend | undefined;
  let pmd: Testpmd | undefined;
  let ps: PacketSocket | undefined;

  afterEach(async () => {
    ps?.close();
    ps = undefined;
    await pmd?.stop();
    pmd = undefined;
    await be?.stop();
    be = undefined;
  });

  async function serve(client: boolean): Promise<{ tap: string; sock: string }> {
    ensureHugepages();
    const tap = uniqueIfName('vxp');
    const dir = tempDir('dpdk');
    const sock = path.join(dir, 'dev.sock');
    be = await startBackend(['--socket', sock, '--port', `${kind}:${tap}`, '--queues', String(queues), '--name', 'pmd', ...(client ? ['--client'] : [])], { dir });
    disableIpv6(tap);
    return { tap, sock };
  }

  test('frames testpmd sends (txonly) arrive on the host interface: kernel counters and payloads', async () => {
    const { tap, sock } = await serve(false);
    ps = PacketSocket.open(tap);
    const before = readLinkStats(tap);
    pmd = await startTestpmd({
      name: `txonly-q${queues}`, vdevs: [`net_virtio_user0,path=${sock},queues=${queues},queue_size=256`],
      forwardMode: 'txonly', queues, txpkts: 64, statsPeriod: 1, txonlyMultiFlow: queues > 1,
    });
    await waitUntil(() => readLinkStats(tap).rxPackets - before.rxPackets >= 20_000, 30_000, '20k frames on the tap');
    const sample = ps.recvAll(50, 3000);
    expect(sample.length).toBe(50);
    // txonly-multi-flow varies the source IP; the rest of the frame is checked exactly.
    expect(sample.every((f) => isTxonlyFrame(f, { frameLen: 64, ...(queues > 1 ? { srcIp: `198.18.${f[28]}.${f[29]}` } : {}) }))).toBe(true);
    await pmd.stop();
    pmd = undefined;
    const st = (await be!.call('stats', { name: 'pmd' }))[0];
    const onTap = readLinkStats(tap).rxPackets - before.rxPackets;
    expect(st.total.txPackets).toBeGreaterThanOrEqual(20_000);
    // Everything the backend counted as sent, the kernel counted as received on the tap.
    expect(onTap).toBe(st.total.txPackets);
    for (let p = 0; p < queues; p++) expect(st.pairs[p].txPackets).toBeGreaterThan(0);
    expect(st.total.txErrors).toBe(0);
    // Straight from guest buffers to the host: no payload copy in JavaScript on either port.
    expect(st.total.jsCopies).toBe(0);
  });

  test('frames injected on the host interface arrive in testpmd with intact payloads', async () => {
    const { tap, sock } = await serve(queues === 1);
    const dir = tempDir('pcap');
    const files = Array.from({ length: queues }, (_, q) => path.join(dir, `rx${q}.pcap`));
    // In client mode (queues=1 here) virtio-user listens (server=1) and the backend connects.
    pmd = await startTestpmd({
      name: `rx-q${queues}`,
      vdevs: [`net_virtio_user0,path=${sock},queues=${queues},queue_size=256${queues === 1 ? ',server=1' : ''}`, pcapVdev(1, files)],
      forwardMode: 'io', queues, statsPeriod: 1,
    });
    await waitUntil(async () => (await be!.call('status')).devices[0].runningVrings.length === 2 * queues, 20_000, 'vrings running');
    ps = PacketSocket.open(tap);
    const n = 500;
    for (let i = 0; i < n; i++) {
      ps.send(udpFrame(i, 64 + (i % 13) * 97, 3000 + (i % 32), '52:54:00:aa:bb:cc', GUEST_MAC));
      if (i % 50 === 49) await new Promise((r) => setTimeout(r, 5));
    }
    await pmd.waitForStats((ports) => (ports.find((p) => p.port === 0)?.rxPackets ?? 0) >= n, 20_000);
    await pmd.stop();
    pmd = undefined;
    const frames = files.flatMap((f) => readPcap(f));
    const seqs = new Set(frames.map((f) => seqOf(f)).filter((s): s is number => s !== null));
    expect(seqs.size).toBe(n);
    const st = (await be!.call('stats', { name: 'pmd' }))[0];
    for (let p = 0; p < queues; p++) expect(st.pairs[p].rxPackets).toBeGreaterThan(0);
    // MTU-sized receive buffers (DPDK's 2 KiB mbufs): the kernel writes straight into them.
    expect(st.total.jsCopies).toBe(0);
  });
});
