// The guest's XDP program made into a tc program for a tap's egress (issue 18): host→guest
// frames leave the host stack through the tap's transmit (tun_net_xmit), and tcx egress runs
// before it with direct packet access, so a frame the program drops never reaches the tap's
// fd, and costs no syscall at all.
//
// Two steps:
//  1. translateXdpToTc rewrites the guest's context accesses from struct xdp_md to struct
//     __sk_buff. Which registers hold the context comes from offload/ctx-flow.ts; anything it
//     cannot prove — a base that may or may not be the context, a context pointer stored where
//     the pass loses it, a helper without a tc counterpart of the same meaning — refuses the
//     translation with a code, and the caller keeps the program on BPF_PROG_TEST_RUN.
//  2. composeTc builds the tc program: a fixed entry that puts an out-of-band VLAN tag into
//     the frame's bytes and pulls the whole frame into the linear area (so the program sees
//     what XDP on the frame read from the tap saw), calls the rewritten guest as a
//     bpf-to-bpf subprogram and maps its verdict, the same layout as the xsk composer
//     (offload/compose.ts), whose guest-block check it reuses.
// The kernel verifier checks the result: a wrong rewrite is refused at load, never run.

import {
  encodeInsns, countInto, jeqR0, BPF_INSN_SIZE, Op, Pseudo, PseudoCall, Helper, BPF_CLASS_MASK, BPF_OP_MASK,
  BPF_CLASS_JMP, BPF_CLASS_LD, BPF_CLASS_LDX, BPF_CLASS_ST, BPF_CLASS_STX, BPF_OP_CALL, BPF_SIZE_MASK, BPF_SIZE_W,
  BPF_MODE_MASK, BPF_MODE_MEM, BPF_MODE_ATOMIC, BPF_ATOMIC_LOAD_ACQ, BPF_ATOMIC_STORE_REL, type BpfInsn,
} from '../sys/bpf/insns.js';
import { XDP_DROP, XDP_PASS, XDP_TX } from '../sys/bpf/xdp.js';
import { TCX_NEXT, TCX_DROP, BPF_F_INGRESS } from '../sys/bpf/tcx.js';
import { VxError } from '../errors.js';
import { analyzeCtxFlow, CtxFlowError, CTX } from './ctx-flow.js';
import { decodeGuestBlock, ComposeError } from './compose.js';
import { helperId, helperName } from './program-check.js';

export type TcRefusal =
  | 'tc-xdp-helper' | 'tc-helper-unknown' | 'tc-tail-call' | 'tc-kfunc' | 'tc-callback' | 'tc-legacy-packet-access'
  | 'tc-ctx-field' | 'tc-ctx-access-size' | 'tc-ctx-write' | 'tc-ctx-ambiguous' | 'tc-ctx-escape' | 'tc-ctx-flow'
  | 'tc-bad-program';

/** A program this translation will not make into a tc program; `insn` is the guest-relative instruction (-1: the whole program). */
export class TcTranslateError extends VxError {
  constructor(code: TcRefusal, message: string, readonly insn: number) {
    super(code, message);
  }
}

/** struct __sk_buff offsets the translation and the entry read (uapi linux/bpf.h). */
const SKB = {
  len: 0, queueMapping: 12, protocol: 16, vlanPresent: 20, vlanTci: 24, vlanProto: 28, ifindex: 40, data: 76, dataEnd: 80, dataMeta: 140,
} as const;

/**
 * struct xdp_md field → struct __sk_buff field (uapi linux/bpf.h). XDP allows only 4-byte reads
 * of these (xdp_is_valid_access: "size != sizeof(__u32)" refused, no writes), so a context
 * access is one LDX_W whose offset is rewritten; tc reads the same pointers and values as u32
 * too (the verifier widens data/data_end/data_meta to pointers in both).
 * - data, data_end, data_meta: the frame (skb->data is the Ethernet header at tc egress).
 * - ingress_ifindex → ifindex: the host device the program runs at, the tap (on the xsk port
 *   it is the veth end's; on BPF_PROG_TEST_RUN it was loopback's, an artifact of test-run).
 * - rx_queue_index → queue_mapping: the tap queue the frame is going to = the guest's pair, as
 *   the xsk port's rx_queue_index is.
 * egress_ifindex is readable only by devmap programs (the verifier refused it already).
 */
