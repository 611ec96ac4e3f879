// Errors of the offload layer. A ProtocolError is a refusal the guest hears about: `status`
// and `detail` go on the wire (docs/offload-protocol.md, "Status codes"), the message becomes
// the response's reason, and `code` is the stable host-side name of the rule that refused
// (tests and logs branch on it, never on the reason text). One code per rule, as undici's
// errors and vm-virtio's Reader do, so two refusals with the same status stay distinguishable.

import { VxError } from '../errors.js';

/** Fixed part of every failure response's body (meaning per status, see the spec). */
export interface ErrorDetail { a: number; b: number; c: number }

export class ProtocolError extends VxError {
  readonly status: number;
  readonly detail: ErrorDetail;
  /** Bytes after the detail in the response body (VERIFIER_REJECTED: the log). */
  readonly extra: Uint8Array | undefined;
  constructor(status: number, code: string, reason: string, detail: Partial<ErrorDetail> = {}, extra?: Uint8Array) {
    super(code, reason);
    this.status = status;
    this.detail = { a: detail.a ?? 0, b: detail.b ?? 0, c: detail.c ?? 0 };
    this.extra = extra;
  }
}

/** Throws the refusal: for expressions such as `x ?? refuse(...)` and guard lines. */
export function refuse(status: number, code: string, reason: string, detail: Partial<ErrorDetail> = {}, extra?: Uint8Array): never {
  throw new ProtocolError(status, code, reason, detail, extra);
}

/**
 * Operator input the offload layer refuses (quota values, helper allow-lists): never seen by
 * the guest. `subject` names the quota or helper, so callers need not parse the message.
 */
export class OffloadConfigError extends VxError {
  constructor(code: 'bad-quota' | 'unknown-quota' | 'bad-size' | 'not-a-helper' | 'helper-never-allowed',
    message: string, readonly subject: string) {
    super(code, message);
  }
}

/** Stable codes of a refused migration state (docs/offload-protocol.md §7 lists each rule). */
export type MigrationStateCode =
  | 'bad-state-magic' | 'state-version' | 'state-truncated' | 'state-trailing' | 'state-checksum'
  | 'state-malformed' | 'state-map-type' | 'state-quota' | 'state-program-refused' | 'state-kernel'
  | 'state-not-fresh' | 'state-program-unexportable' | 'state-too-large' | 'state-object-unsupported'
  | 'state-load-pending';

/**
 * A migration state the destination refuses (or the source cannot write). The vhost-user side
 * fails CHECK_DEVICE_STATE with it, so QEMU fails the migration and the source keeps running.
 * `rule` is the code of the underlying rule when one of the broker's own checks refused
 * (e.g. 'helper-not-allowed', 'verifier-rejected', 'quota-exceeded', 'truncated').
 */
export class MigrationStateError extends VxError {
  constructor(code: MigrationStateCode, message: string, readonly rule?: string, cause?: unknown) {
    super(code, message, { cause });
  }
}
