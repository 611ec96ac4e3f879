// Which registers hold the program's context pointer, at every instruction: a small forward
// data-flow pass over the control-flow graph of a raw BPF program (all its bpf-to-bpf
// subprograms), for rewriting context accesses from one program type's context to another's
// (offload/tc-translate.ts: struct xdp_md → struct __sk_buff).
//
// The pass follows r1 at entry through register moves, stack spills and fills (r10-relative,
// and through registers derived from r10 by constant offsets), and bpf-to-bpf call arguments
// and return values. Everything it cannot follow exactly widens: a value is a set of what it
// may be — the unmodified context (C), a pointer into some stack frame (S), anything else (O).
// A memory access is a context access only when its base is exactly {C}; a base that may be
// the context but not surely is reported, and the caller refuses the translation there. The
// verifier's own rules make that sound for programs it already accepted: a context pointer can
// only be held in registers and in 8-byte aligned stack slots ("spilled pointers" — the
// verifier keeps pointer types only there), the context may only be dereferenced unmodified
// ("dereference of modified ctx ptr disallowed"), and one instruction may not see the context
// on one path and another pointer on another ("same insn cannot be used with different pointers").
//
// Pure: instructions in, facts out. No kernel call.

import {
  Op, PseudoCall, BPF_CLASS_MASK, BPF_OP_MASK, BPF_CLASS_JMP, BPF_CLASS_JMP32,
  BPF_CLASS_LD, BPF_CLASS_LDX, BPF_CLASS_ST, BPF_CLASS_STX, BPF_CLASS_ALU64, BPF_OP_JA, BPF_OP_CALL,
  BPF_OP_EXIT, BPF_SIZE_MASK, BPF_SIZE_DW, BPF_MODE_MASK, BPF_MODE_MEM, BPF_MODE_ATOMIC, BPF_SRC_X,
  BPF_ALU_ADD, BPF_ALU_SUB, BPF_ALU_MOV, BPF_ALU_NEG, BPF_ALU_END, BPF_ATOMIC_FETCH, BPF_ATOMIC_CMPXCHG, BPF_ATOMIC_LOAD_ACQ,
  BPF_ATOMIC_STORE_REL, accessBytes, type BpfInsn,
} from '../sys/bpf/insns.js';
import { subprogLayout } from './compose.js';

/** May be the unmodified context pointer. */
export const CTX = 1;
/** May be a pointer into a stack frame. */
export const STACK = 2;
/** May be anything else (scalars, packet, map values, a modified context pointer...). */
export const OTHER = 4;

/** An abstract register or slot value: `m` a set of CTX/STACK/OTHER; `fp` the offset from this frame's r10 when m is exactly STACK and known. */
export interface Val { m: number; fp: number | null }

const V_OTHER: Val = { m: OTHER, fp: null };
const V_CTX: Val = { m: CTX, fp: null };

interface State { regs: Val[]; slots: Map<number, Val> }

/** Helper argument counts the pass needs (a stack pointer argument may be written through); unknown helpers count as 5. */
export type HelperArgs = (id: number) => number;

export interface CtxFlow {
  /** The state before each instruction (null: not reached, or the second half of an ld_imm64). */
  regsAt(insn: number): readonly Val[] | null;
  /** True when some path stores a value that may be the context outside a known stack slot of its own frame. */
  readonly ctxEscapes: { insn: number } | null;
}

export class CtxFlowError extends Error {
  constructor(readonly code: 'ctx-flow-no-convergence', message: string) { super(message); }
}

function same(a: Val, b: Val): boolean { return a.m === b.m && a.fp === b.fp; }

function join(a: Val, b: Val): Val {
  if (same(a, b)) return a;
  const m = a.m | b.m;
  return { m, fp: m === STACK && a.fp === b.fp ? a.fp : null };
}

/** What arithmetic makes of its operands: a context pointer is no longer one (C|O), a stack pointer's offset is lost. */
function arith(m: number): Val {
  let out = 0;
  if (m & CTX) out |= CTX | OTHER;
  if (m & STACK) out |= STACK;
  if (m & OTHER) out |= OTHER;
  return { m: out || OTHER, fp: null };
}

function cloneState(s: State): State {
  return { regs: s.regs.slice(), slots: new Map(s.slots) };
}

/** Joins b into a (in place); returns whether a changed. */
function joinInto(a: State, b: State): boolean {
  let changed = false;
  for (let r = 0; r < 11; r++) {
    const j = join(a.regs[r]!, b.regs[r]!);
    if (!same(j, a.regs[r]!)) { a.regs[r] = j; changed = true; }
  }
  for (const k of new Set([...a.slots.keys(), ...b.slots.keys()])) {
    const x = a.slots.get(k) ?? V_OTHER;
    const j = join(x, b.slots.get(k) ?? V_OTHER);
    if (!same(j, x) || !a.slots.has(k)) { a.slots.set(k, j); changed = changed || !same(j, x); }
  }
  return changed;
}

