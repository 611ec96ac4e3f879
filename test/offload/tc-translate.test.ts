// The XDP → tc translation (issue 18): which programs it takes, which it refuses and why (each
// refusal by its code), and that what it takes loads as a SCHED_CLS program the kernel verifier
// accepts and answers with the verdicts the tap's egress needs (BPF_PROG_TEST_RUN on skbs).
import { describe, test, expect, afterAll } from 'vitest';
import { BpfMap, BpfMapType } from '../../src/sys/bpf/maps.js';
import { BpfProgType, closeBpfFd, progLoadWithLog } from '../../src/sys/bpf/programs.js';
import { encodeInsns, decodeInsn, ldImm64, setInsnImm, Op, Pseudo, PseudoCall, type BpfInsn } from '../../src/sys/bpf/insns.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { NativeBuffer } from '../../src/sys/libc.js';
import { TCX_NEXT, TCX_DROP, TCX_REDIRECT } from '../../src/sys/bpf/tcx.js';
import { translateXdpToTc, composeTc, TcTranslateError, TC_ENTRY_INSNS } from '../../src/offload/tc-translate.js';
import { obj } from './helpers.js';
import { udpFrame } from '../support/frames.js';

const maps: BpfMap[] = [];
const progs: number[] = [];
afterAll(() => {
  for (const p of progs) closeBpfFd(p);
  for (const m of maps) m.close();
});

/** A sample's instructions with its maps created and their fds in place (what the broker's check hands over). */
function sample(name: string): { code: Uint8Array; license: string } {
  const o = obj(name);
  const fds = o.maps.map((m) => {
    const map = BpfMap.create(m.type, m.keySize, m.valueSize, m.maxEntries, { name: 'tct_map' });
    maps.push(map);
    return map.fd;
  });
  const code = o.insns.slice();
  for (const r of o.mapRelocations) setInsnImm(code, r.insnIndex, fds[r.mapIndex]!);
  return { code, license: o.license };
}

function refusal(insns: BpfInsn[] | Uint8Array): string {
  try {
    translateXdpToTc(insns instanceof Uint8Array ? insns : encodeInsns(insns));
  } catch (e) {
    if (e instanceof TcTranslateError) return e.code;
    throw e;
  }
  return 'translated';
}

const ctxLoad = (dst: number, src: number, off: number): BpfInsn => ({ code: Op.LDX_W, dst, src, off });
const exit = (v: number): BpfInsn[] => [{ code: Op.MOV64_IMM, dst: 0, imm: v }, { code: Op.EXIT }];
const STX_DW = 0x7b, LDX_DW = 0x79, ADD64_IMM = 0x07, ADD64_REG = 0x0f, JEQ_IMM = 0x15, JA = 0x05;

/** Loads a translated program as tc and runs it on one frame; returns the verdict as a signed int. */
function runTc(code: Uint8Array, license = 'GPL', frame = udpFrame(1, 60)): { verdict: number; counters: BpfMap } {
  const counters = BpfMap.create(BpfMapType.ARRAY, 4, 32, 1, { name: 'tct_verdicts' });
  maps.push(counters);
  const insns = composeTc(translateXdpToTc(code).code, { countersFd: counters.fd, ifindex: 1 });
  const { fd } = progLoadWithLog(insns, { license, type: BpfProgType.SCHED_CLS, name: 'tct_prog' });
  progs.push(fd);
  const buf = new NativeBuffer(4096);
  try {
    buf.bytes.set(frame, 0);
    const v = new TestRunner(fd).run(buf.address, frame.length, buf.address, 4096);
    return { verdict: v | 0, counters };
  } finally {
    buf.free();
  }
}

function counter(m: BpfMap, at: number): number {
  const v = m.lookup(new Uint8Array(4))!;
  return Number(new DataView(v.buffer, v.byteOffset).getBigUint64(at, true));
}

