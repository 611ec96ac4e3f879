import { VxError } from '../errors.js';

/**
 * Why a virtqueue operation was refused: one code per rule, so callers (and tests) can branch
 * on the rule that fired without parsing messages.
 */
export type VirtqueueErrorCode =
  // ring setup (constructor)
  | 'bad-queue-size'
  | 'misaligned-ring'
  | 'odd-host-address'
  | 'ring-outside-memory'
  // avail ring
  | 'avail-idx-jump'
  | 'head-out-of-range'
  // descriptor walking
  | 'desc-out-of-range'
  | 'chain-loop'
  | 'chain-too-long'
  | 'chain-too-large'
  | 'write-before-read'
  | 'addr-outside-memory'
  | 'addr-too-large'
  // indirect tables
  | 'indirect-not-negotiated'
  | 'indirect-nested'
  | 'indirect-next'
  | 'bad-indirect-len'
  // device-side misuse (our own bug, not the guest's)
  | 'bad-argument';

/**
 * A guest (or frontend) broke a virtqueue rule. Thrown before anything outside guest RAM is
 * touched. `head` is the chain's head index when one was already taken off the avail ring
 * (the slot is consumed: the caller may return it with pushUsed(head, 0) to drop the chain,
 * or stop the queue and mark the device NEEDS_RESET); -1 when there is no usable head.
 * The same ring contents break the same rule after a reconnect, so reconnectHelps is false.
 */
export class VirtqueueError extends VxError {
  declare readonly code: VirtqueueErrorCode;
  readonly queue: string;
  readonly head: number;

  constructor(code: VirtqueueErrorCode, queue: string, detail: string, head = -1) {
    super(code, `${queue}: ${code}: ${detail}`);
    this.queue = queue;
    this.head = head;
  }
}
