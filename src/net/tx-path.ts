import { SplitQueue } from '../virtio/split-queue.js';
import type { DescriptorChain } from '../virtio/descriptor-chain.js';
import { ChainReader } from '../virtio/chain-io.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { TX_BUSY, TX_POSTED, TX_SENT, type HostQueue } from '../ports/host-queue.js';
import { C } from './stats.js';
import { ETH_HLEN, type FrameFormat } from './frame-format.js';
import { headerRequests, unnegotiatedRequest } from './vnet-header.js';
import { OFFLOAD_ETHERTYPE, QueuePath, type PathContext } from './queue-path.js';

/** Largest offload message we copy out of a guest TX chain (the broker refuses larger ones). */
export const MAX_OFFLOAD_COPY = 64 * 1024;

/** The reserved pair's link to the broker (worker side). */
export interface OffloadLink {
  /** Claimed: the pair carries only offload messages; other frames are dropped. */
  claimed: boolean;
  post(message: Uint8Array): void;
}

/**
 * Guest → host, for every port: each available chain is one frame, checked (room for an
 * Ethernet header after the vnet header, header requests the driver negotiated), then posted
 * to the port with its head as the cookie. Writev ports are done with it at once; ring ports
 * hand the cookie back when the kernel has sent it (collectTx), and the chain goes back to the
 * guest then. On the reserved pair of an offload device, offload messages are taken out first.
 */
export class TxPath extends QueuePath {
  private readonly eth = new Uint8Array(ETH_HLEN);
  private readonly reader: ChainReader;
  /** Cookies handed back by the port (at most one per chain the guest has out). */
  private readonly cookies: Int32Array;
  /** Set on the reserved pair of an offload device. */
  offload: OffloadLink | null = null;
  /**
   * Header requests the guest may make (TX_CSUM | TX_TSO4 | ...); frames asking for more are
   * refused. A port that does not carry the header sends plain frames: nothing may be asked.
   */
  readonly offloads: number;
  /** Shortest chain that is a frame: the vnet header and an Ethernet header (computed once, not per frame). */
  private readonly minReadable: number;

  constructor(queue: SplitQueue, index: number, callFd: number, ctx: PathContext, host: HostQueue,
              mem: GuestMemory, format: FrameFormat) {
    super(queue, index, callFd, ctx, host, 'tx', mem, format);
    this.reader = new ChainReader(mem);
    this.offloads = host.carriesHeader ? format.txOffloads : 0;
    this.cookies = new Int32Array(queue.size);
    this.minReadable = this.headerLength + ETH_HLEN;
  }

  /** Frames posted to the port and not yet sent. */
  get inFlight(): number {
    return this.host.txInFlight;
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
      this.count(C.txDropClaimed); // a claimed pair carries nothing but offload messages
      return true;
    }
    // Copy, then let the broker validate: the guest may rewrite its buffer at any time.
    const len = Math.min(Math.max(0, ch.readableBytes - this.headerLength - ETH_HLEN), MAX_OFFLOAD_COPY);
    const msg = new Uint8Array(len);
    r.read(msg, 0, len);
    link.post(msg);
    return true;
  }

  /** Returns chains the port is done with to the guest; true when any were. */
  private reap(): boolean {
    const n = this.host.collectTx(this.cookies.length, this.cookies);
    if (n > 0) this.queue.pushUsedHeads(this.cookies, n);
    return n > 0;
  }

  /** Chains the last process() took from the ring (whether the guest had sent anything). */
  lastTaken = 0;

  /**
   * Posts up to `budget` guest frames to the port, flushes them to the host and returns the
   * chains it is done with. Returns true when frames are left (call again).
   */
  process(budget: number, suppressKicks: boolean): boolean {
    this.lastTaken = 0;
    if (this.broken) return false;
    const q = this.queue;
    const ch = this.chain;
    const host = this.host;
    const hdr = this.headerLength;
    const minReadable = this.minReadable;
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
        // The kernel copies each frame out of guest memory: bring the burst's lines here first,
        // all at once (SplitQueue.prefetchFrames says why).
        q.prefetchFrames(budget - done, hdr);
        while (done < budget && q.pop(ch)) {
          done++;
          let req: number;
          if (ch.readableBytes < minReadable) {
            // No room for an Ethernet header after the vnet header: not a frame.
            this.count(C.txErrFrame);
          } else if ((req = headerRequests(this.reader, ch, hdr)) !== 0 && unnegotiatedRequest(req, this.offloads)) {
            // Most frames ask for nothing (flags and gso_type 0): the rules are consulted only
            // when there is something to judge (unnegotiatedRequest(0, x) is false for every x).
            this.count(C.txErrFrame);
          } else if (this.offload && this.offloadFrame(ch)) {
            // consumed by the broker link (or dropped on a claimed pair)
          } else {
            const st = host.postTx(ch.head, ch);
            if (st === TX_POSTED) {
              posted++;
              postedBytes += ch.readableBytes - hdr;
              continue;
            }
            if (st === TX_BUSY) {
              q.rewind(1); // it was the last pop; posted again once the port has room
              done--;
              more = true;
              break;
            }
            if (st === TX_SENT) {
              packets++;
              bytes += ch.readableBytes - hdr;
            }
            // TX_DROPPED, TX_ERROR: the port counted the reason where it refused the frame.
          }
          q.pushUsed(ch.head, 0);
        }
        if (posted > 0) {
          host.flushTx();
          // Counted once the host can see them (a broken ring mid-burst flushes nothing).
          packets += posted;
          bytes += postedBytes;
        }
        this.reap();
        host.rebase();
        if (q.unflushed > 0) this.publish();
        if (more || done >= budget) return true;
        if (!suppressKicks) return false;
        // Re-enable kicks, then look once more: the guest may have added buffers in between.
        q.setKickNotification(true);
        if (q.availableCount() === 0) return false;
        q.setKickNotification(false);
      }
    } catch (e) {
      if (q.unflushed > 0) this.publish();
      this.fail(e);
      return false;
    } finally {
      this.lastTaken = done;
      this.count(C.txPackets, packets);
      this.count(C.txBytes, bytes);
      this.foldPortCounts();
    }
  }

  /**
   * Stops serving: chains the port is done with are returned, the rest are given back as sent
   * (an AF_XDP port copied them at the kick). The port closes its socket (releaseQueue) before
   * the frontend hears the ring stopped, so frames left in its ring are never sent.
   */
  stop(): number {
    if (!this.broken) {
      this.reap();
      const n = this.host.cancelTx(this.cookies);
      for (let i = 0; i < n; i++) this.queue.pushUsed(this.cookies[i]!, 0);
      if (this.queue.unflushed > 0) this.publish();
    } else {
      this.host.cancelTx(this.cookies);
    }
    return this.queue.lastAvailIdx;
  }

  free(): void {}
}
