/**
 * The one base of every error this project throws on purpose. `code` is stable (tests and
 * callers branch on it, never on message text); `reconnectHelps` says whether the same request
 * may succeed after the frontend reconnects or the device is reset (a transient condition), as
 * rust-vmm's vhost errors do.
 */
export class VxError extends Error {
  readonly code: string;
  readonly reconnectHelps: boolean;

  constructor(code: string, message: string, opts: { reconnectHelps?: boolean; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = code;
    this.reconnectHelps = opts.reconnectHelps ?? false;
  }
}

/** A caller passed a value outside what a function accepts (our bug or the operator's, never errno). */
export class ArgumentError extends VxError {
  constructor(message: string) {
    super('bad-argument', message);
  }
}
