import { describe, it, expect, beforeAll, afterAll, afterEach } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { OffloadBroker, type OffloadBrokerOptions, type OffloadProgram, type RefusalRecord } from '../../src/offload/broker.js';
import { OffloadConfigError } from '../../src/offload/errors.js';
import * as P from '../../src/offload/guest/codec.js';
import { obj, ownBpfFds, existsNow, gone, Guest, u32, u64, readU64, readU32, frame } from './helpers.js';
import { Status, QuotaId } from '../../src/offload/guest/codec.js';
import { BpfMapType } from '../../src/sys/bpf/maps.js';
import { closeBpfFd, progLoad, BpfProgType } from '../../src/sys/bpf/programs.js';
import { encodeInsns } from '../../src/sys/bpf/insns.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { XDP_DROP, XDP_PASS, XDP_TX } from '../../src/sys/bpf/xdp.js';
import { countKernelObjects, progInfo, mapInfo } from '../../src/sys/bpf/info.js';
import { objGet } from '../../src/sys/bpf/pins.js';
import { bpfPrefix, hostObjectName } from '../../src/offload/host-names.js';

const seenMapIds = new Set<number>();
const seenProgIds = new Set<number>();
function remember(b: OffloadBroker): void {
  const s = b.show();
  for (const m of s.maps) seenMapIds.add(m.id);
  if (s.program) seenProgIds.add(s.program.id);
}

const brokers: OffloadBroker[] = [];
/** Each broker's latest refusal, with its stable code (host side: the guest sees status and reason). */
const lastRefusal = new Map<OffloadBroker, RefusalRecord>();
const codeOf = (b: OffloadBroker): string | undefined => lastRefusal.get(b)?.code;
function broker(opts: Partial<OffloadBrokerOptions> = {}): OffloadBroker {
  const b: OffloadBroker = new OffloadBroker({ device: `vx${brokers.length}`, onRefusal: (r) => lastRefusal.set(b, r), ...opts });
  brokers.push(b);
  return b;
}

let fdsBefore = 0;
let globalBefore: { progs: number; maps: number };
beforeAll(() => {
  fdsBefore = ownBpfFds();
  globalBefore = countKernelObjects();
});
// Each test's brokers are reset after it, pass or fail, so one failure cannot cascade.
afterEach(() => {
  for (const b of brokers.splice(0)) { remember(b); b.reset('test end'); }
});
afterAll(() => {
  for (const b of brokers.splice(0)) b.reset('test end');
});

