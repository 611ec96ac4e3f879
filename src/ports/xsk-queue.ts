import koffi from 'koffi';
import { FillRing, CompletionRing, RxRing, TxRing, kickTx } from '../sys/xsk.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { DescriptorChain } from '../virtio/descriptor-chain.js';
import { ChainReader, ChainWriter } from '../virtio/chain-io.js';
import type { SocketRingLayouts } from '../sys/xsk.js';
import {
  PORT_COUNTS, PortCount, RX_DROPPED, RX_ERROR, RX_OK, TX_BUSY, TX_ERROR, TX_POSTED,
  type HostQueue, type QueueFormat, type RxFrames,
} from './host-queue.js';

/** A guest memory region as the UMEM holds it. */
export interface UmemRegion {
  gpa: number;
  size: number;
  /** Where the region starts inside the UMEM (UMEM addresses are offsets from its start). */
  umemOffset: number;
}

/** The UMEM geometry every path of a device shares (plain data: posted to workers). */
export interface XskUmemInfo {
  /** Our virtual address of UMEM offset 0. */
  address: number;
  length: number;
  chunkSize: number;
  /** UMEM headroom: the kernel puts a received frame at chunk + headroom + XDP_PACKET_HEADROOM. */
  headroom: number;
  /** headroom + XDP_PACKET_HEADROOM. */
  frameOffset: number;
  /** Largest frame the kernel delivers (chunkSize - frameOffset); larger ones it drops. */
  maxFrame: number;
  /** Guest regions inside the UMEM; empty in bounce-only mode. */
  regions: UmemRegion[];
  /** 'zero-copy': guest RAM is in the UMEM; 'bounce': only private chunks (over the pin limit). */
  mode: 'zero-copy' | 'bounce';
  /** Why the UMEM is bounce-only (null in zero-copy mode), for the operator's log. */
  bounceReason: string | null;
}

/** What a worker needs to run one queue pair over its AF_XDP socket (plain data). */
export interface XskQueueConfig {
  kind: 'xsk';
  /** The backend-owned veth end. */
  ifname: string;
  ifindex: number;
  queueId: number;
  /** The receive socket (fill, completion and RX rings; in the XSKMAP; the one to poll). */
  fd: number;
  /**
   * The transmit socket (TX ring only), sharing the receive socket's buffer pool, so its
   * completions arrive on `rings.completion`. Kept apart so that nothing waits on it: every
   * sent frame's skb destructor wakes the waiters of its socket, and with the RX socket in the
   * worker's epoll set that wakeup cost about 9% of guest-to-host throughput.
   */
  txFd: number;
  /** Frames one TX wakeup sends (XDP_MAX_TX_SKB_BUDGET). */
  txBudget: number;
  rings: SocketRingLayouts;
  umem: XskUmemInfo;
  /** This pair's private chunks (UMEM offsets, chunkSize apart) for frames that cannot go zero-copy. */
  rxBounce: { offset: number; count: number };
  txBounce: { offset: number; count: number };
}

/** Bounce chains keep at most this many segments (a frame is at most one chunk). */
const MAX_BOUNCE_SEGS = 8;
/** A multiple of every slot-table size (powers of two up to 2^15): subtracting it keeps `& mask`. */
const REBASE = 2 ** 30;
/** Ethernet header: the shortest frame the kernel may hand us. */
const ETH_HLEN = 14;

/**
 * The guest buffers the kernel holds in one direction, in the order it was given them: per slot
 * the cookie, the UMEM address the kernel was given and the private bounce chunk in use (-1:
 * the guest's own buffer), with the direction's free bounce chunks.
 */
export class InFlight {
  readonly mask: number;
  readonly cookie: Int32Array;
  readonly addr: Float64Array;
  readonly bounce: Int32Array;
  readonly freeBounce: number[] = [];
  /** Free-running slot counters: [head, tail) are outstanding. */
  head = 0;
  tail = 0;

