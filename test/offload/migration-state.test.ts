// The offload state that travels in QEMU's migration stream (docs/offload-protocol.md §7),
// against the real kernel: broker A is built through guest requests, exported, imported into
// broker B; refusals carry their stable code and leave no kernel object or pin behind.

import { describe, it, expect, beforeAll, afterEach } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { OffloadBroker, type OffloadBrokerOptions } from '../../src/offload/broker.js';
import { MigrationStateError } from '../../src/offload/errors.js';
import { decodeState, encodeState, type MigrationState } from '../../src/offload/migration-format.js';
import * as P from '../../src/offload/guest/codec.js';
import { Status } from '../../src/offload/guest/codec.js';
import { BpfMapType } from '../../src/sys/bpf/maps.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { XDP_DROP, XDP_PASS } from '../../src/sys/bpf/xdp.js';
import { obj, ownBpfFds, namedKernelObjects, gone, sleepMs, Guest, u32, u64, readU64, frame } from './helpers.js';
import { roleOf } from '../../src/offload/host-names.js';

// Names every map and program of this file carries, so the leak check can tell them from
// objects other processes on this host create meanwhile.
const MAP_PREFIX = 'mig_';
const PROG_NAME = 'vx_mig';

const brokers: OffloadBroker[] = [];
function broker(opts: Partial<OffloadBrokerOptions> = {}): OffloadBroker {
  const b = new OffloadBroker({ device: `mig${brokers.length}`, ...opts });
  brokers.push(b);
  return b;
}
afterEach(() => {
  for (const b of brokers.splice(0)) b.reset('test end');
});

/** Kernel objects of this file alive now (by name), whoever holds them. */
function ourObjects(): { maps: number[]; progs: number[] } {
  // Kernel names are <device prefix>_<guest name> (src/offload/host-names.ts); every device here is mig*.
  return namedKernelObjects((n) => /^mig[A-Za-z0-9]*_/.test(n) && roleOf(n.slice(0, n.indexOf('_')), n).startsWith(MAP_PREFIX),
    (n) => /^mig[A-Za-z0-9]*_/.test(n) && roleOf(n.slice(0, n.indexOf('_')), n) === PROG_NAME);
}
/** No object of this file remains (a freed program drops its maps after an RCU grace period). */
function expectNoKernelObjects(): void {
  let o = ourObjects();
  for (let i = 0; i < 200 && (o.maps.length || o.progs.length); i++) { sleepMs(10); o = ourObjects(); }
  expect(o).toEqual({ maps: [], progs: [] });
}

/** Every element a guest can see in a map, by walking its keys: hex key → hex value. */
function dump(g: Guest, handle: number): Record<string, string> {
  const out: Record<string, string> = {};
  let r = g.send((s) => P.encodeGetFirstKey(s, handle));
  while (r.status === Status.OK) {
    const key = r.body.slice();
    out[Buffer.from(key).toString('hex')] = Buffer.from(g.ok((s) => P.encodeElemLookup(s, handle, key)).body).toString('hex');
    r = g.send((s) => P.encodeGetNextKey(s, handle, key));
  }
  expect(r.status).toBe(Status.NO_SUCH_ELEMENT);
  return out;
}

const HASH = { type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 64, name: `${MAP_PREFIX}hash` };
const ARRAY = { type: BpfMapType.ARRAY, keySize: 4, valueSize: 16, maxEntries: 8, name: `${MAP_PREFIX}array` };

/**
 * Source broker: claimed with a 4 KiB response limit, a blocklist program on a HASH map of
 * blocked sources, an ARRAY map with values, and a freed map leaving a handle gap (1, 3, 4;
 * next 5). The program has dropped two frames.
 */
