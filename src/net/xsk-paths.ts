import koffi from 'koffi';
import { FillRing, CompletionRing, RxRing, TxRing, kickTx } from '../sys/xsk.js';
import { SplitQueue } from '../virtio/split-queue.js';
import { ChainReader, ChainWriter } from '../virtio/chain-io.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { HostQueue } from '../ports/port.js';
import type { XskQueueConfig } from '../ports/xsk.js';
import { QueuePath, type PathContext } from './queue-paths.js';
import { headerRequests, unnegotiatedRequest, writeRxHeader } from './vnet-header.js';
import { C, COUNTERS } from './stats.js';
import { ETH_HLEN } from './frame-format.js';

/** Bounce chains keep at most this many segments (a frame is at most one chunk). */
const MAX_BOUNCE_SEGS = 8;

/**
 * The worker side of one pair's AF_XDP socket: the four rings over the mappings the port owns
 * (same process) and a view of the UMEM for bounce copies. `fd` is what the worker polls: it
 * is readable when the RX ring holds frames.
 */
export class XskQueue implements HostQueue {
  readonly fd: number;
  readonly fill: FillRing;
  readonly completion: CompletionRing;
  readonly rx: RxRing;
  readonly tx: TxRing;
  /** The whole UMEM (bounce chunks and guest regions), for the counted copies. */
  readonly umemBytes: Uint8Array;

  constructor(readonly cfg: XskQueueConfig) {
    this.fd = cfg.fd;
    this.fill = new FillRing(cfg.rings.fill);
    this.completion = new CompletionRing(cfg.rings.completion);
    this.rx = new RxRing(cfg.rings.rx);
    this.tx = new TxRing(cfg.rings.tx);
    // SAFETY: the UMEM reservation lives until XskPort.detachMemory, which the control side
    // calls only after the workers stopped the rings and dropped this queue.
    this.umemBytes = new Uint8Array(koffi.view(cfg.umem.address, cfg.umem.length));
  }

  receive(): number {
    throw new Error('an xsk queue moves frames through its rings (XskRxPath), not iovecs');
  }

  transmit(): number {
    throw new Error('an xsk queue moves frames through its rings (XskTxPath), not iovecs');
  }
}

export function openXskQueue(cfg: XskQueueConfig): XskQueue {
  return new XskQueue(cfg);
}

/** GuestMemory region index → UMEM offset of that region (-1: not in the UMEM, bounce). */
function regionOffsets(mem: GuestMemory, cfg: XskQueueConfig): Float64Array {
  const out = new Float64Array(mem.regions.length).fill(-1);
  mem.regions.forEach((r, i) => {
    const u = cfg.umem.regions.find((x) => x.gpa === r.gpa && x.size === r.size);
    if (u) out[i] = u.umemOffset;
  });
  return out;
}

/** A multiple of every slot-table size (powers of two up to 2^15): subtracting it keeps `& mask`. */
const REBASE = 2 ** 30;

/**
 * What both directions share: the table of guest chains whose buffers the kernel holds, in the
 * order it was given them, and the pair's private bounce chunks for this direction.
 */
abstract class XskPath extends QueuePath {
  protected readonly regionUmem: Float64Array;
  /** Table size: no more chains outstanding than the kernel's rings have slots. */
  protected readonly cap: number;
  protected readonly mask: number;
  /** Per slot: the chain's head and the UMEM address the kernel was given. */
  protected readonly oHead16: Uint16Array;
  protected readonly oAddr: Float64Array;
  /** Per slot: -1 (the guest's own buffer) or the bounce chunk in use. */
  protected readonly oBounce: Int32Array;
  protected readonly freeBounce: number[] = [];
  /** Free-running slot counters of the in-flight table: [head, tail) are outstanding. */
  protected head = 0;
  protected tail = 0;

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext,
              protected readonly xq: XskQueue, protected readonly mem: GuestMemory, protected readonly headerLength: number,
              cap: number, bounceChunks: number) {
    super(queue, index, callFd, ctx);
    this.regionUmem = regionOffsets(mem, xq.cfg);
    this.cap = cap;
    this.mask = cap - 1;
    this.oHead16 = new Uint16Array(cap);
    this.oAddr = new Float64Array(cap);
    this.oBounce = new Int32Array(cap);
    for (let i = bounceChunks - 1; i >= 0; i--) this.freeBounce.push(i);
  }

  /** Guest chains whose buffers the kernel holds right now. */
  get inFlight(): number { return this.tail - this.head; }

  /**
   * Keeps the counters small. Past 2^31 V8 holds them as doubles and every `& mask` takes a
   * slow truncation (twice the cost per slot in a microbenchmark): at line rate that is after
   * about 40 minutes.
   */
  protected rebase(): void {
    if (this.head >= REBASE) {
      this.head -= REBASE;
      this.tail -= REBASE;
    }
  }
}