  constructor(readonly cap: number, private readonly bounceChunks: number) {
    this.mask = cap - 1;
    this.cookie = new Int32Array(cap);
    this.addr = new Float64Array(cap);
    this.bounce = new Int32Array(cap);
    this.reset();
  }

  get count(): number { return this.tail - this.head; }

  reset(): void {
    this.head = this.tail = 0;
    this.freeBounce.length = 0;
    for (let i = this.bounceChunks - 1; i >= 0; i--) this.freeBounce.push(i);
  }

  /**
   * Keeps the counters small. Past 2^31 V8 holds them as doubles and every `& mask` takes a
   * slow truncation (twice the cost per slot in a microbenchmark): at line rate that is after
   * about 40 minutes.
   */
  rebase(): void {
    if (this.head >= REBASE) {
      this.head -= REBASE;
      this.tail -= REBASE;
    }
  }
}

/**
 * The worker side of one pair's AF_XDP socket over guest RAM registered as the UMEM: the four
 * rings over the mappings the port owns (same process), the in-flight tables, the private
 * bounce chunks and the guest-region → UMEM address translation. `fd` is what the worker
 * polls: it is readable when the RX ring holds frames.
 *
 * Receive: each guest chain becomes one fill-ring entry. When its first buffer lies in the
 * UMEM and can hold the vnet header plus the largest frame the kernel will deliver
 * (umem.maxFrame: larger frames the kernel drops), the fill address is placed so the frame
 * lands at buffer + headerLength: the kernel writes at most [fill + frameOffset, fill +
 * chunkSize) = [buffer + hdr, buffer + hdr + maxFrame), never past the buffer. Other chains
 * get a private bounce chunk and a counted copy. Chains are consumed in fill order (copy mode
 * fills and receives in order), so the oldest outstanding chain is the one each RX descriptor
 * belongs to.
 *
 * Transmit: a frame that is one contiguous buffer in the UMEM (header and frame in one buffer,
 * or a header-only buffer followed by the frame) goes out from guest RAM by address; its
 * cookie comes back when the completion ring returns that address. Other frames are gathered
 * into a private chunk (counted copy). AF_XDP carries plain frames: the header is the
 * datapath's (carriesHeader false).
 */
export class XskQueue implements HostQueue {
  readonly fd: number;
  readonly carriesHeader = false;
  readonly cancelsAtOnce = false;
  readonly counts = new Float64Array(PORT_COUNTS.length);
  readonly fill: FillRing;
  readonly completion: CompletionRing;
  readonly rx: RxRing;
  readonly tx: TxRing;
  /** The whole UMEM (bounce chunks and guest regions), for the counted copies. */
  readonly umemBytes: Uint8Array;
  /** Receive side: no more chains outstanding than the kernel's rings have slots (it drops, never reorders, while the RX ring cannot overflow). */
  readonly rxTable: InFlight;
  readonly txTable: InFlight;
  /** Per RX slot: the guest segments (bounce copies land there). */
  private readonly oRegion: Int32Array;
  private readonly oOffset: Float64Array;
  private readonly oLength: Uint32Array;
  private readonly oSegs: Uint8Array;
  private readonly oCapacity: Float64Array;
  /** Per TX slot: completed out of order (the head moves past done slots). */
  private readonly oDone: Uint8Array;
  /** GuestMemory region index → UMEM offset of that region (-1: not in the UMEM, bounce). */
  private regionUmem = new Float64Array(0);
  private mem: GuestMemory | null = null;
  private reader: ChainReader | null = null;
  private writer: ChainWriter | null = null;
  private headerLength = 12;
  private txPosted = 0;
  /** umem.chunkSize, read per frame (a field, not a walk through cfg.umem). */
  private readonly chunkSize: number;

