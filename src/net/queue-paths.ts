import { NativeBuffer, eventfdSignal } from '../sys/libc.js';
import { SplitQueue } from '../virtio/split-queue.js';
import { DescriptorChain } from '../virtio/descriptor-chain.js';
import { VirtqueueError } from '../virtio/errors.js';
import type { GuestMemory } from '../vhost-user/guest-memory.js';
import type { HostQueue } from '../ports/port.js';
import { C, COUNTERS } from './stats.js';

/** Kernel limit on iovecs per readv/writev. */
const IOV_MAX = 1024;
/** Frames handled per queue before the worker looks at other queues (fairness). */
export const BURST = 64;

export interface PathContext {
  name: string;
  stats: Float64Array;
  pair: number;
  onBroken(index: number, why: string): void;
}

abstract class QueuePath {
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

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, private readonly host: HostQueue, private readonly headerLength: number) {
    super(queue, index, callFd, ctx);
  }

  /** Sends up to `budget` frames; returns true when frames are left (call again). */
  process(budget: number, suppressKicks: boolean): boolean {
    if (this.broken) return false;
    const q = this.queue;
    const ch = this.chain;
    const iov = this.iov.view;
    const iovAddr = this.iov.address;
    let done = 0;
    try {
      if (suppressKicks) q.setKickNotification(false);
      for (;;) {
        while (done < budget && q.pop(ch)) {
          done++;
          let cnt = 0;
          for (let i = 0; i < ch.readableCount; i++) {
            const len = ch.length[i]!;
            if (len === 0) continue;
            const a = ch.hostAddress[i]!;
            iov.setUint32(cnt * 16, a % 4294967296, true);
            iov.setUint32(cnt * 16 + 4, Math.floor(a / 4294967296), true);
            iov.setUint32(cnt * 16 + 8, len, true);
            iov.setUint32(cnt * 16 + 12, 0, true);
            cnt++;
          }
          if (ch.readableBytes <= this.headerLength || ch.writableBytes > 0 && ch.readableCount === 0) {
            this.count(C.txErrors);
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

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, private readonly host: HostQueue,
              private readonly mem: GuestMemory, private readonly headerLength: number,
              private readonly mergeable: boolean, private readonly maxFrame: number) {
    super(queue, index, callFd, ctx);
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

  /** Tops the stash up until a largest frame fits; false when the guest has too few buffers. */
  private fill(): boolean {
    const need = this.mergeable ? this.maxFrame : 1;
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
        v.setUint32(s * 16, a % 4294967296, true);
        v.setUint32(s * 16 + 4, Math.floor(a / 4294967296), true);
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

  /** Writes a little-endian u16 at byte `at` of the frame starting at segment `seg`. */
  private writeFrameU16(seg: number, at: number, value: number): void {
    let s = seg;
    let off = at;
    for (let k = 0; k < 2; k++) {
      while (s < this.sTail && off >= this.sLength[s]!) { off -= this.sLength[s]!; s++; }
      if (s >= this.sTail) return;
      const r = this.mem.regions[this.sRegion[s]!]!;
      r.bytes[this.sOffset[s]! + off] = (value >> (8 * k)) & 0xff;
      off++;
    }
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
        this.writeFrameU16(s0, 10, used);
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
  }
}
