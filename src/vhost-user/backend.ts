import { VxError } from '../errors.js';
import type { RegionInfo } from '../memory/guest-memory.js';

/**
 * A backend's refusal of something the frontend asked for (logged as a refusal, not a bug).
 * The default code says only that the backend refused; a backend names the rule with its own
 * code, and sets reconnectHelps when the refusal is about its own state (e.g. a datapath
 * worker that died) rather than about the request.
 */
export class BackendRefusal extends VxError {
  constructor(message: string, code = 'backend-refused', opts: { reconnectHelps?: boolean; cause?: unknown } = {}) {
    super(code, message, opts);
  }
}

/** Everything the datapath needs to run one vring, in the backend's address space. */
export interface VringConfig {
  index: number;
  size: number;
  /** Guest-physical addresses of the three ring parts (translated from frontend addresses). */
  descGpa: number;
  availGpa: number;
  usedGpa: number;
  lastAvailIdx: number;
  kickFd: number;
  callFd: number;
  errFd: number;
}

/**
 * The device behind a vhost-user session (here: virtio-net). The session owns protocol state
 * and fds; the backend owns what runs. Optional parts refuse with an error naming the request.
 */
export interface VhostUserBackend {
  readonly name: string;
  /** Device feature bits offered in GET_FEATURES (VHOST_USER_F_PROTOCOL_FEATURES included). */
  deviceFeatures(): bigint;
  protocolFeatures(): bigint;
  /** Number of virtqueues the device has (GET_QUEUE_NUM answers in queue pairs for net). */
  maxQueuePairs(): number;
  featuresAcked(features: bigint): void;
  /** New guest memory: the backend must stop using the previous regions before returning. */
  memoryChanged(regions: RegionInfo[]): void;
  /** A vring is started and enabled: run it. */
  startVring(cfg: VringConfig): void;
  /** The frontend stops a vring (GET_VRING_BASE): the guest reset the device, or the VM is stopping. */
  vringStopRequested?(index: number): void;
  /** Stops a vring; returns the index of the next available descriptor to process. */
  stopVring(index: number): number;
  /** A new call fd for a running vring (-1: no notifications). */
  updateCallFd(index: number, fd: number): void;
  setMtu(mtu: number): void;
  sendRarp(mac: Uint8Array): void;
  /** Frontend gone or device reset: drop all per-session state (queues must be stopped already). */
  sessionReset(reason: string): void;
}
