import { libbpf, fail } from './libbpf.js';

// A minimal BTF blob the kernel accepts as a program's func info: one `int` type, one
// `int (void)` prototype and one static FUNC per subprogram. The kernel wants func info for a
// program whose subprograms call bpf_tail_call ("tail_call is not allowed in subprogs without
// BTF"); programs composed from raw instructions (offload/compose.ts) carry no BTF of their
// own, so they get this one.

const fn = {
  btf_load: libbpf.func('bpf_btf_load', 'int', ['void *', 'size_t', 'intptr_t']),
};

const BTF_MAGIC = 0xeb9f;
const KIND_INT = 1, KIND_FUNC = 12, KIND_FUNC_PROTO = 13;
/** BTF_INT_SIGNED << 24 | bits 32 */
const INT_SIGNED_32 = 0x01000020;

/** The BTF bytes for `count` subprograms named f0..f<count-1>; FUNC i has type id 3 + i. */
export function funcBtf(count: number): Uint8Array {
  if (!Number.isInteger(count) || count < 1 || count > 65535) throw new RangeError(`funcBtf: ${count} functions`);
  const names = ['', 'int', ...Array.from({ length: count }, (_, i) => `f${i}`)];
  const offs: number[] = [];
  let strs = '';
  for (const n of names) { offs.push(strs.length); strs += `${n}\0`; }
  const words: number[] = [offs[1]!, KIND_INT << 24, 4, INT_SIGNED_32, 0, KIND_FUNC_PROTO << 24, 1];
  for (let i = 0; i < count; i++) words.push(offs[2 + i]!, KIND_FUNC << 24, 2);
  const typeLen = words.length * 4;
  const s = Buffer.from(strs, 'latin1');
  const out = new Uint8Array(24 + typeLen + s.length);
  const v = new DataView(out.buffer);
  v.setUint16(0, BTF_MAGIC, true);
  out[2] = 1;
  v.setUint32(4, 24, true);
  v.setUint32(8, 0, true);
  v.setUint32(12, typeLen, true);
  v.setUint32(16, typeLen, true);
  v.setUint32(20, s.length, true);
  words.forEach((w, i) => v.setUint32(24 + 4 * i, w >>> 0, true));
  out.set(s, 24 + typeLen);
  return out;
}

/** The type id funcBtf gives subprogram i. */
export const funcBtfTypeId = (i: number): number => 3 + i;

/** Loads BTF into the kernel; returns its fd (the caller closes it). */
export function btfLoad(bytes: Uint8Array): number {
  const fd = fn.btf_load(bytes, bytes.byteLength, 0) as number;
  if (fd < 0) fail('bpf_btf_load', fd);
  return fd;
}
