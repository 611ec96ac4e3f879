// serve as a host runs it: an unprivileged user holding only CAP_NET_ADMIN, CAP_BPF,
// CAP_PERFMON and CAP_IPC_LOCK (ambient + bounding set, via setpriv), plus CAP_NET_RAW on xsk
// ports (AF_XDP and AF_PACKET sockets check it). A representative subset of the DPDK and offload
// suites, one traffic case and one offload drop case per port kind (docs/least-privilege.md).
import { describe, test, expect, afterEach } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { startTestpmd, ensureHugepages, isTxonlyFrame, type Testpmd } from '../support/dpdk.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, disableIpv6, readLinkStats, vethXdpCounters } from '../support/netdev.js';
import { waitUntil, sleep } from '../support/processes.js';
import { OffloadRig } from '../support/frontend/offload-rig.js';
import { offloadSample, requireOk, lookupU64 } from '../support/frontend/offload-client.js';
import { encodeProgUnset } from '../../src/offload/guest/codec.js';
import { defaultPeerName } from '../../src/ports/xsk.js';
import { TEST_USER, capsFor, capMask, ensureUser, processCredentials } from '../support/unprivileged.js';

describe.each(['tap', 'xsk'] as const)('serve --port %s as an unprivileged user with only the listed capabilities', (kind) => {
  const runAs = { user: TEST_USER, caps: capsFor(kind) };
  let be: Backend | undefined;
  let pmd: Testpmd | undefined;
  let ps: PacketSocket | undefined;
  let rig: OffloadRig | undefined;

  // Frontends first, then the backend, then the rig (it unmounts its pin dir last).
  afterEach(async () => {
    const [p, t, b, r] = [ps, pmd, be, rig];
    ps = pmd = be = rig = undefined;
    p?.close();
    await t?.stop();
    await b?.stop();
    await r?.close();
  });

  /** The process runs as the user, with exactly these capabilities and no way to regain more. */
  function expectCredentials(pid: number): void {
    const c = processCredentials(pid);
    expect(c.uid).toBe(ensureUser(TEST_USER).uid);
    expect(c.effective).toBe(capMask(runAs.caps));
    expect(c.ambient).toBe(capMask(runAs.caps));
    expect(c.bounding).toBe(capMask(runAs.caps));
  }

  test('DPDK virtio-user txonly: frames reach the host interface; the socket file gets --socket-group/--socket-mode', async () => {
    ensureHugepages();
    const ifname = uniqueIfName('vxu');
    const dir = tempDir('lp-dpdk');
    const sock = path.join(dir, 'dev.sock');
    const { gid } = ensureUser(TEST_USER);
    be = await startBackend(['--socket', sock, '--port', `${kind}:${ifname}`, '--queues', '1', '--name', 'pmd',
      '--socket-group', TEST_USER, '--socket-mode', '0660'], { dir, runAs });
    expectCredentials(be.proc.pid);
    const st0 = fs.statSync(sock);
    expect(st0.isSocket()).toBe(true);
    expect(st0.gid).toBe(gid);
    expect(st0.mode & 0o777).toBe(0o660);
    disableIpv6(ifname);
    ps = PacketSocket.open(ifname);
    const before = readLinkStats(ifname);
    pmd = await startTestpmd({
      name: `lp-txonly-${kind}`, vdevs: [`net_virtio_user0,path=${sock},queues=1,queue_size=256`],
      forwardMode: 'txonly', queues: 1, txpkts: 64, statsPeriod: 1,
    });
    await waitUntil(() => readLinkStats(ifname).rxPackets - before.rxPackets >= 20_000, 30_000, '20k frames on the host interface');
    const sample = ps.recvAll(50, 3000);
    expect(sample.length).toBe(50);
    expect(sample.every((f) => isTxonlyFrame(f, { frameLen: 64 }))).toBe(true);
    await pmd.stop();
    pmd = undefined;
    const st = (await be.call('stats', { name: 'pmd' }))[0];
    expect(st.total.txPackets).toBeGreaterThanOrEqual(20_000);
    expect(readLinkStats(ifname).rxPackets - before.rxPackets).toBe(st.total.txPackets);
    expect(st.total.txErrors).toBe(0);
    // Zero-copy on xsk: the UMEM over guest RAM was pinned under CAP_IPC_LOCK, not RLIMIT_MEMLOCK.
    if (kind === 'xsk') expect((await be.call('status')).devices[0].port.umem).toBe('zero-copy');
    // A clean stop by the unprivileged user removes what it made: the socket and the port.
    await be.stop();
    expect((await be.proc.exited).code).toBe(0);
    be = undefined;
    expect(fs.existsSync(sock)).toBe(false);
    expect(fs.existsSync(`/sys/class/net/${ifname}`)).toBe(false);
  });

  test('offload: xdp_drop kills host frames before the guest, pins belong to the user, a restart re-adopts them', async () => {
    const ifname = uniqueIfName('vxo');
    rig = await OffloadRig.start({
      tag: 'lp-off', port: kind, ifname, name: 'lpoff', hostMac: '52:54:00:1c:1c:1c', firstSeq: 700_000, runAs,
      afterStart: kind === 'tap' ? () => disableIpv6(ifname) : undefined,
    });
    expectCredentials(rig.be.proc.pid);
    requireOk(await rig.oc.claim());
    await waitUntil(async () => (await rig!.be.call('status')).devices[0].offload.claimed, 3000, 'claim visible');
    expect(await rig.hostToGuest(10)).toBe(10);
    const [h] = (await offloadSample(rig.oc, 'xdp_drop')) as [number];
    // With CAP_NET_ADMIN and CAP_BPF a tap runs it at tc egress (SCHED_CLS load, tcx link).
    expect((await rig.be.call('offload.show', { name: 'lpoff' })).host.program.runs).toBe(kind === 'tap' ? 'tap-tc' : 'xdp-native');
    await sleep(100);
    const peer = defaultPeerName(ifname);
    const drops0 = kind === 'xsk' ? vethXdpCounters(peer).xdp_drops ?? 0 : 0;
    expect(await rig.hostToGuest(50)).toBe(0);
    expect(await lookupU64(rig.oc, h)).toBeGreaterThanOrEqual(50);
    if (kind === 'xsk') expect((vethXdpCounters(peer).xdp_drops ?? 0) - drops0).toBeGreaterThanOrEqual(50);
    else expect((await rig.be.call('stats', { name: 'lpoff' }))[0].total.xdpDrop).toBeGreaterThanOrEqual(50);
    // Pins (and their directory) are the serve user's, private to it.
    const { uid } = ensureUser(TEST_USER);
    const devDir = path.join(rig.pinRoot, 'lpoff');
    const pins = fs.readdirSync(devDir);
    expect(pins.length).toBeGreaterThan(0);
    for (const p of [devDir, ...pins.map((f) => path.join(devDir, f))]) {
      const st = fs.lstatSync(p);
      expect(st.uid).toBe(uid);
      // Symlinks (the pin set's records) always read 0777; what they point at is checked.
      if (!st.isSymbolicLink()) expect(st.mode & 0o077).toBe(0);
    }
    // Killed and restarted unprivileged: the pinned program is re-adopted (bpf_obj_get on our own pins).
    const id = (await rig.be.call('offload.show', { name: 'lpoff' })).program.id;
    await rig.restart();
    expectCredentials(rig.be.proc.pid);
    expect((await rig.be.call('offload.show', { name: 'lpoff' })).program.id).toBe(id);
    await waitUntil(async () => (await rig!.be.call('status')).devices[0].offload.claimed, 3000, 'claim re-adopted');
    expect(await rig.hostToGuest(20)).toBe(0);
    requireOk(await rig.oc.call(encodeProgUnset(rig.oc.nextSeq())));
    expect(await rig.hostToGuest(10)).toBe(10);
  });
});
