import { NativeBuffer, eventfdSignal, IOV_MAX } from '../sys/libc.js';
import { readU64, writeU64 } from '../sys/u64.js';
import { SplitQueue } from '../virtio/split-queue.js';
import { DescriptorChain } from '../virtio/descriptor-chain.js';
import { ChainReader, ChainWriter } from '../virtio/chain-io.js';
import { VirtqueueError } from '../virtio/errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { HostQueue } from '../ports/port.js';
import { C, COUNTERS } from './stats.js';
import { TestRunner, XDP_DROP, XDP_PASS, XDP_TX } from '../sys/libbpf.js';
import { ETH_HLEN } from './frame-format.js';
import { TX_CSUM, TX_TSO4, TX_TSO6, TX_ECN, headerRequests, unnegotiatedRequest, setNumBuffers } from './vnet-header.js';

/** Offload frames: zero MACs and the IEEE local-experimental EtherType (docs/offload-protocol.md). */
export const OFFLOAD_ETHERTYPE = 0x88b5;
/** Largest offload message we copy out of a guest TX chain (the broker refuses larger ones). */
export const MAX_OFFLOAD_COPY = 64 * 1024;
/** Largest frame run through a bounce buffer when it spans several receive buffers. */
const MAX_FRAME_BOUNCE = 65536 + 256;

/** The reserved pair's link to the broker (worker side). */
export interface OffloadLink {
  /** Claimed: the pair carries only offload messages; other frames are dropped. */
  claimed: boolean;
  post(message: Uint8Array): void;
}

/** Frames handled per queue before the worker looks at other queues (fairness). */
export const BURST = 64;

export interface PathContext {
  name: string;
  stats: Float64Array;
  pair: number;
  onBroken(index: number, why: string): void;
}

/** What every queue path shares: counters, publishing used entries, fail-stop on a broken ring. */
export abstract class QueuePath {
  readonly chain = new DescriptorChain(IOV_MAX);
  callFd: number;
  broken = false;
  protected readonly base: number;

  constructor(readonly queue: SplitQueue, readonly index: number, callFd: number, protected readonly ctx: PathContext) {
    this.callFd = callFd;
    this.base = ctx.pair * COUNTERS.length;
  }

  protected count(c: number, n = 1): void {
    this.ctx.stats[this.base + c]! += n;
  }

  /** Publishes used entries and signals the guest if it asked to be told. */
  protected publish(): void {
    this.queue.flushUsed();
    if (this.callFd >= 0 && this.queue.needsNotify()) {
      eventfdSignal(this.callFd);
      this.count(C.calls);
    }
  }

  protected fail(e: unknown): void {
    if (!(e instanceof VirtqueueError)) throw e;
    // A broken ring is the guest's fault: stop serving it (fail-stop), never read further.
    this.broken = true;
    this.ctx.onBroken(this.index, e.message);
  }
}