  constructor(readonly cfg: XskQueueConfig) {
    this.fd = cfg.fd;
    this.chunkSize = cfg.umem.chunkSize;
    this.fill = new FillRing(cfg.rings.fill);
    this.completion = new CompletionRing(cfg.rings.completion);
    this.rx = new RxRing(cfg.rings.rx);
    this.tx = new TxRing(cfg.rings.tx);
    // SAFETY: the UMEM reservation lives until XskPort.detachMemory, which the control side
    // calls only after the workers stopped the rings and dropped this queue.
    this.umemBytes = new Uint8Array(koffi.view(cfg.umem.address, cfg.umem.length));
    this.rxTable = new InFlight(Math.min(this.fill.entries, this.rx.entries), cfg.rxBounce.count);
    this.txTable = new InFlight(Math.min(this.tx.entries, this.completion.entries), cfg.txBounce.count);
    const cap = this.rxTable.cap;
    this.oRegion = new Int32Array(cap * MAX_BOUNCE_SEGS);
    this.oOffset = new Float64Array(cap * MAX_BOUNCE_SEGS);
    this.oLength = new Uint32Array(cap * MAX_BOUNCE_SEGS);
    this.oSegs = new Uint8Array(cap);
    this.oCapacity = new Float64Array(cap);
    this.oDone = new Uint8Array(this.txTable.cap);
  }

  start(side: 'rx' | 'tx', mem: GuestMemory, format: QueueFormat): void {
    if (side === 'rx') {
      if (this.fill.outstanding() !== 0 || this.rx.peek(1) !== 0) throw this.notFresh('buffers');
      this.rxTable.reset();
    } else {
      if (this.tx.outstanding() !== 0 || this.completion.peek(1) !== 0) throw this.notFresh('frames');
      this.txTable.reset();
      this.txPosted = 0;
    }
    if (this.mem !== mem) {
      this.mem = mem;
      this.regionUmem = new Float64Array(mem.regions.length).fill(-1);
      mem.regions.forEach((r, i) => {
        const u = this.cfg.umem.regions.find((x) => x.gpa === r.gpa && x.size === r.size);
        if (u) this.regionUmem[i] = u.umemOffset;
      });
      this.reader = new ChainReader(mem);
      this.writer = new ChainWriter(mem);
    }
    this.headerLength = format.headerLength;
  }

  /** Entries left by an earlier run would be matched to the wrong chains: sockets are per start. */
  private notFresh(what: string): Error {
    return new Error(`AF_XDP socket ${this.fd} still holds ${what} of a previous run (release the queue and open a new one)`);
  }

  // -------------------------------------------------------------------------------------
  // Receive

  wantsRx(): boolean {
    const t = this.rxTable;
    return t.tail - t.head < t.cap && this.fill.free(1) >= 1;
  }

  get rxReady(): boolean {
    return this.rxTable.tail !== this.rxTable.head;
  }

  postRx(cookie: number, ch: DescriptorChain): boolean {
    const t = this.rxTable;
    const u = this.cfg.umem;
    const hdr = this.headerLength;
    const slot = t.tail & t.mask;
    const s0 = slot * MAX_BOUNCE_SEGS;
    const first = ch.readableCount;
    const uo = this.regionUmem[ch.region[first]!]!;
    let addr: number;
    if (uo >= 0 && ch.length[first]! >= hdr + u.maxFrame) {
      addr = uo + ch.offset[first]! + hdr - u.frameOffset;
      t.bounce[slot] = -1;
      this.oRegion[s0] = ch.region[first]!;
      this.oOffset[s0] = ch.offset[first]!;
      this.oLength[s0] = ch.length[first]!;
      this.oSegs[slot] = 1;
    } else {
      const k = t.freeBounce.pop();
      if (k === undefined) return false; // retried once a bounce chunk is free again
      addr = this.cfg.rxBounce.offset + k * u.chunkSize;
      t.bounce[slot] = k;
      const segs = Math.min(ch.count - first, MAX_BOUNCE_SEGS);
      let capacity = 0;
      for (let i = 0; i < segs; i++) {
        this.oRegion[s0 + i] = ch.region[first + i]!;
        this.oOffset[s0 + i] = ch.offset[first + i]!;
        this.oLength[s0 + i] = ch.length[first + i]!;
        capacity += ch.length[first + i]!;
      }
      this.oSegs[slot] = segs;
      this.oCapacity[slot] = capacity;
    }
    const fill = this.fill;
    const at = fill.nextIndex;
    fill.reserve(1);
    fill.set(at, addr);
    // Published at once: a burst's posts are few syscall-free stores, and the kernel may start on them early.
    fill.submit();
    t.cookie[slot] = cookie;
    t.addr[slot] = addr;
    t.tail++;
    return true;
  }

