// The tap port's offload fast path (issue 18), end to end: `serve --offload --pin-dir` on a
// real tap, the TS frontend as the guest, host frames from a packet socket. The guest's XDP
// program runs at the tap's tc egress (tcx): what it drops never reaches the backend's fd, what
// it passes arrives intact, XDP_TX goes back to the host; a program the translation cannot take
// stays on per-frame BPF_PROG_TEST_RUN with a log line saying why; and the tc program never
// outlives its purpose: detach, restart and SIGKILL leave no filter on the tap.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import { OffloadRig } from '../support/frontend/offload-rig.js';
import { offloadSample, requireOk } from '../support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6, readLinkStats } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { udpFrame, seqOf, GUEST_MAC } from '../support/frames.js';
import { encodeInsns, Op } from '../../src/sys/bpf/insns.js';
import { tcxQuery, tcxAttach } from '../../src/sys/bpf/tcx.js';
import { progLoad, closeBpfFd, BpfProgType } from '../../src/sys/bpf/programs.js';
import { listProgIds } from '../../src/sys/bpf/info.js';
import { ifNameToIndex, closeFd } from '../../src/sys/libc.js';
import { statusName, encodeProgSet, encodeProgUnset, encodeElemUpdate } from '../../src/offload/guest/codec.js';

const HOST_MAC = '52:54:00:0e:0e:0e';

