import { raw, SysError, lastErrno, Errno, NativeBuffer, IOV_MAX } from '../sys/libc.js';
import { readU64, writeU64 } from '../sys/u64.js';
import { TestRunner } from '../sys/bpf/test-run.js';
import { XDP_DROP, XDP_PASS, XDP_TX } from '../sys/bpf/xdp.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { DescriptorChain } from '../virtio/descriptor-chain.js';
import { ChainReader, ChainWriter } from '../virtio/chain-io.js';
import {
  PORT_COUNTS, PortCount, RX_DROPPED, RX_ERROR, RX_NONE, RX_OK, TX_DROPPED, TX_SENT,
  type HostQueue, type QueueFormat, type RxFrames,
} from './host-queue.js';

/** writev errors that mean "this frame is not going out": a drop, counted under its reason. */
export const DROP_REASON: ReadonlyMap<number, number> = new Map<number, number>([
  [Errno.EAGAIN, PortCount.txDropHostBusy], [Errno.EINTR, PortCount.txDropHostBusy], [Errno.ENOBUFS, PortCount.txDropHostBusy],
  [Errno.EMSGSIZE, PortCount.txDropOversize],
  [Errno.ENETDOWN, PortCount.txDropLinkDown], [Errno.ENXIO, PortCount.txDropLinkDown],
  [Errno.EINVAL, PortCount.txDropRefused],
]);
/** Largest frame run through a bounce buffer when it spans several receive buffers. */
const MAX_FRAME_BOUNCE = 65536 + 256;

/**
 * A host queue behind one fd that takes a frame per readv/writev (a tap queue, vnet header
 * first; a packet socket): the iovecs point straight into guest buffers, so completions are
 * immediate. Posted receive buffers wait in a stash whose iovecs stay in native memory; each
 * readv lands one frame directly in them. With MRG_RXBUF a frame may span several posted
 * buffers; without it a frame must fit the first.
 */
export class FdQueue implements HostQueue {
  readonly carriesHeader: boolean = true;
  readonly cancelsAtOnce = true;
  readonly counts = new Float64Array(PORT_COUNTS.length);
  protected mem: GuestMemory | null = null;
  protected headerLength = 12;
  protected mergeable = false;
  protected maxFrame = 1530;
  protected reader: ChainReader | null = null;
  protected writer: ChainWriter | null = null;
  // Allocated at the first bind: a queue of a device with no running guest holds none of it.
  private txIov!: NativeBuffer;
  // Stash of posted chains [cHead, cTail) and their segments [.., sTail) (linear, compacted).
  protected iov!: NativeBuffer;
  private readonly cap = 256;
  protected readonly segCap = IOV_MAX * 2;
  protected cCookie!: Int32Array;
  protected cSegStart!: Uint32Array;
  protected cSegCount!: Uint32Array;
  protected cBytes!: Float64Array;
  private sRegion!: Int32Array;
  private sOffset!: Float64Array;
  private sLength!: Uint32Array;
  private backIov!: NativeBuffer;
  protected cHead = 0;
  protected cTail = 0;
  protected sTail = 0;
  private stashBytes = 0;
  /** The offloaded XDP program, run on every host->guest frame before delivery (tap). */
  protected runner: TestRunner | null = null;
  private bounce: NativeBuffer | null = null;

  /**
   * `io` is the fd frames are read from and written to; `fd`, what the datapath polls, is the
   * same unless a subclass is woken another way (an io_uring's eventfd).
   */
  constructor(readonly fd: number, private readonly what: string, protected readonly io: number = fd) {}

  start(_side: 'rx' | 'tx', mem: GuestMemory, format: QueueFormat): void {
    this.mem = mem;
    this.headerLength = format.headerLength;
    this.mergeable = format.mergeable;
    this.maxFrame = format.maxFrame;
    this.reader = new ChainReader(mem);
    this.writer = new ChainWriter(mem);
    if (this.iov) return;
    this.txIov = new NativeBuffer(IOV_MAX * 16);
    this.iov = new NativeBuffer(IOV_MAX * 2 * 16);
    this.backIov = new NativeBuffer(4096);
    this.cCookie = new Int32Array(this.cap);
    this.cSegStart = new Uint32Array(this.cap);
    this.cSegCount = new Uint32Array(this.cap);
    this.cBytes = new Float64Array(this.cap);
    this.sRegion = new Int32Array(this.segCap);
    this.sOffset = new Float64Array(this.segCap);
    this.sLength = new Uint32Array(this.segCap);
  }

  /**
   * An offloaded program the tap's tc egress cannot run (TapPort.attachInKernel: XDP-only
   * helpers, tail calls, what the translation cannot prove) runs here, on each frame right
   * after readv and before it is collected (DESIGN.md decision 7). Here rather than
   * in net/: the frame is run in the buffers this queue read it into (the stash's iovecs, no
   * copy when it sits in one), and XDP_TX goes back out through this queue's fd.
   */
  setProgram(runner: TestRunner | null): void {
    this.runner = runner;
  }

