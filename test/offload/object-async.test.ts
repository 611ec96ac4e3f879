// Issue 17: OBJ_LOAD's libbpf child must not stall the process serving other devices. Two
// offload devices on one real `serve`; the loader child made slow deterministically
// (VX_OBJECT_LOADER_DELAY_MS, honoured only by the child script). While device A's OBJ_LOAD
// waits, device B answers offload requests and the control API answers `status`; A then gets
// its OBJ_LOAD answer, and the request it queued behind it after, in order.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import {
  OffloadClient, requireOk, offloadFrame, isOffloadFrame, filterObjectWithConfig,
} from '../support/frontend/offload-client.js';
import { uniqueIfName } from '../support/netdev.js';
import {
  Status, encodeCaps, encodeMapCreate, encodeElemUpdate, encodeElemLookup, encodeObjLoad, encodeObjShow, decodeResponse, objectUploadRequests,
  type Response,
} from '../../src/offload/guest/codec.js';

const ETH_HLEN = 14;
const DELAY_MS = 2500;

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
});