  collectRx(max: number, out: RxFrames): number {
    const rx = this.rx;
    const want = Math.min(max, this.rxTable.count);
    const n = rx.peek(want);
    out.hostEmpty = n < want;
    const first = rx.nextIndex;
    for (let i = 0; i < n; i++) {
      const idx = (first + i) | 0;
      this.deliver(rx.base(idx), rx.offset(idx), rx.len(idx), out, i);
    }
    if (n > 0) rx.release(n);
    return n;
  }

  /** Matches one received frame to the oldest outstanding chain. */
  private deliver(base: number, offset: number, len: number, out: RxFrames, i: number): void {
    const t = this.rxTable;
    const slot = t.head & t.mask;
    t.head++;
    const u = this.cfg.umem;
    const hdr = this.headerLength;
    const k = t.bounce[slot]!;
    out.cookie[i] = t.cookie[slot]!;
    out.buffers[i] = 1;
    out.length[i] = 0;
    if (k >= 0) t.freeBounce.push(k);
    // In order: the kernel takes fill entries in the order we posted them, and copy mode puts
    // every frame at the same offset (the frame is copied, whatever the program did to its head).
    if (base !== t.addr[slot]! || offset !== u.frameOffset || len < ETH_HLEN || len > u.maxFrame) {
      // Not the buffer we expected: we cannot tell where the frame went. Give the chain back empty.
      out.status[i] = RX_ERROR;
      return;
    }
    if (k >= 0) {
      if (hdr + len > this.oCapacity[slot]!) {
        out.status[i] = RX_DROPPED;
        return;
      }
      const s0 = slot * MAX_BOUNCE_SEGS;
      const w = this.writer!.overSegments(this.oRegion, this.oOffset, this.oLength, s0, s0 + this.oSegs[slot]!);
      w.skip(hdr);
      w.write(this.umemBytes, t.addr[slot]! + u.frameOffset, len);
      this.counts[PortCount.rxCopies]! += 1;
      this.counts[PortCount.rxCopyBytes]! += len;
    }
    // Zero-copy: the kernel wrote the frame at buffer + hdr; the header is the datapath's.
    out.length[i] = hdr + len;
    out.status[i] = RX_OK;
  }

  cancelRx(): void {
    this.rxTable.reset();
  }

  // -------------------------------------------------------------------------------------
  // Transmit