  // -------------------------------------------------------------------------------------
  // Receive

  get rxReady(): boolean {
    return this.mergeable ? this.stashBytes >= this.maxFrame : this.cTail > this.cHead;
  }

  wantsRx(): boolean {
    return !this.rxReady && this.stashHasRoom();
  }

  /** Room in the stash for one more chain (a cookie and IOV_MAX segments), compacting once if not. */
  protected stashHasRoom(): boolean {
    if (this.cTail < this.cap && this.sTail + IOV_MAX <= this.segCap) return true;
    this.compact();
    return this.cTail < this.cap && this.sTail + IOV_MAX <= this.segCap;
  }

  /**
   * A frame that filled the whole of chain c's buffers, smaller than the largest frame: it may
   * have been cut short, so it is not delivered.
   */
  protected mayBeCut(c: number, got: number): boolean {
    return got >= this.cBytes[c]! && this.cBytes[c]! < this.maxFrame;
  }

  protected compact(): void {
    if (this.cHead === 0) return;
    const s0 = this.cHead < this.cTail ? this.cSegStart[this.cHead]! : this.sTail;
    const segs = this.sTail - s0;
    this.iov.bytes.copyWithin(0, s0 * 16, this.sTail * 16);
    this.sRegion.copyWithin(0, s0, this.sTail);
    this.sOffset.copyWithin(0, s0, this.sTail);
    this.sLength.copyWithin(0, s0, this.sTail);
    const n = this.cTail - this.cHead;
    this.cCookie.copyWithin(0, this.cHead, this.cTail);
    this.cSegCount.copyWithin(0, this.cHead, this.cTail);
    this.cBytes.copyWithin(0, this.cHead, this.cTail);
    for (let i = 0; i < n; i++) this.cSegStart[i] = this.cSegStart[this.cHead + i]! - s0;
    this.cHead = 0;
    this.cTail = n;
    this.sTail = segs;
  }

  postRx(cookie: number, ch: DescriptorChain): boolean {
    const c = this.cTail++;
    this.cCookie[c] = cookie;
    this.cSegStart[c] = this.sTail;
    const s = this.sTail;
    const segs = this.writer!.overWritable(ch).iovecs(this.iov.view, s * 16, IOV_MAX);
    // The stash's own record of the segments (pop() leaves no empty ones), for XDP bounces.
    for (let i = 0; i < segs; i++) {
      this.sRegion[s + i] = ch.region[ch.readableCount + i]!;
      this.sOffset[s + i] = ch.offset[ch.readableCount + i]!;
      this.sLength[s + i] = ch.length[ch.readableCount + i]!;
    }
    this.sTail += segs;
    this.cSegCount[c] = segs;
    this.cBytes[c] = ch.writableBytes;
    this.stashBytes += ch.writableBytes;
    return true;
  }

  /** Takes the oldest stashed buffer out (collected). */
  protected shift(): void {
    this.stashBytes -= this.cBytes[this.cHead]!;
    this.cHead++;
  }

  collectRx(max: number, out: RxFrames): number {
    let n = 0;
    out.hostEmpty = false;
    while (n < max && this.rxReady) {
      const c = this.cHead;
      const s0 = this.cSegStart[c]!;
      const segs = this.mergeable ? Math.min(this.sTail - s0, IOV_MAX) : this.cSegCount[c]!;
      let got = raw.readv(this.io, this.iov.address + s0 * 16, segs);
      if (got < 0) {
        const e = lastErrno();
        if (e !== Errno.EAGAIN && e !== Errno.EINTR) this.counts[PortCount.rxErrHost]! += 1;
        out.hostEmpty = true;
        break;
      }
      out.cookie[n] = this.cCookie[c]!;
      out.buffers[n] = 0;
      out.length[n] = 0;
      if (got <= this.headerLength) {
        out.status[n++] = RX_ERROR; // nothing usable was written; the buffers stay posted
        continue;
      }
      if (!this.mergeable && this.mayBeCut(c, got)) {
        // The frame filled the whole buffer, which is smaller than the largest frame: it may be
        // cut short. Hand the buffer back empty rather than deliver a truncated frame.
        this.shift();
        out.buffers[n] = 1;
        out.status[n++] = RX_DROPPED;
        continue;
      }
      if (this.runner) {
        got = this.runXdp(s0, got);
        if (got < 0) {
          out.status[n++] = RX_NONE; // dropped, sent back to the host or aborted: buffers stay posted
          continue;
        }
      }
      let remaining = got;
      let used = 0;
      while (remaining > 0 && this.cHead < this.cTail) {
        remaining -= Math.min(remaining, this.cBytes[this.cHead]!);
        this.shift();
        used++;
        if (!this.mergeable) break;
      }
      out.buffers[n] = used;
      out.length[n] = got;
      out.status[n++] = RX_OK;
    }
    return n;
  }