/**
 * Host → guest. Each guest receive chain becomes one fill-ring entry. When the chain's first
 * buffer lies in the UMEM and can hold the vnet header plus the largest frame the kernel will
 * deliver (umem.maxFrame: larger frames the kernel drops), the fill address is placed so the
 * frame lands at buffer + headerLength: the kernel writes at most [fill + frameOffset,
 * fill + chunkSize) = [buffer + hdr, buffer + hdr + maxFrame), never past the buffer.
 * Other chains get a private bounce chunk and a counted copy. Chains are consumed in fill
 * order (copy mode fills and receives in order), so the oldest outstanding chain is the one
 * each RX descriptor belongs to.
 */
export class XskRxPath extends XskPath {
  private readonly oRegion: Int32Array;
  private readonly oOffset: Float64Array;
  private readonly oLength: Uint32Array;
  private readonly oSegs: Uint8Array;
  private readonly oCapacity: Float64Array;
  /** Chains completed at once (errors) while others were outstanding: rewinding is then unsafe. */
  private interleaved = 0;
  /** True while waiting for the guest to add buffers (mirrors RxPath.starving for the worker). */
  starving = false;
  /** Over a slot's guest segments: the header we write and the bounce copy. */
  private readonly writer: ChainWriter;

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, xq: XskQueue,
              mem: GuestMemory, headerLength: number) {
    // The kernel drops (never reorders) while the RX ring cannot overflow: keep no more buffers
    // outstanding than it has slots.
    super(queue, index, callFd, ctx, xq, mem, headerLength, Math.min(xq.fill.entries, xq.rx.entries), xq.cfg.rxBounce.count);
    // Entries left by an earlier path would be matched to the wrong chains: sockets are per start.
    if (xq.fill.outstanding() !== 0 || xq.rx.peek(1) !== 0) {
      throw new Error(`${queue.name}: AF_XDP socket ${xq.fd} still holds buffers of a previous run (release the queue and open a new one)`);
    }
    this.oRegion = new Int32Array(this.cap * MAX_BOUNCE_SEGS);
    this.oOffset = new Float64Array(this.cap * MAX_BOUNCE_SEGS);
    this.oLength = new Uint32Array(this.cap * MAX_BOUNCE_SEGS);
    this.oSegs = new Uint8Array(this.cap);
    this.oCapacity = new Float64Array(this.cap);
    this.writer = new ChainWriter(mem);
  }

  /** Hands guest receive chains to the fill ring; returns false when the guest ring was empty. */
  private refill(): boolean {
    const q = this.queue;
    const ch = this.chain;
    const fill = this.xq.fill;
    const u = this.xq.cfg.umem;
    const hdr = this.headerLength;
    const need = hdr + u.maxFrame;
    let posted = 0;
    let more = true;
    while (this.tail - this.head < this.cap && fill.free(1) >= 1) {
      if (!q.pop(ch)) { more = false; break; }
      if (ch.readableCount > 0 || ch.writableBytes < hdr + ETH_HLEN) {
        // A receive buffer the device may not write, or too small for any frame: give it back empty.
        this.count(C.rxErrors);
        q.pushUsed(ch.head, 0);
        if (this.tail !== this.head) this.interleaved++;
        continue;
      }
      const slot = this.tail & this.mask;
      const uo = this.regionUmem[ch.region[0]!]!;
      let addr: number;
      if (uo >= 0 && ch.length[0]! >= need) {
        addr = uo + ch.offset[0]! + hdr - u.frameOffset;
        this.oBounce[slot] = -1;
        this.oRegion[slot * MAX_BOUNCE_SEGS] = ch.region[0]!;
        this.oOffset[slot * MAX_BOUNCE_SEGS] = ch.offset[0]!;
        this.oLength[slot * MAX_BOUNCE_SEGS] = ch.length[0]!;
        this.oSegs[slot] = 1;
      } else {
        const k = this.freeBounce.pop();
        if (k === undefined) {
          q.rewind(1); // retried once a bounce chunk is free again (it was the last pop)
          break;
        }
        addr = this.xq.cfg.rxBounce.offset + k * u.chunkSize;
        this.oBounce[slot] = k;
        const segs = Math.min(ch.count, MAX_BOUNCE_SEGS);
        let capacity = 0;
        for (let i = 0; i < segs; i++) {
          this.oRegion[slot * MAX_BOUNCE_SEGS + i] = ch.region[i]!;
          this.oOffset[slot * MAX_BOUNCE_SEGS + i] = ch.offset[i]!;
          this.oLength[slot * MAX_BOUNCE_SEGS + i] = ch.length[i]!;
          capacity += ch.length[i]!;
        }
        this.oSegs[slot] = segs;
        this.oCapacity[slot] = capacity;
      }
      const at = fill.nextIndex;
      fill.reserve(1);
      fill.set(at, addr);
      this.oHead16[slot] = ch.head;
      this.oAddr[slot] = addr;
      this.tail++;
      posted++;
    }
    if (posted > 0) fill.submit();
    return more;
  }

  /** A writer over the guest segments of a slot, at their first byte. */
  private slotWriter(slot: number): ChainWriter {
    const s0 = slot * MAX_BOUNCE_SEGS;
    return this.writer.overSegments(this.oRegion, this.oOffset, this.oLength, s0, s0 + this.oSegs[slot]!);
  }

  /** Delivers one received frame to the oldest outstanding chain. */
  private deliver(base: number, offset: number, len: number): void {
    const q = this.queue;
    const slot = this.head & this.mask;
    this.head++;
    const headIdx = this.oHead16[slot]!;
    const hdr = this.headerLength;
    const u = this.xq.cfg.umem;
    // In order: the kernel takes fill entries in the order we posted them, and copy mode puts
    // every frame at the same offset (the frame is copied, whatever the program did to its head).
    if (base !== this.oAddr[slot]! || offset !== u.frameOffset || len < ETH_HLEN || len > u.maxFrame) {
      // Not the buffer we expected: we cannot tell where the frame went. Give the chain back empty.
      this.count(C.rxErrors);
      q.pushUsed(headIdx, 0);
      if (this.oBounce[slot]! >= 0) this.freeBounce.push(this.oBounce[slot]!);
      return;
    }
    const k = this.oBounce[slot]!;
    if (k < 0) {
      // The kernel wrote the frame at buffer + hdr; only the header is ours to write.
      writeRxHeader(this.slotWriter(slot), hdr, 1);
      q.pushUsed(headIdx, hdr + len);
    } else {
      this.freeBounce.push(k);
      if (hdr + len > this.oCapacity[slot]!) {
        this.count(C.rxDropped);
        q.pushUsed(headIdx, 0);
        return;
      }
      const w = this.slotWriter(slot);
      writeRxHeader(w, hdr, 1);
      w.write(this.xq.umemBytes, this.oAddr[slot]! + u.frameOffset, len);
      this.count(C.jsCopies);
      this.count(C.jsCopyBytes, len);
      q.pushUsed(headIdx, hdr + len);
    }
    this.count(C.rxPackets);
    this.count(C.rxBytes, len);
  }

  /**
   * Moves up to `budget` received frames into the guest and refills. Returns 'more' when the
   * budget ran out, 'idle' when the RX ring is empty, 'starved' when the guest has no buffers
   * at all (nothing posted, nothing available): the worker then waits for a kick.
   */
  process(budget: number): 'more' | 'idle' | 'starved' {
    if (this.broken) return 'idle';
    const rx = this.xq.rx;
    let delivered = 0;
    try {
      const n = rx.peek(Math.min(budget, this.tail - this.head));
      const first = rx.nextIndex;
      for (let i = 0; i < n; i++) {
        const idx = (first + i) | 0;
        this.deliver(rx.base(idx), rx.offset(idx), rx.len(idx));
      }
      if (n > 0) rx.release(n);
      delivered = n;
      if (this.head === this.tail) this.interleaved = 0;
      const guestHadMore = this.refill();
      this.rebase();
      if (delivered > 0 || this.queue.unflushed > 0) this.publish();
      if (delivered >= budget) return 'more';
      if (!guestHadMore && this.tail === this.head) {
        this.count(C.rxNoBuffers);
        return 'starved';
      }
      return 'idle';
    } catch (e) {
      if (this.queue.unflushed > 0) this.publish();
      this.fail(e);
      return 'idle';
    }
  }

  /**
   * Stops serving: chains the kernel holds are rewound (when they are exactly the last ones
   * popped) or given back empty. The port must close the socket (releaseQueue) before the
   * frontend hears the ring stopped, so the kernel cannot write into them afterwards.
   */
  stop(): number {
    const n = this.tail - this.head;
    if (n > 0 && !this.broken) {
      if (this.interleaved === 0) {
        this.queue.rewind(n);
      } else {
        for (let s = this.head; s !== this.tail; s++) this.queue.pushUsed(this.oHead16[s & this.mask]!, 0);
        this.publish();
      }
    }
    this.head = this.tail = 0;
    return this.queue.lastAvailIdx;
  }

  free(): void {}
}

