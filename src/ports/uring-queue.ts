import { NativeBuffer, eventfdCreate, eventfdDrain, closeFd, IOV_MAX, Errno } from '../sys/libc.js';
import { readU64 } from '../sys/u64.js';
import {
  IoUring, IORING_OP_POLL_ADD, IORING_OP_READ, IORING_OP_READV, IORING_OP_WRITE, IORING_OP_WRITEV,
  IOSQE_FIXED_FILE, IOSQE_IO_HARDLINK, POLLIN,
} from '../sys/io-uring.js';
import type { TestRunner } from '../sys/bpf/test-run.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { DescriptorChain } from '../virtio/descriptor-chain.js';
import {
  PortCount, RX_DROPPED, RX_ERROR, RX_OK, TX_BUSY, TX_DROPPED, TX_POSTED, type QueueFormat, type RxFrames,
} from './host-queue.js';
import { DROP_REASON } from './fd-queue.js';
import { TapQueue } from './tap.js';

/** Frames in flight toward the host at once: one submission slot each (and a slot of iovecs). */
const TX_SLOTS = 256;
/**
 * iovecs kept per in-flight frame. A Linux guest's largest TSO frame is a header and 17 page
 * fragments; a chain with more readable segments than this is written at once with writev
 * (after what is queued ahead of it, so frames keep their order).
 */
const SLOT_IOVS = 32;
/** Receive buffers handed to the kernel as standing reads at most (two bursts' worth). */
const RX_DEPTH = 128;
/** Submission slots of the receive ring: a chain of reads, a poll, a cancellation. */
const RX_RING = 256;
/** Completion tags on the receive ring besides read sequence numbers (below 2^31). */
const POLL_TAG = 0xfffffffe;
const CANCEL_TAG = 0xffffffff;
/** The tap fd's index among each ring's registered files. */
const TAP_INDEX = 0;
/** A read taken back by a cancellation (compared per completion: a constant, not a lookup). */
const ECANCELED = Errno.ECANCELED;
/** Read results kept: at most RX_DEPTH reads are between the stash head and the kernel. */
const RES_MASK = 255;
/**
 * Read tags are posting sequence numbers modulo 2^30, and the counters are kept below 2^31 by
 * taking 2^30 off them all (a multiple of RES_MASK + 1): tags in flight stay what they were.
 */
const SEQ_MASK = 2 ** 30 - 1;
const REBASE = 2 ** 30;
/** Rounds of cancellation a stop waits for reads to leave the kernel (one per read at worst). */
const MAX_CANCEL_ROUNDS = RX_DEPTH + 8;

/**
 * A tap queue whose I/O goes through io_uring, two rings per queue pair, no system call per frame.
 *
 * Guest → host: postTx turns a chain into one write SQE over the guest's own buffers (WRITE for
 * one segment, WRITEV over a slot of iovecs otherwise; the tap takes the vnet header in front,
 * as with writev); flushTx submits the burst with one io_uring_enter. A tap write never waits (a
 * full queue drops in the kernel), so the writes complete inside that enter, in order, and the
 * datapath collects their cookies in the same burst.
 *
 * Host → guest: posted receive buffers become standing reads, one per chain, and `fd` is an
 * eventfd the kernel signals when reads complete, so the worker's epoll sleeps on it instead of
 * the tap. The reads of one submission are hard-linked: unlinked reads armed on a tap are woken
 * together and complete newest first (measured: frames 1, 2, 3 landed in reads 4, 2, 3), which
 * would reorder frames; a hard link (not a plain one, which a short read breaks) makes them take
 * frames one after another, in posting order. A chain takes no buffers once submitted, so the
 * next one is submitted when it has run out.
 *
 * Where one read per buffer cannot hold the frames — mergeable buffers smaller than the largest
 * frame (GSO toward the guest) — or an offloaded program may keep a buffer posted after it
 * consumed a frame (a drop), the receive side falls back to readv into the stash (FdQueue),
 * woken by a poll request on the same ring, until its buffers are all given back.
 */
export class UringQueue extends TapQueue {
  private readonly tx: IoUring;
  private readonly slotIov: NativeBuffer;
  private readonly txCookie = new Int32Array(TX_SLOTS);
  /** Per slot: 1 while its write is in the kernel (a completion for any other slot is ignored). */
  private readonly txBusy = new Uint8Array(TX_SLOTS);
  /** Slots not in the kernel; the rest are in flight (txInFlight counts them; txBusy guards completions). */
  private readonly freeSlots: number[] = [];

