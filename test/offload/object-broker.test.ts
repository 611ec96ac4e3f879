// The object path's rules against the broker in this process (docs/offload-protocol.md §8):
// upload rules, refusals by status and code (the helper named, the verifier's C source line),
// quotas, the migration export refusal, and what a tail call from the composed entry does.
import { describe, test, expect, afterEach } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { OffloadBroker } from '../../src/offload/broker.js';
import * as P from '../../src/offload/guest/codec.js';
import { Status, QuotaId } from '../../src/offload/guest/codec.js';
import { MigrationStateError } from '../../src/offload/errors.js';
import { BpfMap, BpfMapType, numPossibleCpus } from '../../src/sys/bpf/maps.js';
import { decodeState, encodeState } from '../../src/offload/migration-format.js';
import { progLoadWithLog, closeBpfFd } from '../../src/sys/bpf/programs.js';
import { encodeInsns, ldImm64, Op } from '../../src/sys/bpf/insns.js';
import { btfLoad, funcBtf, funcBtfTypeId } from '../../src/sys/bpf/btf.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { Guest, ROOT, ownBpfFds } from './helpers.js';

const sample = (name: string) => new Uint8Array(readFileSync(join(ROOT, 'bpf/out', `${name}.o`)));

let broker: OffloadBroker | null = null;
afterEach(() => { broker?.close(); broker = null; });

function claimed(quotas: Partial<Parameters<OffloadBroker['setQuotas']>[0]> = {}): Guest {
  broker = new OffloadBroker({ device: 'objunit', quotas });
  const g = new Guest(broker);
  g.claim();
  return g;
}

function upload(g: Guest, bytes: Uint8Array, name = 'vx_unit', chunk = 4096): void {
  for (const req of P.objectUploadRequests(bytes, () => g.seq, name, chunk)) {
    g.seq++;
    const r = P.decodeResponse(g.b.handle(req));
    if (r.status !== Status.OK) throw new Error(`upload: ${P.statusName(r.status)} ${r.reason}`);
  }
}

describe('object upload', () => {
  test('OBJ_BEGIN answers the limits; chunks must arrive in order; OBJ_LOAD needs every announced byte', () => {
    const g = claimed();
    const b = P.decodeObjBeginBody(g.ok((s) => P.encodeObjBegin(s, 100, 'x')).body);
    expect(b).toEqual({ maxObjectBytes: 1024 * 1024, maxChunkBytes: P.MAX_CHUNK_BYTES });
    expect(P.decodeU32Body(g.ok((s) => P.encodeObjChunk(s, 0, new Uint8Array(40))).body)).toBe(40);
    const gap = g.send((s) => P.encodeObjChunk(s, 50, new Uint8Array(10)));
    expect(gap.status).toBe(Status.BAD_REQUEST);
    // The gap discarded the upload.
    expect(g.send((s) => P.encodeObjChunk(s, 40, new Uint8Array(10))).reason).toMatch(/without OBJ_BEGIN/);
    g.ok((s) => P.encodeObjBegin(s, 100));
    g.ok((s) => P.encodeObjChunk(s, 0, new Uint8Array(60)));
    expect(g.send((s) => P.encodeObjChunk(s, 60, new Uint8Array(41))).status).toBe(Status.BAD_REQUEST);
    g.ok((s) => P.encodeObjBegin(s, 100));
    g.ok((s) => P.encodeObjChunk(s, 0, new Uint8Array(60)));
    const short = g.send((s) => P.encodeObjLoad(s));
    expect(short.status).toBe(Status.BAD_REQUEST);
    expect(short.reason).toMatch(/60 of the announced 100/);
  });

  test('an object over max-object-bytes is QUOTA_EXCEEDED (quota 7) at OBJ_BEGIN', () => {
    const g = claimed({ maxObjectBytes: 4096 });
    const r = g.send((s) => P.encodeObjBegin(s, 4097));
    expect(r.status).toBe(Status.QUOTA_EXCEEDED);
    expect(r.detail).toMatchObject({ a: QuotaId.MAX_OBJECT_BYTES, b: 4097, c: 4096 });
  });
});

