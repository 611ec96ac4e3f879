import type { RegionInfo } from '../memory/guest-memory.js';
import type { VringConfig } from '../vhost-user/backend.js';
import type { HostQueueConfig } from '../ports/port.js';
import type { XskOffloadTarget } from '../ports/xsk.js';
import type { OffloadProgram } from '../offload/broker.js';

/** The worker that owns the offload pair runs the broker (no thread hop per request). */
export interface OffloadInit {
  device: string;
  pinDir: string | null;
  /** On an xsk port the program runs natively on the backend's veth end, composed with the XSKMAP redirect. */
  xsk?: XskOffloadTarget;
}
export type OffloadMethod = 'show' | 'quotas' | 'setQuotas' | 'detach' | 'reset';

/** How frames are laid out for this device (from the acked features). */
/** Ethernet header: destination, source, EtherType. */
export const ETH_HLEN = 14;

/** Header requests a driver may make, by the features it acked (FrameFormat.txOffloads). */
export const TX_CSUM = 1; // VIRTIO_NET_F_CSUM
export const TX_TSO4 = 2; // VIRTIO_NET_F_HOST_TSO4
export const TX_TSO6 = 4; // VIRTIO_NET_F_HOST_TSO6
export const TX_ECN = 8; // VIRTIO_NET_F_HOST_ECN

export interface FrameFormat {
  eventIdx: boolean;
  headerLength: number;
  mergeable: boolean;
  /** Largest frame the host may hand us, header included: decides how many RX buffers to stash. */
  maxFrame: number;
  /** What guest TX headers may ask for: TX_CSUM | TX_TSO4 | TX_TSO6 | TX_ECN (queue-paths.ts). */
  txOffloads: number;
}

export type DatapathRequest =
  | { op: 'memory'; regions: RegionInfo[] }
  | { op: 'host'; pair: number; cfg: HostQueueConfig | null }
  | { op: 'format'; format: FrameFormat }
  | { op: 'start'; vring: VringConfig }
  | { op: 'stop'; index: number }
  | { op: 'call'; index: number; fd: number }
  /** The offloaded program (a dup of the broker's fd, owned by the worker from now on), or -1. */
  | { op: 'xdp'; progFd: number }
  /** Makes `pair` the offload channel of this worker, with a broker built (or restored from pins) here. */
  | { op: 'offload'; pair: number; init: OffloadInit }
  /** A control-plane call on the broker; the result comes back as an object. */
  | { op: 'offload-call'; method: OffloadMethod; arg?: unknown }
  | { op: 'exit' };

export interface DatapathWorkerData {
  name: string;
  controlFd: number;
  /** Int32Array over it: [0] = sequence number answered, [1] = status (0 ok), [2] = value. */
  control: SharedArrayBuffer;
  stats: SharedArrayBuffer;
  busyPoll: boolean;
  /** Queue pairs this worker serves (their vrings 2p and 2p+1). */
  pairs: number[];
}

/** Posted by a worker to the main thread (asynchronously). */
export type DatapathEvent = { kind: 'offload-state'; claimed: boolean; program: OffloadProgram | null };

export const CTL_SEQ = 0;
export const CTL_STATUS = 1;
export const CTL_VALUE = 2;
