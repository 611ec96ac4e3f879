// Offload on the xsk port: the guest's program runs natively at the ingress of the backend's
// veth end, composed with the AF_XDP redirect, so dropped frames never reach the backend.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import { OffloadRig } from '../support/frontend/offload-rig.js';
import { offloadSample, requireOk } from '../support/frontend/offload-client.js';
import { bytesToMac } from '../support/packet-socket.js';
import { uniqueIfName, vethXdpCounters } from '../support/netdev.js';
import { waitUntil, sleep } from '../support/processes.js';
import { udpFrame, seqOf, GUEST_MAC } from '../support/frames.js';
import { defaultPeerName } from '../../src/ports/xsk.js';
import { encodeProgUnset, encodeElemLookup } from '../../src/offload/guest/codec.js';

const HOST_MAC = '52:54:00:0e:0e:0e';

describe('XDP offload on the xsk port (native XDP on the veth)', () => {
  let rig: OffloadRig;
  const ifname = uniqueIfName('vxq');
  const peer = defaultPeerName(ifname);

  beforeAll(async () => {
    rig = await OffloadRig.start({ tag: 'offxsk', port: 'xsk', ifname, name: 'offx', hostMac: HOST_MAC, firstSeq: 500_000 });
  });

  afterAll(async () => {
    await rig?.close();
  });

  const pairStats = async (pair: number) => (await rig.be.call('stats', { name: 'offx' }))[0].pairs[pair] as { txPackets: number; txDropped: number };

  describe('before any claim', () => {
    test('guest frames sent on the reserved pair reach the host (it has no AF_XDP socket: a packet socket on the peer sends them)', async () => {
      rig.ps.drain();
      const before = await pairStats(1);
      const first = rig.seq;
      const frames = Array.from({ length: 20 }, (_, i) => udpFrame(first + i, 300 + i));
      rig.seq += frames.length;
      rig.fe.transmit(1, frames);
      const got = rig.ps.recvAll(frames.length, 3000, (f) => { const s = seqOf(f); return s !== null && s >= first && s < first + frames.length; });
      expect(got.length).toBe(frames.length);
      got.sort((a, b) => seqOf(a)! - seqOf(b)!);
      for (let i = 0; i < frames.length; i++) expect(Buffer.from(got[i]!).equals(Buffer.from(frames[i]!))).toBe(true);
      expect((await pairStats(1)).txPackets - before.txPackets).toBe(frames.length);
      expect((await rig.be.call('status')).devices[0].offload).toEqual({ pair: 1, claimed: false, program: null, bpfPrefix: 'offx' });
    });

    test('the reserved pair refuses headers asking for what an xsk device never offers (checksum, segmentation): counted, not sent', async () => {
      rig.ps.drain();
      const before = (await rig.be.call('stats', { name: 'offx' }))[0].pairs[1] as { txPackets: number; txErrors: number };
      const first = rig.seq;
      rig.seq += 2;
      // flags NEEDS_CSUM, csum_start 34, csum_offset 6 (UDP); then gso_type TCPV4 with gso_size 1400.
      const csum = new Uint8Array([1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0]);
      const gso = new Uint8Array([0, 1, 54, 0, 0x78, 0x05, 0, 0, 0, 0, 0, 0]);
      rig.fe.transmit(1, [udpFrame(first, 100)], csum);
      rig.fe.transmit(1, [udpFrame(first + 1, 100)], gso);
      await waitUntil(async () => (await rig.be.call('stats', { name: 'offx' }))[0].pairs[1].txErrors >= before.txErrors + 2, 3000, 'both refused');
      expect(rig.ps.recvAll(1, 300, (f) => { const s = seqOf(f); return s === first || s === first + 1; }).length).toBe(0);
      expect((await rig.be.call('stats', { name: 'offx' }))[0].pairs[1].txPackets).toBe(before.txPackets);
    });
  });

  describe('claimed', () => {
    beforeAll(async () => {
      requireOk(await rig.oc.claim());
      await waitUntil(async () => (await rig.be.call('status')).devices[0].offload.claimed, 3000, 'claim visible');
    });

    test('the reserved pair carries only offload messages: data frames on it are dropped and counted, none reach the host', async () => {
      rig.ps.drain();
      const before = await pairStats(1);
      const s = rig.seq++;
      rig.fe.transmit(1, [udpFrame(s, 100)]);
      await waitUntil(async () => (await pairStats(1)).txDropped > before.txDropped, 3000, 'drop counted');
      expect(rig.ps.recvAll(1, 300, (f) => seqOf(f) === s).length).toBe(0);
      expect((await pairStats(1)).txPackets).toBe(before.txPackets);
    });

    test('without a program, host frames reach the guest through AF_XDP', async () => {
      expect(await rig.hostToGuest(20)).toBe(20);
    });

    test('xdp_drop: frames die in the kernel, the backend never sees them, the veth XDP drop counter and the guest map rise', async () => {
      const [h] = (await offloadSample(rig.oc, 'xdp_drop')) as [number];
      await sleep(100);
      const before = (await rig.be.call('stats', { name: 'offx' }))[0].total;
      const drops0 = vethXdpCounters(peer).xdp_drops!;
      expect(await rig.hostToGuest(50)).toBe(0);
      const after = (await rig.be.call('stats', { name: 'offx' }))[0].total;
      expect(after.rxPackets - before.rxPackets).toBe(0);
      expect(vethXdpCounters(peer).xdp_drops! - drops0).toBeGreaterThanOrEqual(50);
      const count = requireOk(await rig.oc.call(encodeElemLookup(rig.oc.nextSeq(), h, new Uint8Array(4))));
      expect(Number(new DataView(count.body.buffer, count.body.byteOffset).getBigUint64(0, true))).toBeGreaterThanOrEqual(50);
      requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
      expect(await rig.hostToGuest(10)).toBe(10);
    });

    test('with --pin-dir, a backend killed and restarted composes the pinned program again: frames still die in the kernel', async () => {
      await offloadSample(rig.oc, 'xdp_drop');
      const before = await rig.be.call('offload.show', { name: 'offx' });
      await rig.restart();
      const after = await rig.be.call('offload.show', { name: 'offx' });
      expect(after.program.id).toBe(before.program.id);
      await waitUntil(async () => (await rig.be.call('status')).devices[0].offload.claimed, 3000, 'claim re-adopted');
      const stats0 = (await rig.be.call('stats', { name: 'offx' }))[0].total;
      const drops0 = vethXdpCounters(peer).xdp_drops ?? 0;
      expect(await rig.hostToGuest(20)).toBe(0);
      expect(vethXdpCounters(peer).xdp_drops! - drops0).toBeGreaterThanOrEqual(20);
      expect((await rig.be.call('stats', { name: 'offx' }))[0].total.rxPackets - stats0.rxPackets).toBe(0);
      requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
      expect(await rig.hostToGuest(10)).toBe(10);
    });

    test('xdp_tx: frames bounce back to the host side with swapped MACs', async () => {
      await offloadSample(rig.oc, 'xdp_tx');
      await sleep(100);
      rig.ps.drain();
      const s = rig.seq++;
      rig.ps.send(udpFrame(s, 60, 5000, HOST_MAC, GUEST_MAC));
      const back = rig.ps.recvAll(1, 3000, (f) => seqOf(f) === s);
      expect(back.length).toBe(1);
      expect(bytesToMac(back[0]!, 0)).toBe(HOST_MAC);
      expect(bytesToMac(back[0]!, 6)).toBe(GUEST_MAC);
      requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
    });
  });
});