  cancelRx(): void {
    this.cHead = this.cTail = this.sTail = 0;
    this.stashBytes = 0;
  }

  private count(c: number, n = 1): void {
    this.counts[c]! += n;
  }

  /**
   * Runs the offloaded program on the frame just read (its header starts at segment s0). Returns
   * the length (header included) to deliver, or -1 when the frame is not delivered. In place when
   * the frame sits in one buffer; otherwise through a bounce buffer (counted as JS copies).
   */
  protected runXdp(s0: number, n: number): number {
    const hdr = this.headerLength;
    const len = n - hdr;
    const contiguous = this.sLength[s0]! >= n;
    let addr: number;
    let cap: number;
    if (contiguous) {
      addr = readU64(this.iov.view, s0 * 16) + hdr;
      cap = this.sLength[s0]! - hdr;
    } else {
      if (len > MAX_FRAME_BOUNCE) { this.count(PortCount.xdpAborted); return -1; }
      this.bounce ??= new NativeBuffer(MAX_FRAME_BOUNCE);
      const r = this.reader!.overSegments(this.sRegion, this.sOffset, this.sLength, s0, this.sTail);
      r.skip(hdr);
      r.read(this.bounce.bytes, 0, len);
      this.count(PortCount.rxCopies);
      this.count(PortCount.rxCopyBytes, len);
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
        this.count(PortCount.xdpPass);
        if (!contiguous) {
          if (hdr + outLen > this.stashBytes) { this.count(PortCount.xdpAborted); return -1; }
          const w = this.writer!.overSegments(this.sRegion, this.sOffset, this.sLength, s0, this.sTail);
          w.skip(hdr);
          w.write(this.bounce!.bytes, 0, outLen);
          this.count(PortCount.rxCopies);
          this.count(PortCount.rxCopyBytes, outLen);
        }
        return hdr + outLen;
      case XDP_DROP:
        this.count(PortCount.xdpDrop);
        return -1;
      case XDP_TX:
        this.count(PortCount.xdpTx);
        this.sendBack(s0, addr, outLen);
        return -1;
      default:
        this.count(PortCount.xdpAborted);
        return -1;
    }
  }

  /** XDP_TX: [vnet header as the host wrote it][program output] back to the host. */
  private sendBack(s0: number, dataAddr: number, len: number): void {
    if (this.sLength[s0]! < this.headerLength) { this.count(PortCount.xdpAborted); return; }
    const b = this.backIov.view;
    writeU64(b, 0, readU64(this.iov.view, s0 * 16));
    b.setUint32(8, this.headerLength, true);
    b.setUint32(12, 0, true);
    writeU64(b, 16, dataAddr);
    b.setUint32(24, len, true);
    b.setUint32(28, 0, true);
    try {
      this.writev(this.backIov.address, 2); // a refusal is counted under its reason
    } catch {
      this.count(PortCount.txErrHost);
    }
  }

  // -------------------------------------------------------------------------------------
  // Transmit

  /** The iovecs of a frame to send: the whole readable part (the host takes the header too). */
  protected txIovecs(ch: DescriptorChain, iov: DataView): number {
    return this.reader!.overReadable(ch).iovecs(iov, 0, IOV_MAX);
  }

  postTx(_cookie: number, ch: DescriptorChain): number {
    const cnt = this.txIovecs(ch, this.txIov.view);
    if (cnt === 0) {
      this.count(PortCount.txDropRefused); // nothing past the header: not a frame
      return TX_DROPPED;
    }
    try {
      return this.writev(this.txIov.address, cnt) >= 0 ? TX_SENT : TX_DROPPED;
    } catch {
      this.count(PortCount.txErrHost);
      return TX_DROPPED;
    }
  }

  /**
   * Frames the host cannot take now (full, link down) or at all (too large for its MTU) are
   * dropped, -1, counted under their reason: a guest can send those at line rate, and an
   * exception per frame costs more than the frame.
   */
  private writev(iovAddress: number, iovCount: number): number {
    const n = raw.writev(this.io, iovAddress, iovCount);
    if (n >= 0) return n;
    const e = lastErrno();
    const reason = DROP_REASON.get(e);
    if (reason !== undefined) {
      this.count(reason);
      return -1;
    }
    throw new SysError(`writev(${this.what})`, e);
  }

  flushTx(): void {}

  /** Frames written here are done at once: nothing is ever in flight. */
  get txInFlight(): number {
    return 0;
  }

  collectTx(_max: number, _cookies: Int32Array): number {
    return 0;
  }

  cancelTx(_out: Int32Array): number {
    return 0;
  }

  rebase(): void {}

  /** Frees the native buffers (the fd is the port's, except where a subclass owns it). */
  close(): void {
    this.txIov?.free();
    this.iov?.free();
    this.backIov?.free();
    this.bounce?.free();
  }
}