/** Every slot of the frame may also hold `v` now (a write the pass cannot place). */
function weaken(s: State, v: Val): void {
  for (const [k, x] of s.slots) s.slots.set(k, join(x, v));
}

function entryState(args: readonly Val[]): State {
  const regs: Val[] = Array.from({ length: 11 }, () => V_OTHER);
  for (let r = 1; r <= 5; r++) {
    const a = args[r] ?? V_OTHER;
    // A pointer into the caller's frame is no known slot of the callee's.
    regs[r] = a.m & STACK ? { m: a.m, fp: null } : a;
  }
  regs[10] = { m: STACK, fp: 0 };
  return { regs, slots: new Map() };
}

/**
 * Runs the pass over a program decoded once by the caller (decodeGuestBlock), which walks it
 * again; the context is in r1 when the program starts. Throws CtxFlowError when the states do not settle within a bound (they always should:
 * the value sets are finite and widen monotonically; the bound guards against a bug, not input).
 */
export function analyzeCtxFlow(decoded: readonly Required<BpfInsn>[], helperArgs: HelperArgs): CtxFlow {
  const n = decoded.length;
  const { starts } = subprogLayout(decoded);
  const funcOf = new Int32Array(n);
  for (let f = 0, i = 0; i < n; i++) {
    while (f + 1 < starts.length && starts[f + 1]! <= i) f++;
    funcOf[i] = f;
  }

  let spillsAnywhere = false;
  let escape: { insn: number } | null = null;
  for (let attempt = 0; attempt < 2; attempt++) {
    const before: boolean = spillsAnywhere;
    const inState: (State | null)[] = new Array(n).fill(null);
    const summary: (Val | null)[] = new Array(starts.length).fill(null);
    const returnSites: Set<number>[] = starts.map(() => new Set());
    const work: number[] = [];
    const queued = new Uint8Array(n);
    const push = (i: number) => { if (i >= 0 && i < n && !queued[i]) { queued[i] = 1; work.push(i); } };
    const flow = (to: number, s: State) => {
      if (to < 0 || to >= n) return;
      const cur = inState[to];
      if (!cur) { inState[to] = cloneState(s); push(to); return; }
      if (joinInto(cur, s)) push(to);
    };
    const main = entryState([V_OTHER, V_CTX]);
    flow(0, main);
    let steps = 0;
    const limit = 64 * n + 10_000;
    escape = null;

    while (work.length > 0) {
      if (++steps > limit) throw new CtxFlowError('ctx-flow-no-convergence', `context data-flow did not settle within ${limit} steps`);
      const i = work.pop()!;
      queued[i] = 0;
      const s = cloneState(inState[i]!);
      const { code, dst, src, off, imm } = decoded[i]!;
      const cls = code & BPF_CLASS_MASK;
      const r = s.regs;

      if (cls === BPF_CLASS_LD) {
        if (code === Op.LD_IMM64) { r[dst] = V_OTHER; flow(i + 2, s); continue; }
        // Legacy packet loads (LD_ABS/LD_IND) clobber r0..r5 like a call.
        for (let k = 0; k <= 5; k++) r[k] = V_OTHER;
        flow(i + 1, s);
        continue;
      }

      if (cls === BPF_CLASS_LDX) {
        r[dst] = load(s, r[src]!, off, code, spillsAnywhere);
        flow(i + 1, s);
        continue;
      }

      if (cls === BPF_CLASS_ST || cls === BPF_CLASS_STX) {
        const mode = code & BPF_MODE_MASK;
        if (cls === BPF_CLASS_STX && mode === BPF_MODE_ATOMIC) {
          if (imm === BPF_ATOMIC_LOAD_ACQ) {
            r[dst] = V_OTHER; // base is src; the verifier allows it on scalars only
          } else {
            const value = imm === BPF_ATOMIC_STORE_REL ? r[src]! : V_OTHER;
            if (value.m & CTX) spillsAnywhere = true;
            store(s, r[dst]!, off, code, value);
            if (imm !== BPF_ATOMIC_STORE_REL && (imm & BPF_ATOMIC_FETCH)) {
              if (imm === BPF_ATOMIC_CMPXCHG) r[0] = V_OTHER;
              else r[src] = V_OTHER;
            }
          }
        } else {
          const value = cls === BPF_CLASS_ST ? V_OTHER : r[src]!;
          if (value.m & CTX) {
            spillsAnywhere = true;
            const base = r[dst]!;
            const aligned = base.m === STACK && base.fp !== null && (code & BPF_SIZE_MASK) === BPF_SIZE_DW && (base.fp + off) % 8 === 0;
            if (!aligned && !escape) escape = { insn: i };
          }
          store(s, r[dst]!, off, code, value);
        }
        flow(i + 1, s);
        continue;
      }

      if (cls === BPF_CLASS_JMP || cls === BPF_CLASS_JMP32) {
        const op = code & BPF_OP_MASK;
        if (op === BPF_OP_CALL && cls === BPF_CLASS_JMP) {
          if (src === PseudoCall.CALL) {
            const target = i + imm + 1;
            if (target >= 0 && target < n) {
              const f = funcOf[target]!;
              returnSites[f]!.add(i);
              flow(target, entryState(r));
              const ret = summary[f];
              if (ret) {
                const after = cloneState(s);
                // The callee may have written through any stack pointer it was given.
                if ([1, 2, 3, 4, 5].some((k) => r[k]!.m & STACK)) weaken(after, { m: STACK | OTHER, fp: null });
                for (let k = 1; k <= 5; k++) after.regs[k] = V_OTHER;
                after.regs[0] = ret.m & STACK ? { m: ret.m, fp: null } : ret;
                flow(i + 1, after);
              }
            }
            continue;
          }
          const args = src === PseudoCall.HELPER ? helperArgs(imm) : 5;
          // Helpers write scalars only, through the pointers they are given.
          for (let k = 1; k <= args; k++) if (r[k]!.m & STACK) { weaken(s, V_OTHER); break; }
          for (let k = 0; k <= 5; k++) r[k] = V_OTHER;
          flow(i + 1, s);
          continue;
        }
        if (op === BPF_OP_EXIT) {
          const f = funcOf[i]!;
          if (f !== 0) {
            const cur = summary[f];
            const next = cur ? join(cur, r[0]!) : r[0]!;
            if (!cur || !same(cur, next)) {
              summary[f] = next;
              for (const site of returnSites[f]!) push(site);
            }
          }
          continue;
        }
        if (op === BPF_OP_JA) {
          const rel = cls === BPF_CLASS_JMP32 ? imm : off;
          flow(i + rel + 1, s);
          continue;
        }
        // Conditional jumps (may_goto included): both ways, no refinement.
        flow(i + 1, s);
        flow(i + off + 1, s);
        continue;
      }

      // ALU / ALU64
      const op = code & BPF_OP_MASK;
      // NEG and END read dst only (END's source bit picks the byte order, not a register).
      const x = (code & BPF_SRC_X) !== 0 && op !== BPF_ALU_NEG && op !== BPF_ALU_END;
      if (cls === BPF_CLASS_ALU64 && op === BPF_ALU_MOV) {
        r[dst] = x ? (off === 0 ? r[src]! : arith(r[src]!.m)) : V_OTHER;
      } else if (cls === BPF_CLASS_ALU64 && !x && (op === BPF_ALU_ADD || op === BPF_ALU_SUB) && r[dst]!.m === STACK && r[dst]!.fp !== null) {
        r[dst] = { m: STACK, fp: r[dst]!.fp! + (op === BPF_ALU_ADD ? imm : -imm) };
      } else if (cls === BPF_CLASS_ALU64) {
        r[dst] = arith(r[dst]!.m | (x ? r[src]!.m : 0));
      } else {
        // 32-bit arithmetic on a pointer leaves a scalar; a context pointer stays suspect.
        const m = (op === BPF_ALU_MOV ? 0 : r[dst]!.m) | (x ? r[src]!.m : 0);
        r[dst] = m & CTX ? { m: CTX | OTHER, fp: null } : V_OTHER;
      }
      flow(i + 1, s);
    }

    if (spillsAnywhere === before) {
      return {
        regsAt: (i) => (i >= 0 && i < n ? inState[i]?.regs ?? null : null),
        ctxEscapes: escape,
      };
    }
    // A context pointer is spilled somewhere: loads through stack pointers the pass cannot
    // place may fetch it. Run again with that known from the start.
  }
  throw new CtxFlowError('ctx-flow-no-convergence', 'context data-flow did not settle');
}