describe('offload broker against the kernel', () => {
  it('CLAIM → CAPS → MAP_CREATE → PROG_SET drops frames and counts them in the guest-visible map, then unwinds to nothing', () => {
    const b = broker();
    const g = new Guest(b);
    const events: (OffloadProgram | null)[] = [];
    b.onProgramChange((p) => events.push(p));
    const caps = g.claim();
    expect(b.claimed).toBe(true);
    expect(caps.mapTypes).toEqual([BpfMapType.HASH, BpfMapType.ARRAY, BpfMapType.LRU_HASH]);
    expect(caps.helpers).toContain(1);
    expect(caps.helpers).not.toContain(6);
    expect(P.decodeCapsBody(g.ok(P.encodeCaps).body).maxProgInsns).toBe(4096);

    const drop = obj('xdp_drop');
    const [h] = g.offload(drop);
    expect(h).toBe(1);
    const prog = b.program!;
    expect(prog.insns).toBe(drop.insns.byteLength / 8);
    expect(events).toHaveLength(1);

    const runner = new TestRunner(prog.fd);
    try {
      for (let i = 0; i < 3; i++) expect(runner.runBytes(frame()).retval).toBe(XDP_DROP);
    } finally {
      runner.dispose();
    }
    expect(readU64(g.ok((s) => P.encodeElemLookup(s, h!, u32(0))).body)).toBe(3);

    // The loaded program pins its map: freeing it is refused until the program goes.
    expect(g.send((s) => P.encodeMapFree(s, h!)).status).toBe(Status.MAP_IN_USE);
    expect(P.decodeU32Body(g.ok(P.encodeProgUnset).body)).toBe(1);
    expect(b.program).toBeNull();
    expect(events.at(-1)).toBeNull();
    expect(P.decodeU32Body(g.ok(P.encodeProgUnset).body)).toBe(0);
    g.ok((s) => P.encodeMapFree(s, h!));
    expect(g.send((s) => P.encodeElemLookup(s, h!, u32(0))).status).toBe(Status.BAD_MAP_HANDLE);

    remember(b);
    b.reset('test');
    expect(b.claimed).toBe(false);
    expect(ownBpfFds()).toBe(fdsBefore);
    expect(g.send(P.encodeCaps).status).toBe(Status.NOT_CLAIMED);
  });

  it('HASH element ops: update flags, lookup, delete, first/next key walk, batched update/lookup/delete', () => {
    const b = broker();
    const g = new Guest(b);
    g.claim();
    const h = g.createMap({ type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 256, name: 'kv' });
    g.ok((s) => P.encodeElemUpdate(s, h, u32(7), u64(70)));
    expect(g.send((s) => P.encodeElemUpdate(s, h, u32(7), u64(71), P.UpdateFlag.NOEXIST)).status).toBe(Status.ELEMENT_EXISTS);
    expect(g.send((s) => P.encodeElemUpdate(s, h, u32(8), u64(80), P.UpdateFlag.EXIST)).status).toBe(Status.NO_SUCH_ELEMENT);
    g.ok((s) => P.encodeElemUpdate(s, h, u32(7), u64(77), P.UpdateFlag.EXIST));
    expect(readU64(g.ok((s) => P.encodeElemLookup(s, h, u32(7))).body)).toBe(77);
    expect(g.send((s) => P.encodeElemLookup(s, h, u32(9))).status).toBe(Status.NO_SUCH_ELEMENT);
    expect(g.send((s) => P.encodeElemLookup(s, h, new Uint8Array(3))).status).toBe(Status.BAD_REQUEST);
    expect(g.send((s) => P.encodeElemUpdate(s, h, u32(1), u64(1), 4 /* F_LOCK */)).status).toBe(Status.BAD_REQUEST);

    // Batched update of 100 elements, then page through them 30 at a time with the cursor.
    const n = 100;
    const keys = new Uint8Array(n * 4);
    const vals = new Uint8Array(n * 8);
    for (let i = 0; i < n; i++) { keys.set(u32(1000 + i), i * 4); vals.set(u64(i * 3), i * 8); }
    expect(P.decodeU32Body(g.ok((s) => P.encodeUpdateBatch(s, h, keys, vals, n)).body)).toBe(n);
    const seen = new Map<number, number>();
    let cursor: Uint8Array | null = null;
    for (let pages = 0; pages < 20; pages++) {
      const page = P.decodeLookupBatchBody(g.ok((s) => P.encodeLookupBatch(s, h, 30, cursor)).body, 4, 8);
      for (let i = 0; i < page.count; i++) seen.set(readU32(page.keys, i * 4), readU64(page.values.subarray(i * 8)));
      if (page.done) break;
      cursor = page.cursor;
    }
    expect(seen.size).toBe(n + 1);
    expect(seen.get(1042)).toBe(126);
    expect(seen.get(7)).toBe(77);

    // Walk with GET_FIRST_KEY / GET_NEXT_KEY.
    const walked = new Set<number>();
    let key = g.ok((s) => P.encodeGetFirstKey(s, h)).body;
    for (;;) {
      walked.add(readU32(key));
      const r = g.send((s) => P.encodeGetNextKey(s, h, key));
      if (r.status === Status.NO_SUCH_ELEMENT) break;
      expect(r.status).toBe(Status.OK);
      key = r.body;
    }
    expect(walked.size).toBe(n + 1);

    // Batched delete of the first 50; a batch naming an absent key stops there and says how far it got.
    expect(P.decodeU32Body(g.ok((s) => P.encodeDeleteBatch(s, h, keys.subarray(0, 200), 50)).body)).toBe(50);
    const partial = g.send((s) => P.encodeDeleteBatch(s, h, keys.subarray(196, 208), 3));
    expect(partial.status).toBe(Status.NO_SUCH_ELEMENT);
    expect(partial.detail!.c).toBe(0);
    g.ok((s) => P.encodeElemDelete(s, h, u32(7)));
    expect(g.send((s) => P.encodeElemDelete(s, h, u32(7))).status).toBe(Status.NO_SUCH_ELEMENT);
    expect(b.show().maps[0]!.entries).toBe(50);
    // A batch whose count does not match the bytes sent is refused before the kernel sees it.
    expect(g.send((s) => P.encodeUpdateBatch(s, h, keys, vals, n + 1)).status).toBe(Status.BAD_REQUEST);
    b.reset('test');
  });

  it('ARRAY and LRU_HASH maps: arrays refuse deletes and out-of-range indexes, LRU evicts instead of filling', () => {
    const b = broker();
    const g = new Guest(b);
    g.claim();
    const a = g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 4 });
    g.ok((s) => P.encodeElemUpdate(s, a, u32(3), u64(33)));
    expect(g.send((s) => P.encodeElemUpdate(s, a, u32(4), u64(1))).status).toBe(Status.NO_SUCH_ELEMENT);
    expect(g.send((s) => P.encodeElemDelete(s, a, u32(3))).status).toBe(Status.BAD_REQUEST);
    const all = P.decodeLookupBatchBody(g.ok((s) => P.encodeLookupBatch(s, a, 10)).body, 4, 8);
    expect(all.count).toBe(4);
    expect(readU64(all.values.subarray(24))).toBe(33);
    expect(g.send((s) => P.encodeMapCreate(s, { type: BpfMapType.ARRAY, keySize: 8, valueSize: 8, maxEntries: 4 })).status).toBe(Status.BAD_REQUEST);

    const lru = g.createMap({ type: BpfMapType.LRU_HASH, keySize: 4, valueSize: 4, maxEntries: 64 });
    for (let i = 0; i < 500; i++) g.ok((s) => P.encodeElemUpdate(s, lru, u32(i), u32(i)));
    const hashFull = g.createMap({ type: BpfMapType.HASH, keySize: 4, valueSize: 4, maxEntries: 2 });
    g.ok((s) => P.encodeElemUpdate(s, hashFull, u32(1), u32(1)));
    g.ok((s) => P.encodeElemUpdate(s, hashFull, u32(2), u32(2)));
    expect(g.send((s) => P.encodeElemUpdate(s, hashFull, u32(3), u32(3))).status).toBe(Status.MAP_FULL);
    b.reset('test');
  });

  it('every accepted sample offloads and gives its verdicts (xdp_pass, xdp_tx rewrites MACs, xdp_blocklist drops listed sources)', () => {
    const b = broker();
    const g = new Guest(b);
    g.claim();
    g.offload(obj('xdp_pass'));
    let r = new TestRunner(b.program!.fd);
    expect(r.runBytes(frame()).retval).toBe(XDP_PASS);
    r.dispose();

    const firstId = b.program!.id;
    g.offload(obj('xdp_tx')); // replaces the loaded program
    expect(b.program!.id).not.toBe(firstId);
    expect(gone('prog', firstId)).toBe(true);
    r = new TestRunner(b.program!.fd);
    const out = r.runBytes(frame());
    r.dispose();
    expect(out.retval).toBe(XDP_TX);
    expect([...out.data.subarray(0, 12)]).toEqual([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);

    const [bl] = g.offload(obj('xdp_blocklist'));
    g.ok((s) => P.encodeElemUpdate(s, bl!, new Uint8Array([192, 0, 2, 9]), u64(0)));
    r = new TestRunner(b.program!.fd);
    expect(r.runBytes(frame([192, 0, 2, 9])).retval).toBe(XDP_DROP);
    expect(r.runBytes(frame([192, 0, 2, 10])).retval).toBe(XDP_PASS);
    r.dispose();
    expect(readU64(g.ok((s) => P.encodeElemLookup(s, bl!, new Uint8Array([192, 0, 2, 9]))).body)).toBe(1);
    b.reset('test');
  });

  it('forbidden samples are refused through the broker with their status, and nothing stays loaded', () => {
    const b = broker();
    const g = new Guest(b);
    g.claim();
    const expectRefused = (name: string, status: number, code: string, detail: Partial<P.ErrorDetail> = {}) => {
      const o = obj(name);
      // Their maps are stand-ins: the check looks at the instructions, not the map types.
      const handles = o.maps.map(() => g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1 }));
      const r = g.send((s) => P.encodeProgSet(s, { license: o.license, insns: P.bindMapHandles(o.insns, o.mapRelocations, handles), mapHandles: handles }));
      expect(P.statusName(r.status), `${name}: ${r.reason}`).toBe(P.statusName(status));
      expect(codeOf(b), name).toBe(code);
      expect(r.detail).toMatchObject(detail);
      expect(b.program).toBeNull();
    };
    expectRefused('bad_trace_printk', Status.HELPER_NOT_ALLOWED, 'helper-not-allowed', { a: 6 });
    expectRefused('bad_get_current', Status.HELPER_NOT_ALLOWED, 'helper-not-allowed', { a: 14 });
    expectRefused('bad_tail_call', Status.TAIL_CALL_REFUSED, 'tail-call-refused', { b: 12 });
    expectRefused('bad_kfunc', Status.KFUNC_REFUSED, 'kfunc-refused');
    expectRefused('big_prog', Status.QUOTA_EXCEEDED, 'quota-exceeded', { a: QuotaId.MAX_PROG_INSNS });
    // Map types those samples need are refused at MAP_CREATE, each naming the type.
    for (const [type, code] of [[BpfMapType.PERCPU_ARRAY, 'map-type-percpu'], [BpfMapType.PROG_ARRAY, 'bad-map-type'],
      [BpfMapType.DEVMAP, 'bad-map-type'], [BpfMapType.PERF_EVENT_ARRAY, 'bad-map-type'], [BpfMapType.LRU_PERCPU_HASH, 'map-type-percpu']] as const) {
      const r = g.send((s) => P.encodeMapCreate(s, { type, keySize: 4, valueSize: 4, maxEntries: 1 }));
      expect(r.status).toBe(Status.MAP_TYPE_REFUSED);
      expect(codeOf(b)).toBe(code);
      expect(r.detail!.a).toBe(type);
    }
    b.reset('test');
  });

  it('the verifier log comes back, bounded, when the host verifier rejects a program', () => {
    const b = broker();
    const g = new Guest(b);
    g.claim(2048);
    // r0 = *(u64 *)(r2 + 0) with r2 uninitialised: the verifier refuses ("R2 !read_ok").
    const insns = encodeInsns([{ code: 0x79, dst: 0, src: 2, off: 0 }, { code: 0x95 }]);
    const r = g.send((s) => P.encodeProgSet(s, { license: 'GPL', insns, mapHandles: [] }));
    expect(r.status).toBe(Status.VERIFIER_REJECTED);
    expect(r.detail!.a).toBeGreaterThan(0);
    expect(r.verifierLog).toMatch(/R2/);
    expect(b.handle(P.encodeProgUnset(99)).byteLength).toBeLessThanOrEqual(2048);
    // A non-GPL license is refused before the kernel is asked.
    const lic = g.send((s) => P.encodeProgSet(s, { license: 'Proprietary', insns, mapHandles: [] }));
    expect(lic.status).toBe(Status.LICENSE_REFUSED);
    expect(codeOf(b)).toBe('license-refused');
    b.reset('test');
  });

  it("another device's handle is refused: handles are per device and only this device's maps are reachable", () => {
    const a = broker();
    const bb = broker();
    const ga = new Guest(a);
    const gb = new Guest(bb);
    ga.claim();
    gb.claim();
    ga.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1 });
    const a2 = ga.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1 });
    gb.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1 });
    expect(a2).toBe(2);
    expect(gb.send((s) => P.encodeElemLookup(s, a2, u32(0))).status).toBe(Status.BAD_MAP_HANDLE);
    const drop = obj('xdp_drop');
    const r = gb.send((s) => P.encodeProgSet(s, { license: 'GPL', insns: P.bindMapHandles(drop.insns, drop.mapRelocations, [a2]), mapHandles: [a2] }));
    expect(r.status).toBe(Status.BAD_MAP_HANDLE);
    expect(codeOf(bb)).toBe('bad-map-handle');
    expect(r.detail!.a).toBe(2);
    // Declaring a live handle but referencing an undeclared one is refused too.
    const r2 = gb.send((s) => P.encodeProgSet(s, { license: 'GPL', insns: P.bindMapHandles(drop.insns, drop.mapRelocations, [a2]), mapHandles: [1] }));
    expect(r2.status).toBe(Status.BAD_MAP_HANDLE);
    expect(r2.detail!.b).toBe(drop.mapRelocations[0]!.insnIndex);
    expect(codeOf(bb)).toBe('bad-map-handle'); // handle 2 is device A's, so not live here either
    expect(bb.program).toBeNull();
    a.reset('test');
    bb.reset('test');
  });

  it('quota overruns (maps, memory, entries, key size, insns) are refused naming the quota, with no partial state', () => {
    const b = broker({ quotas: { maxMaps: 2, maxMapMemory: 200_000, maxEntries: 2048, maxProgInsns: 100 } });
    const g = new Guest(b);
    g.claim();
    const fds0 = ownBpfFds();
    const refused = (m: Parameters<typeof P.encodeMapCreate>[1], quota: number) => {
      const r = g.send((s) => P.encodeMapCreate(s, m));
      expect(r.status, r.reason).toBe(Status.QUOTA_EXCEEDED);
      expect(r.detail!.a).toBe(quota);
      expect(codeOf(b)).toBe('quota-exceeded');
      return r;
    };
    expect(refused({ type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 4096 }, QuotaId.MAX_ENTRIES).detail).toMatchObject({ b: 4096, c: 2048 });
    refused({ type: BpfMapType.HASH, keySize: 600, valueSize: 8, maxEntries: 1 }, QuotaId.MAX_KEY_SIZE);
    // 2048 × (48 + 8 + 64) bytes ≈ 280 KB > 200 KB: refused before anything is allocated.
    expect(refused({ type: BpfMapType.HASH, keySize: 4, valueSize: 64, maxEntries: 2048 }, QuotaId.MAX_MAP_MEMORY).detail!.c).toBe(200_000);
    expect(ownBpfFds()).toBe(fds0);
    const h1 = g.createMap({ type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 1024 });
    const used = b.quotas().usage.mapMemory;
    expect(used).toBeGreaterThanOrEqual(80_000); // the kernel's own figure for this map is ~83 KB
    refused({ type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 2000 }, QuotaId.MAX_MAP_MEMORY);
    g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 16 });
    refused({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1 }, QuotaId.MAX_MAPS);
    expect(b.show().maps.map((m) => m.handle)).toEqual([h1, 2]);
    expect(ownBpfFds()).toBe(fds0 + 2);
    // Instruction quota: big_prog (about 6000) is far over 100.
    const big = obj('big_prog');
    const r = g.send((s) => P.encodeProgSet(s, { license: 'GPL', insns: big.insns, mapHandles: [] }));
    expect(r.status).toBe(Status.QUOTA_EXCEEDED);
    expect(r.detail!.a).toBe(QuotaId.MAX_PROG_INSNS);
    expect(b.program).toBeNull();
    expect(ownBpfFds()).toBe(fds0 + 2);
    b.reset('test');
  });

  it('max-ops-per-sec: a token bucket refuses with RATE_LIMITED and a retry time; RELEASE is never limited', () => {
    let t = 1_000_000;
    const b = broker({ quotas: { maxOpsPerSec: 10 }, now: () => t });
    const g = new Guest(b);
    g.claim();
    let limited = 0;
    for (let i = 0; i < 20; i++) if (g.send(P.encodeCaps).status === Status.RATE_LIMITED) limited++;
    expect(limited).toBe(11); // 10 tokens, one spent by CLAIM
    const r = g.send(P.encodeCaps);
    expect(r.status).toBe(Status.RATE_LIMITED);
    expect(codeOf(b)).toBe('rate-limited');
    expect(r.detail!.a).toBe(100); // ms until one of 10 tokens per second is back
    t += 500;
    expect(g.send(P.encodeCaps).status).toBe(Status.OK);
    // setQuotas applies live.
    b.setQuotas({ maxOpsPerSec: 1000 });
    t += 1000;
    for (let i = 0; i < 500; i++) expect(g.send(P.encodeCaps).status).toBe(Status.OK);
    b.setQuotas({ maxOpsPerSec: 1 });
    t += 1000;
    g.ok(P.encodeCaps);
    expect(g.send(P.encodeCaps).status).toBe(Status.RATE_LIMITED);
    g.ok(P.encodeRelease);
    expect(b.claimed).toBe(false);
  });

  it('setQuotas takes effect live; lowering below current use refuses new allocations and says so', () => {
    const b = broker();
    const g = new Guest(b);
    g.claim();
    for (let i = 0; i < 3; i++) g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 8 });
    const res = b.setQuotas({ maxMaps: 2, maxMapMemory: 1000 });
    expect(res.limits.maxMaps).toBe(2);
    expect(res.warnings.join('\n')).toMatch(/max-maps 2 is below current use \(3 maps\)/);
    expect(res.warnings.join('\n')).toMatch(/max-map-memory/);
    expect(g.send((s) => P.encodeMapCreate(s, { type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1 })).status).toBe(Status.QUOTA_EXCEEDED);
    // Existing maps keep working; the guest sees the new limits in CAPS.
    g.ok((s) => P.encodeElemUpdate(s, 1, u32(0), u64(5)));
    expect(P.decodeCapsBody(g.ok(P.encodeCaps).body).maxMaps).toBe(2);
    try {
      b.setQuotas({ maxMaps: -1 });
      expect.unreachable('setQuotas accepted max-maps -1');
    } catch (e) {
      expect(e).toBeInstanceOf(OffloadConfigError);
      expect(e).toMatchObject({ code: 'bad-quota', subject: 'max-maps' });
    }
    expect(b.setQuotas({ maxMapMemory: '16MiB' as unknown as number }).limits.maxMapMemory).toBe(16 * 1024 * 1024);
    b.setQuotas({ maxMaps: 8, maxMapMemory: 1 << 20 });
    g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1 });
    b.reset('test');
  });

  it('RELEASE and reset free everything: program, maps, claim; detach removes only the program', () => {
    const b = broker();
    const g = new Guest(b);
    const claims: boolean[] = [];
    b.onClaimChange((c) => claims.push(c));
    g.claim();
    const [h] = g.offload(obj('xdp_drop'));
    remember(b);
    const ids = { prog: b.program!.id, map: b.show().maps[0]!.id };
    expect(b.detach()).toEqual({ detached: true, kind: 'program', cancelledLoad: false });
    expect(b.program).toBeNull();
    expect(gone('prog', ids.prog)).toBe(true);
    expect(existsNow('map', ids.map)).toBe(true);
    g.ok((s) => P.encodeElemLookup(s, h!, u32(0)));
    expect(b.detach()).toEqual({ detached: false, kind: null, cancelledLoad: false });
    g.offload(obj('xdp_pass'));
    remember(b);
    g.ok(P.encodeRelease);
    expect(claims).toEqual([true, false]);
    expect(b.program).toBeNull();
    expect(b.show().maps).toEqual([]);
    expect(gone('map', ids.map)).toBe(true);
    expect(ownBpfFds()).toBe(fdsBefore);
    // The pair can be claimed again; handle numbering restarts.
    g.claim();
    expect(g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 4, maxEntries: 1 })).toBe(1);
    b.reset('frontend disconnect');
    expect(ownBpfFds()).toBe(fdsBefore);
  });

  it('a small claimed response limit bounds batch lookups and verifier logs', () => {
    const b = broker();
    const g = new Guest(b);
    const caps = g.claim(1024);
    expect(caps.maxResponseBytes).toBe(1024);
    expect(caps.verifierLogBytes).toBeLessThan(1024);
    const h = g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 64, maxEntries: 100 });
    const res = b.handle(P.encodeLookupBatch(1, h, 100));
    expect(res.byteLength).toBeLessThanOrEqual(1024);
    const page = P.decodeLookupBatchBody(P.decodeResponse(res).body, 4, 64);
    expect(page.count).toBeGreaterThan(5);
    expect(page.count).toBeLessThan(100);
    expect(page.done).toBe(false);
    b.reset('test');
  });

  it('pin + restore: a restarted backend re-adopts the program and maps with their contents; reset unpins', () => {
    let dir = '';
    let mounted = false;
    try {
      dir = mkdtempSync(join(tmpdir(), 'vx-offload-bpffs-'));
      execFileSync('mount', ['-t', 'bpf', 'bpf', dir]);
      mounted = true;
      const opts = { device: 'pinned0', pinDir: dir };
      const b = new OffloadBroker(opts);
      const g = new Guest(b);
      g.claim();
      const [h] = g.offload(obj('xdp_drop'));
      const extra = g.createMap({ type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 16 });
      g.ok((s) => P.encodeElemUpdate(s, extra, u32(42), u64(4242)));
      let r = new TestRunner(b.program!.fd);
      r.runBytes(frame());
      r.runBytes(frame());
      r.dispose();
      const before = b.show();
      expect(readdirSync(join(dir, 'pinned0')).sort()).toEqual(['map_1', 'map_2', 'meta_1', 'meta_2', 'meta_prog', 'prog', 'src', 'state']);
      // The source blob's map is named for its role, not for the temporary pin it was made under.
      const srcFd = objGet(join(dir, 'pinned0', 'src'));
      try {
        expect(mapInfo(srcFd).name).toBe(hostObjectName(bpfPrefix('pinned0'), 'src'));
      } finally {
        closeBpfFd(srcFd);
      }
      b.close(); // process exit: fds closed, pins kept
      expect(ownBpfFds()).toBe(fdsBefore);
      expect(existsNow('prog', before.program!.id)).toBe(true);

      const b2 = OffloadBroker.restore(opts);
      brokers.push(b2);
      expect(b2.claimed).toBe(true);
      expect(b2.program!.id).toBe(before.program!.id);
      expect(b2.program!.tag).toBe(before.program!.tag);
      expect(b2.program!.loadedAt).toBe(before.program!.loadedAt);
      expect(b2.show().maps.map((m) => [m.handle, m.id])).toEqual(before.maps.map((m) => [m.handle, m.id]));
      // The source comes back too (for composing it again on an xsk port), pointing at the
      // restored maps: loaded, it is the same program (the kernel's tag ignores map fds).
      const src = b2.programSource!;
      expect(src.license).toBe('GPL');
      const again = progLoad(src.code, { license: src.license, type: BpfProgType.XDP, name: 'vx_src_check' });
      try {
        expect(progInfo(again).tag).toBe(before.program!.tag);
      } finally {
        closeBpfFd(again);
      }
      const g2 = new Guest(b2);
      expect(readU64(g2.ok((s) => P.encodeElemLookup(s, h!, u32(0))).body)).toBe(2);
      expect(readU64(g2.ok((s) => P.encodeElemLookup(s, extra, u32(42))).body)).toBe(4242);
      r = new TestRunner(b2.program!.fd);
      expect(r.runBytes(frame()).retval).toBe(XDP_DROP);
      r.dispose();
      expect(readU64(g2.ok((s) => P.encodeElemLookup(s, h!, u32(0))).body)).toBe(3);
      // The in-use rule survives the restart; new handles continue after the old ones.
      expect(g2.send((s) => P.encodeMapFree(s, h!)).status).toBe(Status.MAP_IN_USE);
      expect(g2.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 4, maxEntries: 1 })).toBe(3);
      remember(b2);
      b2.reset('test');
      expect(existsSync(join(dir, 'pinned0'))).toBe(false);
      expect(gone('prog', before.program!.id)).toBe(true);
      for (const m of before.maps) expect(gone('map', m.id)).toBe(true);
      // Nothing pinned: restore gives a fresh, unclaimed broker.
      const b3 = OffloadBroker.restore(opts);
      expect(b3.claimed).toBe(false);
      b3.close();
    } finally {
      if (mounted) execFileSync('umount', [dir]);
      if (dir) rmdirSync(dir);
    }
  });

  it('answers single and batched element operations on a 64 Ki-entry HASH map with OK (their rates: npm run bench -- offload)', () => {
    const b = broker({ quotas: { maxOpsPerSec: 10_000_000 } });
    const g = new Guest(b);
    g.claim();
    const h = g.createMap({ type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 65536 });
    g.ok((s) => P.encodeElemUpdate(s, h, u32(1), u64(2)));
    expect(readU64(g.ok((s) => P.encodeElemLookup(s, h, u32(1))).body)).toBe(2);
    const n = 1024;
    const keys = new Uint8Array(n * 4);
    const vals = new Uint8Array(n * 8);
    for (let i = 0; i < n; i++) keys.set(u32(i), i * 4);
    g.ok((s) => P.encodeUpdateBatch(s, h, keys, vals, n));
    expect(P.decodeLookupBatchBody(g.ok((s) => P.encodeLookupBatch(s, h, n)).body, 4, 8).count).toBeGreaterThan(0);
    b.reset('test');
  });
});

describe('leak check', () => {
  it('every kernel object any broker in this file created is gone and no bpf fd is left open', () => {
    for (const b of brokers.splice(0)) { remember(b); b.reset('leak check'); }
    expect(seenProgIds.size).toBeGreaterThan(0);
    expect(seenMapIds.size).toBeGreaterThan(0);
    for (const id of seenProgIds) expect(gone('prog', id), `prog ${id}`).toBe(true);
    for (const id of seenMapIds) expect(gone('map', id), `map ${id}`).toBe(true);
    expect(ownBpfFds()).toBe(fdsBefore);
    const after = countKernelObjects();
    console.log(`kernel objects before ${JSON.stringify(globalBefore)} after ${JSON.stringify(after)}`);
  });
});


