import type { DescriptorChain } from '../virtio/descriptor-chain.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { TestRunner } from '../sys/bpf/test-run.js';

/** A received frame's outcome (RxFrames.status). */
export const RX_OK = 0;
/** Nothing usable landed in the buffers: they go back empty, an error. */
export const RX_ERROR = 1;
/** The frame did not fit the buffers: they go back empty, a drop. */
export const RX_DROPPED = 2;
/** The host's frame went elsewhere (an offloaded program's verdict); no buffer was used. */
export const RX_NONE = 3;

/** What postTx did with a frame. Taken: its cookie comes back through collectTx once the host is done with the buffers. */
export const TX_POSTED = 0;
/** Sent and done with already (writev ports): the buffers are free now. */
export const TX_SENT = 1;
/** Not going out (host full, link down, too large for it): the buffers are free now; a drop (the port counted its reason). */
export const TX_DROPPED = 2;
/** Not a frame this port can send: the buffers are free now; an error (the port counted its reason). */
export const TX_ERROR = 3;
/** No room right now (ring or bounce chunks busy): nothing was taken, post it again later. */
export const TX_BUSY = 4;

/**
 * Received frames collected in one call, in the order their buffers were posted: frame i used
 * `buffers[i]` consecutive posted buffers (the first posted with `cookie[i]`; 0 for RX_NONE
 * and for errors that used none) and is `length[i]` bytes long counted from the first
 * buffer's start, vnet header included (written by the port when it carries one; otherwise
 * the frame starts headerLength bytes in and the datapath writes the header). Preallocated
 * and reused: nothing is allocated per frame.
 */
export class RxFrames {
  readonly cookie: Int32Array;
  readonly length: Int32Array;
  readonly buffers: Int32Array;
  readonly status: Uint8Array;
  /** Set by collectRx: it stopped because the host had no more frames (not for want of buffers or room in here). */
  hostEmpty = false;
  constructor(readonly capacity: number) {
    this.cookie = new Int32Array(capacity);
    this.length = new Int32Array(capacity);
    this.buffers = new Int32Array(capacity);
    this.status = new Uint8Array(capacity);
  }
}

/**
 * What a port queue counts for the datapath, which folds them into the device's counters
 * (net/stats.ts, same names) and zeroes them. A port counts the reason of every frame it
 * loses where it loses it: postTx counts the reason of each TX_DROPPED or TX_ERROR it returns.
 */
export const PORT_COUNTS = [
  'rxCopies', 'rxCopyBytes', 'txCopies', 'txCopyBytes', 'rxErrHost', 'txErrHost',
  'txDropOversize', 'txDropHostBusy', 'txDropLinkDown', 'txDropRefused',
  'xdpPass', 'xdpDrop', 'xdpTx', 'xdpAborted',
] as const;
export type PortCountName = (typeof PORT_COUNTS)[number];
export const PortCount = Object.fromEntries(PORT_COUNTS.map((n, i) => [n, i])) as Record<PortCountName, number>;

/** How a device lays frames out, as far as its port queues care (plain data). */
export interface QueueFormat {
  /** The vnet header in front of every frame. */
  headerLength: number;
  /** A received frame may span several receive buffers (MRG_RXBUF). */
  mergeable: boolean;
  /** Largest frame the host may hand over, header included. */
  maxFrame: number;
}

/**
 * A host attachment's queue as the datapath sees it, one per virtio queue pair: a
 * completion-style interface that fits readv/writev (completions are immediate), AF_XDP rings
 * (completions come later, from the kernel) and io_uring alike. Guest buffers are handed over
 * as popped descriptor chains with a cookie (the datapath uses the chain's head) and come back
 * by cookie, on receive in the order they were posted. The port moves the bytes (the kernel,
 * or its own counted bounce copies), never the datapath, which only writes the vnet header
 * where the port does not carry one (`carriesHeader` false: the port leaves headerLength bytes
 * in front of each received frame and skips them on transmit).
 */
export interface HostQueue {
  /** Readable when the host has frames for the guest. */
  readonly fd: number;
  /** The host reads and writes the vnet header itself (tap). */
  readonly carriesHeader: boolean;
  /** Posted receive buffers can be forgotten at once (readv ports); AF_XDP ones only by closing the socket. */
  readonly cancelsAtOnce: boolean;
  /** Counts for the datapath to fold in (PortCount indexes) and zero. */
  readonly counts: Float64Array;

  /**
   * A path of this queue starts (receive or transmit side): the guest memory its chains point
   * into and the device's frame layout. Throws when the queue cannot serve it (an AF_XDP
   * socket whose rings hold a previous run's entries: they would be matched to the wrong chains).
   */
  start(side: 'rx' | 'tx', mem: GuestMemory, format: QueueFormat): void;

  /** Whether the port wants another receive buffer posted now. */
  wantsRx(): boolean;
  /** Whether what is posted lets the port take a frame from the host (else the guest is short of buffers). */
  readonly rxReady: boolean;
  /**
   * Posts the device-writable part of a popped chain as one receive buffer; false when the port
   * cannot take it now (no bounce chunk free): the caller gives the chain back.
   */
  postRx(cookie: number, ch: DescriptorChain): boolean;
  /** Collects up to `max` received frames into `out`; returns how many. */
  collectRx(max: number, out: RxFrames): number;
  /**
   * Forgets every posted receive buffer (the caller gives the chains back). An AF_XDP queue
   * must be released (socket closed) before the guest may reuse them.
   */
  cancelRx(): void;

  /** Posts the device-readable part of a popped chain as one frame; TX_* says what happened (a lost frame's reason is in counts). */
  postTx(cookie: number, ch: DescriptorChain): number;
  /** Hands the frames posted since the last flush to the host (a kick). */
  flushTx(): void;
  /** Collects up to `max` cookies of posted frames the host is done with; returns how many. */
  collectTx(max: number, cookies: Int32Array): number;
  /** Frames posted and not yet collected. */
  readonly txInFlight: number;
  /** Forgets every posted frame; writes the cookies of those not yet collected into `out` (room for txInFlight) and returns how many. */
  cancelTx(out: Int32Array): number;
  /** Keeps free-running counters small; called once per burst. */
  rebase(): void;

  /**
   * Attaching an offloaded program is a port method (DESIGN.md decision 7). Ports with no
   * kernel hook on their host→guest path (tap) run it on each frame before it is collected,
   * through BPF_PROG_TEST_RUN; xsk ports have it composed into the kernel's XDP program on the
   * control side and do not implement this.
   */
  setProgram?(runner: TestRunner | null): void;
  /** Releases what the queue itself owns (the port owns the fds of tap and AF_XDP queues). */
  close?(): void;
}
