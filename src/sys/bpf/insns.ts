// The one encoding of BPF instructions (struct bpf_insn, uapi linux/bpf.h):
//   u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm;   little-endian, 8 bytes
// and of the 16-byte ld_imm64 pair ("the only instruction that occupies two slots": its
// second half has code, dst, src and off all zero and carries the upper imm). Pure bytes, no
// native calls: the AF_XDP port (redirect program), the offload checks, the composer and the
// ELF reader all build and read instructions through here, so a field layout or opcode can
// only be wrong in one place. Lives in sys/ so both ports/ and offload/ may import it.

export const BPF_INSN_SIZE = 8;

/** Full opcodes (class | size/source | op, uapi linux/bpf_common.h) this project emits or looks for. */
export const Op = {
  /** BPF_LD | BPF_IMM | BPF_DW: the first half of a 16-byte load */
  LD_IMM64: 0x18,
  /** BPF_LDX | BPF_MEM | BPF_W */
  LDX_W: 0x61,
  /** BPF_ALU64 | BPF_MOV | BPF_K */
  MOV64_IMM: 0xb7,
  /** BPF_ALU64 | BPF_MOV | BPF_X */
  MOV64_REG: 0xbf,
  /** BPF_JMP32 | BPF_JEQ | BPF_K */
  JEQ32_IMM: 0x16,
  /** BPF_JMP | BPF_JNE | BPF_K */
  JNE_IMM: 0x55,
  /** BPF_JMP | BPF_JEQ | BPF_K */
  JEQ_IMM: 0x15,
  /** BPF_JMP | BPF_JGT | BPF_X */
  JGT_REG: 0x2d,
  /** BPF_ALU64 | BPF_ADD | BPF_K */
  ADD64_IMM: 0x07,
  /** BPF_STX | BPF_MEM | BPF_W, and BPF_H */
  STX_W: 0x63,
  STX_H: 0x6b,
  /** BPF_ALU | BPF_END | BPF_TO_BE (imm 16: htons) */
  BE16: 0xdc,
  /** BPF_STX | BPF_ATOMIC | BPF_DW (imm = BPF_ADD: fetch-less add) */
  ATOMIC_DW: 0xdb,
  /** BPF_JMP | BPF_CALL */
  CALL: 0x85,
  /** BPF_JMP | BPF_EXIT */
  EXIT: 0x95,
} as const;

/** Instruction classes (code & 0x07) and jump ops (code & 0xf0) that decide control flow. */
export const BPF_CLASS_MASK = 0x07;
export const BPF_OP_MASK = 0xf0;
export const BPF_CLASS_JMP = 0x05;
export const BPF_CLASS_JMP32 = 0x06;
export const BPF_OP_JA = 0x00;
export const BPF_OP_CALL = 0x80;
export const BPF_OP_EXIT = 0x90;

/** The other classes, and the fields of load/store (size, mode) and ALU (op, source) opcodes. */
export const BPF_CLASS_LD = 0x00;
export const BPF_CLASS_LDX = 0x01;
export const BPF_CLASS_ST = 0x02;
export const BPF_CLASS_STX = 0x03;
export const BPF_CLASS_ALU64 = 0x07;
export const BPF_SIZE_MASK = 0x18;
export const BPF_SIZE_W = 0x00;
export const BPF_SIZE_DW = 0x18;
export const BPF_MODE_MASK = 0xe0;
export const BPF_MODE_MEM = 0x60;
export const BPF_MODE_ATOMIC = 0xc0;
/** ALU source bit: register (BPF_X) rather than immediate (BPF_K). */
export const BPF_SRC_X = 0x08;
export const BPF_ALU_ADD = 0x00;
export const BPF_ALU_SUB = 0x10;
export const BPF_ALU_MOV = 0xb0;
export const BPF_ALU_NEG = 0x80;
export const BPF_ALU_END = 0xd0;
/** BPF_ATOMIC imm: fetch variants write the old value to src (cmpxchg: to r0); load-acquire / store-release (6.15+). */
export const BPF_ATOMIC_FETCH = 0x01;
export const BPF_ATOMIC_CMPXCHG = 0xf1;
export const BPF_ATOMIC_LOAD_ACQ = 0x100;
export const BPF_ATOMIC_STORE_REL = 0x110;

/** Bytes a load/store of this opcode moves. */
export function accessBytes(code: number): number {
  return [4, 2, 1, 8][(code & BPF_SIZE_MASK) >> 3]!;
}

/** ld_imm64 src_reg values (uapi linux/bpf.h, BPF_PSEUDO_*). */
export const Pseudo = {
  MAP_FD: 1, MAP_VALUE: 2, BTF_ID: 3, FUNC: 4, MAP_IDX: 5, MAP_IDX_VALUE: 6,
} as const;
/** call src_reg values: helper (0), bpf-to-bpf (BPF_PSEUDO_CALL), kfunc (BPF_PSEUDO_KFUNC_CALL). */
export const PseudoCall = { HELPER: 0, CALL: 1, KFUNC_CALL: 2 } as const;

export const BPF_PSEUDO_MAP_FD = Pseudo.MAP_FD;
export const BPF_PSEUDO_MAP_VALUE = Pseudo.MAP_VALUE;
export const BPF_PSEUDO_FUNC = Pseudo.FUNC;
export const BPF_PSEUDO_CALL = PseudoCall.CALL;
export const BPF_PSEUDO_KFUNC_CALL = PseudoCall.KFUNC_CALL;

/** Helper ids (enum bpf_func_id) the project's own programs call or policy names. */
export const Helper = { TAIL_CALL: 12, CLONE_REDIRECT: 13, REDIRECT_MAP: 51 } as const;

