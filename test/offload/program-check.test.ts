import { describe, it, expect } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readBpfObject } from '../../src/offload/bpf-object.js';
import {
  checkProgram, decodeProgram, judgeProgram, rewriteMapRefs, validateAllowList, helperName, isGplCompatible,
  DEFAULT_ALLOWED_HELPERS, type ProgramPolicy,
} from '../../src/offload/program-check.js';
import { checkMapDef } from '../../src/offload/map-table.js';
import { DEFAULT_QUOTAS } from '../../src/offload/quotas.js';
import { ProtocolError, Status, QuotaId, bindMapHandles, statusName } from '../../src/offload/guest/codec.js';
import { OffloadConfigError } from '../../src/offload/errors.js';
import { encodeInsns } from '../../src/sys/bpf/insns.js';
import { BpfMapType } from '../../src/sys/bpf/maps.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const obj = (name: string) => readBpfObject(new Uint8Array(readFileSync(join(ROOT, 'bpf/out', `${name}.o`))));

const policy = (over: Partial<ProgramPolicy> = {}): ProgramPolicy => ({
  maxInsns: DEFAULT_QUOTAS.maxProgInsns,
  allowedHelpers: new Set(DEFAULT_ALLOWED_HELPERS),
  handleExists: (h) => h >= 1 && h <= 8,
  ...over,
});

/** The object's program with its maps bound to handles 1..n, checked under the default policy. */
function check(name: string, p = policy()) {
  const o = obj(name);
  const handles = o.maps.map((_, i) => i + 1);
  return checkProgram(bindMapHandles(o.insns, o.mapRelocations, handles), o.license, handles, p);
}

function refusal(r: ReturnType<typeof check>): ProtocolError {
  if (r.ok) throw new Error('expected a refusal');
  return r.error;
}

/** The error `fn` throws, as type T (the test fails when it returns or throws something else). */
function thrown<T>(fn: () => unknown, type: abstract new (...a: never[]) => T): T {
  try { fn(); } catch (e) { expect(e).toBeInstanceOf(type); return e as T; }
  throw new Error('expected a throw');
}

const exit = { code: 0x95 };
const mov0 = { code: 0xb7, dst: 0, imm: 2 };

