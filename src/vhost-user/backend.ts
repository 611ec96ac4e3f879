import { VxError } from '../errors.js';
import type { RegionInfo } from '../memory/guest-memory.js';
import type { LogInfo, UsedRingLog } from '../memory/dirty-log.js';

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
  /**
   * VHOST_VRING_F_LOG of SET_VRING_ADDR: while a dirty log is given, used-ring writes are marked
   * at logGuestAddr + their offset into the used ring (DirtyLog.markUsed), not at usedGpa.
   */
  logUsed: boolean;
  /** log_guest_addr of SET_VRING_ADDR (0 unless logUsed). */
  logGuestAddr: number;
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
  /**
   * The frontend enabled or disabled a ring (SET_VRING_ENABLE, or the start of a ring when
   * protocol features are not negotiated). Called after a disabled ring stopped and before an
   * enabled one starts; after a reset (sessionReset) every ring counts as disabled again.
   */
  vringEnabled?(index: number, enabled: boolean): void;
  /** A new call fd for a running vring (-1: no notifications). */
  updateCallFd(index: number, fd: number): void;
  setMtu(mtu: number): void;
  sendRarp(mac: Uint8Array): void;
  /** Frontend gone or device reset: drop all per-session state (queues must be stopped already). */
  sessionReset(reason: string): void;
  /**
   * The dirty log to mark every guest write into (DirtyLog over `log`), or null: no logging.
   * Non-null exactly while VHOST_F_LOG_ALL is acked and SET_LOG_BASE gave a log; may change while
   * rings run. Before returning, the backend must stop marking into the previous log (the session
   * unmaps it next). A backend with this hook is offered VHOST_F_LOG_ALL and LOG_SHMFD.
   */
  dirtyLogChanged?(log: LogInfo | null): void;
  /**
   * VHOST_VRING_F_LOG / log_guest_addr changed on a running vring (QEMU sends that when
   * migration logging starts and stops): apply them between two bursts without stopping the
   * ring. Without this hook the session restarts the ring, which a port whose host queue
   * still holds the ring's buffers (an AF_XDP fill ring) cannot do.
   */
  vringLogChanged?(index: number, log: UsedRingLog): void;
  /**
   * Device state for migration (SET_DEVICE_STATE_FD, save direction), called while every ring is
   * stopped. A backend with saveState and loadState is offered VHOST_USER_PROTOCOL_F_DEVICE_STATE.
   * A promise: the state is not ready yet (the frontend waits for it on the pipe); its rejection
   * fails the transfer with the error's code.
   */
  saveState?(): Uint8Array | Promise<Uint8Array>;
  /** Takes the state saved by a source backend; throws a VxError with a code to refuse it (fails the migration). */
  loadState?(state: Uint8Array): void;
}