/** offsetof(struct xdp_md, rx_queue_index) */
export const XDP_MD_RX_QUEUE_INDEX = 16;

export interface BpfInsn { code: number; dst?: number; src?: number; off?: number; imm?: number }

/** Packs instructions into the byte layout bpf_prog_load takes. */
export function encodeInsns(insns: readonly BpfInsn[]): Uint8Array {
  const out = new Uint8Array(insns.length * BPF_INSN_SIZE);
  const v = new DataView(out.buffer);
  insns.forEach((i, n) => {
    const o = n * BPF_INSN_SIZE;
    v.setUint8(o, i.code);
    v.setUint8(o + 1, ((i.src ?? 0) << 4) | ((i.dst ?? 0) & 0xf));
    v.setInt16(o + 2, i.off ?? 0, true);
    v.setInt32(o + 4, i.imm ?? 0, true);
  });
  return out;
}

/** Reads instruction n of a raw program (RangeError when n is outside it). */
export function decodeInsn(insns: Uint8Array, n: number): Required<BpfInsn> {
  const o = n * BPF_INSN_SIZE;
  if (!Number.isInteger(n) || n < 0 || o + BPF_INSN_SIZE > insns.byteLength) throw new RangeError(`instruction ${n} out of range`);
  const v = new DataView(insns.buffer, insns.byteOffset + o, BPF_INSN_SIZE);
  const regs = v.getUint8(1);
  return { code: v.getUint8(0), dst: regs & 0xf, src: regs >> 4, off: v.getInt16(2, true), imm: v.getInt32(4, true) };
}

/** Every instruction of a raw program whose length is a multiple of 8: one decode, for passes that walk it more than once. */
export function decodeInsns(insns: Uint8Array): Required<BpfInsn>[] {
  return Array.from({ length: Math.floor(insns.byteLength / BPF_INSN_SIZE) }, (_, i) => decodeInsn(insns, i));
}

/** Instructions in a raw program, or null when its length is not a non-zero multiple of 8. */
export function insnCount(insns: Uint8Array): number | null {
  return insns.byteLength === 0 || insns.byteLength % BPF_INSN_SIZE !== 0 ? null : insns.byteLength / BPF_INSN_SIZE;
}

/** Overwrites instruction n's imm (map-reference rewrites: handle → fd, index → handle). */
export function setInsnImm(insns: Uint8Array, n: number, imm: number): void {
  decodeInsn(insns, n); // bounds
  new DataView(insns.buffer, insns.byteOffset).setInt32(n * BPF_INSN_SIZE + 4, imm | 0, true);
}

/** Overwrites instruction n's src_reg, keeping dst_reg. */
export function setInsnSrc(insns: Uint8Array, n: number, src: number): void {
  const { dst } = decodeInsn(insns, n);
  insns[n * BPF_INSN_SIZE + 1] = ((src & 0xf) << 4) | dst;
}

/** dst = imm64 as the pair of slots the kernel expects; src is a BPF_PSEUDO_* kind (0 for a plain constant). */
export function ldImm64(dst: number, src: number, imm: number, imm2 = 0): BpfInsn[] {
  return [{ code: Op.LD_IMM64, dst, src, imm }, { code: 0, imm: imm2 }];
}

/** True when `second` is a well-formed second half of an ld_imm64 (only imm may be set). */
export function isLdImm64SecondHalf(second: Required<BpfInsn>): boolean {
  return second.code === 0 && second.dst === 0 && second.src === 0 && second.off === 0;
}

/**
 * return bpf_redirect_map(&xskmap, ctx->rx_queue_index, fallback): every frame goes to its
 * queue's AF_XDP socket; the low bits of flags are the verdict when that slot is empty. Used
 * alone by the xsk port and as the tail of the offload composer's entry block.
 */
export function redirectToQueueSocket(ctxReg: number, xskMapFd: number, fallback: number): BpfInsn[] {
  return [
    { code: Op.LDX_W, dst: 2, src: ctxReg, off: XDP_MD_RX_QUEUE_INDEX },
    ...ldImm64(1, Pseudo.MAP_FD, xskMapFd),
    { code: Op.MOV64_IMM, dst: 3, imm: fallback },
    { code: Op.CALL, imm: Helper.REDIRECT_MAP },
    { code: Op.EXIT },
  ];
}

/**
 * The instruction at index `at` of a block jumping to index `target` when r0's low 32 bits are
 * `value`: how the composers' entries read the verdict the guest's program returned (the
 * kernel takes an XDP verdict as u32).
 */
export function jeqR0(at: number, value: number, target: number): BpfInsn {
  return { code: Op.JEQ32_IMM, dst: 0, imm: value, off: target - at - 1 };
}

/**
 * The u64 at `offset` in the value of a one-element ARRAY += 1, atomically. The value is reached
 * by a direct map-value load (BPF_PSEUDO_MAP_VALUE), not bpf_map_lookup_elem, so the counting
 * needs no stack and no helper; it clobbers r1 and r2. The composers' verdict counters.
 */
export function countInto(mapFd: number, offset = 0): BpfInsn[] {
  return [
    ...ldImm64(1, Pseudo.MAP_VALUE, mapFd, offset),
    { code: Op.MOV64_IMM, dst: 2, imm: 1 },
    { code: Op.ATOMIC_DW, dst: 1, src: 2, off: 0, imm: 0 },
  ];
}

/** r0 = verdict; exit. */
export function returnImm(verdict: number): BpfInsn[] {
  return [{ code: Op.MOV64_IMM, dst: 0, imm: verdict }, { code: Op.EXIT }];
}
