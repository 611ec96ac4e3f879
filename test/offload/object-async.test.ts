// Issue 17: OBJ_LOAD's libbpf child must not stall the process serving other devices. Two
// offload devices on one real `serve`; the loader child made slow deterministically
// (VX_OBJECT_LOADER_DELAY_MS, honoured only by the child script). While device A's OBJ_LOAD
// waits, device B answers offload requests and the control API answers `status`; A then gets
// its OBJ_LOAD answer, and the request it queued behind it after, in order. A guest that resets
// its device while its load runs gets the child killed: the new driver's CLAIM (the driver waits
// 1 s for it) is answered at once, and nothing of the old load reaches it or stays in the kernel.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import fs from 'node:fs';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import {
  OffloadClient, requireOk, offloadFrame, isOffloadFrame, filterObjectWithConfig,
} from '../support/frontend/offload-client.js';
import { uniqueIfName } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { ownBpfFds } from './helpers.js';
import {
  Status, encodeCaps, encodeClaim, encodeMapCreate, encodeElemUpdate, encodeElemLookup, encodeObjLoad, encodeObjShow, decodeResponse, objectUploadRequests,
  type Response,
} from '../../src/offload/guest/codec.js';

const ETH_HLEN = 14;
const DELAY_MS = 2500;

/** Object loader children of serve `pid` (prlimit execs node on child.js). */
function loaderChildren(pid: number): number {
  let n = 0;
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid && fs.readFileSync(`/proc/${e}/cmdline`, 'utf8').includes('object-loader/child.js')) n++;
    } catch { /* gone meanwhile */ }
  }
  return n;
}

describe('a slow OBJ_LOAD does not block the other devices', () => {
  let be: Backend;
  const fes: TestFrontend[] = [];
  let a: OffloadClient;
  let b: OffloadClient;

  beforeAll(async () => {
    const dir = tempDir('objasync');
    const dev = (name: string) => `name=${name},socket=${path.join(dir, `${name}.sock`)},port=tap:${uniqueIfName('vxa')},queues=1,offload=1`;
    be = await startBackend(['--device', dev('slow'), '--device', dev('fast')], {
      dir, env: { ...process.env, VX_OBJECT_LOADER_DELAY_MS: String(DELAY_MS) },
    });
    for (const name of ['slow', 'fast']) fes.push(await TestFrontend.connect(path.join(dir, `${name}.sock`), { queuePairs: 2, start: true }));
    a = new OffloadClient(fes[0]!, 1);
    b = new OffloadClient(fes[1]!, 1);
    requireOk(await a.claim());
    requireOk(await b.claim());
  }, 60_000);

  afterAll(async () => {
    for (const fe of fes) fe.close();
    await be?.stop();
  });

  test('device B and the control API answer while A loads; A gets OBJ_LOAD, then its queued request, in order', async () => {
    for (const req of objectUploadRequests(filterObjectWithConfig(4005), () => a.nextSeq(), 'vo_async')) requireOk(await a.call(req));
    // OBJ_LOAD and, right behind it, OBJ_SHOW: the second must wait for the first.
    const loadSeq = a.nextSeq();
    const showSeq = a.nextSeq();
    const t0 = Date.now();
    await a.fe.transmitLarge(1, offloadFrame(encodeObjLoad(loadSeq)));
    await a.fe.transmitLarge(1, offloadFrame(encodeObjShow(showSeq)));

    // Device B, meanwhile: CAPS, a map, an update and a lookup; the control API's status.
    const during: number[] = [];
    requireOk(await b.call(encodeCaps(b.nextSeq())));
    const created = requireOk(await b.call(encodeMapCreate(b.nextSeq(), { type: 2, keySize: 4, valueSize: 8, maxEntries: 4, name: 'm' }))).body;
    const h = new DataView(created.buffer, created.byteOffset).getUint32(0, true);
    requireOk(await b.call(encodeElemUpdate(b.nextSeq(), h, new Uint8Array(4), new Uint8Array([7, 0, 0, 0, 0, 0, 0, 0]))));
    expect([...requireOk(await b.call(encodeElemLookup(b.nextSeq(), h, new Uint8Array(4)))).body]).toEqual([7, 0, 0, 0, 0, 0, 0, 0]);
    during.push(Date.now() - t0);
    const status = await be.call('status');
    expect(status.devices.map((d: { name: string }) => d.name).sort()).toEqual(['fast', 'slow']);
    during.push(Date.now() - t0);
    // All of it answered well before the slow loader could have finished.
    expect(Math.max(...during)).toBeLessThan(DELAY_MS - 500);

    // A: both answers, OBJ_LOAD's first, after the loader's delay.
    const got: Response[] = [];
    const deadline = Date.now() + 20_000;
    while (got.length < 2 && Date.now() < deadline) {
      for (const f of a.fe.receive(1)) if (isOffloadFrame(f)) got.push(decodeResponse(f.subarray(ETH_HLEN)));
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(Date.now() - t0).toBeGreaterThanOrEqual(DELAY_MS - 100);
    expect(got.map((r) => r.seq)).toEqual([loadSeq, showSeq]);
    expect(got.map((r) => r.status)).toEqual([Status.OK, Status.OK]);
  }, 60_000);

  test('a device reset while A loads kills the loader child: the new driver\'s CLAIM is answered at once, the old load\'s answer never comes, nothing stays', async () => {
    for (const req of objectUploadRequests(filterObjectWithConfig(4005), () => a.nextSeq(), 'vo_reset')) requireOk(await a.call(req));
    const loadSeq = a.nextSeq();
    await a.fe.transmitLarge(1, offloadFrame(encodeObjLoad(loadSeq)));
    await waitUntil(() => loaderChildren(be.proc.pid) === 1, 5000, 'the loader child running', 10);

    // The guest resets its device (reboot, driver reload): its rings start anew, not where they stopped.
    await a.fe.stopRings();
    await a.fe.start();
    const t0 = Date.now();
    const claimSeq = a.nextSeq();
    await a.fe.transmitLarge(1, offloadFrame(encodeClaim(claimSeq, {})));
    const got: Response[] = [];
    await waitUntil(() => {
      for (const f of a.fe.receive(1)) if (isOffloadFrame(f)) got.push(decodeResponse(f.subarray(ETH_HLEN)));
      return got.some((r) => r.seq === claimSeq);
    }, DELAY_MS, 'the new driver\'s CLAIM answered', 5);
    const claimMs = Date.now() - t0;
    console.log(`[object-async] CLAIM after a reset during a load answered in ${claimMs} ms`);
    // The guest driver waits offload_claim_ms (1 s) for it.
    expect(claimMs).toBeLessThan(1000);
    expect(got.find((r) => r.seq === claimSeq)!.status).toBe(Status.OK);
    expect(loaderChildren(be.proc.pid)).toBe(0);
    // Past the time the held child would have taken: the old OBJ_LOAD's answer never comes.
    await new Promise((r) => setTimeout(r, DELAY_MS - claimMs + 300));
    for (const f of a.fe.receive(1)) if (isOffloadFrame(f)) got.push(decodeResponse(f.subarray(ETH_HLEN)));
    expect(got.map((r) => r.seq)).toEqual([claimSeq]);
    const shown = await be.call('offload.show', { name: 'slow' });
    expect(shown).toMatchObject({ claimed: true, program: null, object: null, maps: [] });
    // The process's bpf fds are device B's map and nothing else: the old load's and A's earlier object's are closed.
    const other = await be.call('offload.show', { name: 'fast' });
    expect(other.program).toBeNull();
    expect(ownBpfFds(be.proc.pid)).toBe(other.maps.length);
  }, 60_000);
});