describe('context accesses are found by data flow and rewritten xdp_md -> __sk_buff', () => {
  test('each xdp_md field maps to its __sk_buff counterpart (data 76, data_end 80, data_meta 140, ingress_ifindex -> ifindex 40, rx_queue_index -> queue_mapping 12)', () => {
    const t = translateXdpToTc(encodeInsns([ctxLoad(2, 1, 0), ctxLoad(3, 1, 4), ctxLoad(4, 1, 8), ctxLoad(5, 1, 12), ctxLoad(0, 1, 16), { code: Op.EXIT }]));
    expect([0, 1, 2, 3, 4].map((i) => decodeInsn(t.code, i).off)).toEqual([76, 80, 140, 40, 12]);
    expect(t.rewrites.map((r) => r.field)).toEqual(['data', 'data_end', 'data_meta', 'ingress_ifindex', 'rx_queue_index']);
  });

  test('the context is followed through moves, a stack spill and fill, and into a subprogram', () => {
    const insns: BpfInsn[] = [
      /* 0 */ { code: Op.MOV64_REG, dst: 6, src: 1 },
      /* 1 */ { code: STX_DW, dst: 10, src: 6, off: -8 },
      /* 2 */ { code: Op.MOV64_IMM, dst: 1, imm: 0 },
      /* 3 */ { code: LDX_DW, dst: 7, src: 10, off: -8 },
      /* 4 */ ctxLoad(2, 7, 4),
      /* 5 */ { code: Op.MOV64_REG, dst: 1, src: 6 },
      /* 6 */ { code: Op.CALL, src: PseudoCall.CALL, imm: 2 }, // -> 9
      /* 7 */ { code: Op.MOV64_IMM, dst: 0, imm: 2 },
      /* 8 */ { code: Op.EXIT },
      /* 9 */ ctxLoad(0, 1, 0),
      /* 10 */ { code: Op.EXIT },
    ];
    const t = translateXdpToTc(encodeInsns(insns));
    expect(t.rewrites.map((r) => r.insn)).toEqual([4, 9]);
    // r1 after `r1 = 0` is not the context: nothing else is touched.
    expect(decodeInsn(t.code, 3).off).toBe(-8);
  });

  test('a fill through a register derived from r10 is followed too', () => {
    const t = translateXdpToTc(encodeInsns([
      { code: STX_DW, dst: 10, src: 1, off: -16 },
      { code: Op.MOV64_REG, dst: 3, src: 10 },
      { code: ADD64_IMM, dst: 3, imm: -16 },
      { code: LDX_DW, dst: 4, src: 3, off: 0 },
      ctxLoad(0, 4, 16),
      { code: Op.EXIT },
    ]));
    expect(t.rewrites).toEqual([{ insn: 4, field: 'rx_queue_index' }]);
  });

  test('a base that is the context on one path and the stack on another is refused (tc-ctx-ambiguous)', () => {
    expect(refusal([
      { code: Op.MOV64_REG, dst: 2, src: 1 },
      { code: JEQ_IMM, dst: 3, imm: 0, off: 1 },
      { code: Op.MOV64_REG, dst: 2, src: 10 },
      ctxLoad(0, 2, -8 + 8),
      { code: Op.EXIT },
    ])).toBe('tc-ctx-ambiguous');
  });

  test('a context pointer stored through a computed stack pointer is refused (tc-ctx-escape)', () => {
    expect(refusal([
      { code: Op.MOV64_IMM, dst: 3, imm: -8 },
      { code: Op.MOV64_REG, dst: 2, src: 10 },
      { code: ADD64_REG, dst: 2, src: 3 },
      { code: STX_DW, dst: 2, src: 1, off: 0 },
      ...exit(2),
    ])).toBe('tc-ctx-escape');
  });

  test('a modified context pointer used as a base is refused (tc-ctx-ambiguous)', () => {
    expect(refusal([{ code: ADD64_IMM, dst: 1, imm: 4 }, { code: ADD64_IMM, dst: 1, imm: -4 }, ctxLoad(0, 1, 0), { code: Op.EXIT }])).toBe('tc-ctx-ambiguous');
  });

  test('loops settle: a context load inside a loop is rewritten', () => {
    const t = translateXdpToTc(encodeInsns([
      { code: Op.MOV64_IMM, dst: 3, imm: 4 },
      /* 1 */ ctxLoad(2, 1, 0),
      { code: ADD64_IMM, dst: 3, imm: -1 },
      { code: 0x55, dst: 3, imm: 0, off: -3 }, // JNE r3, 0, -> 1
      { code: JA, off: 0 },
      ...exit(2),
    ]));
    expect(t.rewrites).toEqual([{ insn: 1, field: 'data' }]);
  });
});

