/**
 * Datapath counters in shared memory: workers add, the control plane reads, no messages.
 * One row of COUNTERS per queue pair. Float64 holds exact integers up to 2^53.
 */
export const COUNTERS = [
  'rxPackets', 'rxBytes', 'rxDropped', 'rxErrors', 'rxNoBuffers',
  'txPackets', 'txBytes', 'txDropped', 'txErrors',
  'kicks', 'calls', 'jsCopies', 'jsCopyBytes',
  'xdpPass', 'xdpDrop', 'xdpTx', 'xdpAborted',
] as const;
export type Counter = (typeof COUNTERS)[number];
export const C = Object.fromEntries(COUNTERS.map((n, i) => [n, i])) as Record<Counter, number>;

export class DeviceStats {
  readonly shared: SharedArrayBuffer;
  readonly values: Float64Array;
  constructor(readonly pairs: number, shared?: SharedArrayBuffer) {
    this.shared = shared ?? new SharedArrayBuffer(pairs * COUNTERS.length * 8);
    this.values = new Float64Array(this.shared);
  }

  /** Index of a counter of a pair in `values`. */
  static slot(pair: number, c: number): number {
    return pair * COUNTERS.length + c;
  }

  pair(p: number): Record<Counter, number> {
    const out = {} as Record<Counter, number>;
    COUNTERS.forEach((n, i) => { out[n] = this.values[p * COUNTERS.length + i]!; });
    return out;
  }

  total(): Record<Counter, number> {
    const out = {} as Record<Counter, number>;
    COUNTERS.forEach((n, i) => {
      let s = 0;
      for (let p = 0; p < this.pairs; p++) s += this.values[p * COUNTERS.length + i]!;
      out[n] = s;
    });
    return out;
  }
}
