// Issue 17 item 4: a migration's SAVE that comes while the guest's OBJ_LOAD is still loading
// (its libbpf child runs asynchronously, commit 7fac291) waits for it. The state then carries
// the loaded object, and the OBJ_LOAD response made while the rings were stopped travels with
// it, so the guest's own request is answered on the destination (or on the source again, when
// the migration is cancelled). The loader child is held with VX_OBJECT_LOADER_DELAY_MS (read
// only by the child); everything else is real: serve, libbpf, the kernel.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import { OffloadRig, type OffloadRigOptions } from '../support/frontend/offload-rig.js';
import { requireOk, offloadFrame, isOffloadFrame, filterObjectWithConfig } from '../support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { ownBpfFds } from './helpers.js';
import { ProtocolFeature, bit } from '../../src/vhost-user/protocol.js';
import { decodeDeviceState } from '../../src/net/device-state.js';
import { decodeState } from '../../src/offload/migration-format.js';
import { OffloadChannel } from '../../src/net/offload-channel.js';
import { logger } from '../../src/log.js';
import {
  Status, encodeClaim, encodeObjLoad, objectUploadRequests, decodeResponse, decodeObjLoadBody, type Response,
} from '../../src/offload/guest/codec.js';

const MIGRATION = bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.DEVICE_STATE);
const OK_NOFD = 0x100n;
const ETH_HLEN = 14;
const DELAY_MS = 2500;
/** Frames hostFramesReceived sends use source ports 4000..4007: the object drops one in eight. */
const DROP_SPORT = 4005;
const NAME = 'objpend';

/** Whether serve `pid` has an object loader child running (prlimit execs node on child.js). */
function loaderRunning(pid: number): boolean {
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid && fs.readFileSync(`/proc/${e}/cmdline`, 'utf8').includes('object-loader/child.js')) return true;
    } catch { /* gone meanwhile */ }
  }
  return false;
}

/** Offload responses that reach the guest on the reserved pair within timeoutMs, until one has seq `seq`. */
async function responseTo(rig: OffloadRig, seq: number, timeoutMs: number): Promise<Response> {
  let got: Response | undefined;
  await waitUntil(() => {
    for (const f of rig.fe.receive(1)) {
      if (!isOffloadFrame(f)) continue;
      const r = decodeResponse(f.subarray(ETH_HLEN));
      if (r.seq === seq) got = r;
    }
    return got !== undefined;
  }, timeoutMs, `the response to seq ${seq}`, 5);
  return got!;
}

