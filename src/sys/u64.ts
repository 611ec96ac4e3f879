// u64 fields (addresses in iovecs, ring descriptors) as JS numbers below 2^53.

/** Reads a little-endian u64. */
export function readU64(v: DataView, off: number): number {
  return v.getUint32(off, true) + v.getUint32(off + 4, true) * 4294967296;
}

/**
 * Writes a non-negative integer below 2^53 as a little-endian u64. `>>> 0` takes the low word
 * by truncation; `% 2 ** 32` on a double is a floating-point modulo, a runtime call in V8 that
 * showed in per-frame profiles.
 */
export function writeU64(v: DataView, off: number, value: number): void {
  const lo = value >>> 0;
  v.setUint32(off, lo, true);
  v.setUint32(off + 4, (value - lo) / 4294967296, true);
}
