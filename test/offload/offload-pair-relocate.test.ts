// The pool evens out its workers by moving running pairs, and the reserved offload pair of a
// claimed device is one of them even while its worker holds responses for a guest that posted no
// receive buffers: the move takes them from the old worker and hands them to the new one, so the
// guest still gets each exactly once and in order. Everything is real: one serve with two
// workers, an offload device and a plain one on taps, the TS frontend as guest and QEMU.
//
// Placement (least busy worker, lowest index on a tie; moves from the busiest worker, its pairs
// in the order they started):
//   offload device: pair 0 -> w0, reserved pair 1 -> w1;  plain device: pair 0 -> w0, pair 1 -> w1.
//   Stopping the offload device's pair 0 leaves 1/2; stopping the plain device's pair 0 leaves 0/2,
//   and the pool moves w1's first pair, the reserved one.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { OffloadClient, requireOk, offloadFrame, isOffloadFrame } from '../support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { Status, encodeCaps, decodeResponse } from '../../src/offload/guest/codec.js';

interface Placement { worker: number; queues: { device: string; pair: number }[] }

const ETH_HLEN = 14;
/** Ring size: few receive buffers, so a handful of requests outruns them. */
const QUEUE_SIZE = 8;
/** Requests sent while the guest takes nothing: some answers fill its buffers, the rest wait in the worker. */
const SENT = QUEUE_SIZE + 3;
const OFF = 'mvoff';
const DATA = 'mvdata';
const RESERVED = 1;

describe('the pool moves a claimed offload pair whose worker holds responses, and they follow it', () => {
  let be: Backend;
  let off: TestFrontend;
  let data: TestFrontend;
  let oc: OffloadClient;
  const seqs: number[] = [];

  const status = (): Promise<any> => be.call('status');
  const show = (): Promise<any> => be.call('offload.show', { name: OFF });
  /** The worker serving a device's pair, from serve's status. */
  const workerOf = (st: any, device: string, pair: number): number =>
    (st.workers as Placement[]).find((w) => w.queues.some((q) => q.device === device && q.pair === pair))?.worker ?? -1;
  /** Offload responses the guest finds on the reserved pair now, in ring order (refills its buffers). */
  const takeResponses = (): { seq: number; status: number }[] =>
    off.receive(RESERVED).filter(isOffloadFrame).map((f) => decodeResponse(f.subarray(ETH_HLEN)));

  beforeAll(async () => {
    const dir = tempDir('offreloc');
    const tapOff = uniqueIfName('vxro');
    const tapData = uniqueIfName('vxrd');
    be = await startBackend(['--workers', '2',
      '--device', `name=${OFF},socket=${path.join(dir, 'off.sock')},port=tap:${tapOff},queues=1,offload=1`,
      '--device', `name=${DATA},socket=${path.join(dir, 'data.sock')},port=tap:${tapData},queues=2`], { dir });
    disableIpv6(tapOff);
    disableIpv6(tapData);
    off = await TestFrontend.connect(path.join(dir, 'off.sock'), { queuePairs: 2, queueSize: QUEUE_SIZE });
    oc = new OffloadClient(off, RESERVED);
    requireOk(await oc.claim());
    data = await TestFrontend.connect(path.join(dir, 'data.sock'), { queuePairs: 2 });
  }, 60_000);

  afterAll(async () => {
    off?.close();
    data?.close();
    await be?.stop();
  }, 60_000);

  test('the reserved pair starts on worker 1, ahead of the plain device\'s pair there', async () => {
    const st = await status();
    expect(workerOf(st, OFF, 0)).toBe(0);
    expect(workerOf(st, OFF, RESERVED)).toBe(1);
    expect(workerOf(st, DATA, 0)).toBe(0);
    expect(workerOf(st, DATA, 1)).toBe(1);
  });

  test('with responses held on worker 1, unbalancing the pool moves the reserved pair to worker 0', async () => {
    const before = (await show()).requests.total as number;
    for (let i = 0; i < SENT; i++) {
      const seq = oc.nextSeq();
      seqs.push(seq);
      await off.transmitLarge(RESERVED, offloadFrame(encodeCaps(seq)));
    }
    // Every request answered by the broker (its answer went to worker 1) before anything moves.
    await waitUntil(async () => (await show()).requests.total === before + SENT, 5000, 'the broker answering every request', 10);

    // GET_VRING_BASE on both rings of a pair stops it; the second stop releases it to the pool.
    await off.getVringBase(0);
    await off.getVringBase(1);
    await data.getVringBase(0);
    await data.getVringBase(1);

    const st = await status();
    expect((st.workers as Placement[]).map((w) => w.queues.length)).toEqual([1, 1]);
    expect(workerOf(st, OFF, RESERVED)).toBe(0);
    expect(workerOf(st, DATA, 1)).toBe(1);
    // Worker 1 no longer serves the offload device at all.
    expect(st.devices.find((d: any) => d.name === OFF).workers).toEqual([{ pair: RESERVED, worker: 0 }]);
    expect(st.devices.find((d: any) => d.name === OFF).offload.claimed).toBe(true);
  }, 60_000);

  test('once the guest posts receive buffers, every answer arrives exactly once, in order', async () => {
    const got: number[] = [];
    await waitUntil(() => {
      for (const r of takeResponses()) {
        expect(r.status).toBe(Status.OK);
        got.push(r.seq);
      }
      return got.length >= SENT;
    }, 5000, `responses to seqs ${seqs.join(',')}`, 5).catch(() => undefined);
    // Nothing more trails in (a response delivered twice would).
    await new Promise((r) => setTimeout(r, 200));
    for (const r of takeResponses()) got.push(r.seq);
    expect(got).toEqual(seqs);
  }, 60_000);

  test('a later request is answered by the reserved pair on its new worker', async () => {
    const r = requireOk(await oc.call(encodeCaps(oc.nextSeq())));
    expect(r.status).toBe(Status.OK);
    const st = await status();
    expect(workerOf(st, OFF, RESERVED)).toBe(0);
    expect(takeResponses()).toEqual([]);
  }, 60_000);
});
