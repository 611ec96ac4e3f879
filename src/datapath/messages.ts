import type { RegionInfo } from '../memory/guest-memory.js';
import type { VringConfig } from '../vhost-user/backend.js';
import type { HostQueueConfig } from '../ports/port.js';
import type { FrameFormat } from '../net/frame-format.js';
import type { LogInfo, UsedRingLog } from '../memory/dirty-log.js';
import type { WorkerPlacement } from './placement.js';

/**
 * What the main thread asks of one device's queues on a worker. Plain data: posted between
 * threads. A device is known to a worker only by the small integer the pool gave it.
 */
export type DeviceRequest =
  | { op: 'memory'; regions: RegionInfo[] }
  | { op: 'host'; pair: number; cfg: HostQueueConfig | null }
  | { op: 'format'; format: FrameFormat }
  /** Migration logging on (the log's mapping) or off (null). */
  | { op: 'log'; log: LogInfo | null }
  /** A running vring's VHOST_VRING_F_LOG / log_guest_addr changed (applied in place). */
  | { op: 'vring-log'; index: number; log: UsedRingLog }
  | { op: 'start'; vring: VringConfig }
  | { op: 'stop'; index: number }
  | { op: 'call'; index: number; fd: number }
  /** The offloaded program for per-frame test runs (a fd the worker owns from now on), or -1. */
  | { op: 'xdp'; progFd: number }
  /** The device's reserved offload pair and whether the guest has claimed it. */
  | { op: 'offload'; pair: number; claimed: boolean }
  /** A broker response to deliver on the reserved pair's receive ring. */
  | { op: 'offload-reply'; reply: Uint8Array }
  /**
   * The responses the worker still holds for the reserved pair, oldest first, handed back (and
   * forgotten here): its receive ring stopped, and they must reach the migration state or the
   * worker that serves the pair next. Answered with data (WorkerHandle.requestData).
   */
  | { op: 'take-replies' };

/** What a request that answers with more than a number yields on the worker side; `data` is posted as { seq, data }. */
export interface DataAnswer { data: unknown }

export type WorkerRequest =
  /** The worker starts serving queues of a device: its name (logs) and shared counters. */
  | { op: 'attach'; device: number; name: string; stats: SharedArrayBuffer }
  /** The worker stops everything of the device it still runs and forgets it. */
  | { op: 'detach'; device: number }
  | { op: 'device'; device: number; req: DeviceRequest }
  | { op: 'exit' };

/** Posted by a worker to the main thread (asynchronously). */
export type WorkerEvent =
  /** An offload request the guest sent on its reserved pair, copied out of guest memory. */
  { kind: 'offload-request'; device: number; message: Uint8Array };

export interface WorkerData {
  name: string;
  controlFd: number;
  /** Int32Array over it: [0] = sequence number answered, [1] = status (0 ok), [2] = value, [3] = the worker's kernel thread id. */
  control: SharedArrayBuffer;
  busyPoll: boolean;
  /** The bound of each queue pair's reply window in µs, 0 for none (always 0 with busyPoll: WorkerPool; src/net/reply-poll.ts). */
  replyPollUs: number;
  /** The worker's index in the pool: which of placement.cpus is its own. */
  index: number;
  placement: WorkerPlacement;
}

export const CTL_SEQ = 0;
export const CTL_STATUS = 1;
export const CTL_VALUE = 2;
export const CTL_TID = 3;
