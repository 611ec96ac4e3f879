import { SplitQueue } from '../virtio/split-queue.js';
import type { DescriptorChain } from '../virtio/descriptor-chain.js';
import { ChainWriter } from '../virtio/chain-io.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { RxFrames, RX_DROPPED, RX_ERROR, RX_OK, type HostQueue } from '../ports/host-queue.js';
import { C } from './stats.js';
import { ETH_HLEN, type FrameFormat } from './frame-format.js';
import { setNumBuffers, writeRxHeader } from './vnet-header.js';
import { BURST, OFFLOAD_ETHERTYPE, QueuePath, type PathContext } from './queue-path.js';

/**
 * Segments kept per posted chain for writing its header (Linux puts it in one; an 8-byte first
 * buffer makes two). A header split over more gets what these hold written, nothing outside the
 * guest's buffers either way; more would cost 16 bytes per slot and segment for every chain.
 */
const HDR_SEGS = 4;
/** Keeps the FIFO's free-running counters below 2^31 (a multiple of every power-of-two table size up to 2^15). */
const REBASE = 2 ** 30;

/**
 * Host → guest, for every port. Guest receive chains are popped and posted to the port (their
 * head is the cookie) while it wants them; the port fills them (readv, or the kernel through
 * AF_XDP) and hands frames back in posting order. Then the path writes the vnet header where
 * the port does not carry one (and num_buffers where it does), returns the chains as used and
 * counts. With MRG_RXBUF a frame may span several chains (num_buffers says how many).
 */