function sourceBroker(opts: Partial<OffloadBrokerOptions> = {}): { a: OffloadBroker; g: Guest; handles: { bl: number; arr: number; hash: number } } {
  const a = broker(opts);
  const g = new Guest(a);
  g.claim(4096);
  const o = obj('xdp_blocklist');
  const bl = g.createMap({ ...o.maps[0]!, name: `${MAP_PREFIX}bl` });
  const gap = g.createMap({ ...ARRAY, name: `${MAP_PREFIX}gap` });
  const arr = g.createMap(ARRAY);
  const hash = g.createMap(HASH);
  g.ok((s) => P.encodeMapFree(s, gap));
  g.ok((s) => P.encodeProgSet(s, { license: o.license, insns: P.bindMapHandles(o.insns, o.mapRelocations, [bl]), mapHandles: [bl], name: PROG_NAME }));
  g.ok((s) => P.encodeElemUpdate(s, bl, new Uint8Array([192, 0, 2, 9]), u64(0)));
  g.ok((s) => P.encodeElemUpdate(s, bl, new Uint8Array([192, 0, 2, 7]), u64(100)));
  for (let i = 0; i < 8; i++) g.ok((s) => P.encodeElemUpdate(s, arr, u32(i), new Uint8Array(16).fill(i * 3 + 1)));
  for (let i = 0; i < 40; i++) g.ok((s) => P.encodeElemUpdate(s, hash, u32(1000 + i * 7), u64(i * i)));
  expect(verdicts(a, [[192, 0, 2, 9], [192, 0, 2, 9]])).toEqual([XDP_DROP, XDP_DROP]);
  return { a, g, handles: { bl, arr, hash } };
}

/** The loaded program's verdict on one IPv4 frame per source address (BPF_PROG_TEST_RUN). */
function verdicts(b: OffloadBroker, sources: number[][]): number[] {
  const r = new TestRunner(b.program!.fd);
  try {
    return sources.map((src) => r.runBytes(frame(src)).retval);
  } finally {
    r.dispose();
  }
}

function refusal(f: () => unknown): MigrationStateError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(MigrationStateError);
    return e as MigrationStateError;
  }
  throw new Error('expected a MigrationStateError');
}

/** Re-encodes a decoded (and edited) state; decodeState of encodeState is the identity. */
function edit(bytes: Uint8Array, f: (s: MigrationState) => void): Uint8Array {
  const s = decodeState(bytes.slice());
  f(s);
  return encodeState(s);
}

let fdsBefore = 0;
beforeAll(() => {
  fdsBefore = ownBpfFds();
});