describe('a SAVE while the guest\'s OBJ_LOAD is loading waits for it and carries the object and its answer', () => {
  const rigs: OffloadRig[] = [];
  let a: OffloadRig;
  let loadSeq = 0;
  let state: Uint8Array;
  let bases: number[] = [];
  let tag = '';

  async function rig(tag: string, o: Partial<OffloadRigOptions>): Promise<OffloadRig> {
    const tap = uniqueIfName('vxp');
    const r = await OffloadRig.start({
      tag, port: 'tap', ifname: tap, name: NAME, hostMac: '52:54:00:0e:0e:1e', firstSeq: 900_000 + rigs.length * 100_000,
      afterStart: () => disableIpv6(tap), protocolFeatures: MIGRATION, ...o,
    });
    rigs.push(r);
    return r;
  }
  const show = (r: OffloadRig): Promise<any> => r.be.call('offload.show', { name: NAME });

  beforeAll(async () => {
    a = await rig('objpend-a', { env: { ...process.env, VX_OBJECT_LOADER_DELAY_MS: String(DELAY_MS) } });
    requireOk(await a.oc.claim());
  }, 60_000);

  afterAll(async () => {
    for (const r of rigs.splice(0)) await r.close();
  }, 60_000);

  test('source: the rings stop and SAVE starts while the loader child runs; the state comes once it is done (CHECK 0), with the object and the OBJ_LOAD response', async () => {
    for (const req of objectUploadRequests(filterObjectWithConfig(DROP_SPORT), () => a.oc.nextSeq(), 'pending')) requireOk(await a.oc.call(req));
    loadSeq = a.oc.nextSeq();
    await a.fe.transmitLarge(1, offloadFrame(encodeObjLoad(loadSeq)));
    await waitUntil(() => loaderRunning(a.be.proc.pid), 5000, 'the loader child running', 10);
    const t0 = Date.now();
    // QEMU at switch-over: every ring stopped, then SAVE (it reads the pipe until EOF), then CHECK.
    bases = await a.fe.stopRings();
    const saved = await a.fe.saveDeviceState(20_000);
    const waited = Date.now() - t0;
    expect(saved.reply).toBe(OK_NOFD);
    expect(saved.check).toBe(0n);
    expect(loaderRunning(a.be.proc.pid)).toBe(false);
    expect((await a.be.call('status')).devices[0].lastMigration).toMatchObject({ direction: 'save', ok: true, bytes: saved.state.length });
    state = saved.state;

    const sections = decodeDeviceState(state);
    const off = decodeState(sections.offload!);
    expect(off.claim).not.toBeNull();
    expect(off.object).toMatchObject({ name: 'pending', progName: 'xdp_filter' });
    const onA = await show(a);
    expect(onA.program.tag).toBe(off.object!.tag);
    // The answer the guest has not had yet: OBJ_LOAD's, OK, with the entry's tag.
    const replies = (sections.replies ?? []).map((r) => decodeResponse(r));
    expect(replies.map((r) => [r.seq, r.status])).toEqual([[loadSeq, Status.OK]]);
    tag = decodeObjLoadBody(replies[0]!.body).tag;
    expect(tag).toBe(off.object!.tag);
    console.log(`[object-migration-pending] SAVE waited ${waited} ms for a ${DELAY_MS} ms loader; state ${state.length} bytes`);
  }, 60_000);

  test('destination: LOAD (CHECK 0) has the object; once its rings run the guest gets its OBJ_LOAD answer there, and host frames of the configured port are dropped', async () => {
    const b = await rig('objpend-b', { start: false });
    expect(await b.fe.loadDeviceState(state)).toMatchObject({ reply: OK_NOFD, check: 0n });
    const s = await show(b);
    expect(s).toMatchObject({ claimed: true, program: { tag }, object: { name: 'pending' } });
    await b.fe.start();
    const r = await responseTo(b, loadSeq, 5000);
    expect(r.status).toBe(Status.OK);
    expect(decodeObjLoadBody(r.body).tag).toBe(tag);
    // 16 frames, source ports 4000..4007: the two from DROP_SPORT die on the host.
    expect(await b.hostToGuest(16)).toBe(14);
    expect((await show(b)).verdicts.drop).toBeGreaterThanOrEqual(2);
  }, 60_000);

  test('source, migration cancelled: the rings resume where they stopped, the guest gets its answer there, and the object stays', async () => {
    await a.fe.resumeRings(bases);
    const r = await responseTo(a, loadSeq, 5000);
    expect(r.status).toBe(Status.OK);
    expect(decodeObjLoadBody(r.body).tag).toBe(tag);
    expect(await show(a)).toMatchObject({ claimed: true, program: { tag }, object: { name: 'pending' } });
    // Nothing held twice: a second save carries no response.
    await a.fe.stopRings().then((b) => { bases = b; });
    const again = await a.fe.saveDeviceState(20_000);
    expect(again.check).toBe(0n);
    expect(decodeDeviceState(again.state).replies ?? []).toEqual([]);
    await a.fe.resumeRings(bases);
  }, 60_000);
});

describe('the wait is bounded: a guest that queues load after load gets the save refused (state-load-pending)', () => {
  test('settled() rejects with state-load-pending while the second load still runs, resolves once both answered; nothing leaks', async () => {
    const prev = process.env.VX_OBJECT_LOADER_DELAY_MS;
    process.env.VX_OBJECT_LOADER_DELAY_MS = String(DELAY_MS);
    const fds0 = ownBpfFds();
    const replies: Response[] = [];
    const ch = new OffloadChannel({ device: 'vxpendch', pinDir: null, log: logger('vxpendch') }, {
      reply: (m) => replies.push(decodeResponse(m)), claimChanged: () => undefined, programChanged: () => undefined,
    });
    try {
      let seq = 1;
      ch.handle(encodeClaim(seq++, {}));
      const object = filterObjectWithConfig(DROP_SPORT);
      for (const req of objectUploadRequests(object, () => seq++, 'first')) ch.handle(req);
      const first = seq++;
      ch.handle(encodeObjLoad(first));
      expect(ch.pending).toBe(true);
      // Queued behind the first: a second upload and load, answered in order after it.
      for (const req of objectUploadRequests(object, () => seq++, 'second')) ch.handle(req);
      const second = seq++;
      ch.handle(encodeObjLoad(second));
      const t0 = Date.now();
      await expect(ch.settled(DELAY_MS + 1000)).rejects.toMatchObject({ code: 'state-load-pending' });
      expect(Date.now() - t0).toBeGreaterThanOrEqual(DELAY_MS + 900);
      // The first load has answered by now; the second still runs.
      expect(replies.some((r) => r.seq === first && r.status === Status.OK)).toBe(true);
      expect(ch.pending).toBe(true);
      await ch.settled(30_000);
      expect(ch.pending).toBe(false);
      expect(replies.every((r) => r.status === Status.OK)).toBe(true);
      expect(replies.map((r) => r.seq)).toEqual([...replies.map((r) => r.seq)].sort((x, y) => x - y));
      expect(replies.at(-1)!.seq).toBe(second);
    } finally {
      ch.close();
      if (prev === undefined) delete process.env.VX_OBJECT_LOADER_DELAY_MS;
      else process.env.VX_OBJECT_LOADER_DELAY_MS = prev;
    }
    expect(ownBpfFds()).toBe(fds0);
  }, 60_000);
});