const CTX_FIELD = new Map<number, { name: string; skbOffset: number }>([
  [0, { name: 'data', skbOffset: SKB.data }],
  [4, { name: 'data_end', skbOffset: SKB.dataEnd }],
  [8, { name: 'data_meta', skbOffset: SKB.dataMeta }],
  [12, { name: 'ingress_ifindex', skbOffset: SKB.ifindex }],
  [16, { name: 'rx_queue_index', skbOffset: SKB.queueMapping }],
]);

/** Helpers with the same meaning and signature for XDP and tc programs: id → argument count. */
const TC_HELPER_ARGS = new Map<number, number>(([
  ['map_lookup_elem', 2], ['map_update_elem', 4], ['map_delete_elem', 2], ['ktime_get_ns', 0],
  ['get_prandom_u32', 0], ['get_smp_processor_id', 0], ['csum_diff', 5], ['ktime_get_boot_ns', 0],
  ['map_lookup_percpu_elem', 3],
] as const).map(([name, args]) => [helperId(name), args]));

/** Helpers that exist for XDP only (their context is an xdp_buff): such a program stays on test-run. */
const XDP_ONLY_HELPERS = new Set<number>([
  'xdp_adjust_head', 'xdp_adjust_meta', 'xdp_adjust_tail', 'xdp_output', 'xdp_get_buff_len', 'xdp_load_bytes', 'xdp_store_bytes',
].map(helperId));

export interface TcTranslation {
  /** The guest's instructions with context accesses rewritten (host map fds untouched). */
  code: Uint8Array;
  /** Context reads rewritten, for logs and tests. */
  rewrites: { insn: number; field: string }[];
}

/**
 * Rewrites a checked guest XDP program (host map fds in its ld_imm64s) for the tc hook, or
 * throws TcTranslateError naming the first thing it cannot prove.
 */
