// Offload responses the worker holds for a guest with no receive buffers must go out when the
// guest refills the reserved ring, with no stop, restart or later request to wake them. A
// driver with VIRTIO_RING_F_EVENT_IDX notifies only when its avail index passes the device's
// avail_event, so the worker must move avail_event past every buffer it took before it waits.
// Failed before that (the guest got the first 8 of 19). Real serve on a tap, TS frontend.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { OffloadClient, requireOk, offloadFrame, isOffloadFrame } from '../support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { Status, encodeCaps, decodeResponse } from '../../src/offload/guest/codec.js';

const ETH_HLEN = 14;
/** Ring size: few receive buffers, so a handful of requests outruns them. */
const QUEUE_SIZE = 8;
/** More requests than buffers, twice over: the rest wait in the worker through two refills. */
const SENT = 2 * QUEUE_SIZE + 3;
const NAME = 'refill';
const RESERVED = 1;

describe('held offload responses go out when an EVENT_IDX guest refills the reserved ring', () => {
  let be: Backend;
  let fe: TestFrontend;
  let oc: OffloadClient;

  beforeAll(async () => {
    const dir = tempDir('offrefill');
    const tap = uniqueIfName('vxrf');
    be = await startBackend(['--device', `name=${NAME},socket=${path.join(dir, 'off.sock')},port=tap:${tap},queues=1,offload=1`], { dir });
    disableIpv6(tap);
    fe = await TestFrontend.connect(path.join(dir, 'off.sock'), { queuePairs: 2, queueSize: QUEUE_SIZE });
    oc = new OffloadClient(fe, RESERVED);
    requireOk(await oc.claim());
  }, 60_000);

  afterAll(async () => {
    fe?.close();
    await be?.stop();
  }, 60_000);

  test('every response arrives once and in order, each refill waking the worker', async () => {
    const before = (await be.call('offload.show', { name: NAME })).requests.total as number;
    const seqs: number[] = [];
    for (let i = 0; i < SENT; i++) {
      const seq = oc.nextSeq();
      seqs.push(seq);
      await fe.transmitLarge(RESERVED, offloadFrame(encodeCaps(seq)));
    }
    await waitUntil(async () => (await be.call('offload.show', { name: NAME })).requests.total === before + SENT, 5000, 'the broker answering every request', 10);
    const got: number[] = [];
    // receive() takes what arrived and refills the ring, kicking only where avail_event asks.
    await waitUntil(() => {
      for (const f of fe.receive(RESERVED).filter(isOffloadFrame)) {
        const r = decodeResponse(f.subarray(ETH_HLEN));
        expect(r.status).toBe(Status.OK);
        got.push(r.seq);
      }
      return got.length >= SENT;
    }, 5000, `responses to seqs ${seqs.join(',')}`, 5).catch(() => undefined);
    expect(got).toEqual(seqs);
  }, 60_000);
});
