// The XDP program the broker attaches on an xsk port's veth end (DESIGN.md decision 7): a
// fixed entry block, then the guest's program as a bpf-to-bpf subprogram, then the entry
// turns the guest's verdict into what the port needs. freplace (BPF_PROG_TYPE_EXT) is
// refused on this kernel, so composition happens at the instruction level instead.
//
// Layout of the composed instructions:
//   [0, ENTRY_INSNS)           entry: r6 = ctx; call guest; map r0
//   [ENTRY_INSNS, +guest)      the guest's instructions, unchanged
// Relative jump and call offsets inside the guest stay valid because the guest is one
// contiguous block; the composer only refuses guests whose offsets leave that block (the
// verifier would see such a target as a jump into the entry).
//
// The entry needs no stack: the 'aborted' counter is reached through a direct map-value
// load (BPF_PSEUDO_MAP_VALUE on a one-element ARRAY), not bpf_map_lookup_elem, so the guest
// keeps the whole 512-byte stack budget.

import { BpfMap, BpfMapType } from '../sys/bpf/maps.js';
import { BpfProgType, closeBpfFd, progLoadWithLog } from '../sys/bpf/programs.js';
import { progInfo } from '../sys/bpf/info.js';
import { XDP_DROP, XDP_PASS, XDP_TX } from '../sys/bpf/xdp.js';
import {
  encodeInsns, decodeInsn, decodeInsns, countInto, jeqR0, redirectToQueueSocket, Op, Pseudo, PseudoCall, Helper, BPF_INSN_SIZE,
  BPF_CLASS_MASK, BPF_OP_MASK, BPF_CLASS_JMP, BPF_CLASS_JMP32, BPF_OP_JA, BPF_OP_CALL, BPF_OP_EXIT, type BpfInsn,
} from '../sys/bpf/insns.js';
import { VxError } from '../errors.js';
import { btfLoad, funcBtf, funcBtfTypeId } from '../sys/bpf/btf.js';

export interface ComposeOptions {
  /** XSKMAP with one AF_XDP socket per queue index. */
  xskMapFd: number;
}

type Transfer = 'jump' | 'call' | 'callback';
const TRANSFER_TEXT: Record<Transfer, string> = { jump: 'jump', call: 'subprogram call', callback: 'callback reference' };

/**
 * A guest program the composer cannot place safely; `insn` is the guest-relative index,
 * `target` where its jump, call or callback reference would land (null for length errors).
 */
export class ComposeError extends VxError {
  constructor(code: 'compose-bad-length' | 'compose-too-long' | 'compose-truncated-ld-imm64' | `compose-${Transfer}-outside` | 'compose-target-mid-ld-imm64',
    message: string, readonly insn: number, readonly target: number | null = null) {
    super(code, message);
  }
}

/** The kernel's cap on a program's length (BPF_COMPLEXITY_LIMIT_INSNS). */
const MAX_PROG_INSNS = 1_000_000;

const R0 = 0, R1 = 1, R6 = 6;
/** enum bpf_attach_type BPF_XDP */
const BPF_XDP_ATTACH = 37;

function entryBlock(xskMapFd: number, abortedMapFd: number): BpfInsn[] {
  // Indices are fixed; the assertion in composeXdp keeps them honest.
  const LABEL_DROP = 9, LABEL_TX = 11, LABEL_REDIRECT = 13;
  return [
    /* 0 */ { code: Op.MOV64_REG, dst: R6, src: R1 },   // ctx survives the call in a callee-saved register
    /* 1 */ { code: Op.CALL, src: PseudoCall.CALL, imm: ENTRY_INSNS - 2 },
    // The kernel reads an XDP verdict as u32, so compare the low 32 bits only.
    /* 2 */ jeqR0(2, XDP_PASS, LABEL_REDIRECT),
    /* 3 */ jeqR0(3, XDP_DROP, LABEL_DROP),
    /* 4 */ jeqR0(4, XDP_TX, LABEL_TX),
    // XDP_ABORTED, XDP_REDIRECT (the guest cannot set a target) and unknown values.
    /* 5 */ ...countInto(abortedMapFd),
    /* 9 */ { code: Op.MOV64_IMM, dst: R0, imm: XDP_DROP },
    /* 10 */ { code: Op.EXIT },
    /* 11 */ { code: Op.MOV64_IMM, dst: R0, imm: XDP_TX },
    /* 12 */ { code: Op.EXIT },
    // bpf_redirect_map(xskmap, ctx->rx_queue_index, XDP_DROP): a queue without a socket drops instead of aborting.
    /* 13 */ ...redirectToQueueSocket(R6, xskMapFd, XDP_DROP),
  ];
}

