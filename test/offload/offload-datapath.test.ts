// The offload path end to end: the TS test frontend plays the guest, talks to `serve --offload`
// over the reserved queue pair, and host frames written into the tap meet the guest's program.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { OffloadRig } from '../support/frontend/offload-rig.js';
import { offloadSample, requireOk, lookupU64 } from '../support/frontend/offload-client.js';
import { buildUdpFrame, patternPayload } from '../support/packet-socket.js';
import { uniqueIfName, disableIpv6, readLinkStats } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { udpFrame, seqOf, GUEST_MAC } from '../support/frames.js';
import { readBpfObject } from '../../src/offload/bpf-object.js';
import { statusName, encodeMapCreate, encodeProgSet, encodeProgUnset, encodeCaps, encodeRelease, encodeElemUpdate } from '../../src/offload/guest/codec.js';
import { listProgIds, listMapIds } from '../../src/sys/bpf/info.js';

const HOST_MAC = '52:54:00:0f:0f:0f';
const bpfDir = path.resolve(__dirname, '../../bpf/out');

function object(name: string) {
  return readBpfObject(new Uint8Array(fs.readFileSync(path.join(bpfDir, `${name}.o`))));
}


describe('XDP offload through the reserved queue pair (tap port)', () => {
  let rig: OffloadRig;
  const tap = uniqueIfName('vxo');

  beforeAll(async () => {
    // 1 data pair + the reserved pair.
    rig = await OffloadRig.start({ tag: 'offload', port: 'tap', ifname: tap, name: 'off', hostMac: HOST_MAC, firstSeq: 100_000, afterStart: () => disableIpv6(tap) });
  });

  afterAll(async () => {
    await rig?.close();
  });

  let dropMap = 0;

  test('before any claim, the reserved pair is a plain data pair', async () => {
    const s = rig.seq++;
    rig.ps.drain();
    rig.fe.transmit(1, [udpFrame(s, 100)]);
    expect(rig.ps.recvAll(1, 3000, (f) => seqOf(f) === s).length).toBe(1);
    expect((await rig.be.call('status')).devices[0].offload).toEqual({ pair: 1, claimed: false, program: null, bpfPrefix: 'off' });
  });

  test('CLAIM and CAPS: the guest learns up front what this host allows', async () => {
    requireOk(await rig.oc.claim());
    const caps = requireOk(await rig.oc.call(encodeCaps(rig.oc.nextSeq())));
    expect(caps.body.length).toBeGreaterThan(16);
    await waitUntil(async () => (await rig.be.call('status')).devices[0].offload.claimed, 3000, 'claim visible in status');
  });

  test('xdp_drop offloaded: host frames die on the host, the guest sees none, the guest-visible map counts them', async () => {
    [dropMap] = (await offloadSample(rig.oc, 'xdp_drop')) as [number];
    const tapBefore = readLinkStats(tap);
    const delivered = await rig.hostToGuest(50);
    expect(delivered).toBe(0);
    const show = await rig.be.call('offload.show', { name: 'off' });
    // The fast path (issue 18): the program runs at the tap's tc egress, so the 50 frames die
    // before the tap's transmit and never reach the backend's fd (the tap counts none of them).
    expect(show.host.program.runs).toBe('tap-tc');
    expect(readLinkStats(tap).txPackets - tapBefore.txPackets).toBeLessThan(50);
    expect(show.verdicts.drop).toBeGreaterThanOrEqual(50);
    expect(show.program.name).toBe('xdp_drop');
    expect(await lookupU64(rig.oc, dropMap)).toBe(show.verdicts.drop);
    expect(show.maps[0].handle).toBe(dropMap);
  });

  test('the program and its maps survive a backend restart with --pin-dir', async () => {
    const before = await rig.be.call('offload.show', { name: 'off' });
    await rig.restart();
    const after = await rig.be.call('offload.show', { name: 'off' });
    expect(after.claimed).toBe(true);
    expect(after.program.id).toBe(before.program.id);
    expect(await rig.hostToGuest(20)).toBe(0);
    expect(await lookupU64(rig.oc, dropMap)).toBeGreaterThanOrEqual(before.verdicts.drop + 20);
  });

  test('PROG_UNSET restores delivery', async () => {
    requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
    expect(await rig.hostToGuest(20)).toBe(20);
  });

  test('xdp_tx bounces host frames back to the host with swapped MACs', async () => {
    await offloadSample(rig.oc, 'xdp_tx');
    rig.ps.drain();
    const s = rig.seq++;
    rig.ps.send(udpFrame(s, 60, 5000, HOST_MAC, GUEST_MAC));
    const back = rig.ps.recvAll(1, 3000, (f) => seqOf(f) === s);
    expect(back.length).toBe(1);
    // Swapped: the frame now goes from the guest's MAC to the host's.
    expect(Array.from(back[0]!.subarray(0, 6), (b) => b.toString(16).padStart(2, '0')).join(':')).toBe(HOST_MAC);
    expect((await rig.be.call('offload.show', { name: 'off' })).verdicts.tx).toBeGreaterThanOrEqual(1);
    expect(await rig.hostToGuest(5)).toBe(0);
    requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
  });

  test('xdp_blocklist: sources the guest writes into its HASH map are dropped on the host, others delivered', async () => {
    const [h] = (await offloadSample(rig.oc, 'xdp_blocklist')) as [number];
    // udpFrame sends from 198.18.0.1: block it (key = the address in network byte order).
    requireOk(await rig.oc.call(encodeElemUpdate(rig.oc.nextSeq(), h, Uint8Array.from([198, 18, 0, 1]), new Uint8Array(8))));
    expect(await rig.hostToGuest(10)).toBe(0);
    const other = buildUdpFrame({ srcMac: HOST_MAC, dstMac: GUEST_MAC, srcIp: '198.18.0.9', dstIp: '198.18.0.1', srcPort: 1, dstPort: 2, payload: patternPayload(rig.seq, 60) });
    const s = rig.seq++;
    rig.ps.send(other);
    expect((await rig.fe.waitForFrames(0, 1, 2000, (f) => seqOf(f) === s).catch(() => [])).length + (await rig.fe.waitForFrames(1, 1, 200, (f) => seqOf(f) === s)).length).toBe(1);
    // The map's hit counter is readable from the guest side.
    expect(await lookupU64(rig.oc, h, Uint8Array.from([198, 18, 0, 1]))).toBe(10);
    requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
  });

  test('a program calling a forbidden helper is refused with a reason naming the helper', async () => {
    const obj = object('bad_trace_printk');
    const r = await rig.oc.call(encodeProgSet(rig.oc.nextSeq(), { license: obj.license, insns: obj.insns, mapHandles: [], name: 'bad' }));
    expect(statusName(r.status)).toBe('HELPER_NOT_ALLOWED');
    expect(r.reason).toMatch(/trace_printk/);
  });

  test('quota set takes effect live: lowering max maps refuses the next MAP_CREATE', async () => {
    const used = (await rig.be.call('quota.show', { name: 'off' })).usage.maps;
    const r = await rig.be.call('quota.set', { name: 'off', changes: { maxMaps: String(used) } });
    expect(r.limits.maxMaps).toBe(used);
    const refused = await rig.oc.call(encodeMapCreate(rig.oc.nextSeq(), { type: 2, keySize: 4, valueSize: 8, maxEntries: 4, name: 'over' }));
    expect(statusName(refused.status)).toBe('QUOTA_EXCEEDED');
    await rig.be.call('quota.set', { name: 'off', changes: { maxMaps: '16' } });
  });

  test('RELEASE frees everything in the kernel and the pair goes back to data use', async () => {
    const show = await rig.be.call('offload.show', { name: 'off' });
    const mapIds: number[] = show.maps.map((m: { id: number }) => m.id);
    expect(mapIds.length).toBeGreaterThan(0);
    requireOk(await rig.oc.call(encodeRelease(rig.oc.nextSeq())));
    await waitUntil(() => mapIds.every((id) => !listMapIds().includes(id)), 3000, 'maps freed in the kernel');
    expect(listProgIds()).not.toContain(show.program?.id ?? -1);
    expect(fs.existsSync(path.join(rig.pinRoot, 'off'))).toBe(false);
    const s = rig.seq++;
    rig.ps.drain();
    rig.fe.transmit(1, [udpFrame(s, 100)]);
    expect(rig.ps.recvAll(1, 3000, (f) => seqOf(f) === s).length).toBe(1);
  });

  test('a frontend that disconnects leaves nothing of its offload in the kernel', async () => {
    requireOk(await rig.oc.claim());
    await offloadSample(rig.oc, 'xdp_drop');
    const show = await rig.be.call('offload.show', { name: 'off' });
    rig.fe.close();
    await waitUntil(async () => !(await rig.be.call('status')).devices[0].connected, 3000, 'disconnect seen');
    await waitUntil(() => !listMapIds().includes(show.maps[0].id) && !listProgIds().includes(show.program.id), 3000, 'program and map gone from the kernel');
    expect((await rig.be.call('status')).devices[0].offload).toEqual({ pair: 1, claimed: false, program: null, bpfPrefix: 'off' });
    expect(fs.existsSync(path.join(rig.pinRoot, 'off'))).toBe(false);
  });
});