/**
 * Guest → host. A chain whose frame is one contiguous buffer in the UMEM (header and frame in
 * one buffer, or a header-only buffer followed by the frame) is transmitted from guest RAM by
 * address; its used entry is written when the completion ring returns that address. Other
 * frames are gathered into a private chunk (counted copy). Frames carrying checksum or
 * segmentation requests cannot be honoured by AF_XDP and are dropped (txErrors): an xsk
 * device must not offer those features.
 */
export class XskTxPath extends XskPath {
  private readonly oDone: Uint8Array;
  private readonly reader: ChainReader;

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, xq: XskQueue,
              mem: GuestMemory, headerLength: number) {
    super(queue, index, callFd, ctx, xq, mem, headerLength, Math.min(xq.tx.entries, xq.completion.entries), xq.cfg.txBounce.count);
    if (xq.tx.outstanding() !== 0 || xq.completion.peek(1) !== 0) {
      throw new Error(`${queue.name}: AF_XDP socket ${xq.fd} still holds frames of a previous run (release the queue and open a new one)`);
    }
    this.oDone = new Uint8Array(this.cap);
    this.reader = new ChainReader(mem);
  }


  /** Returns completed chains to the guest; true when any were completed. */
  reap(): boolean {
    const cq = this.xq.completion;
    const n = cq.peek(this.cap);
    if (n === 0) return false;
    const first = cq.nextIndex;
    for (let i = 0; i < n; i++) this.complete(cq.addr((first + i) | 0));
    cq.release(n);
    return true;
  }

  private complete(addr: number): void {
    const mask = this.mask;
    // In order almost always: the oldest outstanding frame (never marked done: the head moves
    // past done slots), from the guest's own buffer. It leaves the table at once.
    const h = this.head & mask;
    if (this.head !== this.tail && this.oAddr[h] === addr && this.oBounce[h] === -1) {
      this.queue.pushUsed(this.oHead16[h]!, 0);
      this.head++;
      while (this.head !== this.tail && this.oDone[this.head & mask] === 1) this.head++;
      return;
    }
    // Otherwise search: a frame freed early (e.g. dropped by the host stack) can overtake.
    for (let s = this.head; s !== this.tail; s++) {
      const slot = s & mask;
      if (this.oDone[slot] === 0 && this.oAddr[slot] === addr) {
        this.oDone[slot] = 1;
        if (this.oBounce[slot]! >= 0) this.freeBounce.push(this.oBounce[slot]!);
        this.queue.pushUsed(this.oHead16[slot]!, 0);
        while (this.head !== this.tail && this.oDone[this.head & mask] === 1) this.head++;
        return;
      }
    }
    this.count(C.txErrors); // an address we never posted (a previous path's): ignore it
  }

  /**
   * Posts up to `budget` guest frames to the TX ring, kicks the kernel, and returns finished
   * chains. Returns true when frames are left (call again).
   */
  process(budget: number, suppressKicks: boolean): boolean {
    if (this.broken) return false;
    const q = this.queue;
    const ch = this.chain;
    const tx = this.xq.tx;
    const u = this.xq.cfg.umem;
    const hdr = this.headerLength;
    let done = 0;
    let more = false;
    // Counted once per burst: per-frame stores into the shared counters showed in profiles.
    let packets = 0;
    let bytes = 0;
    try {
      this.reap();
      if (suppressKicks) q.setKickNotification(false);
      for (;;) {
        let posted = 0;
        let postedBytes = 0;
        // Slots both in our in-flight table and in the TX ring.
        const room = Math.min(budget - done, this.cap - (this.tail - this.head), tx.free(budget - done));
        while (done < budget && posted < room && q.pop(ch)) {
          done++;
          const frameLen = ch.readableBytes - hdr;
          if (ch.readableCount === 0 || frameLen < ETH_HLEN || frameLen > u.chunkSize) {
            this.count(C.txErrors);
            q.pushUsed(ch.head, 0);
            continue;
          }
          // AF_XDP carries plain frames: no checksum or segmentation can be done for the guest.
          const r = this.reader.overReadable(ch);
          if (unnegotiatedRequest(headerRequests(r, hdr), 0)) {
            this.count(C.txErrors);
            q.pushUsed(ch.head, 0);
            continue;
          }
          let seg = -1;
          let at = 0;
          if (ch.length[0]! > hdr && ch.readableCount === 1) { seg = 0; at = hdr; }
          else if (ch.length[0]! === hdr && ch.readableCount === 2) { seg = 1; at = 0; }
          const uo = seg >= 0 ? this.regionUmem[ch.region[seg]!]! : -1;
          let addr: number;
          let k = -1;
          if (uo >= 0) {
            addr = uo + ch.offset[seg]! + at;
          } else {
            const b = this.freeBounce.pop();
            if (b === undefined) {
              q.rewind(1); // it was the last pop; retried when a chunk completes
              done--;
              more = true;
              break;
            }
            k = b;
            // The frame past the header into the chunk (the checks above made sure it fits one).
            r.skip(hdr);
            r.read(this.xq.umemBytes, this.xq.cfg.txBounce.offset + k * u.chunkSize, frameLen);
            this.count(C.jsCopies);
            this.count(C.jsCopyBytes, frameLen);
            addr = this.xq.cfg.txBounce.offset + k * u.chunkSize;
          }
          const slot = this.tail & this.mask;
          this.oHead16[slot] = ch.head;
          this.oAddr[slot] = addr;
          this.oBounce[slot] = k;
          this.oDone[slot] = 0;
          this.tail++;
          tx.push(addr, frameLen);
          posted++;
          postedBytes += frameLen;
        }
        if (posted > 0) {
          tx.submit();
          // Counted once the kernel can see them (a broken ring mid-burst submits nothing).
          packets += posted;
          bytes += postedBytes;
          this.kick(posted);
        }
        this.reap();
        this.rebase();
        if (q.unflushed > 0) this.publish();
        if (more || done >= budget) return true;
        if (this.tail - this.head >= this.cap || tx.free(1) < 1) return true;
        if (!suppressKicks) return false;
        q.setKickNotification(true);
        if (q.availableCount() === 0) return false;
        q.setKickNotification(false);
      }
    } catch (e) {
      if (q.unflushed > 0) this.publish();
      this.fail(e);
      return false;
    } finally {
      this.count(C.txPackets, packets);
      this.count(C.txBytes, bytes);
    }
  }

  /** Copy mode sends at most txBudget frames per syscall; kick until the ring drains or the kernel pushes back. */
  private kick(posted: number): void {
    const fd = this.xq.cfg.txFd;
    for (let tries = Math.ceil(posted / this.xq.cfg.txBudget) + 1; tries > 0; tries--) {
      kickTx(fd);
      if (this.xq.tx.outstanding() === 0) return;
    }
  }

  /**
   * Stops serving: finished chains are returned, the rest are given back as sent (copy mode
   * copied them at the kick). The port closes the socket (releaseQueue) before the frontend
   * hears the ring stopped, so descriptors left in the TX ring are never sent.
   */
  stop(): number {
    if (!this.broken) {
      this.reap();
      for (let s = this.head; s !== this.tail; s++) {
        const slot = s & this.mask;
        if (this.oDone[slot] === 0) this.queue.pushUsed(this.oHead16[slot]!, 0);
      }
      if (this.queue.unflushed > 0) this.publish();
    }
    this.head = this.tail = 0;
    return this.queue.lastAvailIdx;
  }

  free(): void {}
}
