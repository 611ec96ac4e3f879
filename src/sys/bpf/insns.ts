// Instruction encoding (struct bpf_insn: code u8, dst:4|src:4 u8, off s16, imm s32). Pure
// byte layout, no libbpf call: the broker's checks and composer use it without loading anything.

export const BPF_INSN_SIZE = 8;

/** src_reg of an ld_imm64 whose imm is a map fd; of a call to a subprogram; of a kfunc call. */
export const BPF_PSEUDO_MAP_FD = 1;
export const BPF_PSEUDO_MAP_VALUE = 2;
export const BPF_PSEUDO_CALL = 1;
export const BPF_PSEUDO_KFUNC_CALL = 2;

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

/** Reads instruction n of a raw program. */
export function decodeInsn(insns: Uint8Array, n: number): Required<BpfInsn> {
  const o = n * BPF_INSN_SIZE;
  if (n < 0 || o + BPF_INSN_SIZE > insns.byteLength) throw new RangeError(`instruction ${n} out of range`);
  const v = new DataView(insns.buffer, insns.byteOffset + o, BPF_INSN_SIZE);
  const regs = v.getUint8(1);
  return { code: v.getUint8(0), dst: regs & 0xf, src: regs >> 4, off: v.getInt16(2, true), imm: v.getInt32(4, true) };
}