describe('object refusals', () => {
  test('a forbidden helper is refused before the kernel sees the object, the helper named', () => {
    const g = claimed();
    const fds = ownBpfFds();
    upload(g, sample('bad_obj_helper'));
    const r = g.send((s) => P.encodeObjLoad(s));
    expect(r.status).toBe(Status.HELPER_NOT_ALLOWED);
    expect(r.detail?.a).toBe(14);
    expect(r.reason).toMatch(/bpf_get_current_pid_tgid \(14\)/);
    expect(ownBpfFds()).toBe(fds);
  });

  test('a verifier refusal carries the log with the C source line (BTF line info)', () => {
    const g = claimed();
    upload(g, sample('bad_obj_verifier'));
    const r = g.send((s) => P.encodeObjLoad(s));
    expect(r.status).toBe(Status.VERIFIER_REJECTED);
    expect(r.reason).toMatch(/bad_obj_verifier/);
    expect(r.verifierLog).toMatch(/__u32 unchecked_saddr = iph->saddr;.*@ bad_obj_verifier\.c:21/);
    expect(r.verifierLog).toMatch(/invalid access to packet/);
    expect(broker!.program).toBe(null);
  });

  test('a malformed object is OBJECT_REFUSED (22) with a reason', () => {
    const g = claimed();
    const bytes = sample('xdp_filter_obj').slice();
    bytes[18] = 62; // e_machine EM_X86_64
    upload(g, bytes);
    const r = g.send((s) => P.encodeObjLoad(s));
    expect(r.status).toBe(Status.OBJECT_REFUSED);
    expect(r.reason).toMatch(/EM_BPF/);
  });

  test('the object counts against max-maps: five maps (global data included) over a quota of 4', () => {
    const g = claimed({ maxMaps: 4 });
    upload(g, sample('xdp_filter_obj'));
    const r = g.send((s) => P.encodeObjLoad(s));
    expect(r.status).toBe(Status.QUOTA_EXCEEDED);
    expect(r.detail?.a).toBe(QuotaId.MAX_MAPS);
  });

  test('an unknown program name is BAD_REQUEST', () => {
    const g = claimed();
    upload(g, sample('xdp_filter_obj'));
    expect(g.send((s) => P.encodeObjLoad(s, 'nope')).status).toBe(Status.BAD_REQUEST);
  });
});

describe('a loaded object', () => {
  test('loads by name, replaces a PROG_SET program, refuses MAP_FREE of its maps', () => {
    const g = claimed();
    upload(g, sample('xdp_filter_obj'));
    const body = P.decodeObjLoadBody(g.ok((s) => P.encodeObjLoad(s, 'udp_filter')).body);
    expect(body.progCount).toBe(2);
    const show = P.decodeObjShowBody(g.ok((s) => P.encodeObjShow(s)).body);
    expect(show.progName).toBe('udp_filter');
    const free = g.send((s) => P.encodeMapFree(s, show.maps[0]!.handle));
    expect(free.status).toBe(Status.MAP_IN_USE);
    // A PROG_SET program replaces the object: its programs and maps go.
    const handles = g.offload({ section: 'xdp', insns: encodeInsns([{ code: Op.MOV64_IMM, dst: 0, imm: 2 }, { code: Op.EXIT }]), license: 'GPL', maps: [], mapRelocations: [], externCalls: [] });
    expect(handles).toEqual([]);
    expect(broker!.show().maps).toEqual([]);
    expect(broker!.show().object).toBe(null);
    expect(g.send((s) => P.encodeObjShow(s)).status).toBe(Status.NO_SUCH_ELEMENT);
  });

  test('an operator detach of an object reports kind object: its maps go with it (a PROG_SET program\'s stay)', () => {
    const g = claimed();
    upload(g, sample('xdp_filter_obj'));
    g.ok((s) => P.encodeObjLoad(s, 'udp_filter'));
    expect(broker!.show().maps.length).toBeGreaterThan(0);
    expect(broker!.detach()).toEqual({ detached: true, kind: 'object', cancelledLoad: false });
    expect(broker!.show()).toMatchObject({ program: null, object: null, maps: [] });
    expect(broker!.detach()).toEqual({ detached: false, kind: null, cancelledLoad: false });
  });

  test('per-CPU values are possible_cpus × round_up(value_size, 8) bytes in ELEM_LOOKUP and ELEM_UPDATE', () => {
    const g = claimed();
    upload(g, sample('xdp_filter_obj'));
    g.ok((s) => P.encodeObjLoad(s));
    const show = P.decodeObjShowBody(g.ok((s) => P.encodeObjShow(s)).body);
    const h = show.maps.find((m) => m.name === 'counters')!.handle;
    const key = new Uint8Array(4);
    const value = new Uint8Array(8 * show.possibleCpus).fill(1);
    g.ok((s) => P.encodeElemUpdate(s, h, key, value));
    expect(Buffer.from(g.ok((s) => P.encodeElemLookup(s, h, key)).body)).toEqual(Buffer.from(value));
    expect(g.send((s) => P.encodeElemUpdate(s, h, key, new Uint8Array(8))).status).toBe(Status.BAD_REQUEST);
  });
});