export function translateXdpToTc(guest: Uint8Array): TcTranslation {
  // Decoded once here; the policy walk, the data-flow pass and the rewrite all read this.
  let insns: Required<BpfInsn>[];
  try {
    insns = decodeGuestBlock(guest);
  } catch (e) {
    if (e instanceof ComposeError) throw new TcTranslateError('tc-bad-program', e.message, e.insn);
    throw e;
  }
  const n = insns.length;
  // Policy first (cheap, and names the helper an operator will recognise).
  for (let i = 0; i < n; i++) {
    const { code, src, imm } = insns[i]!;
    if (code === Op.LD_IMM64) {
      if (src === Pseudo.FUNC) throw new TcTranslateError('tc-callback', `instruction ${i}: a callback function reference (bpf_loop and friends): the translation does not follow the context into callbacks`, i);
      i++;
      continue;
    }
    if ((code & BPF_CLASS_MASK) === BPF_CLASS_LD) {
      throw new TcTranslateError('tc-legacy-packet-access', `instruction ${i}: legacy packet load (LD_ABS/LD_IND) reads r6 as an skb`, i);
    }
    if (code !== Op.CALL) continue;
    if (src === PseudoCall.KFUNC_CALL) throw new TcTranslateError('tc-kfunc', `instruction ${i}: kfunc call`, i);
    if (src !== PseudoCall.HELPER) continue;
    if (imm === Helper.TAIL_CALL) {
      throw new TcTranslateError('tc-tail-call', `instruction ${i}: bpf_tail_call: the PROG_ARRAY holds XDP programs, and a tc program may only tail-call programs of its own type (the verifier checks the array's owner type)`, i);
    }
    if (XDP_ONLY_HELPERS.has(imm)) throw new TcTranslateError('tc-xdp-helper', `instruction ${i}: helper ${helperName(imm)} (${imm}) exists for XDP only`, i);
    if (!TC_HELPER_ARGS.has(imm)) throw new TcTranslateError('tc-helper-unknown', `instruction ${i}: helper ${imm} has no tc counterpart this translation knows to mean the same`, i);
  }

  let flow;
  try {
    flow = analyzeCtxFlow(insns, (id) => TC_HELPER_ARGS.get(id) ?? 5);
  } catch (e) {
    if (e instanceof CtxFlowError) throw new TcTranslateError('tc-ctx-flow', e.message, -1);
    throw e;
  }
  if (flow.ctxEscapes) {
    const i = flow.ctxEscapes.insn;
    throw new TcTranslateError('tc-ctx-escape', `instruction ${i}: the context pointer is stored where the data-flow pass cannot follow it (not an aligned 8-byte slot of its own frame)`, i);
  }

  const out = guest.slice();
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const rewrites: { insn: number; field: string }[] = [];
  for (let i = 0; i < n; i++) {
    const { code, dst, src, off, imm } = insns[i]!;
    if (code === Op.LD_IMM64) { i++; continue; }
    const regs = flow.regsAt(i);
    if (!regs) continue; // unreached: the verifier refuses unreachable instructions itself
    const cls = code & BPF_CLASS_MASK;
    const mode = code & BPF_MODE_MASK;
    const loadBase = cls === BPF_CLASS_LDX || (cls === BPF_CLASS_STX && mode === BPF_MODE_ATOMIC && imm === BPF_ATOMIC_LOAD_ACQ) ? src : -1;
    const storeBase = cls === BPF_CLASS_ST || (cls === BPF_CLASS_STX && !(mode === BPF_MODE_ATOMIC && imm === BPF_ATOMIC_LOAD_ACQ)) ? dst : -1;
    if (loadBase >= 0) {
      const b = regs[loadBase]!;
      if (!(b.m & CTX)) continue;
      if (b.m !== CTX) throw new TcTranslateError('tc-ctx-ambiguous', `instruction ${i}: r${loadBase} may be the context pointer on one path and something else on another (or a modified one)`, i);
      if (cls !== BPF_CLASS_LDX || mode !== BPF_MODE_MEM || (code & BPF_SIZE_MASK) !== BPF_SIZE_W) {
        throw new TcTranslateError('tc-ctx-access-size', `instruction ${i}: context read that is not a plain 4-byte load`, i);
      }
      const field = CTX_FIELD.get(off);
      if (!field) throw new TcTranslateError('tc-ctx-field', `instruction ${i}: xdp_md offset ${off} has no __sk_buff counterpart`, i);
      view.setInt16(i * BPF_INSN_SIZE + 2, field.skbOffset, true);
      rewrites.push({ insn: i, field: field.name });
      continue;
    }
    if (storeBase >= 0) {
      if (regs[storeBase]!.m & CTX) throw new TcTranslateError('tc-ctx-write', `instruction ${i}: store through a register that may be the context pointer`, i);
      // Spills of the context were followed by the pass (ctxEscapes covers the rest).
      continue;
    }
    if (cls === BPF_CLASS_JMP && (code & BPF_OP_MASK) === BPF_OP_CALL && src === PseudoCall.HELPER) {
      const args = TC_HELPER_ARGS.get(imm)!;
      for (let k = 1; k <= args; k++) {
        if (regs[k]!.m & CTX) throw new TcTranslateError('tc-ctx-escape', `instruction ${i}: the context pointer may be argument ${k} of helper ${helperName(imm)}`, i);
      }
    }
  }
  return { code: out, rewrites };
}

const R0 = 0, R1 = 1, R2 = 2, R3 = 3, R4 = 4, R5 = 5, R6 = 6, R7 = 7, R8 = 8;
const HELPER_SKB_VLAN_POP = helperId('skb_vlan_pop');
const HELPER_SKB_CHANGE_HEAD = helperId('skb_change_head');
const HELPER_SKB_PULL_DATA = helperId('skb_pull_data');
const HELPER_REDIRECT = helperId('redirect');