/** Where the guest's first instruction lands in the composed program. */
export const ENTRY_INSNS = 19;

function checkFd(what: string, fd: number): void {
  if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) throw new RangeError(`${what} ${fd} is not a file descriptor`);
}

/**
 * Refuses a guest whose jumps, calls or callback references leave its own block, and a
 * truncated ld_imm64. Everything else (including what the targets hold) is the verifier's
 * to judge; this only guarantees the guest cannot reach into the entry.
 */
export function checkGuestBlock(guest: Uint8Array): number {
  if (guest.byteLength === 0 || guest.byteLength % BPF_INSN_SIZE !== 0) {
    throw new ComposeError('compose-bad-length', `guest program is ${guest.byteLength} bytes, not a non-zero multiple of 8`, 0);
  }
  const n = guest.byteLength / BPF_INSN_SIZE;
  if (n + ENTRY_INSNS > MAX_PROG_INSNS) {
    throw new ComposeError('compose-too-long', `guest program has ${n} instructions; composed it would exceed ${MAX_PROG_INSNS}`, 0);
  }
  // One instruction at a time: the compose path checks and copies, and keeps no decoded program.
  const secondHalf = new Uint8Array(n);
  const targets: { from: number; to: number; kind: Transfer }[] = [];
  for (let i = 0; i < n; i++) {
    const { code, src, off, imm } = decodeInsn(guest, i);
    if (code === Op.LD_IMM64) {
      if (i + 1 >= n) throw new ComposeError('compose-truncated-ld-imm64', `instruction ${i}: ld_imm64 has no second half`, i);
      if (src === Pseudo.FUNC) targets.push({ from: i, to: i + imm + 1, kind: 'callback' });
      secondHalf[i + 1] = 1;
      i++;
      continue;
    }
    const cls = code & BPF_CLASS_MASK;
    if (cls !== BPF_CLASS_JMP && cls !== BPF_CLASS_JMP32) continue;
    const op = code & BPF_OP_MASK;
    if (op === BPF_OP_EXIT) continue;
    if (op === BPF_OP_CALL) {
      if (cls === BPF_CLASS_JMP && src === PseudoCall.CALL) targets.push({ from: i, to: i + imm + 1, kind: 'call' });
      continue;
    }
    // JMP32|JA (gotol) carries its offset in imm; every other jump in off.
    const rel = cls === BPF_CLASS_JMP32 && op === BPF_OP_JA ? imm : off;
    targets.push({ from: i, to: i + rel + 1, kind: 'jump' });
  }
  for (const t of targets) {
    const what = TRANSFER_TEXT[t.kind];
    if (t.to < 0 || t.to >= n) {
      throw new ComposeError(`compose-${t.kind}-outside`, `instruction ${t.from}: ${what} to ${t.to} leaves the guest program (0..${n - 1})`, t.from, t.to);
    }
    if (secondHalf[t.to]) {
      throw new ComposeError('compose-target-mid-ld-imm64', `instruction ${t.from}: ${what} lands in the middle of the ld_imm64 at ${t.to - 1}`, t.from, t.to);
    }
  }
  return n;
}

/** checkGuestBlock, then the decoded instructions, for callers that walk the program again (tc-translate). */
export function decodeGuestBlock(guest: Uint8Array): Required<BpfInsn>[] {
  checkGuestBlock(guest);
  return decodeInsns(guest);
}

