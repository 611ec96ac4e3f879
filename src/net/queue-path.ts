import { eventfdSignal, IOV_MAX } from '../sys/libc.js';
import { SplitQueue } from '../virtio/split-queue.js';
import { DescriptorChain } from '../virtio/descriptor-chain.js';
import { VirtqueueError } from '../virtio/errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { PORT_COUNTS, type HostQueue } from '../ports/host-queue.js';
import { C, COUNTERS } from './stats.js';
import type { FrameFormat } from './frame-format.js';

/** Offload frames: zero MACs and the IEEE local-experimental EtherType (docs/offload-protocol.md). */
export { OFFLOAD_ETHERTYPE } from '../offload/protocol.js';

/** Frames handled per queue before the worker looks at other queues (fairness). */
export const BURST = 64;

/**
 * The transmit side's budget per turn: twice BURST. Each turn pays a fixed cost (the kick's
 * sendto or io_uring_enter, the worker's epoll_wait, the ring fences, a few koffi calls), and on
 * a machine where a system call is dear (x86 with PTI, a paravirtualized VM) that cost showed:
 * 128 against 64 gave 11-15 % more guest->host frames on both ports and 12-43 ns less user time
 * per frame (docs/benchmarks.md). The price is a busy TX ring holding its worker twice as long
 * per turn (about 58 us instead of 29 us on that machine) before other rings are looked at.
 * Receive stays at BURST: 128 was not measured there.
 */
export const TX_BURST = 2 * BURST;

export interface PathContext {
  name: string;
  stats: Float64Array;
  pair: number;
  onBroken(index: number, why: string): void;
}

/** Device counter of each port count (PORT_COUNTS order). */
const PORT_TO_COUNTER = Int32Array.from(PORT_COUNTS, (n) => C[n]);

/**
 * What both directions share, whatever the port: counters, publishing used entries, fail-stop
 * on a broken ring, and folding the port's own counts (copies, XDP verdicts) into the device's.
 */
export abstract class QueuePath {
  readonly chain = new DescriptorChain(IOV_MAX);
  callFd: number;
  broken = false;
  protected readonly base: number;
  protected readonly headerLength: number;
  private readonly brokenCounter: number;

  /** Starts the port queue's side this path serves (it may refuse: AF_XDP rings left over from a previous run). */
  constructor(readonly queue: SplitQueue, readonly index: number, callFd: number, protected readonly ctx: PathContext,
              protected readonly host: HostQueue, side: 'rx' | 'tx', mem: GuestMemory, format: FrameFormat) {
    host.start(side, mem, format);
    this.callFd = callFd;
    this.base = ctx.pair * COUNTERS.length;
    this.headerLength = format.headerLength;
    this.brokenCounter = side === 'rx' ? C.rxRingBroken : C.txRingBroken;
  }

  protected count(c: number, n = 1): void {
    this.ctx.stats[this.base + c]! += n;
  }

  /** Adds what the port counted since the last call to the device's counters (once per burst). */
  protected foldPortCounts(): void {
    const counts = this.host.counts;
    for (let i = 0; i < counts.length; i++) {
      if (counts[i] !== 0) {
        this.ctx.stats[this.base + PORT_TO_COUNTER[i]!]! += counts[i]!;
        counts[i] = 0;
      }
    }
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
    this.count(this.brokenCounter);
    this.ctx.onBroken(this.index, e.message);
  }
}