describe('programs kept on test-run, by rule code', () => {
  test('an XDP-only helper (bpf_xdp_adjust_head) is tc-xdp-helper', () => {
    expect(refusal([{ code: Op.MOV64_IMM, dst: 2, imm: 0 }, { code: Op.CALL, imm: 44 }, ...exit(2)])).toBe('tc-xdp-helper');
  });
  test('bpf_tail_call (an object\'s PROG_ARRAY holds XDP programs) is tc-tail-call', () => {
    expect(refusal([{ code: Op.CALL, imm: 12 }, ...exit(2)])).toBe('tc-tail-call');
  });
  test('a helper the translation does not know is tc-helper-unknown', () => {
    expect(refusal([{ code: Op.CALL, imm: 6 }, ...exit(2)])).toBe('tc-helper-unknown');
  });
  test('a callback reference is tc-callback', () => {
    expect(refusal([...ldImm64(2, Pseudo.FUNC, 1), ...exit(2), ...exit(2)])).toBe('tc-callback');
  });
  test('xdp_md.egress_ifindex is tc-ctx-field; a context write is tc-ctx-write', () => {
    expect(refusal([ctxLoad(0, 1, 20), { code: Op.EXIT }])).toBe('tc-ctx-field');
    expect(refusal([{ code: 0x63, dst: 1, src: 2, off: 16 }, ...exit(2)])).toBe('tc-ctx-write');
  });
  test('the context as a helper argument is tc-ctx-escape (stale r1 at a no-argument helper is fine)', () => {
    expect(refusal([{ code: Op.MOV64_REG, dst: 2, src: 1 }, ...ldImm64(1, Pseudo.MAP_FD, 3), { code: Op.CALL, imm: 1 }, ...exit(2)])).toBe('tc-ctx-escape');
    expect(refusal([{ code: Op.CALL, imm: 5 }, ...exit(2)])).toBe('translated');
  });
  test('the tail-call sample object program is refused for its tail call', () => {
    expect(refusal(obj('bad_tail_call').insns)).toBe('tc-tail-call');
  });
});

describe('translated samples load as SCHED_CLS and map verdicts for the tap egress (kernel verifier, BPF_PROG_TEST_RUN)', () => {
  test('xdp_drop -> TC_ACT_SHOT, counted as drop; its own map counts too', () => {
    const s = sample('xdp_drop');
    const r = runTc(s.code, s.license);
    expect(r.verdict).toBe(TCX_DROP);
    expect(counter(r.counters, 8)).toBe(1);
    expect(counter(maps[0]!, 0)).toBe(1);
  });
  test('xdp_pass -> TCX_NEXT (on to the tap fd and any later host filter), counted as pass', () => {
    const s = sample('xdp_pass');
    const r = runTc(s.code, s.license);
    expect(r.verdict).toBe(TCX_NEXT);
    expect(counter(r.counters, 0)).toBe(1);
  });
  test('xdp_tx -> bpf_redirect(tap, BPF_F_INGRESS) = TC_ACT_REDIRECT, counted as tx', () => {
    const s = sample('xdp_tx');
    const r = runTc(s.code, s.license);
    expect(r.verdict).toBe(TCX_REDIRECT);
    expect(counter(r.counters, 16)).toBe(1);
  });
  test('xdp_blocklist (HASH map, packet parsing through data/data_end) translates and passes an unlisted source', () => {
    const s = sample('xdp_blocklist');
    expect(translateXdpToTc(s.code).rewrites.length).toBeGreaterThanOrEqual(2);
    expect(runTc(s.code, s.license).verdict).toBe(TCX_NEXT);
  });
  test('an unknown verdict is dropped and counted as aborted', () => {
    const r = runTc(encodeInsns(exit(77)));
    expect(r.verdict).toBe(TCX_DROP);
    expect(counter(r.counters, 24)).toBe(1);
  });
  test('the guest starts right after the entry block', () => {
    expect(TC_ENTRY_INSNS).toBe(65);
  });
});