/**
 * Builds the instructions of one XDP program: an entry that saves ctx (r1) in r6, calls the
 * guest program as a bpf-to-bpf subprogram, then maps the verdict in r0: XDP_PASS →
 * bpf_redirect_map(xskmap, ctx->rx_queue_index, XDP_DROP); XDP_DROP → XDP_DROP; XDP_TX →
 * XDP_TX; anything else → aborted counter += 1 and XDP_DROP. `guestInsns` must already carry
 * host map fds in its ld_imm64s; they are copied unchanged.
 */
export function composeXdp(guestInsns: Uint8Array, opts: ComposeOptions & { abortedMapFd: number }): Uint8Array {
  checkFd('xskMapFd', opts.xskMapFd);
  checkFd('abortedMapFd', opts.abortedMapFd);
  const n = checkGuestBlock(guestInsns);
  const entry = encodeInsns(entryBlock(opts.xskMapFd, opts.abortedMapFd));
  if (entry.byteLength !== ENTRY_INSNS * BPF_INSN_SIZE) throw new Error('compose: entry block length drifted from ENTRY_INSNS');
  const out = new Uint8Array((ENTRY_INSNS + n) * BPF_INSN_SIZE);
  out.set(entry, 0);
  out.set(guestInsns, entry.byteLength);
  return out;
}

/**
 * Where each subprogram of a program starts (the kernel's own split: instruction 0 and every
 * bpf-to-bpf call or callback target), and whether any calls bpf_tail_call.
 */
export function subprogLayout(insns: Uint8Array | readonly Required<BpfInsn>[]): { starts: number[]; tailCall: boolean } {
  // Encoded (the compose path: decoded one at a time) or already decoded (tc-translate's).
  const bytes = insns instanceof Uint8Array ? insns : null;
  const decoded = bytes ? null : insns as readonly Required<BpfInsn>[];
  const n = bytes ? bytes.byteLength / BPF_INSN_SIZE : decoded!.length;
  const starts = new Set<number>([0]);
  let tailCall = false;
  for (let i = 0; i < n; i++) {
    const { code, src, imm } = bytes ? decodeInsn(bytes, i) : decoded![i]!;
    if (code === Op.CALL && src === PseudoCall.CALL) starts.add(i + imm + 1);
    if (code === Op.CALL && src === PseudoCall.HELPER && imm === Helper.TAIL_CALL) tailCall = true;
    if (code === Op.LD_IMM64) {
      if (src === Pseudo.FUNC) starts.add(i + imm + 1);
      i++;
    }
  }
  return { starts: [...starts].filter((x) => x >= 0 && x < n).sort((a, b) => a - b), tailCall };
}

/**
 * Func info for a composed program whose guest part calls bpf_tail_call: the kernel allows a
 * tail call inside a subprogram only with BTF func info (and, on x86-64, within its stack
 * limits). A tail call made there returns to the subprogram's caller, the entry block, so the
 * target's verdict is mapped like the guest's own (docs/offload-protocol.md §8). Null when
 * the program needs none; the caller closes btfFd after the load.
 */
function tailCallFuncInfo(insns: Uint8Array): { btfFd: number; records: Uint8Array } | null {
  const { starts, tailCall } = subprogLayout(insns);
  if (!tailCall) return null;
  const records = new Uint8Array(8 * starts.length);
  const v = new DataView(records.buffer);
  starts.forEach((at, i) => { v.setUint32(8 * i, at, true); v.setUint32(8 * i + 4, funcBtfTypeId(i), true); });
  return { btfFd: btfLoad(funcBtf(starts.length)), records };
}

/** The program used when no guest program is offloaded: redirect every frame to its queue's socket. */
export function plainRedirect(opts: ComposeOptions): Uint8Array {
  checkFd('xskMapFd', opts.xskMapFd);
  return encodeInsns(redirectToQueueSocket(R1, opts.xskMapFd, XDP_DROP));
}