  private readonly rx: IoUring;
  /** Standing reads (one per posted chain), or readv into the stash woken by a poll. */
  private rxMode: 'uring' | 'rw' = 'uring';
  // Posted chains counted in posting order (free-running): [headSeq, doneSeq) have completed
  // reads (results in rxRes), [doneSeq, submittedSeq) are in the kernel, [submittedSeq,
  // postedSeq) wait for the running chain to end. headSeq is the stash's cHead; postedSeq is
  // derived from the stash (see there).
  private headSeq = 0;
  private doneSeq = 0;
  private submittedSeq = 0;
  private readonly rxRes = new Int32Array(RES_MASK + 1);
  private pollArmed = false;

  private constructor(tapFd: number, tx: IoUring, rx: IoUring, efd: number) {
    super(tapFd, efd);
    this.tx = tx;
    this.rx = rx;
    this.slotIov = new NativeBuffer(TX_SLOTS * SLOT_IOVS * 16);
    this.resetSlots();
  }

  /** Every slot free and none busy: at the start, and once the kernel holds no write of ours. */
  private resetSlots(): void {
    this.txBusy.fill(0);
    this.freeSlots.length = 0;
    for (let i = TX_SLOTS - 1; i >= 0; i--) this.freeSlots.push(i);
  }

  /** Opens the rings for tap fd `fd`; throws UringError (ENOSYS, EPERM, no-liburing...) when io_uring is unavailable. */
  static open(fd: number): UringQueue {
    const made: { close(): void }[] = [];
    try {
      const tx = IoUring.create(TX_SLOTS);
      made.push(tx);
      // A registered file: no fd lookup and reference per request.
      tx.registerFiles([fd]);
      const rx = IoUring.create(RX_RING);
      made.push(rx);
      rx.registerFiles([fd]);
      const efd = eventfdCreate(true);
      made.push({ close: () => closeFd(efd) });
      rx.registerEventfd(efd);
      return new UringQueue(fd, tx, rx, efd);
    } catch (e) {
      for (const m of made.reverse()) m.close();
      throw e;
    }
  }

  // -------------------------------------------------------------------------------------
  // Transmit

  override get txInFlight(): number {
    return TX_SLOTS - this.freeSlots.length;
  }

  override postTx(cookie: number, ch: DescriptorChain): number {
    if (ch.readableCount > SLOT_IOVS) {
      // Too many segments for a slot: written now, behind what is queued.
      if (this.tx.unsubmitted > 0) this.tx.submit();
      return super.postTx(cookie, ch);
    }
    if (this.freeSlots.length === 0 || this.tx.sqFree() === 0) return TX_BUSY;
    const slot = this.freeSlots.pop()!;
    if (ch.readableCount === 1 && ch.length[0]! > 0) {
      // The usual layout (the vnet header in front of the frame, one buffer): the SQE takes its
      // address directly. Going through the slot's iovec stored it to native memory only to read
      // it back, the largest part of our own per-frame time at 1500 B (the rest is the kernel's).
      this.tx.prep(IORING_OP_WRITE, IOSQE_FIXED_FILE, TAP_INDEX, this.reader!.overReadable(ch).hostAddress, ch.length[0]!, slot);
    } else {
      const at = slot * SLOT_IOVS * 16;
      const v = this.slotIov.view;
      const cnt = this.reader!.overReadable(ch).iovecs(v, at, SLOT_IOVS);
      if (cnt === 0) {
        this.freeSlots.push(slot);
        this.counts[PortCount.txDropRefused]! += 1; // nothing to send: not a frame
        return TX_DROPPED;
      }
      if (cnt === 1) this.tx.prep(IORING_OP_WRITE, IOSQE_FIXED_FILE, TAP_INDEX, readU64(v, at), v.getUint32(at + 8, true), slot);
      else this.tx.prep(IORING_OP_WRITEV, IOSQE_FIXED_FILE, TAP_INDEX, this.slotIov.address + at, cnt, slot);
    }
    this.txCookie[slot] = cookie;
    this.txBusy[slot] = 1;
    return TX_POSTED;
  }

  override flushTx(): void {
    if (this.tx.unsubmitted > 0) this.tx.submit();
  }

  override collectTx(max: number, cookies: Int32Array): number {
    if (this.freeSlots.length === TX_SLOTS) return 0;
    const r = this.tx;
    const ready = r.cqReady();
    let n = 0;
    let seen = 0;
    for (let i = r.cqIndex; seen < ready && n < max; seen++, i = (i + 1) | 0) {
      const slot = r.cqeUserData(i);
      // The kernel echoes our tag; still, a slot is taken back only once and only when in flight.
      if (slot >= TX_SLOTS || this.txBusy[slot] !== 1) continue;
      const res = r.cqeRes(i);
      if (res < 0) this.counts[DROP_REASON.get(-res) ?? PortCount.txErrHost]! += 1;
      this.txBusy[slot] = 0;
      this.freeSlots.push(slot);
      cookies[n++] = this.txCookie[slot]!;
    }
    if (seen > 0) r.cqAdvance(seen);
    return n;
  }

