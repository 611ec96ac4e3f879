import { describe, it, expect, afterAll } from 'vitest';
import { OffloadBroker } from '../../src/offload/broker.js';
import * as P from '../../src/offload/guest/codec.js';
import { Cmd, Status } from '../../src/offload/guest/codec.js';
import { BpfMapType } from '../../src/sys/bpf/maps.js';
import { gone, obj, ownBpfFds } from './helpers.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { XDP_DROP } from '../../src/sys/bpf/xdp.js';

const FUZZ_MS = Number(process.env.VX_FUZZ_MS ?? 5000);

// xorshift32: reproducible from the printed seed.
function rng(seed: number) {
  let s = seed >>> 0 || 1;
  const next = () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s; };
  return {
    u32: next,
    int: (n: number) => next() % n,
    pick: <T>(a: readonly T[]): T => a[next() % a.length]!,
    bytes: (n: number) => { const b = new Uint8Array(n); for (let i = 0; i < n; i++) b[i] = next() & 0xff; return b; },
  };
}

const brokers: OffloadBroker[] = [];
afterAll(() => { for (const b of brokers) b.reset('test end'); });

describe('offload broker fuzz', () => {
  it(`random and mutated requests for ${FUZZ_MS} ms: handle() never throws, nothing leaks, another device is unaffected`, () => {
    const fds0 = ownBpfFds();
    const seed = Number(process.env.VX_FUZZ_SEED ?? (Date.now() & 0x7fffffff));
    console.log(`fuzz seed ${seed} (VX_FUZZ_SEED to replay)`);
    const r = rng(seed);

    // The bystander: device B with its own program and map contents.
    const other = new OffloadBroker({ device: 'fuzz-other' });
    brokers.push(other);
    let seqB = 1;
    const okB = (m: Uint8Array) => {
      const res = P.decodeResponse(other.handle(m));
      expect(res.status, res.reason).toBe(Status.OK);
      return res;
    };
    okB(P.encodeClaim(seqB++));
    const drop = obj('xdp_drop');
    const hb = P.decodeMapCreateBody(okB(P.encodeMapCreate(seqB++, drop.maps[0]!)).body).handle;
    okB(P.encodeProgSet(seqB++, { license: 'GPL', insns: P.bindMapHandles(drop.insns, drop.mapRelocations, [hb]), mapHandles: [hb] }));
    const kv = P.decodeMapCreateBody(okB(P.encodeMapCreate(seqB++, { type: BpfMapType.HASH, keySize: 4, valueSize: 4, maxEntries: 8 })).body).handle;
    okB(P.encodeElemUpdate(seqB++, kv, new Uint8Array([1, 0, 0, 0]), new Uint8Array([9, 9, 9, 9])));
    const otherBefore = other.show();

    // The target: device A, small quotas so allocations stay quick.
    let lastCode = '';
    const a = new OffloadBroker({
      device: 'fuzz-target', quotas: { maxMapMemory: 1 << 20, maxEntries: 4096, maxMaps: 8 }, onRefusal: (x) => { lastCode = x.code; },
    });
    brokers.push(a);
    const seenMaps = new Set<number>();
    const seenProgs = new Set<number>();

    const samples = ['xdp_drop', 'xdp_pass', 'xdp_tx', 'xdp_blocklist', 'bad_trace_printk', 'bad_kfunc', 'bad_tail_call'].map(obj);
    const mapTypes = [BpfMapType.HASH, BpfMapType.ARRAY, BpfMapType.LRU_HASH, BpfMapType.PERCPU_HASH, BpfMapType.DEVMAP, 0, 99];
    const handle = () => r.int(6);
    const key = () => r.bytes(r.pick([0, 3, 4, 8, 16]));
    const valid = (seq: number): Uint8Array => {
      switch (r.int(16)) {
        case 0: return P.encodeClaim(seq, { maxResponseBytes: r.pick([0, 1024, 4096, 100]) });
        case 1: return P.encodeCaps(seq);
        case 2: return r.int(8) === 0 ? P.encodeRelease(seq) : P.encodeProgUnset(seq);
        case 3: return P.encodeMapCreate(seq, {
          type: r.pick(mapTypes), keySize: r.pick([4, 8, 0, 600]), valueSize: r.pick([4, 8, 64, 0]),
          maxEntries: r.pick([1, 16, 256, 5000, 0]), flags: r.pick([0, 0, 1, 0x400]),
        });
        case 4: return P.encodeMapFree(seq, handle());
        case 5: return P.encodeElemLookup(seq, handle(), key());
        case 6: return P.encodeElemUpdate(seq, handle(), key(), r.bytes(r.pick([4, 8, 64])), r.int(4));
        case 7: return P.encodeElemDelete(seq, handle(), key());
        case 8: return P.encodeGetFirstKey(seq, handle());
        case 9: return P.encodeGetNextKey(seq, handle(), key());
        case 10: return P.encodeLookupBatch(seq, handle(), r.pick([0, 1, 10, 1000]), r.pick([null, r.bytes(4), r.bytes(8)]));
        case 11: { const n = r.int(20); return P.encodeUpdateBatch(seq, handle(), r.bytes(n * 4), r.bytes(n * r.pick([4, 8])), n, r.int(3)); }
        case 12: { const n = r.int(20); return P.encodeDeleteBatch(seq, handle(), r.bytes(n * 4), n); }
        default: {
          const o = r.pick(samples);
          const hs = o.maps.map(() => 1 + r.int(4));
          return P.encodeProgSet(seq, { license: r.pick(['GPL', 'GPL', 'MIT']), insns: P.bindMapHandles(o.insns, o.mapRelocations, hs), mapHandles: hs });
        }
      }
    };
    const mutate = (m: Uint8Array): Uint8Array => {
      let out = m.slice();
      const rounds = 1 + r.int(4);
      for (let i = 0; i < rounds; i++) {
        switch (r.int(7)) {
          case 0: if (out.length) { const i = r.int(out.length); out[i] = out[i]! ^ (1 << r.int(8)); } break;
          case 1: if (out.length) out[r.int(out.length)] = r.pick([0, 0xff, 0x7f, 0x80]); break;
          case 2: out = out.subarray(0, r.int(out.length + 1)); break;
          case 3: { const e = new Uint8Array(out.length + 1 + r.int(64)); e.set(out); e.set(r.bytes(e.length - out.length), out.length); out = e; break; }
          case 4: if (out.length >= 16) new DataView(out.buffer, out.byteOffset).setUint32(12, r.pick([0, 1, 0xffffffff, r.u32(), out.length]), true); break;
          case 5: if (out.length >= 24) new DataView(out.buffer, out.byteOffset).setUint32(16 + 4 * r.int(Math.min(4, (out.length - 16) >> 2)), r.pick([0, 1, 2, 0xffffffff, 0x80000000, r.u32()]), true); break;
          default: if (out.length >= 8) new DataView(out.buffer, out.byteOffset).setUint16(6, r.pick(Object.values(Cmd)), true); break;
        }
      }
      return out;
    };

    const statuses = new Map<string, number>();
    const kernelErrors = new Map<string, number>();
    let n = 0;
    const t0 = Date.now();
    a.handle(P.encodeClaim(0));
    while (Date.now() - t0 < FUZZ_MS) {
      const seq = r.u32();
      const kind = r.int(10);
      const req = kind < 4 ? valid(seq) : kind < 9 ? mutate(valid(seq)) : r.bytes(r.int(80));
      let res: Uint8Array;
      lastCode = '';
      try {
        res = a.handle(req);
      } catch (e) {
        throw new Error(`handle() threw on request ${Buffer.from(req).toString('hex')} (seed ${seed}): ${(e as Error).stack}`);
      }
      const d = P.decodeResponse(res);
      if (req.byteLength >= P.HEADER_BYTES) expect(d.seq).toBe(P.readHeader(req)!.seq);
      expect(res.byteLength).toBeLessThanOrEqual(P.MAX_MESSAGE_BYTES);
      statuses.set(P.statusName(d.status), (statuses.get(P.statusName(d.status)) ?? 0) + 1);
      // Kernel errors are fine (the kernel is the authority); a bug in the broker is not.
      expect(lastCode, `request ${Buffer.from(req).toString('hex')} (seed ${seed}): ${d.reason}`).not.toBe('internal-error');
      expect(lastCode === '', `status ${P.statusName(d.status)} and refusal code '${lastCode}' disagree`).toBe(d.status === Status.OK);
      if (d.status === Status.KERNEL_ERROR) {
        const k = d.reason.replace(/\d+/g, 'N');
        kernelErrors.set(k, (kernelErrors.get(k) ?? 0) + 1);
      }
      if (d.status === Status.OK && (d.command === Cmd.MAP_CREATE || d.command === Cmd.PROG_SET)) {
        const s = a.show();
        for (const m of s.maps) seenMaps.add(m.id);
        if (s.program) seenProgs.add(s.program.id);
      }
      // Keep the target claimed most of the time so deep paths are reached.
      if (!a.claimed && r.int(3) === 0) a.handle(P.encodeClaim(0));
      n++;
    }
    console.log(`fuzz: ${n} requests, ${seenMaps.size} maps and ${seenProgs.size} programs created; statuses ${JSON.stringify(Object.fromEntries(statuses))}`);
    console.log(`fuzz: kernel errors ${JSON.stringify(Object.fromEntries(kernelErrors))}`);
    expect(n).toBeGreaterThan(1000);

    // The bystander kept its program, map contents and state.
    const otherAfter = other.show();
    expect(otherAfter.program!.id).toBe(otherBefore.program!.id);
    expect(otherAfter.maps.map((m) => [m.handle, m.id, m.entries])).toEqual(otherBefore.maps.map((m) => [m.handle, m.id, m.entries]));
    expect([...P.decodeResponse(other.handle(P.encodeElemLookup(seqB++, kv, new Uint8Array([1, 0, 0, 0])))).body]).toEqual([9, 9, 9, 9]);
    const runner = new TestRunner(other.program!.fd);
    expect(runner.runBytes(new Uint8Array(64)).retval).toBe(XDP_DROP);
    runner.dispose();

    // Nothing of the target survives its reset.
    a.reset('fuzz done');
    for (const id of seenProgs) expect(gone('prog', id), `prog ${id}`).toBe(true);
    for (const id of seenMaps) expect(gone('map', id), `map ${id}`).toBe(true);
    other.reset('fuzz done');
    expect(ownBpfFds()).toBe(fds0);
  });
});