/** Guest → host: each available chain is one frame, sent with writev straight from guest RAM. */
export class TxPath extends QueuePath {
  private readonly iov = new NativeBuffer(IOV_MAX * 16);
  private readonly eth = new Uint8Array(ETH_HLEN);
  private readonly reader: ChainReader;
  /** Set on the reserved pair of an offload device. */
  offload: OffloadLink | null = null;
  /** Header requests the driver negotiated (TX_CSUM | TX_TSO4 | ...); frames asking for more are refused. */
  offloads = TX_CSUM | TX_TSO4 | TX_TSO6 | TX_ECN;

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, private readonly host: HostQueue,
              private readonly headerLength: number, mem: GuestMemory) {
    super(queue, index, callFd, ctx);
    this.reader = new ChainReader(mem);
  }

  /** Handles the chain as an offload message if it is one; true when it was consumed. */
  private offloadFrame(ch: DescriptorChain): boolean {
    const link = this.offload!;
    const r = this.reader.overReadable(ch);
    r.skip(this.headerLength);
    const got = r.read(this.eth, 0, ETH_HLEN);
    const e = this.eth;
    let isOffload = got === ETH_HLEN && ((e[12]! << 8) | e[13]!) === OFFLOAD_ETHERTYPE;
    for (let i = 0; isOffload && i < 12; i++) if (e[i] !== 0) isOffload = false;
    if (!isOffload) {
      if (!link.claimed) return false;
      this.count(C.txDropped); // a claimed pair carries nothing but offload messages
      return true;
    }
    // Copy, then let the broker validate: the guest may rewrite its buffer at any time.
    const len = Math.min(Math.max(0, ch.readableBytes - this.headerLength - ETH_HLEN), MAX_OFFLOAD_COPY);
    const msg = new Uint8Array(len);
    r.read(msg, 0, len);
    link.post(msg);
    return true;
  }

  /** Sends up to `budget` frames; returns true when frames are left (call again). */
  process(budget: number, suppressKicks: boolean): boolean {
    if (this.broken) return false;
    const q = this.queue;
    const ch = this.chain;
    const iov = this.iov.view;
    const iovAddr = this.iov.address;
    const r = this.reader;
    let done = 0;
    try {
      if (suppressKicks) q.setKickNotification(false);
      for (;;) {
        while (done < budget && q.pop(ch)) {
          done++;
          const cnt = r.overReadable(ch).iovecs(iov, 0, IOV_MAX);
          if (ch.readableBytes < this.headerLength + ETH_HLEN || ch.writableBytes > 0 && ch.readableCount === 0) {
            // No room for an Ethernet header after the vnet header: not a frame.
            this.count(C.txErrors);
          } else if (unnegotiatedRequest(headerRequests(r, this.headerLength), this.offloads)) {
            this.count(C.txErrors);
          } else if (this.offload && this.offloadFrame(ch)) {
            // consumed by the broker link (or dropped on a claimed pair)
          } else {
            let sent = -2;
            try {
              sent = this.host.transmit(iovAddr, cnt);
            } catch {
              sent = -2;
            }
            if (sent >= 0) {
              this.count(C.txPackets);
              this.count(C.txBytes, ch.readableBytes - this.headerLength);
            } else {
              this.count(C.txDropped);
            }
          }
          q.pushUsed(ch.head, 0);
        }
        if (done > 0) this.publish();
        if (done >= budget) return true;
        if (!suppressKicks) return false;
        // Re-enable kicks, then look once more: the guest may have added buffers in between.
        q.setKickNotification(true);
        if (q.availableCount() === 0) return false;
        q.setKickNotification(false);
      }
    } catch (e) {
      if (done > 0) this.publish();
      this.fail(e);
      return false;
    }
  }

  stop(): number {
    return this.queue.lastAvailIdx;
  }

  free(): void {
    this.iov.free();
  }
}

/**
 * Host → guest. Guest buffers are popped ahead into a stash whose iovecs stay in native memory;
 * each readv lands one frame directly in them. With MRG_RXBUF a frame may span several chains
 * (num_buffers says how many); without it a frame must fit the first chain.
 */