  /**
   * The ring stops: writes still in the kernel are cancelled and waited for (a tap write does
   * not wait, so this is one enter); their cookies go back with those not collected.
   */
  override cancelTx(out: Int32Array): number {
    let n = 0;
    if (this.txInFlight > 0) {
      this.tx.prepCancelFixed(TAP_INDEX, CANCEL_TAG);
      this.tx.submit(1);
      n = this.collectTx(out.length, out);
    }
    // Whatever did not answer (none expected) is forgotten: its buffers were only being read.
    for (let s = 0; s < TX_SLOTS; s++) if (this.txBusy[s] === 1 && n < out.length) out[n++] = this.txCookie[s]!;
    this.resetSlots();
    this.tx.cqAdvance(this.tx.cqReady());
    return n;
  }

  // -------------------------------------------------------------------------------------
  // Receive

  override start(side: 'rx' | 'tx', mem: GuestMemory, format: QueueFormat): void {
    super.start(side, mem, format);
    if (side === 'rx' && this.cTail === this.cHead) this.rxMode = this.runner ? 'rw' : 'uring';
  }

  /** Frames run through an offloaded program may stay unused in a buffer: readv keeps those posted. */
  override setProgram(runner: TestRunner | null): void {
    super.setProgram(runner);
    if (runner && this.rxMode === 'uring') this.toReadv();
  }

  override get rxReady(): boolean {
    return this.rxMode === 'uring' ? this.cTail > this.cHead : super.rxReady;
  }

  override wantsRx(): boolean {
    if (this.rxMode === 'rw') return super.wantsRx();
    return this.cTail - this.cHead < RX_DEPTH && this.stashHasRoom();
  }

  override postRx(cookie: number, ch: DescriptorChain): boolean {
    // One read per buffer cannot spread a frame over several: mergeable buffers smaller than
    // the largest frame need readv over the stash.
    if (this.rxMode === 'uring' && this.mergeable && ch.writableBytes < this.maxFrame) this.toReadv();
    super.postRx(cookie, ch);
    return true;
  }

  /**
   * One past the last posted chain. Every chain posted is stashed and leaves the stash only as
   * headSeq moves on (delivered, or readv's collect), so the stash's length is what lies
   * between; compaction moves cHead and cTail together.
   */
  private get postedSeq(): number {
    return this.headSeq + (this.cTail - this.cHead);
  }

  override collectRx(max: number, out: RxFrames): number {
    // The eventfd is what the worker sleeps on, so it must be cleared before the last look at
    // the ring ahead of a sleep: a completion posted after that look signals it again. A sleep
    // can follow only a call that returns fewer than `max` frames, so it is cleared only when
    // the completions in sight cannot fill the burst (a read per burst saved under load, where
    // they can). Left set, it costs at most one wake-up with nothing to do, never a lost one:
    // only this read clears it and a look at the ring follows each, so a completion the ring
    // still holds here was signalled after the last clear.
    if (this.rx.cqReady() + (this.doneSeq - this.headSeq) < max) eventfdDrain(this.fd);
    this.reapRx();
    const n = this.deliverDone(max, out);
    if (this.rxMode === 'uring') {
      this.submitReads();
      // "Empty" means the kernel holds reads that will wake us. With none there (every posted
      // buffer delivered) the datapath must look again: refill, or find the guest out of
      // buffers and ask for its kick. Said empty, it would sleep on an eventfd nothing signals.
      out.hostEmpty = n < max && this.doneSeq !== this.submittedSeq;
      return n;
    }
    if (n > 0) return n; // reads completed before the switch go first; readv resumes after them
    const before = this.cHead;
    const got = super.collectRx(max, out);
    this.headSeq += this.cHead - before;
    this.doneSeq = this.submittedSeq = this.headSeq;
    // Emptied the tap: wake up through the ring when it has frames again.
    if (out.hostEmpty && !this.pollArmed) this.armPoll();
    return got;
  }

  /** Reads the receive ring's completions: read results in order, the poll's answer, cancellations. */
  private reapRx(): void {
    const r = this.rx;
    const ready = r.cqReady();
    for (let k = 0, i = r.cqIndex; k < ready; k++, i = (i + 1) | 0) {
      const tag = r.cqeUserData(i);
      if (tag === POLL_TAG) { this.pollArmed = false; continue; }
      if (tag === CANCEL_TAG) continue;
      // Hard-linked reads complete in submission order; anything else is not ours to count.
      if (tag !== (this.doneSeq & SEQ_MASK) || this.doneSeq === this.submittedSeq) continue;
      this.rxRes[this.doneSeq & RES_MASK] = r.cqeRes(i);
      this.doneSeq++;
    }
    if (ready > 0) r.cqAdvance(ready);
  }