describe('program intake checks', () => {
  it('the accepted samples (xdp_drop, xdp_tx, xdp_blocklist, xdp_pass) pass decode and judge', () => {
    for (const n of ['xdp_drop', 'xdp_tx', 'xdp_blocklist', 'xdp_pass']) {
      const r = check(n);
      expect(r.ok, n).toBe(true);
      if (r.ok) expect(r.program.usedHandles).toEqual([1]);
    }
  });

  it('each forbidden-helper sample is refused with HELPER_NOT_ALLOWED naming the helper and its id', () => {
    const cases: [string, string, number][] = [
      ['bad_trace_printk', 'bpf_trace_printk', 6],
      ['bad_perf_event', 'bpf_perf_event_output', 25],
      ['bad_probe_read', 'bpf_probe_read_kernel', 113],
      ['bad_fib_lookup', 'bpf_fib_lookup', 69],
      ['bad_redirect', 'bpf_redirect', 23],
      ['bad_redirect_map', 'bpf_redirect_map', 51],
      ['bad_get_current', 'bpf_get_current_pid_tgid', 14],
    ];
    for (const [name, helper, id] of cases) {
      const e = refusal(check(name));
      expect(statusName(e.status), name).toBe('HELPER_NOT_ALLOWED');
      expect(e.code, name).toBe('helper-not-allowed');
      expect(helperName(id)).toBe(helper);
      expect(e.detail.a).toBe(id);
    }
  });

  it('a tail call, a kfunc call and a BTF ksym load each get their own status', () => {
    const tail = refusal(check('bad_tail_call'));
    expect(tail.status).toBe(Status.TAIL_CALL_REFUSED);
    expect(tail.code).toBe('tail-call-refused');
    expect(tail.detail.b).toBe(12);
    // Even an operator cannot allow tail calls: they are on the never-allowed list.
    expect(thrown(() => validateAllowList([1, 12]), OffloadConfigError)).toMatchObject({ code: 'helper-never-allowed', subject: '12' });
    expect(thrown(() => validateAllowList([0]), OffloadConfigError)).toMatchObject({ code: 'not-a-helper', subject: '0' });

    const kf = refusal(check('bad_kfunc'));
    expect(kf.status).toBe(Status.KFUNC_REFUSED);
    expect(kf.code).toBe('kfunc-refused');

    // ld_imm64 r1 = BTF id (src_reg 3): a ksym.
    const ksym = encodeInsns([{ code: 0x18, dst: 1, src: 3, imm: 1234 }, { code: 0 }, mov0, exit]);
    const k = refusal(checkProgram(ksym, 'GPL', [], policy()));
    expect(k.status).toBe(Status.KSYM_REFUSED);
    expect(k.code).toBe('ksym-refused');
    expect(k.detail.a).toBe(0);
  });

  it('a per-CPU map is refused with MAP_TYPE_REFUSED naming the type; the program itself would pass', () => {
    const o = obj('bad_percpu_map');
    const def = o.maps[0]!;
    const percpu = thrown(() => checkMapDef(def, DEFAULT_QUOTAS), ProtocolError);
    expect(percpu).toMatchObject({ status: Status.MAP_TYPE_REFUSED, code: 'map-type-percpu', detail: { a: BpfMapType.PERCPU_ARRAY } });
    expect(check('bad_percpu_map').ok).toBe(true);
    for (const t of [BpfMapType.HASH, BpfMapType.ARRAY, BpfMapType.LRU_HASH]) {
      expect(() => checkMapDef({ type: t, keySize: 4, valueSize: 8, maxEntries: 4, flags: 0, name: '' }, DEFAULT_QUOTAS)).not.toThrow();
    }
    expect(thrown(() => checkMapDef({ type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 4, flags: 1 << 10, name: '' }, DEFAULT_QUOTAS), ProtocolError))
      .toMatchObject({ status: Status.BAD_REQUEST, code: 'bad-map-flags' });
  });

  it('big_prog is refused by the instruction quota, and passes once the quota allows it', () => {
    const e = refusal(check('big_prog'));
    expect(e.status).toBe(Status.QUOTA_EXCEEDED);
    expect(e.detail.a).toBe(QuotaId.MAX_PROG_INSNS);
    expect(e.code).toBe('quota-exceeded');
    expect(e.detail.c).toBe(4096);
    expect(check('big_prog', policy({ maxInsns: 10_000 })).ok).toBe(true);
  });

  it('the license must be one the kernel calls GPL-compatible', () => {
    for (const l of ['GPL', 'GPL v2', 'Dual BSD/GPL', 'Dual MIT/GPL', 'Dual MPL/GPL', 'GPL and additional rights']) expect(isGplCompatible(l)).toBe(true);
    for (const l of ['MIT', 'gpl', 'GPL ', 'Proprietary', '']) expect(isGplCompatible(l)).toBe(false);
    const e = refusal(checkProgram(encodeInsns([mov0, exit]), 'BSD', [], policy()));
    expect(e.status).toBe(Status.LICENSE_REFUSED);
    expect(e.code).toBe('license-refused');
  });

  it('map references: only declared, live handles; rewrite puts host fds in imm and leaves the guest copy untouched', () => {
    const insns = encodeInsns([
      { code: 0x18, dst: 1, src: 1, imm: 3 }, { code: 0 },
      { code: 0x18, dst: 2, src: 2, imm: 4 }, { code: 0, imm: 16 },
      mov0, exit,
    ]);
    const j = judgeProgram(decodeProgram(insns), 'GPL', [3, 4], policy());
    expect(j.usedHandles).toEqual([3, 4]);
    expect(j.decoded.mapRefs.map((m) => [m.index, m.src, m.handle, m.offset])).toEqual([[0, 1, 3, 0], [2, 2, 4, 16]]);
    const out = rewriteMapRefs(j, (h) => 100 + h);
    const v = new DataView(out.buffer);
    expect(v.getInt32(4, true)).toBe(103);
    expect(v.getInt32(20, true)).toBe(104);
    expect(v.getInt32(28, true)).toBe(16);
    expect(new DataView(insns.buffer).getInt32(4, true)).toBe(3);

    const unknown = refusal(checkProgram(insns, 'GPL', [3, 9], policy()));
    expect(unknown.status).toBe(Status.BAD_MAP_HANDLE);
    expect(unknown.code).toBe('bad-map-handle');
    expect(unknown.detail.a).toBe(9);
    const undeclared = refusal(checkProgram(insns, 'GPL', [3], policy()));
    expect(undeclared.status).toBe(Status.BAD_MAP_HANDLE);
    expect(undeclared.code).toBe('map-not-declared');
    expect(undeclared.detail).toMatchObject({ a: 4, b: 2 });
  });

  it('syntax: a truncated ld_imm64, a malformed second half and a ragged length are BAD_REQUEST; bpf-to-bpf calls pass', () => {
    expect(refusal(checkProgram(encodeInsns([{ code: 0x18, dst: 1, imm: 1 }]), 'GPL', [], policy())))
      .toMatchObject({ status: Status.BAD_REQUEST, code: 'truncated-ld-imm64' });
    expect(refusal(checkProgram(encodeInsns([{ code: 0x18, dst: 1 }, { code: 0x07 }, exit]), 'GPL', [], policy())))
      .toMatchObject({ status: Status.BAD_REQUEST, code: 'bad-ld-imm64', detail: { a: 1 } });
    expect(refusal(checkProgram(new Uint8Array(12), 'GPL', [], policy()))).toMatchObject({ status: Status.BAD_REQUEST, code: 'bad-program-length' });
    expect(refusal(checkProgram(new Uint8Array(0), 'GPL', [], policy()))).toMatchObject({ status: Status.BAD_REQUEST, code: 'bad-program-length' });
    const sub = encodeInsns([{ code: 0x85, src: 1, imm: 1 }, exit, mov0, exit]);
    expect(checkProgram(sub, 'GPL', [], policy()).ok).toBe(true);
    const odd = refusal(checkProgram(encodeInsns([{ code: 0x85, src: 5, imm: 1 }, exit]), 'GPL', [], policy()));
    expect(odd.status).toBe(Status.INSN_REFUSED);
    expect(odd.code).toBe('bad-call');
    const fn = refusal(checkProgram(encodeInsns([{ code: 0x18, dst: 2, src: 4, imm: 2 }, { code: 0 }, mov0, exit]), 'GPL', [], policy()));
    expect(fn.status).toBe(Status.INSN_REFUSED);
    expect(fn.code).toBe('callback-refused');
  });

  it('the first offending instruction is the one reported, whatever its kind', () => {
    const insns = encodeInsns([
      mov0, { code: 0x85, imm: 8 /* get_smp_processor_id */ }, { code: 0x85, src: 2, imm: 0 }, { code: 0x85, imm: 6 }, exit,
    ]);
    const e = refusal(checkProgram(insns, 'GPL', [], policy()));
    expect(e.status).toBe(Status.HELPER_NOT_ALLOWED);
    expect(e.code).toBe('helper-not-allowed');
    expect(e.detail).toMatchObject({ a: 8, b: 1 });
    // An operator may allow a helper outside the default list (8 is not never-allowed).
    expect(checkProgram(encodeInsns([mov0, { code: 0x85, imm: 8 }, exit]), 'GPL', [], policy({ allowedHelpers: validateAllowList([8]) })).ok).toBe(true);
    expect(helperName(211)).toBe('bpf_cgrp_storage_delete');
    expect(helperName(9999)).toBe('helper #9999');
  });
});