export class RxPath extends QueuePath {
  private readonly iov = new NativeBuffer(IOV_MAX * 2 * 16);
  // Stash of popped chains [cHead, cTail) and their segments [sHead, sTail) (linear, compacted).
  private readonly cap = 256;
  private readonly segCap = IOV_MAX * 2;
  private readonly cHeadIdx = new Uint16Array(this.cap);
  private readonly cSegStart = new Uint32Array(this.cap);
  private readonly cSegCount = new Uint32Array(this.cap);
  private readonly cBytes = new Float64Array(this.cap);
  private readonly sRegion = new Int32Array(this.segCap);
  private readonly sOffset = new Float64Array(this.segCap);
  private readonly sLength = new Uint32Array(this.segCap);
  private cHead = 0;
  private cTail = 0;
  private sTail = 0;
  private stashBytes = 0;
  /** True while waiting for the guest to add buffers (host polling paused). */
  starving = false;
  /** The offloaded XDP program, run on every host->guest frame before delivery (tap port). */
  runner: TestRunner | null = null;
  private bounce: NativeBuffer | null = null;
  private readonly backIov = new NativeBuffer(4096);
  /** Over stashed segments: the frame's bytes and header, read back or written. */
  private readonly reader: ChainReader;
  private readonly writer: ChainWriter;

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, private readonly host: HostQueue,
              private readonly mem: GuestMemory, private readonly headerLength: number,
              private readonly mergeable: boolean, private readonly maxFrame: number) {
    super(queue, index, callFd, ctx);
    this.reader = new ChainReader(mem);
    this.writer = new ChainWriter(mem);
  }

  private get stashed(): number { return this.cTail - this.cHead; }

  private compact(): void {
    if (this.cHead === 0) return;
    const s0 = this.cHead < this.cTail ? this.cSegStart[this.cHead]! : this.sTail;
    const segs = this.sTail - s0;
    this.iov.bytes.copyWithin(0, s0 * 16, this.sTail * 16);
    this.sRegion.copyWithin(0, s0, this.sTail);
    this.sOffset.copyWithin(0, s0, this.sTail);
    this.sLength.copyWithin(0, s0, this.sTail);
    const n = this.cTail - this.cHead;
    this.cHeadIdx.copyWithin(0, this.cHead, this.cTail);
    this.cSegCount.copyWithin(0, this.cHead, this.cTail);
    this.cBytes.copyWithin(0, this.cHead, this.cTail);
    for (let i = 0; i < n; i++) this.cSegStart[i] = this.cSegStart[this.cHead + i]! - s0;
    this.cHead = 0;
    this.cTail = n;
    this.sTail = segs;
  }

  /**
   * Tops the stash up until `need` bytes fit (a largest frame by default); false when the guest
   * has too few buffers.
   */
  private fill(need = this.mergeable ? this.maxFrame : 1): boolean {
    const q = this.queue;
    const ch = this.chain;
    while (this.mergeable ? this.stashBytes < need : this.stashed < 1) {
      if (this.cTail >= this.cap || this.sTail + IOV_MAX > this.segCap) {
        this.compact();
        if (this.cTail >= this.cap || this.sTail + IOV_MAX > this.segCap) return this.stashed > 0;
      }
      if (!q.pop(ch)) return false;
      if (ch.readableCount > 0 || ch.writableBytes < (this.mergeable ? 1 : this.headerLength + 1)) {
        // A receive buffer the device may not write, or too small for anything: hand it back empty.
        this.count(C.rxErrors);
        q.pushUsed(ch.head, 0);
        continue;
      }
      const c = this.cTail++;
      this.cHeadIdx[c] = ch.head;
      this.cSegStart[c] = this.sTail;
      let segs = 0;
      const v = this.iov.view;
      for (let i = 0; i < ch.count; i++) {
        const len = ch.length[i]!;
        if (len === 0) continue;
        const s = this.sTail++;
        const a = ch.hostAddress[i]!;
        writeU64(v, s * 16, a);
        v.setUint32(s * 16 + 8, len, true);
        v.setUint32(s * 16 + 12, 0, true);
        this.sRegion[s] = ch.region[i]!;
        this.sOffset[s] = ch.offset[i]!;
        this.sLength[s] = len;
        segs++;
      }
      this.cSegCount[c] = segs;
      this.cBytes[c] = ch.writableBytes;
      this.stashBytes += ch.writableBytes;
    }
    return true;
  }

  /** A writer over the stash from the first byte of segment s0 (a frame's start). */
  private stashWriter(s0: number): ChainWriter {
    return this.writer.overSegments(this.sRegion, this.sOffset, this.sLength, s0, this.sTail);
  }

  /**
   * Moves up to `budget` frames from the host into the guest. Returns 'more' when the budget
   * ran out, 'idle' when the host had nothing, 'starved' when the guest has no buffers.
   */
  process(budget: number): 'more' | 'idle' | 'starved' {
    if (this.broken) return 'idle';
    const q = this.queue;
    let done = 0;
    let result: 'more' | 'idle' | 'starved' = 'more';
    try {
      while (done < budget) {
        if (!this.fill()) {
          result = 'starved';
          break;
        }
        const c = this.cHead;
        const s0 = this.cSegStart[c]!;
        const segs = this.mergeable ? Math.min(this.sTail - s0, IOV_MAX) : this.cSegCount[c]!;
        let n: number;
        try {
          n = this.host.receive(this.iov.address + s0 * 16, segs);
        } catch {
          this.count(C.rxErrors);
          result = 'idle';
          break;
        }
        if (n < 0) {
          result = 'idle';
          break;
        }
        done++;
        if (n <= this.headerLength) {
          this.count(C.rxErrors);
          continue; // nothing usable was written; the buffers stay stashed for the next frame
        }
        if (!this.mergeable && n >= this.cBytes[c]! && this.cBytes[c]! < this.maxFrame) {
          // The frame filled the whole buffer, which is smaller than the largest frame: it may be
          // cut short. Hand the buffer back empty rather than deliver a truncated frame.
          q.pushUsed(this.cHeadIdx[c]!, 0);
          this.stashBytes -= this.cBytes[c]!;
          this.cHead++;
          this.count(C.rxDropped);
          continue;
        }
        if (this.runner) {
          const deliver = this.runXdp(s0, n);
          if (deliver < 0) continue; // dropped, sent back to the host or aborted: buffers stay stashed
          n = deliver;
        }
        let remaining = n;
        let used = 0;
        while (remaining > 0 && this.cHead < this.cTail) {
          const take = Math.min(remaining, this.cBytes[this.cHead]!);
          q.pushUsed(this.cHeadIdx[this.cHead]!, take);
          this.stashBytes -= this.cBytes[this.cHead]!;
          remaining -= take;
          this.cHead++;
          used++;
          if (!this.mergeable) break;
        }
        setNumBuffers(this.stashWriter(s0), this.headerLength, used);
        this.count(C.rxPackets);
        this.count(C.rxBytes, n - this.headerLength);
      }
    } catch (e) {
      if (done > 0) this.publish();
      this.fail(e);
      return 'idle';
    }
    if (done > 0) this.publish();
    if (result === 'starved') this.count(C.rxNoBuffers);
    return result;
  }

  /**
   * Runs the offloaded program on the frame just read (its header starts at segment s0). Returns
   * the length (header included) to deliver, or -1 when the frame is not delivered. In place when
   * the frame sits in one buffer; otherwise through a bounce buffer (counted as JS copies).
   */
  private runXdp(s0: number, n: number): number {
    const hdr = this.headerLength;
    const len = n - hdr;
    const contiguous = this.sLength[s0]! >= n;
    let addr: number;
    let cap: number;
    if (contiguous) {
      addr = this.segmentAddress(s0) + hdr;
      cap = this.sLength[s0]! - hdr;
    } else {
      if (len > MAX_FRAME_BOUNCE) { this.count(C.xdpAborted); return -1; }
      this.bounce ??= new NativeBuffer(MAX_FRAME_BOUNCE);
      const r = this.reader.overSegments(this.sRegion, this.sOffset, this.sLength, s0, this.sTail);
      r.skip(hdr);
      r.read(this.bounce.bytes, 0, len);
      this.count(C.jsCopies);
      this.count(C.jsCopyBytes, len);
      addr = this.bounce.address;
      cap = MAX_FRAME_BOUNCE;
    }
    let verdict = -1;
    let outLen = len;
    try {
      verdict = this.runner!.run(addr, len, addr, cap, 1);
      outLen = Math.min(this.runner!.outLength, cap);
    } catch {
      verdict = -1;
    }
    switch (verdict) {
      case XDP_PASS:
        this.count(C.xdpPass);
        if (!contiguous) {
          if (hdr + outLen > this.stashBytes) { this.count(C.xdpAborted); return -1; }
          const w = this.stashWriter(s0);
          w.skip(hdr);
          w.write(this.bounce!.bytes, 0, outLen);
          this.count(C.jsCopies);
          this.count(C.jsCopyBytes, outLen);
        }
        return hdr + outLen;
      case XDP_DROP:
        this.count(C.xdpDrop);
        return -1;
      case XDP_TX:
        this.count(C.xdpTx);
        this.sendBack(s0, addr, outLen);
        return -1;
      default:
        this.count(C.xdpAborted);
        return -1;
    }
  }

  private segmentAddress(s: number): number {
    const v = this.iov.view;
    return readU64(v, s * 16);
  }

  /** XDP_TX on a tap port: [vnet header as the tap wrote it][program output] back into the tap. */
  private sendBack(s0: number, dataAddr: number, len: number): void {
    if (this.sLength[s0]! < this.headerLength) { this.count(C.xdpAborted); return; }
    const b = this.backIov.view;
    const hdrAddr = this.segmentAddress(s0);
    writeU64(b, 0, hdrAddr);
    b.setUint32(8, this.headerLength, true);
    b.setUint32(12, 0, true);
    writeU64(b, 16, dataAddr);
    b.setUint32(24, len, true);
    b.setUint32(28, 0, true);
    try {
      if (this.host.transmit(this.backIov.address, 2) < 0) this.count(C.txDropped);
    } catch {
      this.count(C.txErrors);
    }
  }

  /**
   * Delivers one offload response (offload header + payload) as a frame: zero vnet header,
   * zero-MAC Ethernet header with the offload EtherType, then the message. False when the guest
   * has not posted enough receive buffers yet (the caller retries after the next kick).
   */
  deliverMessage(message: Uint8Array): boolean {
    if (this.broken) return false;
    const head = new Uint8Array(this.headerLength + ETH_HLEN);
    head[this.headerLength + 12] = OFFLOAD_ETHERTYPE >> 8;
    head[this.headerLength + 13] = OFFLOAD_ETHERTYPE & 0xff;
    const total = head.length + message.length;
    try {
      // Only as many buffers as this message needs: a driver may post a few large ones.
      if (!this.fill(this.mergeable ? total : 1)) return false;
      const c = this.cHead;
      if ((this.mergeable ? this.stashBytes : this.cBytes[c]!) < total) return false;
      const s0 = this.cSegStart[c]!;
      const w = this.stashWriter(s0);
      w.write(head, 0, head.length);
      w.write(message, 0, message.length);
      let remaining = total;
      let used = 0;
      while (remaining > 0 && this.cHead < this.cTail) {
        const take = Math.min(remaining, this.cBytes[this.cHead]!);
        this.queue.pushUsed(this.cHeadIdx[this.cHead]!, take);
        this.stashBytes -= this.cBytes[this.cHead]!;
        remaining -= take;
        this.cHead++;
        used++;
      }
      setNumBuffers(this.stashWriter(s0), this.headerLength, used);
      this.publish();
      return true;
    } catch (e) {
      this.fail(e);
      return false;
    }
  }

  /** Returns stashed chains to the ring and reports where the guest should resume. */
  stop(): number {
    const n = this.stashed;
    if (n > 0 && !this.broken) this.queue.rewind(n);
    this.cHead = this.cTail = this.sTail = 0;
    this.stashBytes = 0;
    return this.queue.lastAvailIdx;
  }

  free(): void {
    this.iov.free();
    this.backIov.free();
    this.bounce?.free();
  }
}