describe('migrating a loaded object (docs §7, state version 2)', () => {
  const possible = numPossibleCpus();
  function loadedWithState(): { g: Guest; show: P.ObjShow; flowsKey: Uint8Array } {
    const g = claimed();
    const plain = g.createMap({ type: BpfMapType.HASH, keySize: 4, valueSize: 4, maxEntries: 8 });
    g.ok((s) => P.encodeElemUpdate(s, plain, new Uint8Array([1, 2, 3, 4]), new Uint8Array([5, 6, 7, 8])));
    upload(g, sample('xdp_filter_obj'));
    g.ok((s) => P.encodeObjLoad(s, 'xdp_filter'));
    const show = P.decodeObjShowBody(g.ok((s) => P.encodeObjShow(s)).body);
    const h = (n: string) => show.maps.find((m) => m.name === n || m.name.endsWith(n))!.handle;
    g.ok((s) => P.encodeElemUpdate(s, h('counters'), new Uint8Array(4), new Uint8Array(8 * possible).fill(3)));
    const flowsKey = new Uint8Array(12).fill(9);
    g.ok((s) => P.encodeElemUpdate(s, h('flows'), flowsKey, new Uint8Array(8).fill(4)));
    g.ok((s) => P.encodeElemUpdate(s, h('.bss'), new Uint8Array(4), new Uint8Array(8).fill(1)));
    return { g, show, flowsKey };
  }

  test('export carries the object; a fresh broker imports it with the same handles, contents and entry tag, and runs it', () => {
    const { show, flowsKey } = loadedWithState();
    const src = broker!;
    const bytes = src.exportState({ attachFlags: 0 });
    expect(new DataView(bytes.buffer, bytes.byteOffset).getUint16(4, true)).toBe(2);
    expect(OffloadBroker.describeState(bytes).program).toMatchObject({ name: 'xdp_filter', tag: show.tag });
    const srcMaps = src.show().maps.map((m) => m.handle);
    src.close();
    broker = OffloadBroker.fromState(bytes, { device: 'objdst' }).broker;
    const g = new Guest(broker);
    const again = P.decodeObjShowBody(g.ok((s) => P.encodeObjShow(s)).body);
    expect(again).toEqual({ ...show, objName: show.objName });
    expect(broker.show().maps.map((m) => m.handle)).toEqual(srcMaps);
    const h = (n: string) => again.maps.find((m) => m.name === n || m.name.endsWith(n))!.handle;
    expect(Array.from(g.ok((s) => P.encodeElemLookup(s, h('counters'), new Uint8Array(4))).body)).toEqual(new Array(8 * possible).fill(3));
    expect(Array.from(g.ok((s) => P.encodeElemLookup(s, h('flows'), flowsKey)).body)).toEqual(new Array(8).fill(4));
    expect(Array.from(g.ok((s) => P.encodeElemLookup(s, h('.bss'), new Uint8Array(4))).body)).toEqual(new Array(8).fill(1));
    expect(Array.from(g.ok((s) => P.encodeElemLookup(s, 1, new Uint8Array([1, 2, 3, 4]))).body)).toEqual([5, 6, 7, 8]);
    // The PROG_ARRAY came from the ELF again: the tail call reaches udp_filter (the program is whole).
    expect(broker.show().object!.programs.map((x) => x.name).sort()).toEqual(['udp_filter', 'xdp_filter']);
    expect(broker.programSource).not.toBe(null);
  });

  test('a state whose per-CPU values are for another CPU count is refused (state-map-type), leaving nothing', () => {
    loadedWithState();
    const bytes = broker!.exportState();
    broker!.close();
    // The same state from a host with one more CPU: the per-CPU map's values sized for it.
    const st = decodeState(bytes.slice());
    const m = st.object!.maps.find((x) => x.type === BpfMapType.PERCPU_ARRAY)!;
    m.valueCpus = possible + 1;
    m.values = new Uint8Array(m.count * 8 * m.valueCpus);
    const other = encodeState(st);
    const fds = ownBpfFds();
    let err: unknown;
    try { OffloadBroker.fromState(other, { device: 'objdst' }); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(MigrationStateError);
    expect((err as MigrationStateError).code).toBe('state-map-type');
    expect((err as MigrationStateError).rule).toBe('percpu-cpus');
    expect(ownBpfFds()).toBe(fds);
    broker = null;
  });
});

describe('migrating an upload in progress (docs §7, state version 3)', () => {
  /** A claimed broker that has had OBJ_BEGIN and the object's first `sent` bytes. */
  function halfUploaded(object: Uint8Array, sent: number): Guest {
    const g = claimed();
    g.ok((s) => P.encodeObjBegin(s, object.byteLength, 'vx_half'));
    g.ok((s) => P.encodeObjChunk(s, 0, object.subarray(0, sent)));
    return g;
  }

  test('the guest\'s next OBJ_CHUNK lands on the destination, and OBJ_LOAD there loads the whole object', () => {
    const object = sample('xdp_filter_obj');
    const half = 4096;
    halfUploaded(object, half);
    const bytes = broker!.exportState();
    const st = decodeState(bytes.slice());
    expect(new DataView(bytes.buffer, bytes.byteOffset).getUint16(4, true)).toBe(3);
    expect(st.upload).toMatchObject({ name: 'vx_half', totalBytes: object.byteLength });
    expect(Buffer.compare(st.upload!.received, object.subarray(0, half))).toBe(0);
    broker!.close();
    broker = OffloadBroker.fromState(bytes, { device: 'objdst' }).broker;
    const g = new Guest(broker);
    // The guest's next request is the chunk after the last one the source answered.
    expect(P.decodeU32Body(g.ok((s) => P.encodeObjChunk(s, half, object.subarray(half))).body)).toBe(object.byteLength);
    const loaded = P.decodeObjLoadBody(g.ok((s) => P.encodeObjLoad(s, 'xdp_filter')).body);
    const show = P.decodeObjShowBody(g.ok((s) => P.encodeObjShow(s)).body);
    expect(show).toMatchObject({ objName: 'vx_half', tag: loaded.tag });
    expect(loaded.progCount).toBe(2);
  });

  test('an upload of an object over the destination\'s max-object-bytes is refused (state-quota); a lying one is malformed; nothing stays', () => {
    const object = sample('xdp_filter_obj');
    halfUploaded(object, 100);
    const bytes = broker!.exportState();
    broker!.close();
    broker = null;
    const fds = ownBpfFds();
    const refusedWith = (b: Uint8Array, quotas = {}): MigrationStateError => {
      try { OffloadBroker.fromState(b, { device: 'objdst', quotas }); } catch (e) { return e as MigrationStateError; }
      throw new Error('the state was accepted');
    };
    expect(refusedWith(bytes, { maxObjectBytes: object.byteLength - 1 })).toMatchObject({ code: 'state-quota', rule: 'quota-exceeded' });
    const st = decodeState(bytes.slice());
    st.upload!.totalBytes = 50; // fewer than the 100 received
    expect(refusedWith(encodeState(st))).toMatchObject({ code: 'state-malformed' });
    // Version 3 without its UPLOAD section.
    const none = encodeState({ ...decodeState(bytes.slice()), upload: null });
    const v3 = none.slice();
    new DataView(v3.buffer).setUint16(4, 3, true);
    expect(refusedWith(v3)).toBeInstanceOf(MigrationStateError);
    expect(ownBpfFds()).toBe(fds);
  });
});

describe('tail calls from a subprogram (what composition relies on)', () => {
  test('the tail-called program returns to the subprogram\'s caller, so a composed entry maps the target\'s verdict', () => {
    // main: r6 = ctx; call sub; r0 += 100; exit.  sub: tail_call(ctx, progs, 0); r0 = 7; exit.  target: r0 = 1.
    const progs = BpfMap.create(BpfMapType.PROG_ARRAY, 4, 4, 1, { name: 'vx_tc_arr' });
    const target = progLoadWithLog(encodeInsns([{ code: Op.MOV64_IMM, dst: 0, imm: 1 }, { code: Op.EXIT }]), { license: 'GPL', name: 'vx_tc_target' }).fd;
    const btf = btfLoad(funcBtf(2));
    const records = new Uint8Array(16);
    new DataView(records.buffer).setUint32(4, funcBtfTypeId(0), true);
    new DataView(records.buffer).setUint32(8, 4, true);
    new DataView(records.buffer).setUint32(12, funcBtfTypeId(1), true);
    let main = -1;
    try {
      main = progLoadWithLog(encodeInsns([
        { code: Op.MOV64_REG, dst: 6, src: 1 }, { code: Op.CALL, src: 1, imm: 2 }, { code: 0x07, dst: 0, imm: 100 }, { code: Op.EXIT },
        ...ldImm64(2, 1, progs.fd), { code: Op.MOV64_IMM, dst: 3, imm: 0 }, { code: Op.CALL, imm: 12 },
        { code: Op.MOV64_IMM, dst: 0, imm: 7 }, { code: Op.EXIT },
      ]), { license: 'GPL', name: 'vx_tc_main', funcInfo: { btfFd: btf, records } }).fd;
      const v = new Uint8Array(4);
      new DataView(v.buffer).setUint32(0, target, true);
      progs.update(new Uint8Array(4), v);
      const run = new TestRunner(main);
      try {
        expect(run.runBytes(new Uint8Array(64)).retval).toBe(101);
      } finally {
        run.dispose();
      }
    } finally {
      if (main >= 0) closeBpfFd(main);
      closeBpfFd(target);
      closeBpfFd(btf);
      progs.close();
    }
  });
});