  /** Hands completed reads over in posting order, judged as readv's results are. */
  private deliverDone(max: number, out: RxFrames): number {
    let n = 0;
    out.hostEmpty = false;
    while (n < max && this.headSeq !== this.doneSeq) {
      const c = this.cHead;
      const res = this.rxRes[this.headSeq & RES_MASK]!;
      out.cookie[n] = this.cCookie[c]!;
      out.buffers[n] = 1;
      out.length[n] = 0;
      if (res <= this.headerLength) {
        // A failed read (cancelled ahead of a later one that got a frame, or refused), or
        // nothing past the header: the buffer goes back empty.
        if (res < 0 && res !== -ECANCELED) this.counts[PortCount.rxErrHost]! += 1;
        out.status[n] = RX_ERROR;
      } else if (this.mayBeCut(c, res)) {
        out.status[n] = RX_DROPPED; // filled a buffer smaller than the largest frame: maybe cut short
      } else {
        out.length[n] = res;
        out.status[n] = RX_OK;
      }
      this.shift();
      this.headSeq++;
      n++;
    }
    return n;
  }

  /** Submits the waiting buffers as one hard-linked chain of reads once the previous chain is done. */
  private submitReads(): void {
    const posted = this.postedSeq;
    if (this.doneSeq !== this.submittedSeq || this.submittedSeq === posted) return;
    const r = this.rx;
    const v = this.iov.view;
    let c = this.cHead + (this.submittedSeq - this.headSeq);
    for (; this.submittedSeq !== posted && r.sqFree() > 1; c++) {
      const s0 = this.cSegStart[c]!;
      const tag = this.submittedSeq & SEQ_MASK;
      if (this.cSegCount[c] === 1) r.prep(IORING_OP_READ, IOSQE_FIXED_FILE | IOSQE_IO_HARDLINK, TAP_INDEX, readU64(v, s0 * 16), v.getUint32(s0 * 16 + 8, true), tag);
      else r.prep(IORING_OP_READV, IOSQE_FIXED_FILE | IOSQE_IO_HARDLINK, TAP_INDEX, this.iov.address + s0 * 16, this.cSegCount[c]!, tag);
      this.submittedSeq++;
    }
    r.endChain();
    r.submit();
  }

  private armPoll(): void {
    this.rx.prep(IORING_OP_POLL_ADD, IOSQE_FIXED_FILE, TAP_INDEX, 0, 0, POLL_TAG, POLLIN);
    this.rx.submit();
    this.pollArmed = true;
  }

  /**
   * Takes every read out of the kernel and waits until it has: the guest may reuse those
   * buffers as soon as we say so. Cancelling the running read of a hard-linked chain lets the
   * next one start, so this goes round until none is left.
   */
  private cancelReads(): void {
    for (let round = 0; this.doneSeq !== this.submittedSeq; round++) {
      if (round >= MAX_CANCEL_ROUNDS) throw new Error(`tap fd ${this.io}: reads still in the kernel after ${round} cancellations`);
      this.rx.prepCancelFixed(TAP_INDEX, CANCEL_TAG);
      this.rx.submit(1);
      this.reapRx();
    }
  }

  /**
   * From standing reads to readv over the stash: the reads leave the kernel; buffers whose read
   * was cancelled stay posted (readv fills them); those already holding a frame are delivered
   * first. The tap may hold frames already: the poll answers at once then.
   */
  private toReadv(): void {
    this.cancelReads();
    // Completed reads are a prefix unless a cancelled read came before one that got a frame;
    // from the first cancelled one on, the buffers count as posted and not yet read.
    let keep = this.headSeq;
    while (keep !== this.doneSeq && this.rxRes[keep & RES_MASK] !== -ECANCELED) keep++;
    let last = keep;
    for (let s = keep; s !== this.doneSeq; s++) if (this.rxRes[s & RES_MASK] !== -ECANCELED) last = s + 1;
    // A frame landed after a cancelled read: those in between are handed back empty, in order.
    this.doneSeq = this.submittedSeq = last;
    this.rxMode = 'rw';
    if (!this.pollArmed) this.armPoll();
  }

  override rebase(): void {
    if (this.headSeq >= REBASE) {
      this.headSeq -= REBASE;
      this.doneSeq -= REBASE;
      this.submittedSeq -= REBASE;
    }
  }

  override cancelRx(): void {
    this.cancelReads();
    eventfdDrain(this.fd); // the cancellations' own completions: nothing to wake for
    super.cancelRx();
    this.headSeq = this.doneSeq = this.submittedSeq = 0;
    this.rxMode = this.runner ? 'rw' : 'uring';
  }

  /** The rings go (the kernel cancels what is left), the eventfd, then the readv side's buffers. */
  override close(): void {
    try {
      this.cancelReads();
    } finally {
      this.tx.close();
      this.rx.close();
      closeFd(this.fd);
      this.slotIov.free();
      super.close();
    }
  }
}
