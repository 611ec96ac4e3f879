// Fuzz of the object path against a real `serve` (issue 17, "hostile objects"): mutated,
// truncated and lying ELF objects go through OBJ_BEGIN/CHUNK/LOAD for a bounded time. The
// serving process must answer every one (libbpf runs in a per-load child: its crashes and
// hangs are refusals), leak neither fds nor kernel objects, and a bystander device on the
// same process keeps passing traffic throughout. The seed is printed; VX_FUZZ_SEED replays it.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, countFds, settledFdCount, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { OffloadClient, requireOk, uploadAndLoad, sampleObject, hostFramesReceived } from '../support/frontend/offload-client.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { Status, statusName, encodeObjUnload } from '../../src/offload/guest/codec.js';
import { bpfPrefix, hostObjectName } from '../../src/offload/host-names.js';
import { namedKernelObjects, ownBpfFds } from './helpers.js';

const FUZZ_MS = Number(process.env.VX_FUZZ_MS ?? 10_000);
const seed = Number(process.env.VX_FUZZ_SEED ?? (Date.now() & 0x7fffffff));
const OBJ = 'vxfz';

function prng(s0: number) {
  let s = s0 >>> 0 || 1;
  return (n: number) => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s % n; };
}

/** One hostile variant of a valid object: flipped bytes, a truncation, or section headers that lie. */
function mutate(base: Uint8Array, r: (n: number) => number): { bytes: Uint8Array; how: string } {
  const b = base.slice();
  const v = new DataView(b.buffer);
  const shoff = Number(v.getBigUint64(40, true));
  const shnum = v.getUint16(60, true);
  const sh = (i: number) => shoff + 64 * i;
  switch (r(7)) {
    case 0: { const n = 1 + r(32); for (let i = 0; i < n; i++) b[r(b.length)] = r(256); return { bytes: b, how: `${n} random bytes` }; }
    case 1: { const len = r(b.length); return { bytes: b.subarray(0, Math.max(1, len)), how: `truncated to ${len}` }; }
    case 2: { const i = r(shnum); v.setBigUint64(sh(i) + 32, BigInt(r(0x7fffffff)) * BigInt(1 + r(8)), true); return { bytes: b, how: `section ${i} size lies` }; }
    case 3: { const i = r(shnum); v.setBigUint64(sh(i) + 24, BigInt(r(b.length * 2)), true); return { bytes: b, how: `section ${i} offset lies` }; }
    case 4: { v.setUint16(60, r(0x10000), true); v.setUint16(62, r(0x10000), true); return { bytes: b, how: 'e_shnum/e_shstrndx lie' }; }
    case 5: { const i = r(shnum); v.setUint32(sh(i), r(0x100000), true); v.setUint32(sh(i) + 4, r(20), true); return { bytes: b, how: `section ${i} name/type lie` }; }
    default: {
      // Inside the .BTF / .BTF.ext area (their headers and type records), where libbpf parses most.
      const at = b.length > 8000 ? 0x13f8 + r(0x1000) : r(b.length);
      for (let i = 0; i < 1 + r(8); i++) b[Math.min(b.length - 1, at + r(64))] = r(256);
      return { bytes: b, how: `BTF bytes near ${at}` };
    }
  }
}

describe(`object path fuzz (seed ${seed}, ${FUZZ_MS} ms)`, () => {
  let be: Backend;
  let fe: TestFrontend;
  let oc: OffloadClient;
  let bystander: TestFrontend;
  let bps: PacketSocket;
  const fuzzTap = uniqueIfName('vxz');
  const byTap = uniqueIfName('vxy');
  let bySeq = 900_000;

  beforeAll(async () => {
    const dir = tempDir('objfuzz');
    const fuzzSock = path.join(dir, 'fuzz.sock');
    const bySock = path.join(dir, 'by.sock');
    be = await startBackend([
      '--device', `name=ofz,socket=${fuzzSock},port=tap:${fuzzTap},queues=1,offload=1`,
      '--device', `name=oby,socket=${bySock},port=tap:${byTap},queues=1`,
    ], { dir });
    disableIpv6(fuzzTap);
    disableIpv6(byTap);
    fe = await TestFrontend.connect(fuzzSock, { queuePairs: 2 });
    oc = new OffloadClient(fe, 1);
    bystander = await TestFrontend.connect(bySock, { queuePairs: 1 });
    bps = PacketSocket.open(byTap);
    requireOk(await oc.claim());
  }, 60_000);

  afterAll(async () => {
    bps?.close();
    bystander?.close();
    fe?.close();
    await be?.stop();
  });

  async function bystanderPasses(): Promise<void> {
    const got = await hostFramesReceived(bps, bystander, bySeq, 10, '52:54:00:1c:1c:1c', [0], 200);
    bySeq += 10;
    expect(got).toBe(10);
  }

  test('hostile objects never crash serve, leak nothing, and the bystander keeps passing traffic', async () => {
    console.log(`object fuzz seed ${seed} (VX_FUZZ_SEED=${seed} replays it)`);
    const r = prng(seed);
    const base = sampleObject('xdp_filter_obj');
    await bystanderPasses();
    // The baseline once a first (valid) load and unload have brought up what stays.
    requireOk(await uploadAndLoad(oc, base, { name: OBJ }));
    requireOk(await oc.call(encodeObjUnload(oc.nextSeq())));
    const fds0 = await settledFdCount(be.proc.pid);
    const bpf0 = ownBpfFds(be.proc.pid);
    const statuses: Record<string, number> = {};
    const deadline = Date.now() + FUZZ_MS;
    let n = 0;
    while (Date.now() < deadline) {
      const m = mutate(base, r);
      const res = await uploadAndLoad(oc, m.bytes, { name: OBJ, chunk: 1 + r(8000) });
      statuses[statusName(res.status)] = (statuses[statusName(res.status)] ?? 0) + 1;
      // Whatever it was, a refusal says why; an accepted one is unloaded again.
      if (res.status === Status.OK) requireOk(await oc.call(encodeObjUnload(oc.nextSeq())));
      else expect(res.reason.length).toBeGreaterThan(0);
      if (++n % 10 === 0) await bystanderPasses();
    }
    console.log(`object fuzz: ${n} objects, ${JSON.stringify(statuses)}`);
    expect(n).toBeGreaterThan(5);
    await bystanderPasses();
    expect((await be.call('status')).devices.length).toBe(2);
    await waitUntil(async () => ownBpfFds(be.proc.pid) === bpf0, 3000, 'serve bpf fds back to the baseline');
    await waitUntil(async () => countFds(be.proc.pid) <= fds0, 3000, 'serve fds back to the baseline');
    await waitUntil(async () => namedKernelObjects((x) => x.startsWith(hostObjectName(bpfPrefix('ofz'), `${OBJ}.`)), () => false).maps.length === 0, 3000, 'no map of the fuzzed objects left in the kernel');
  }, FUZZ_MS + 120_000);
});