function load(s: State, base: Val, off: number, code: number, spills: boolean): Val {
  if (base.m === CTX) return V_OTHER; // a context field: packet pointers and scalars
  if (!(base.m & STACK)) return V_OTHER;
  const dw = (code & BPF_SIZE_MASK) === BPF_SIZE_DW && (code & BPF_MODE_MASK) === BPF_MODE_MEM;
  if (!dw) return V_OTHER; // a partial fill of a spilled pointer is a scalar to the verifier
  if (base.m === STACK && base.fp !== null && (base.fp + off) % 8 === 0) return s.slots.get(base.fp + off) ?? V_OTHER;
  // Somewhere in some frame: whatever a slot may hold.
  return { m: (spills ? CTX : 0) | STACK | OTHER, fp: null };
}

function store(s: State, base: Val, off: number, code: number, value: Val): void {
  if (!(base.m & STACK)) return; // packet, map value, context: no stack slot changes
  const size = accessBytes(code);
  if (base.m === STACK && base.fp !== null) {
    const at = base.fp + off;
    if (size === 8 && at % 8 === 0) { s.slots.set(at, value); return; }
    // A partial write over a spilled pointer turns the slot into plain bytes.
    for (let k = Math.floor(at / 8) * 8; k < at + size; k += 8) s.slots.set(k, V_OTHER);
    return;
  }
  weaken(s, value.m & CTX ? value : { m: value.m | OTHER, fp: null });
}
