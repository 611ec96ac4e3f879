// Offload on the xsk port: the guest's program runs natively at the ingress of the backend's
// veth end, composed with the AF_XDP redirect, so dropped frames never reach the backend.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend, mountPinDir, unmountPinDir } from '../harness/backend.js';
import { TestFrontend } from '../frontend/test-frontend.js';
import { OffloadClient, offloadSample, requireOk, hostFramesReceived } from '../frontend/offload-client.js';
import { PacketSocket, bytesToMac } from '../harness/packet-socket.js';
import { uniqueIfName, vethXdpCounters } from '../harness/netdev.js';
import { waitUntil, sleep } from '../harness/processes.js';
import { udpFrame, seqOf, GUEST_MAC } from '../harness/frames.js';
import { defaultPeerName } from '../../src/ports/xsk.js';
import { encodeProgUnset, encodeElemLookup } from '../../src/offload/protocol.js';

const HOST_MAC = '52:54:00:0e:0e:0e';



describe('XDP offload on the xsk port (native XDP on the veth)', () => {
  let be: Backend;
  let fe: TestFrontend;
  let oc: OffloadClient;
  let ps: PacketSocket;
  const ifname = uniqueIfName('vxq');
  const peer = defaultPeerName(ifname);
  let seq = 500_000;

  let dir = '';
  let sock = '';
  let pinRoot = '';
  let args: string[] = [];

  beforeAll(async () => {
    dir = tempDir('offxsk');
    sock = path.join(dir, 'dev.sock');
    pinRoot = mountPinDir(dir);
    args = ['--socket', sock, '--port', `xsk:${ifname}`, '--queues', '1', '--offload', '--pin-dir', pinRoot, '--name', 'offx'];
    be = await startBackend(args, { dir });
    fe = await TestFrontend.connect(sock, { queuePairs: 2 });
    oc = new OffloadClient(fe, 1);
    ps = PacketSocket.open(ifname);
    requireOk(await oc.claim());
    await waitUntil(async () => (await be.call('status')).devices[0].offload.claimed, 3000, 'claim visible');
  });

  afterAll(async () => {
    ps?.close();
    fe?.close();
    await be?.stop();
    if (pinRoot) unmountPinDir(pinRoot);
  });

  async function hostToGuest(n: number): Promise<number> {
    const got = await hostFramesReceived(ps, fe, seq, n, HOST_MAC);
    seq += n;
    return got;
  }

  test('without a program, host frames reach the guest through AF_XDP', async () => {
    expect(await hostToGuest(20)).toBe(20);
  });

  test('xdp_drop: frames die in the kernel, the backend never sees them, the veth XDP drop counter and the guest map rise', async () => {
    const [h] = (await offloadSample(oc, 'xdp_drop')) as [number];
    await sleep(100);
    const before = (await be.call('stats', { name: 'offx' }))[0].total;
    const drops0 = vethXdpCounters(peer).xdp_drops!;
    expect(await hostToGuest(50)).toBe(0);
    const after = (await be.call('stats', { name: 'offx' }))[0].total;
    expect(after.rxPackets - before.rxPackets).toBe(0);
    expect(vethXdpCounters(peer).xdp_drops! - drops0).toBeGreaterThanOrEqual(50);
    const count = requireOk(await oc.call(encodeElemLookup(oc.nextSeq(), h, new Uint8Array(4))));
    expect(Number(new DataView(count.body.buffer, count.body.byteOffset).getBigUint64(0, true))).toBeGreaterThanOrEqual(50);
    requireOk(await oc.call(encodeProgUnset(oc.nextSeq())));
    expect(await hostToGuest(10)).toBe(10);
  });

  test('with --pin-dir, a backend killed and restarted composes the pinned program again: frames still die in the kernel', async () => {
    await offloadSample(oc, 'xdp_drop');
    const before = await be.call('offload.show', { name: 'offx' });
    fe.close();
    await be.stop('SIGKILL');
    be = await startBackend(args, { dir });
    ps.close();
    ps = PacketSocket.open(ifname);
    fe = await TestFrontend.connect(sock, { queuePairs: 2 });
    oc = new OffloadClient(fe, 1);
    const after = await be.call('offload.show', { name: 'offx' });
    expect(after.program.id).toBe(before.program.id);
    await waitUntil(async () => (await be.call('status')).devices[0].offload.claimed, 3000, 'claim re-adopted');
    const stats0 = (await be.call('stats', { name: 'offx' }))[0].total;
    const drops0 = vethXdpCounters(peer).xdp_drops ?? 0;
    expect(await hostToGuest(20)).toBe(0);
    expect(vethXdpCounters(peer).xdp_drops! - drops0).toBeGreaterThanOrEqual(20);
    expect((await be.call('stats', { name: 'offx' }))[0].total.rxPackets - stats0.rxPackets).toBe(0);
    requireOk(await oc.call(encodeProgUnset(oc.nextSeq())));
    expect(await hostToGuest(10)).toBe(10);
  });

  test('xdp_tx: frames bounce back to the host side with swapped MACs', async () => {
    await offloadSample(oc, 'xdp_tx');
    await sleep(100);
    ps.drain();
    const s = seq++;
    ps.send(udpFrame(s, 60, 5000, HOST_MAC, GUEST_MAC));
    const back = ps.recvAll(1, 3000, (f) => seqOf(f) === s);
    expect(back.length).toBe(1);
    expect(bytesToMac(back[0]!, 0)).toBe(HOST_MAC);
    expect(bytesToMac(back[0]!, 6)).toBe(GUEST_MAC);
    requireOk(await oc.call(encodeProgUnset(oc.nextSeq())));
  });
});