/** Byte offsets of the verdict counters in the one-element ARRAY the entry counts into (u64 each). */
export const TcCounter = { pass: 0, drop: 8, tx: 16, aborted: 24 } as const;
export const TC_COUNTERS_BYTES = 32;

/** ETH_P_8021Q / ETH_P_8021AD as a 16-bit load of the big-endian field reads them on x86-64 (little-endian). */
const PROTO_8021Q_AS_READ = 0x0081;
const PROTO_8021AD_AS_READ = 0xa888;

function entryBlock(countersFd: number, ifindex: number): BpfInsn[] {
  const PULL = 30, ABORTED = 39, DROP = ABORTED + 6, PASS = DROP + 6, TX = PASS + 6;
  const to = (at: number, target: number) => target - at - 1;
  return [
    /* 0 */ { code: Op.MOV64_REG, dst: R6, src: R1 }, // the skb survives the calls in a callee-saved register
    // A frame whose VLAN tag travels out of band (skb->vlan_present: a VLAN device or a bridge
    // above the tap) has no tag in its bytes yet; tun_put_user inserts it when the frame is
    // read, so XDP on the test-run path saw it. Put it in the bytes here so the program sees
    // what it would have: pop the out-of-band tag, push 4 bytes at the front, move the MACs
    // down and write proto and TCI after them. A frame that carries a tag in its bytes as well
    // (QinQ) is left alone: skb_vlan_pop would move that inner tag out of band.
    /* 1 */ { code: Op.LDX_W, dst: R2, src: R6, off: SKB.vlanPresent },
    /* 2 */ { code: Op.JEQ_IMM, dst: R2, imm: 0, off: to(2, PULL) },
    /* 3 */ { code: Op.LDX_W, dst: R2, src: R6, off: SKB.protocol },
    /* 4 */ { code: Op.JEQ_IMM, dst: R2, imm: PROTO_8021Q_AS_READ, off: to(4, PULL) },
    /* 5 */ { code: Op.JEQ_IMM, dst: R2, imm: PROTO_8021AD_AS_READ, off: to(5, PULL) },
    /* 6 */ { code: Op.LDX_W, dst: R7, src: R6, off: SKB.vlanTci },
    /* 7 */ { code: Op.LDX_W, dst: R8, src: R6, off: SKB.vlanProto },
    /* 8 */ { code: Op.MOV64_REG, dst: R1, src: R6 },
    /* 9 */ { code: Op.CALL, imm: HELPER_SKB_VLAN_POP },
    /* 10 */ { code: Op.JNE_IMM, dst: R0, imm: 0, off: to(10, ABORTED) },
    /* 11 */ { code: Op.MOV64_REG, dst: R1, src: R6 },
    /* 12 */ { code: Op.MOV64_IMM, dst: R2, imm: 4 },
    /* 13 */ { code: Op.MOV64_IMM, dst: R3, imm: 0 },
    /* 14 */ { code: Op.CALL, imm: HELPER_SKB_CHANGE_HEAD },
    /* 15 */ { code: Op.JNE_IMM, dst: R0, imm: 0, off: to(15, ABORTED) },
    /* 16 */ { code: Op.LDX_W, dst: R2, src: R6, off: SKB.data },
    /* 17 */ { code: Op.LDX_W, dst: R3, src: R6, off: SKB.dataEnd },
    /* 18 */ { code: Op.MOV64_REG, dst: R4, src: R2 },
    /* 19 */ { code: Op.ADD64_IMM, dst: R4, imm: 18 },
    /* 20 */ { code: Op.JGT_REG, dst: R4, src: R3, off: to(20, ABORTED) },
    // Ascending 4-byte moves: each source lies ahead of its destination.
    /* 21 */ { code: Op.LDX_W, dst: R5, src: R2, off: 4 }, { code: Op.STX_W, dst: R2, src: R5, off: 0 },
    /* 23 */ { code: Op.LDX_W, dst: R5, src: R2, off: 8 }, { code: Op.STX_W, dst: R2, src: R5, off: 4 },
    /* 25 */ { code: Op.LDX_W, dst: R5, src: R2, off: 12 }, { code: Op.STX_W, dst: R2, src: R5, off: 8 },
    /* 27 */ { code: Op.STX_H, dst: R2, src: R8, off: 12 }, // vlan_proto is kept in network order
    /* 28 */ { code: Op.BE16, dst: R7, imm: 16 }, // vlan_tci in host order
    /* 29 */ { code: Op.STX_H, dst: R2, src: R7, off: 14 },
    // bpf_skb_pull_data(skb, skb->len): the whole frame into the linear area, where direct
    // packet access reaches (data_end is the end of the linear part at tc).
    /* 30 PULL */ { code: Op.MOV64_REG, dst: R1, src: R6 },
    /* 31 */ { code: Op.LDX_W, dst: R2, src: R6, off: SKB.len },
    /* 32 */ { code: Op.CALL, imm: HELPER_SKB_PULL_DATA },
    /* 33 */ { code: Op.JNE_IMM, dst: R0, imm: 0, off: to(33, ABORTED) },
    /* 34 */ { code: Op.MOV64_REG, dst: R1, src: R6 },
    /* 35 */ { code: Op.CALL, src: PseudoCall.CALL, imm: TC_ENTRY_INSNS - 36 },
    // The kernel reads an XDP verdict as u32: compare the low 32 bits only.
    /* 36 */ jeqR0(36, XDP_PASS, PASS),
    /* 37 */ jeqR0(37, XDP_DROP, DROP),
    /* 38 */ jeqR0(38, XDP_TX, TX),
    // XDP_ABORTED, XDP_REDIRECT (the guest cannot set a target), unknown values, a frame that
    // could not be pulled or tagged: dropped and counted, as the test-run path does.
    /* 39 ABORTED */ ...countInto(countersFd, TcCounter.aborted), { code: Op.MOV64_IMM, dst: R0, imm: TCX_DROP }, { code: Op.EXIT },
    /* 45 */ ...countInto(countersFd, TcCounter.drop), { code: Op.MOV64_IMM, dst: R0, imm: TCX_DROP }, { code: Op.EXIT },
    // PASS goes on as TCX_NEXT, not TC_ACT_OK: programs the host attached after ours, and its
    // own classic tc filters, still see the frame (the guest must not bypass host policy).
    /* 51 */ ...countInto(countersFd, TcCounter.pass), { code: Op.MOV64_IMM, dst: R0, imm: TCX_NEXT }, { code: Op.EXIT },
    // XDP_TX: back to the host as if the tap had received it, as writing it into the tap fd
    // does on the test-run path; bpf_redirect returns TC_ACT_REDIRECT.
    /* 57 */ ...countInto(countersFd, TcCounter.tx),
    { code: Op.MOV64_IMM, dst: R1, imm: ifindex },
    { code: Op.MOV64_IMM, dst: R2, imm: BPF_F_INGRESS },
    { code: Op.CALL, imm: HELPER_REDIRECT },
    { code: Op.EXIT },
  ];
}

/** Where the guest's first instruction lands in the composed tc program. */
export const TC_ENTRY_INSNS = 65;

/** The tc program: the entry above, then the translated guest (TcTranslation.code). */
export function composeTc(translated: Uint8Array, opts: { countersFd: number; ifindex: number }): Uint8Array {
  if (!Number.isInteger(opts.ifindex) || opts.ifindex <= 0 || opts.ifindex > 0x7fffffff) throw new RangeError(`ifindex ${opts.ifindex}`);
  if (!Number.isInteger(opts.countersFd) || opts.countersFd < 0) throw new RangeError(`counters fd ${opts.countersFd}`);
  const entry = encodeInsns(entryBlock(opts.countersFd, opts.ifindex));
  if (entry.byteLength !== TC_ENTRY_INSNS * BPF_INSN_SIZE) throw new Error('composeTc: entry block length drifted from TC_ENTRY_INSNS');
  const out = new Uint8Array(entry.byteLength + translated.byteLength);
  out.set(entry, 0);
  out.set(translated, entry.byteLength);
  return out;
}