export interface ComposedLoadOptions extends ComposeOptions {
  /** Program name (≤ 15 chars of [A-Za-z0-9_.]); default 'vx_xsk'. */
  name?: string;
  /** Name of the aborted-counter map (≤ 15 chars); default 'vx_aborted'. */
  abortedName?: string;
  /** Verifier log bytes kept on a rejection (see progLoadWithLog). */
  logSize?: number;
}

/** A loaded composed (or plain redirect) program and the aborted counter it owns. */
export class ComposedProgram {
  readonly fd: number;
  readonly id: number;
  readonly tag: string;
  /** Instructions handed to the kernel. */
  readonly insnCount: number;
  /** The guest program's first instruction in the composed program; null for plain redirect. */
  readonly guestOffset: number | null;
  private readonly aborted: BpfMap | null;
  private readonly key = new Uint8Array(4);
  private readonly value = new Uint8Array(8);
  private closed = false;

  private constructor(fd: number, aborted: BpfMap | null, insnCount: number, guestOffset: number | null) {
    const info = progInfo(fd);
    this.fd = fd;
    this.id = info.id;
    this.tag = info.tag;
    this.aborted = aborted;
    this.insnCount = insnCount;
    this.guestOffset = guestOffset;
  }

  /**
   * Composes and loads. With guestInsns null, loads plainRedirect (no counter map). A
   * verifier rejection throws BpfError with the log; a misplaced guest throws ComposeError.
   * license: the guest's (it may call GPL-only helpers).
   */
  static load(guestInsns: Uint8Array | null, opts: ComposedLoadOptions, license: string): ComposedProgram {
    const loadOpts = { license, type: BpfProgType.XDP, name: opts.name ?? 'vx_xsk', ...(opts.logSize ? { logSize: opts.logSize } : {}) };
    if (guestInsns === null) {
      const insns = plainRedirect(opts);
      const { fd } = progLoadWithLog(insns, loadOpts);
      return ComposedProgram.adopt(fd, null, insns.byteLength / BPF_INSN_SIZE, null);
    }
    checkGuestBlock(guestInsns);
    const aborted = BpfMap.create(BpfMapType.ARRAY, 4, 8, 1, { name: opts.abortedName ?? 'vx_aborted' });
    let fd: number;
    let count: number;
    let funcInfo: { btfFd: number; records: Uint8Array } | null = null;
    try {
      const insns = composeXdp(guestInsns, { xskMapFd: opts.xskMapFd, abortedMapFd: aborted.fd });
      count = insns.byteLength / BPF_INSN_SIZE;
      funcInfo = tailCallFuncInfo(insns);
      // A PROG_ARRAY accepts tail calls only from programs of its owner's expected attach type,
      // and libbpf loads SEC("xdp") programs (the targets) as BPF_XDP.
      fd = progLoadWithLog(insns, { ...loadOpts, ...(funcInfo ? { funcInfo, expectedAttachType: BPF_XDP_ATTACH } : {}) }).fd;
    } catch (e) {
      aborted.close();
      throw e;
    } finally {
      if (funcInfo) closeBpfFd(funcInfo.btfFd);
    }
    return ComposedProgram.adopt(fd, aborted, count, ENTRY_INSNS);
  }

  private static adopt(fd: number, aborted: BpfMap | null, count: number, guestOffset: number | null): ComposedProgram {
    try {
      return new ComposedProgram(fd, aborted, count, guestOffset);
    } catch (e) {
      closeBpfFd(fd);
      aborted?.close();
      throw e;
    }
  }

  /** Frames the guest program answered with XDP_ABORTED or an unknown verdict (0 for plain redirect). */
  abortedCount(): number {
    if (!this.aborted || this.closed) return 0;
    const v = this.aborted.lookup(this.key, this.value);
    return v ? Number(new DataView(v.buffer).getBigUint64(0, true)) : 0;
  }

  /** Map id of the aborted counter (null for plain redirect), for leak checks and inspection. */
  abortedMapId(): number | null {
    return this.aborted && !this.closed ? this.aborted.info().id : null;
  }

  /** Closes the program fd and the counter map; an attached program stays attached until detached. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeBpfFd(this.fd);
    this.aborted?.close();
  }
}