  postTx(cookie: number, ch: DescriptorChain): number {
    const hdr = this.headerLength;
    const frameLen = ch.readableBytes - hdr;
    if (frameLen > this.chunkSize) {
      this.counts[PortCount.txDropOversize]! += 1;
      return TX_ERROR;
    }
    const t = this.txTable;
    const tail = t.tail;
    if (tail - t.head >= t.cap || this.tx.free(1) < 1) return TX_BUSY;
    // Zero-copy when the frame is one buffer in the UMEM: header and frame in one segment, or a
    // header-only segment followed by the frame.
    let addr = -1;
    const readable = ch.readableCount;
    const len0 = ch.length[0]!;
    if (readable === 1 && len0 > hdr) {
      const uo = this.regionUmem[ch.region[0]!]!;
      if (uo >= 0) addr = uo + ch.offset[0]! + hdr;
    } else if (readable === 2 && len0 === hdr) {
      const uo = this.regionUmem[ch.region[1]!]!;
      if (uo >= 0) addr = uo + ch.offset[1]!;
    }
    let k = -1;
    if (addr < 0) {
      const b = t.freeBounce.pop();
      if (b === undefined) return TX_BUSY; // retried when a chunk completes
      k = b;
      addr = this.cfg.txBounce.offset + k * this.chunkSize;
      // The frame past the header into the chunk (checked above to fit one).
      const r = this.reader!.overReadable(ch);
      r.skip(hdr);
      r.read(this.umemBytes, addr, frameLen);
      this.counts[PortCount.txCopies]! += 1;
      this.counts[PortCount.txCopyBytes]! += frameLen;
    }
    const slot = tail & t.mask;
    t.cookie[slot] = cookie;
    t.addr[slot] = addr;
    t.bounce[slot] = k;
    this.oDone[slot] = 0;
    t.tail = tail + 1;
    this.tx.push(addr, frameLen);
    this.txPosted++;
    return TX_POSTED;
  }

  /** Copy mode sends at most txBudget frames per syscall; kick until the ring drains or the kernel pushes back. */
  flushTx(): void {
    const posted = this.txPosted;
    if (posted === 0) return;
    this.txPosted = 0;
    this.tx.submit();
    const fd = this.cfg.txFd;
    for (let tries = Math.ceil(posted / this.cfg.txBudget) + 1; tries > 0; tries--) {
      kickTx(fd);
      if (this.tx.outstanding() === 0) return;
    }
  }

  collectTx(max: number, cookies: Int32Array): number {
    const cq = this.completion;
    const t = this.txTable;
    const n = cq.peek(Math.min(max, t.cap));
    if (n === 0) return 0;
    const first = cq.nextIndex;
    const mask = t.mask;
    const done = this.oDone;
    let got = 0;
    for (let i = 0; i < n; i++) {
      const addr = cq.addr((first + i) | 0);
      // In order almost always: the oldest outstanding frame, from the guest's own buffer, with
      // no frame behind it completed early. It leaves the table at once.
      const head = t.head;
      const h = head & mask;
      if (head !== t.tail && t.addr[h] === addr && t.bounce[h] === -1 && done[(head + 1) & mask] === 0) {
        t.head = head + 1;
        cookies[got++] = t.cookie[h]!;
        continue;
      }
      const c = this.complete(addr);
      if (c >= 0) cookies[got++] = c;
    }
    cq.release(n);
    return got;
  }

  /**
   * The cookie of the frame sent from `addr` wherever it sits in the table, or -1 for an address
   * we never posted (counted): a frame freed early (e.g. dropped by the host stack) can overtake,
   * and a bounce frame gives its chunk back here.
   */
  private complete(addr: number): number {
    const t = this.txTable;
    const mask = t.mask;
    for (let s = t.head; s !== t.tail; s++) {
      const slot = s & mask;
      if (this.oDone[slot] === 0 && t.addr[slot] === addr) {
        this.oDone[slot] = 1;
        if (t.bounce[slot]! >= 0) t.freeBounce.push(t.bounce[slot]!);
        // The head stops only at an outstanding slot: move it past every completed one.
        while (t.head !== t.tail && this.oDone[t.head & mask] === 1) t.head++;
        return t.cookie[slot]!;
      }
    }
    this.counts[PortCount.txErrHost]! += 1; // an address we never posted (a previous run's): ignore it
    return -1;
  }

  get txInFlight(): number {
    return this.txTable.count;
  }

  cancelTx(out: Int32Array): number {
    const t = this.txTable;
    let n = 0;
    for (let s = t.head; s !== t.tail; s++) {
      const slot = s & t.mask;
      if (this.oDone[slot] === 0) out[n++] = t.cookie[slot]!;
    }
    t.reset();
    this.txPosted = 0;
    return n;
  }

  rebase(): void {
    this.rxTable.rebase();
    this.txTable.rebase();
  }
}
