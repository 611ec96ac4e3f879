import type { RegionInfo } from '../vhost-user/guest-memory.js';
import type { VringConfig } from '../vhost-user/backend.js';
import type { HostQueueConfig } from '../ports/port.js';

/** How frames are laid out for this device (from the acked features). */
export interface FrameFormat {
  eventIdx: boolean;
  headerLength: number;
  mergeable: boolean;
  /** Largest frame the host may hand us, header included: decides how many RX buffers to stash. */
  maxFrame: number;
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
  /** Marks a pair as the offload channel (offload = true) and whether the guest has claimed it. */
  | { op: 'offload'; pair: number; offload: boolean; claimed: boolean }
  | { op: 'offload-reply'; pair: number; message: Uint8Array }
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
export type DatapathEvent = { kind: 'offload-request'; pair: number; message: Uint8Array };

export const CTL_SEQ = 0;
export const CTL_STATUS = 1;
export const CTL_VALUE = 2;
