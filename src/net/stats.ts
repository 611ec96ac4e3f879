/**
 * Datapath counters in shared memory: workers add, the control plane reads, no messages.
 * One row of COUNTERS per queue pair. Float64 holds exact integers up to 2^53.
 *
 * Frames that do not get through are counted once, by reason, where they are lost (a
 * Float64Array add; nothing per frame that gets through). The older aggregate names
 * (rxDropped, rxErrors, txDropped, txErrors, jsCopies, jsCopyBytes) are sums of these,
 * computed when read (AGGREGATES). docs/metrics.md says what each counts.
 */
export const COUNTERS = [
  'rxPackets', 'rxBytes',
  /** Bursts that found the guest without a usable receive buffer while the host had frames waiting. */
  'rxNoBuffers',
  /** A host frame larger than the guest buffers posted for it (delivered empty, not cut short). */
  'rxDropOversize',
  /** A guest receive chain the device may not write, or too small for any frame: given back empty. */
  'rxErrBuffer',
  /** The host side of receive failed: readv error, nothing past the vnet header, an AF_XDP descriptor we never posted. */
  'rxErrHost',
  'txPackets', 'txBytes',
  /** A guest frame with no room for an Ethernet header, or asking for a header offload not negotiated. */
  'txErrFrame',
  /** Larger than the host takes (EMSGSIZE, larger than an AF_XDP chunk). */
  'txDropOversize',
  /** The host could not take it now (EAGAIN, ENOBUFS, EINTR). */
  'txDropHostBusy',
  /** The host link is down or gone (ENETDOWN, ENXIO). */
  'txDropLinkDown',
  /** The host refused it as a frame (EINVAL, nothing past the vnet header). */
  'txDropRefused',
  /** A data frame on the offload channel once the guest claimed it (it carries offload messages only). */
  'txDropClaimed',
  /** The host side of transmit failed unexpectedly (writev error, an AF_XDP completion we never posted). */
  'txErrHost',
  /** The guest broke this pair's receive / transmit ring (fail-stop: that ring is no longer served, the frame in hand is lost). */
  'rxRingBroken', 'txRingBroken',
  'kicks', 'calls',
  /** Payload copies in JavaScript (bounce copies) and their bytes, by direction. */
  'rxCopies', 'rxCopyBytes', 'txCopies', 'txCopyBytes',
  'xdpPass', 'xdpDrop', 'xdpTx', 'xdpAborted',
  /** Reply windows opened after a delivery (serve --reply-poll), and those that caught the guest's answer without its kick. */
  'replyPolls', 'replyPollHits',
] as const;
export type Counter = (typeof COUNTERS)[number];
export const C = Object.fromEntries(COUNTERS.map((n, i) => [n, i])) as Record<Counter, number>;

/** The names the control API has always shown, as sums of the counters above. */
export const AGGREGATES = {
  rxDropped: ['rxDropOversize'],
  rxErrors: ['rxErrBuffer', 'rxErrHost'],
  txDropped: ['txDropOversize', 'txDropHostBusy', 'txDropLinkDown', 'txDropRefused', 'txDropClaimed'],
  txErrors: ['txErrFrame', 'txErrHost'],
  jsCopies: ['rxCopies', 'txCopies'],
  jsCopyBytes: ['rxCopyBytes', 'txCopyBytes'],
} as const satisfies Record<string, readonly Counter[]>;
export type Aggregate = keyof typeof AGGREGATES;
export type PairCounters = Record<Counter | Aggregate, number>;

export class DeviceStats {
  readonly shared: SharedArrayBuffer;
  readonly values: Float64Array;
  /**
   * Counters kept outside shared memory (the verdicts of a program the port runs in the
   * kernel, which no worker sees), added to one pair's row when read.
   */
  private external: { pair: number; read: () => Partial<Record<Counter, number>> } | null = null;
  constructor(readonly pairs: number, shared?: SharedArrayBuffer) {
    this.shared = shared ?? new SharedArrayBuffer(pairs * COUNTERS.length * 8);
    this.values = new Float64Array(this.shared);
  }

  /** Main thread only: a source of counters read on every pair()/total() and added to `pair`'s row. */
  setExternal(pair: number, read: () => Partial<Record<Counter, number>>): void {
    this.external = { pair, read };
  }

  private addExternal(out: PairCounters, pair: number | null): void {
    const x = this.external;
    if (!x || (pair !== null && pair !== x.pair)) return;
    for (const [k, v] of Object.entries(x.read()) as [Counter, number][]) out[k] += v;
  }

  /** Index of a counter of a pair in `values`. */
  static slot(pair: number, c: number): number {
    return pair * COUNTERS.length + c;
  }

  /** One pair's counters (read without locking: each value is one aligned 8-byte store). */
  pair(p: number): PairCounters {
    const out = {} as PairCounters;
    COUNTERS.forEach((n, i) => { out[n] = this.values[p * COUNTERS.length + i]!; });
    this.addExternal(out, p);
    return withAggregates(out);
  }

  total(): PairCounters {
    const out = {} as PairCounters;
    COUNTERS.forEach((n, i) => {
      let s = 0;
      for (let p = 0; p < this.pairs; p++) s += this.values[p * COUNTERS.length + i]!;
      out[n] = s;
    });
    this.addExternal(out, null);
    return withAggregates(out);
  }
}

function withAggregates(out: PairCounters): PairCounters {
  for (const [name, parts] of Object.entries(AGGREGATES) as [Aggregate, readonly Counter[]][]) {
    out[name] = parts.reduce((s, c) => s + out[c], 0);
  }
  return out;
}