describe('offload migration state', () => {
  it('round trip: same handles, identical map contents, the program reloaded and dropping, claim and counters carried', () => {
    const { a, g, handles } = sourceBroker();
    const before = { bl: dump(g, handles.bl), arr: dump(g, handles.arr), hash: dump(g, handles.hash) };
    expect(Object.keys(before.hash)).toHaveLength(40);
    expect(before.bl['c0000209']).toBe(u64Hex(2)); // the program counted its two drops
    const counters = { pass: 5, drop: 2, tx: 0, aborted: 1 };
    const bytes = a.exportState({ counters, attachFlags: 2 });
    // Export is read-only: the source keeps running with its offload.
    expect(a.claimed).toBe(true);
    expect(a.program).not.toBeNull();

    const b = broker();
    const claims: boolean[] = [];
    const programs: (number | null)[] = [];
    b.onClaimChange((c) => claims.push(c));
    b.onProgramChange((p) => programs.push(p ? p.id : null));
    const extras = b.importState(bytes);
    expect(extras.counters).toEqual(counters);
    expect(extras.attachFlags).toBe(2);
    expect(extras.sourceQuotas).toEqual(a.quotas().limits);
    // Listeners heard the claim, then the program: a datapath attaches it before the first frame.
    expect(claims).toEqual([true]);
    expect(programs).toEqual([b.program!.id]);

    const sa = a.show();
    const sb = b.show();
    expect(sb.maps.map((m) => [m.handle, m.type, m.keySize, m.valueSize, m.maxEntries, m.flags, m.name]))
      .toEqual(sa.maps.map((m) => [m.handle, m.type, m.keySize, m.valueSize, m.maxEntries, m.flags, m.name]));
    expect(sb.maps.map((m) => m.handle)).toEqual([1, 3, 4]);
    expect(sb.program!.tag).toBe(sa.program!.tag);
    expect(sb.program!.id).not.toBe(sa.program!.id);
    expect(sb.program!.mapHandles).toEqual([handles.bl]);
    expect(sb.program!.name).toBe(PROG_NAME);

    const gb = new Guest(b);
    expect({ bl: dump(gb, handles.bl), arr: dump(gb, handles.arr), hash: dump(gb, handles.hash) }).toEqual(before);
    // The claim's response limit came along; new handles continue after the source's.
    expect(P.decodeCapsBody(gb.ok(P.encodeCaps).body).maxResponseBytes).toBe(4096);
    expect(gb.createMap({ ...HASH, name: `${MAP_PREFIX}new` })).toBe(5);
    // The imported program runs on B's maps: blocked source dropped and counted, others pass.
    expect(verdicts(b, [[192, 0, 2, 9], [192, 0, 2, 10]])).toEqual([XDP_DROP, XDP_PASS]);
    expect(readU64(gb.ok((s) => P.encodeElemLookup(s, handles.bl, new Uint8Array([192, 0, 2, 9]))).body)).toBe(3);
    // The source's maps did not see B's frame: two kernels' objects, not one.
    expect(readU64(g.ok((s) => P.encodeElemLookup(s, handles.bl, new Uint8Array([192, 0, 2, 9]))).body)).toBe(2);
    // The in-use rule holds on the destination.
    expect(gb.send((s) => P.encodeMapFree(s, handles.bl)).status).toBe(Status.MAP_IN_USE);
    // An export of B is the same state (elements in kernel order aside), so B can migrate on.
    const again = decodeState(b.exportState({ counters, attachFlags: 2 }).slice());
    expect(again.maps.map((m) => [m.handle, m.count])).toEqual([[1, 2], [3, 8], [4, 40], [5, 0]]);
  });

  it('discard: after the migration the source holds no program, map or pin', () => {
    withBpffs((dir) => {
      const { a } = sourceBroker({ device: 'migsrc', pinDir: dir });
      const ids = a.show();
      expect(readdirSync(join(dir, 'migsrc'))).toContain('prog');
      a.exportState();
      a.discard();
      expect(a.claimed).toBe(false);
      expect(a.program).toBeNull();
      expect(a.show().maps).toEqual([]);
      expect(existsSync(join(dir, 'migsrc'))).toBe(false);
      for (const m of ids.maps) expect(gone('map', m.id)).toBe(true);
      expect(gone('prog', ids.program!.id)).toBe(true);
    });
  });

  it('with a pin dir the imported state is pinned like a fresh one, and a restarted destination re-adopts it', () => {
    withBpffs((dir) => {
      const { a, handles } = sourceBroker();
      const bytes = a.exportState();
      const opts = { device: 'migdst', pinDir: dir };
      const { broker: b } = OffloadBroker.fromState(bytes, opts);
      brokers.push(b);
      expect(readdirSync(join(dir, 'migdst')).sort())
        .toEqual(['map_1', 'map_3', 'map_4', 'meta_1', 'meta_3', 'meta_4', 'meta_prog', 'prog', 'src', 'state']);
      const tag = b.program!.tag;
      b.close();
      const b2 = OffloadBroker.restore(opts);
      brokers.push(b2);
      expect(b2.program!.tag).toBe(tag);
      expect(b2.programSource).not.toBeNull();
      expect(dump(new Guest(b2), handles.hash)).toEqual(dump(new Guest(a), handles.hash));
      // A restored program kept its source, so it can migrate on.
      expect(decodeState(b2.exportState().slice()).program!.tag).toBe(tag);
      // Importing over pinned state is refused: it would clobber the device's own.
      const e = refusal(() => broker({ device: 'migdst', pinDir: dir }).importState(bytes));
      expect(e.code).toBe('state-not-fresh');
      b2.reset('test');
      expect(existsSync(join(dir, 'migdst'))).toBe(false);
    });
  });

  it('an unclaimed state round-trips, and describeState tells a destination without --offload what it would take on', () => {
    const fresh = broker().exportState();
    expect(OffloadBroker.describeState(fresh)).toEqual({ claimed: false, maps: 0, elements: 0, program: null });
    const b = broker();
    expect(b.importState(fresh)).toEqual({ counters: null, attachFlags: null, sourceQuotas: b.quotas().limits });
    expect(b.claimed).toBe(false);
    expect(new Guest(b).send(P.encodeCaps).status).toBe(Status.NOT_CLAIMED);
    const { a } = sourceBroker();
    const d = OffloadBroker.describeState(a.exportState());
    expect(d).toMatchObject({ claimed: true, maps: 3, elements: 2 + 8 + 40, program: { name: PROG_NAME, tag: a.program!.tag } });
  });

  it("the destination's quotas and allow-list win: refusals name the rule and leave no kernel object or pin", () => {
    const { a } = sourceBroker();
    const bytes = a.exportState();
    const cases: [Partial<OffloadBrokerOptions>, string, string][] = [
      [{ quotas: { maxMaps: 2 } }, 'state-quota', 'quota-exceeded'],
      [{ quotas: { maxMapMemory: 40_000 } }, 'state-quota', 'quota-exceeded'],
      [{ quotas: { maxEntries: 32 } }, 'state-quota', 'quota-exceeded'],
      [{ quotas: { maxValueSize: 8 } }, 'state-quota', 'quota-exceeded'],
      [{ quotas: { maxProgInsns: 8 } }, 'state-quota', 'quota-exceeded'],
      [{ allowedHelpers: [5, 7] }, 'state-program-refused', 'helper-not-allowed'],
    ];
    withBpffs((dir) => {
      for (const [opts, code, rule] of cases) {
        const b = broker({ device: 'migq', pinDir: dir, ...opts });
        const e = refusal(() => b.importState(bytes));
        expect([e.code, e.rule], JSON.stringify(opts)).toEqual([code, rule]);
        expect(b.claimed).toBe(false);
        expect(b.show().maps).toEqual([]);
        expect(existsSync(join(dir, 'migq'))).toBe(false);
      }
    });
    a.reset('test');
    expectNoKernelObjects();
    expect(ownBpfFds()).toBe(fdsBefore);
  });

  it('a program the destination refuses fails the import: a forbidden helper, a verifier rejection, a tag that does not match', () => {
    const { a } = sourceBroker();
    const bytes = a.exportState();
    const printk = obj('bad_trace_printk');
    const cases: [(s: MigrationState) => void, string, string][] = [
      [(s) => { s.program!.insns = printk.insns; s.program!.mapHandles = []; }, 'state-program-refused', 'helper-not-allowed'],
      // "r0 = 0" is missing: the verifier refuses reading an unset R0 at exit.
      [(s) => { s.program!.insns = new Uint8Array([0x95, 0, 0, 0, 0, 0, 0, 0]); s.program!.mapHandles = []; }, 'state-program-refused', 'verifier-rejected'],
      [(s) => { s.program!.tag = '0011223344556677'; }, 'state-program-refused', 'tag-mismatch'],
      [(s) => { s.program!.mapHandles = [2]; }, 'state-program-refused', 'bad-map-handle'],
      [(s) => { s.program!.license = 'Proprietary'; }, 'state-program-refused', 'license-refused'],
    ];
    for (const [f, code, rule] of cases) {
      const e = refusal(() => broker().importState(edit(bytes, f)));
      expect([e.code, e.rule]).toEqual([code, rule]);
    }
    a.reset('test');
    expectNoKernelObjects();
    expect(ownBpfFds()).toBe(fdsBefore);
  });

  it('header, section and map rules: each refusal has its code', () => {
    const { a } = sourceBroker();
    const bytes = a.exportState({ counters: { pass: 1, drop: 2, tx: 3, aborted: 4 } });
    const withCrc = (b: Uint8Array) => { new DataView(b.buffer, b.byteOffset).setUint32(12, crc32(b.subarray(16)), true); return b; };
    const patched = (off: number, v: number, bits: 16 | 32 = 32) => {
      const b = bytes.slice();
      const dv = new DataView(b.buffer);
      if (bits === 16) dv.setUint16(off, v, true); else dv.setUint32(off, v, true);
      return off >= 16 ? withCrc(b) : b;
    };
    const cases: [Uint8Array, string][] = [
      [new Uint8Array(0), 'state-truncated'],
      [bytes.subarray(0, 10), 'state-truncated'],
      [patched(0, 0x12345678), 'bad-state-magic'],
      [patched(4, 4, 16), 'state-version'],
      // Version 2 is a state with an OBJECT section, version 3 one with an UPLOAD section (docs §7); one without is malformed.
      [patched(4, 2, 16), 'state-malformed'],
      [patched(4, 3, 16), 'state-malformed'],
      [bytes.subarray(0, bytes.byteLength - 1), 'state-truncated'],
      [Buffer.concat([bytes, new Uint8Array(1)]), 'state-trailing'],
      [(() => { const b = bytes.slice(); b[b.byteLength - 1]! ^= 1; return b; })(), 'state-checksum'],
      [patched(16, 9, 16), 'state-malformed'], // the first section is not CLAIM
      [edit(bytes, (s) => { s.maps[0]!.type = BpfMapType.PERCPU_ARRAY; }), 'state-map-type'],
      [edit(bytes, (s) => { s.maps[0]!.type = BpfMapType.PROG_ARRAY; }), 'state-map-type'],
      [edit(bytes, (s) => { const m = s.maps[2]!; m.keys = Buffer.concat([m.keys.subarray(0, 4), m.keys.subarray(0, m.keys.byteLength - 4)]); }), 'state-malformed'],
      [edit(bytes, (s) => { const m = s.maps[1]!; new DataView(m.keys.buffer, m.keys.byteOffset).setUint32(0, 8, true); }), 'state-malformed'],
      [edit(bytes, (s) => { s.claim!.nextHandle = 4; }), 'state-malformed'],
      [edit(bytes, (s) => { s.maps[1]!.handle = 1; }), 'state-malformed'],
      [edit(bytes, (s) => { s.claim!.responseLimit = 100; }), 'state-malformed'],
      [edit(bytes, (s) => { s.claim = null; }), 'state-malformed'],
    ];
    for (const [b, code] of cases) expect(refusal(() => broker().importState(b)).code).toBe(code);
    // value_cpus ≠ 1 (a per-CPU value): offset of the first MAP section's value_cpus field.
    const s = decodeState(bytes.slice());
    const firstMap = 16 + (8 + 24) + (8 + 32);
    expect(new DataView(bytes.buffer, bytes.byteOffset).getUint32(firstMap + 8, true)).toBe(s.maps[0]!.handle);
    expect(refusal(() => broker().importState(patched(firstMap + 8 + 24, 2))).code).toBe('state-map-type');
    // A broker that already holds state refuses to import over it.
    expect(refusal(() => a.importState(bytes)).code).toBe('state-not-fresh');
    a.reset('test');
    expectNoKernelObjects();
  });

  it('fuzz: truncated and mutated states refuse with a code, never crash, never leak', () => {
    const { a } = sourceBroker();
    const bytes = a.exportState({ counters: { pass: 1, drop: 2, tx: 3, aborted: 4 } });
    a.reset('fuzz source');
    const seed = Number(process.env.VX_FUZZ_SEED ?? Date.now() % 0xffffffff);
    let x = seed || 1;
    const rand = (n: number) => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x % n; };
    const codes = new Map<string, number>();
    let accepted = 0;
    const deadline = Date.now() + Number(process.env.VX_FUZZ_MS ?? 3000);
    let runs = 0;
    for (; Date.now() < deadline; runs++) {
      let b: Uint8Array;
      const kind = rand(3);
      if (kind === 0) {
        b = bytes.subarray(0, rand(bytes.byteLength));
      } else {
        b = bytes.slice();
        for (let i = 1 + rand(4); i > 0; i--) b[rand(b.byteLength)] = rand(256);
        // Half the mutations get a valid CRC, so the checks past the checksum are reached.
        if (kind === 2 && b.byteLength >= 16) new DataView(b.buffer).setUint32(12, crc32(b.subarray(16)), true);
      }
      const changed = b.byteLength !== bytes.byteLength || b.some((v, i) => v !== bytes[i]);
      const target = new OffloadBroker({ device: 'migfuzz' });
      let code = 'accepted';
      try {
        target.importState(b);
        accepted++; // a mutation with its CRC recomputed can still be a valid state (a changed element value)
      } catch (e) {
        if (!(e instanceof MigrationStateError)) throw new Error(`seed ${seed} run ${runs}: ${(e as Error)?.stack}`);
        code = e.code;
        codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
        expect(target.claimed).toBe(false);
        expect(target.show().maps).toEqual([]);
      } finally {
        target.reset('fuzz');
      }
      // A cut state is always 'state-truncated'; a changed byte without a matching CRC is always refused.
      if (kind === 0) expect(code, `seed ${seed} run ${runs}`).toBe('state-truncated');
      if (kind === 1 && changed) expect(code, `seed ${seed} run ${runs}`).not.toBe('accepted');
    }
    console.log(`migration-state fuzz seed ${seed}: ${runs} runs, ${accepted} accepted, ${JSON.stringify(Object.fromEntries(codes))}`);
    expect(codes.get('state-checksum')).toBeGreaterThan(0);
    expectNoKernelObjects();
    expect(ownBpfFds()).toBe(fdsBefore);
  });
});

function u64Hex(n: number): string {
  return Buffer.from(u64(n)).toString('hex');
}

function withBpffs(f: (dir: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), 'vx-migstate-bpffs-'));
  let mounted = false;
  try {
    execFileSync('mount', ['-t', 'bpf', 'bpf', dir]);
    mounted = true;
    f(dir);
  } finally {
    for (const b of brokers.splice(0)) b.reset('test end');
    if (mounted) execFileSync('umount', [dir]);
    rmdirSync(dir);
  }
}