describe('tap offload fast path: the program at the tap\'s tc egress', () => {
  let rig: OffloadRig;
  const tap = uniqueIfName('vxtc');
  const egress = () => tcxQuery(ifNameToIndex(tap), 'egress');
  const show = () => rig.be.call('offload.show', { name: 'tc' });
  const txOfTap = () => readLinkStats(tap).txPackets;

  beforeAll(async () => {
    rig = await OffloadRig.start({ tag: 'taptc', port: 'tap', ifname: tap, name: 'tc', hostMac: HOST_MAC, firstSeq: 300_000, afterStart: () => disableIpv6(tap) });
    requireOk(await rig.oc.claim());
  });

  afterAll(async () => {
    await rig?.close();
  });

  test('frames the program drops never reach the tap\'s fd: the tap transmits none, the backend reads none, the kernel counts them', async () => {
    await offloadSample(rig.oc, 'xdp_drop');
    const s = await show();
    expect(s.host.program.runs).toBe('tap-tc');
    expect(egress()).toEqual([s.host.program.hostId]);
    expect((await rig.be.call('status')).devices[0].offload.runs).toBe('tap-tc');
    const tx0 = txOfTap();
    const rx0 = (await rig.be.call('stats', { name: 'tc' }))[0].total.rxPackets;
    expect(await rig.hostToGuest(50)).toBe(0);
    expect(txOfTap() - tx0).toBe(0);
    const st = (await rig.be.call('stats', { name: 'tc' }))[0];
    expect(st.total.rxPackets - rx0).toBe(0);
    expect((await show()).verdicts.drop).toBeGreaterThanOrEqual(50);
    // Kernel-counted verdicts sit in the reserved pair's row.
    expect(st.pairs[1].xdpDrop).toBe(st.total.xdpDrop);
  });

  test('frames the program passes arrive intact, byte for byte', async () => {
    await offloadSample(rig.oc, 'xdp_pass');
    expect((await show()).host.program.runs).toBe('tap-tc');
    const sent = Array.from({ length: 10 }, (_, i) => udpFrame(rig.seq + i, 100 + i * 37, 4000, HOST_MAC, GUEST_MAC));
    const first = rig.seq;
    rig.seq += sent.length;
    rig.fe.receive(0);
    for (const f of sent) expect(rig.ps.send(f)).toBe(true);
    const got = await rig.fe.waitForFrames(0, sent.length, 3000, (f) => (seqOf(f) ?? -1) >= first);
    expect(got.length).toBe(sent.length);
    got.sort((a, b) => seqOf(a)! - seqOf(b)!).forEach((f, i) => expect(Buffer.from(f).equals(Buffer.from(sent[i]!))).toBe(true));
    expect((await show()).verdicts.pass).toBeGreaterThanOrEqual(sent.length);
  });

  test('XDP_TX bounces the frame back to the host (bpf_redirect to the tap\'s ingress), MACs swapped, never through the fd', async () => {
    await offloadSample(rig.oc, 'xdp_tx');
    expect((await show()).host.program.runs).toBe('tap-tc');
    rig.ps.drain();
    const tx0 = txOfTap();
    const s = rig.seq++;
    expect(rig.ps.send(udpFrame(s, 60, 5000, HOST_MAC, GUEST_MAC))).toBe(true);
    const back = rig.ps.recvAll(1, 3000, (f) => seqOf(f) === s);
    expect(back.length).toBe(1);
    expect(Array.from(back[0]!.subarray(0, 6), (b) => b.toString(16).padStart(2, '0')).join(':')).toBe(HOST_MAC);
    expect(txOfTap() - tx0).toBe(0);
    expect((await show()).verdicts.tx).toBeGreaterThanOrEqual(1);
  });

  test('a frame with an out-of-band VLAN tag meets the program with the tag in its bytes, as XDP on the frame the tap hands over does', async () => {
    // This kernel has no 8021q: a host tcx program ahead of ours tags every frame out of band
    // (bpf_skb_vlan_push sets skb->vlan_tci, as a VLAN device above the tap would).
    const block = async () => {
      const [h] = (await offloadSample(rig.oc, 'xdp_blocklist')) as [number];
      requireOk(await rig.oc.call(encodeElemUpdate(rig.oc.nextSeq(), h, Uint8Array.from([198, 18, 0, 1]), new Uint8Array(8))));
    };
    await block();
    expect(await rig.hostToGuest(3)).toBe(0); // untagged IPv4 from the blocked source: dropped
    requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
    expect(egress()).toEqual([]);
    const push = progLoad(encodeInsns([
      { code: Op.MOV64_IMM, dst: 2, imm: 0x0081 }, // htons(ETH_P_8021Q)
      { code: Op.MOV64_IMM, dst: 3, imm: 5 },
      { code: Op.CALL, imm: 18 }, // bpf_skb_vlan_push
      { code: Op.MOV64_IMM, dst: 0, imm: -1 }, // TCX_NEXT
      { code: Op.EXIT },
    ]), { license: 'GPL', type: BpfProgType.SCHED_CLS, name: 'vxt_vlan_push' });
    const link = tcxAttach(ifNameToIndex(tap), push, 'egress');
    try {
      await block();
      expect(egress().length).toBe(2);
      expect((await show()).host.program.runs).toBe('tap-tc');
      const s = rig.seq++;
      const f = udpFrame(s, 80, 4000, HOST_MAC, GUEST_MAC);
      rig.fe.receive(0);
      expect(rig.ps.send(f, { dropOk: true })).toBe(true);
      // Tagged, the program sees EtherType 0x8100 (not IPv4) and passes it.
      const got = await rig.fe.waitForFrames(0, 1, 3000, (x) => x.length === f.length + 4);
      expect(got.length).toBe(1);
      const g = got[0]!;
      expect(Array.from(g.subarray(12, 16))).toEqual([0x81, 0x00, 0x00, 0x05]);
      expect(Buffer.from(g.subarray(0, 12)).equals(Buffer.from(f.subarray(0, 12)))).toBe(true);
      expect(Buffer.from(g.subarray(16)).equals(Buffer.from(f.subarray(12)))).toBe(true);
    } finally {
      closeFd(link);
      closeBpfFd(push);
      requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
    }
  });

  test('a program with an XDP-only helper stays on test-run: a log line names the tap, the reason and its code; status says tap-test-run', async () => {
    const from = rig.be.proc.lineCount;
    // r2 = 0; bpf_xdp_adjust_head(ctx, 0); return XDP_PASS
    const insns = encodeInsns([{ code: Op.MOV64_IMM, dst: 2, imm: 0 }, { code: Op.CALL, imm: 44 }, { code: Op.MOV64_IMM, dst: 0, imm: 2 }, { code: Op.EXIT }]);
    const r = await rig.oc.call(encodeProgSet(rig.oc.nextSeq(), { license: 'GPL', insns, mapHandles: [], name: 'adj_head' }));
    expect(statusName(r.status)).toBe('OK');
    const line = await rig.be.proc.waitForLine(/stays on per-frame BPF_PROG_TEST_RUN/, 5000, from);
    expect(line.input).toContain(`tap ${tap}`);
    expect(line.input).toMatch(/bpf_xdp_adjust_head \(44\) exists for XDP only \[tc-xdp-helper\]/);
    expect(line.input).toMatch(/the xsk port is the fast path for offload/);
    const s = await show();
    expect(s.host.program).toMatchObject({ runs: 'tap-test-run', fallback: { code: 'tc-xdp-helper' } });
    expect((await rig.be.call('status')).devices[0].offload.runs).toBe('tap-test-run');
    // The previous (tc) program left the tap; the datapath runs this one per frame.
    expect(egress()).toEqual([]);
    const pass0 = s.verdicts.pass;
    expect(await rig.hostToGuest(5)).toBe(5);
    expect((await show()).verdicts.pass - pass0).toBeGreaterThanOrEqual(5);
  });

  test('detach removes the tc program from the tap (and from the kernel); frames flow again', async () => {
    await offloadSample(rig.oc, 'xdp_drop');
    const id = (await show()).host.program.hostId;
    expect(egress()).toEqual([id]);
    const r = await rig.be.call('offload.detach', { name: 'tc' });
    expect(r).toMatchObject({ detached: true, kind: 'program' });
    expect(egress()).toEqual([]);
    await waitUntil(() => !listProgIds().includes(id), 3000, 'tc program gone from the kernel');
    expect(await rig.hostToGuest(10)).toBe(10);
  });

  test('a SIGKILLed serve leaves no filter on its persistent tap; the restarted one attaches exactly one fresh program, and none once the guest unloads', async () => {
    await offloadSample(rig.oc, 'xdp_drop');
    const before = (await show()).host.program.hostId;
    expect(egress()).toEqual([before]);
    await rig.be.stop('SIGKILL');
    // The link was never pinned: the kernel detached it with the process's fds.
    await waitUntil(() => egress().length === 0, 3000, 'no tcx program on the tap after SIGKILL');
    await rig.restart();
    const s = await show();
    expect(s.host.program.runs).toBe('tap-tc');
    expect(egress()).toEqual([s.host.program.hostId]);
    expect(s.host.program.hostId).not.toBe(before);
    expect(await rig.hostToGuest(10)).toBe(0);
    requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
    expect(egress()).toEqual([]);
    expect(await rig.hostToGuest(10)).toBe(10);
  });
});
