// Offload responses the datapath worker still holds when the rings stop: the guest had posted
// no receive buffers for them on the reserved pair, so the worker queued them (up to
// MAX_HELD_REPLIES). Stopping the rings for the switch-over must not lose them: they travel in
// the state's replies section to the destination, and a cancelled migration delivers them on
// the source. Everything is real: serve on a tap, the TS frontend as guest and QEMU, the
// offload client on the reserved pair; the guest simply stops taking what arrives.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import { OffloadRig, type OffloadRigOptions } from '../support/frontend/offload-rig.js';
import { requireOk, offloadFrame, isOffloadFrame } from '../support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { ProtocolFeature, bit } from '../../src/vhost-user/protocol.js';
import { decodeDeviceState } from '../../src/net/device-state.js';
import { Status, encodeCaps, decodeResponse } from '../../src/offload/guest/codec.js';

const MIGRATION = bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.DEVICE_STATE);
const OK_NOFD = 0x100n;
const ETH_HLEN = 14;
/** Ring size: few receive buffers, so a handful of requests outruns them. */
const QUEUE_SIZE = 8;
/** Requests sent while the guest takes nothing: some answers fill its buffers, the rest wait in the worker. */
const SENT = QUEUE_SIZE + 3;
const NAME = 'heldrep';

/** Offload responses the guest finds on the reserved pair now, in ring order (refills its buffers). */
function takeResponses(rig: OffloadRig): { seq: number; status: number }[] {
  return rig.fe.receive(1).filter(isOffloadFrame).map((f) => decodeResponse(f.subarray(ETH_HLEN)));
}

/** Collects responses until every seq in `want` arrived (or the timeout). */
async function collect(rig: OffloadRig, want: readonly number[], timeoutMs: number): Promise<number[]> {
  const got: number[] = [];
  await waitUntil(() => {
    for (const r of takeResponses(rig)) got.push(r.seq);
    return want.every((s) => got.includes(s));
  }, timeoutMs, `responses to seqs ${want.join(',')}`, 5).catch(() => undefined);
  return got;
}

describe('responses the worker holds for a guest without receive buffers survive the rings stopping', () => {
  const rigs: OffloadRig[] = [];
  let a: OffloadRig;
  let seqs: number[] = [];
  let beforeStop: number[] = [];
  let saved: number[] = [];
  let state: Uint8Array;
  let bases: number[] = [];

  async function rig(tag: string, o: Partial<OffloadRigOptions>): Promise<OffloadRig> {
    const tap = uniqueIfName('vxh');
    const r = await OffloadRig.start({
      tag, port: 'tap', ifname: tap, name: NAME, hostMac: '52:54:00:0e:0e:2e', firstSeq: 950_000 + rigs.length * 10_000,
      afterStart: () => disableIpv6(tap), protocolFeatures: MIGRATION, frontend: { queueSize: QUEUE_SIZE }, ...o,
    });
    rigs.push(r);
    return r;
  }
  const show = (r: OffloadRig): Promise<any> => r.be.call('offload.show', { name: NAME });

  beforeAll(async () => {
    a = await rig('heldrep-a', {});
    requireOk(await a.oc.claim());
  }, 60_000);

  afterAll(async () => {
    for (const r of rigs.splice(0)) await r.close();
  }, 60_000);

  test('source: the answers past the guest\'s buffers are in the saved state (CHECK 0), oldest first, none lost', async () => {
    const before = (await show(a)).requests.total as number;
    for (let i = 0; i < SENT; i++) {
      const seq = a.oc.nextSeq();
      seqs.push(seq);
      await a.fe.transmitLarge(1, offloadFrame(encodeCaps(seq)));
    }
    // Every request answered by the broker (its answer went to the worker) before the stop.
    await waitUntil(async () => (await show(a)).requests.total === before + SENT, 5000, 'the broker answering every request', 10);

    bases = await a.fe.stopRings();
    const out = await a.fe.saveDeviceState();
    expect(out.reply).toBe(OK_NOFD);
    expect(out.check).toBe(0n);
    state = out.state;
    // What reached the guest's buffers before the stop, read only now (reading refills buffers).
    const delivered = takeResponses(a);
    beforeStop = delivered.map((r) => r.seq);
    const replies = (decodeDeviceState(state).replies ?? []).map((r) => decodeResponse(r));
    saved = replies.map((r) => r.seq);
    expect(replies.every((r) => r.status === Status.OK)).toBe(true);
    expect(saved.length).toBeGreaterThan(0);
    expect([...beforeStop, ...saved]).toEqual(seqs);
  }, 60_000);

  test('destination: once its rings run, the guest gets the carried answers there', async () => {
    const b = await rig('heldrep-b', { start: false });
    expect(await b.fe.loadDeviceState(state)).toMatchObject({ reply: OK_NOFD, check: 0n });
    await b.fe.start();
    const got = await collect(b, saved, 5000);
    expect(got).toEqual(saved);
  }, 60_000);

  test('source, migration cancelled: the rings resume and the guest gets the held answers, once', async () => {
    await a.fe.resumeRings(bases);
    const got = await collect(a, saved, 5000);
    expect([...beforeStop, ...got]).toEqual(seqs);
    bases = await a.fe.stopRings();
    const again = await a.fe.saveDeviceState();
    expect(again.check).toBe(0n);
    expect(decodeDeviceState(again.state).replies ?? []).toEqual([]);
    await a.fe.resumeRings(bases);
  }, 60_000);
});