export class RxPath extends QueuePath {
  /** True while waiting for the guest to add buffers (host polling paused). */
  starving = false;
  private readonly frames = new RxFrames(BURST);
  private readonly writer: ChainWriter;
  private readonly mergeable: boolean;
  /** Smallest receive buffer worth posting; smaller ones go back empty at once. */
  private readonly minBuffer: number;
  // FIFO of chains posted to the port, [head, tail) free-running: head index, capacity, and the
  // segments holding its first headerLength bytes (where the header is written).
  private readonly mask: number;
  private readonly fHead16: Uint16Array;
  private readonly fBytes: Float64Array;
  private readonly hSegs: Uint8Array;
  private readonly hRegion: Int32Array;
  private readonly hOffset: Float64Array;
  private readonly hLength: Uint32Array;
  private head = 0;
  private tail = 0;
  /** Chains given back at once (refused) while others were posted: rewinding is then unsafe. */
  private interleaved = 0;

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, host: HostQueue,
              mem: GuestMemory, format: FrameFormat) {
    super(queue, index, callFd, ctx, host, 'rx', mem, format);
    this.writer = new ChainWriter(mem);
    this.mergeable = format.mergeable;
    // A port that writes only the frame puts a whole one in one buffer, after room for the header.
    this.minBuffer = !host.carriesHeader ? format.headerLength + ETH_HLEN : format.mergeable ? 1 : format.headerLength + 1;
    let cap = 1;
    while (cap < queue.size) cap *= 2;
    this.mask = cap - 1;
    this.fHead16 = new Uint16Array(cap);
    this.fBytes = new Float64Array(cap);
    this.hSegs = new Uint8Array(cap);
    this.hRegion = new Int32Array(cap * HDR_SEGS);
    this.hOffset = new Float64Array(cap * HDR_SEGS);
    this.hLength = new Uint32Array(cap * HDR_SEGS);
  }

  /** Chains posted to the port right now. */
  get inFlight(): number { return this.tail - this.head; }

  /** Records a popped chain at the FIFO's tail: head, capacity, the segments of its header. */
  private record(ch: DescriptorChain, capacity: number): void {
    const slot = this.tail & this.mask;
    this.fHead16[slot] = ch.head;
    this.fBytes[slot] = capacity;
    const h0 = slot * HDR_SEGS;
    let covered = 0;
    let n = 0;
    for (let i = ch.readableCount; i < ch.count && covered < this.headerLength && n < HDR_SEGS; i++, n++) {
      this.hRegion[h0 + n] = ch.region[i]!;
      this.hOffset[h0 + n] = ch.offset[i]!;
      this.hLength[h0 + n] = ch.length[i]!;
      covered += ch.length[i]!;
    }
    this.hSegs[slot] = n;
    this.tail++;
  }

  /** A writer at the first byte of the chain in FIFO slot `slot`. */
  private headerWriter(slot: number): ChainWriter {
    const h0 = slot * HDR_SEGS;
    return this.writer.overSegments(this.hRegion, this.hOffset, this.hLength, h0, h0 + this.hSegs[slot]!);
  }

  /** Posts guest receive chains while the port wants them; false when the guest ring ran empty. */
  private refill(): boolean {
    const q = this.queue;
    const ch = this.chain;
    const host = this.host;
    while (host.wantsRx() && this.tail - this.head <= this.mask) {
      if (!q.pop(ch)) return false;
      if (ch.readableCount > 0 || ch.writableBytes < this.minBuffer) {
        // A receive buffer the device may not write, or too small for anything: hand it back empty.
        this.count(C.rxErrBuffer);
        q.pushUsed(ch.head, 0);
        if (this.tail !== this.head) this.interleaved++;
        continue;
      }
      if (!host.postRx(ch.head, ch)) {
        q.rewind(1); // it was the last pop; posted again once the port has room
        break;
      }
      this.record(ch, ch.writableBytes);
    }
    return true;
  }

  /** Hands back the chains of received frame i (all of them used, in posting order). */
  private complete(i: number): void {
    const f = this.frames;
    const q = this.queue;
    const k = f.buffers[i]!;
    const status = f.status[i]!;
    if (status === RX_OK) {
      const len = f.length[i]!;
      const w = this.headerWriter(this.head & this.mask);
      if (this.host.carriesHeader) setNumBuffers(w, this.headerLength, k);
      else writeRxHeader(w, this.headerLength, k);
      let remaining = len;
      for (let j = 0; j < k; j++) {
        const slot = this.head & this.mask;
        const take = Math.min(remaining, this.fBytes[slot]!);
        q.pushUsed(this.fHead16[slot]!, take);
        remaining -= take;
        this.head++;
      }
      this.count(C.rxPackets);
      this.count(C.rxBytes, len - this.headerLength);
    } else {
      for (let j = 0; j < k; j++) q.pushUsed(this.fHead16[this.head++ & this.mask]!, 0);
      if (status === RX_ERROR) this.count(C.rxErrHost);
      else if (status === RX_DROPPED) this.count(C.rxDropOversize);
    }
    if (this.head === this.tail) this.interleaved = 0;
  }

  /** Whether the last process() put frames (or empty chains) on the used ring. */
  lastDelivered = false;

  /**
   * Moves up to `budget` frames from the host into the guest. Returns 'more' when the budget
   * ran out, 'idle' when the host had nothing, 'starved' when the guest has no buffers the port
   * could take a frame with.
   */
  process(budget: number): 'more' | 'idle' | 'starved' {
    this.lastDelivered = false;
    if (this.broken) return 'idle';
    const host = this.host;
    const f = this.frames;
    let done = 0;
    let result: 'more' | 'idle' | 'starved' = 'more';
    try {
      while (done < budget) {
        this.refill();
        if (!host.rxReady) {
          result = 'starved';
          break;
        }
        const n = host.collectRx(Math.min(budget - done, f.capacity), f);
        for (let i = 0; i < n; i++) this.complete(i);
        done += n;
        if (n === 0 || f.hostEmpty) {
          result = 'idle';
          break;
        }
      }
      // Buffers for the next frames go to the port now, not at the next wakeup.
      if (result === 'more') this.refill();
      this.rebase();
    } catch (e) {
      if (this.queue.unflushed > 0) this.publish();
      this.foldPortCounts();
      this.fail(e);
      return 'idle';
    }
    this.lastDelivered = this.queue.unflushed > 0;
    if (this.lastDelivered) this.publish();
    this.foldPortCounts();
    if (result === 'starved') this.count(C.rxNoBuffers);
    return result;
  }

  private rebase(): void {
    this.host.rebase();
    if (this.head >= REBASE) {
      this.head -= REBASE;
      this.tail -= REBASE;
    }
  }

  /**
   * Gives the guest back every chain posted to the port: rewound when they are exactly the last
   * ones popped, else returned empty. The port forgets them first.
   */
  private takeBack(): void {
    const n = this.tail - this.head;
    this.host.cancelRx();
    if (n > 0 && !this.broken) {
      if (this.interleaved === 0) {
        this.queue.rewind(n);
      } else {
        for (let s = this.head; s !== this.tail; s++) this.queue.pushUsed(this.fHead16[s & this.mask]!, 0);
        this.publish();
      }
    }
    this.head = this.tail = 0;
    this.interleaved = 0;
  }

  /**
   * Delivers one offload response (offload header + payload) as a frame: zero vnet header,
   * zero-MAC Ethernet header with the offload EtherType, then the message. False when the guest
   * has not posted enough receive buffers yet (the caller retries after the next kick).
   * Written by us, not the host: chains posted to the port (before the pair was claimed) are
   * taken back first, which only ports that can forget them at once allow.
   */
  deliverMessage(message: Uint8Array): boolean {
    if (this.broken) return false;
    const hdr = this.headerLength;
    const head = new Uint8Array(hdr + ETH_HLEN);
    head[hdr + 12] = OFFLOAD_ETHERTYPE >> 8;
    head[hdr + 13] = OFFLOAD_ETHERTYPE & 0xff;
    const total = head.length + message.length;
    const q = this.queue;
    const ch = this.chain;
    try {
      if (this.tail !== this.head) {
        if (!this.host.cancelsAtOnce) return false;
        this.takeBack();
      }
      // Only as many buffers as this message needs (a driver may post a few large ones); the
      // bytes are written as each chain is popped, the chains kept in the (empty) FIFO.
      let written = 0;
      while (written < total) {
        if (!this.mergeable && this.tail !== this.head) break;
        if (!q.pop(ch)) break;
        if (ch.readableCount > 0 || ch.writableBytes < this.minBuffer) {
          // Cannot be rewound around: everything popped for this message goes back empty.
          this.count(C.rxErrBuffer);
          q.pushUsed(ch.head, 0);
          for (let s = this.head; s !== this.tail; s++) q.pushUsed(this.fHead16[s & this.mask]!, 0);
          this.head = this.tail = 0;
          written = 0;
          continue;
        }
        const w = this.writer.overWritable(ch);
        const take = Math.min(ch.writableBytes, total - written);
        const fromHead = Math.max(0, Math.min(head.length - written, take));
        if (fromHead > 0) w.write(head, written, fromHead);
        if (take > fromHead) w.write(message, written + fromHead - head.length, take - fromHead);
        this.record(ch, take);
        written += take;
      }
      const k = this.tail - this.head;
      if (written < total) {
        if (k > 0) q.rewind(k); // the last k pops: the guest gets them again
        this.head = this.tail = 0;
        if (q.unflushed > 0) this.publish();
        return false;
      }
      setNumBuffers(this.headerWriter(this.head & this.mask), hdr, k);
      for (let s = this.head; s !== this.tail; s++) q.pushUsed(this.fHead16[s & this.mask]!, this.fBytes[s & this.mask]!);
      this.head = this.tail = 0;
      this.publish();
      return true;
    } catch (e) {
      this.head = this.tail = 0;
      this.fail(e);
      return false;
    }
  }

  /** Returns posted chains to the ring and reports where the guest should resume. */
  stop(): number {
    this.takeBack();
    this.foldPortCounts();
    return this.queue.lastAvailIdx;
  }

  free(): void {}
}
