import koffi from 'koffi';
import { VxError } from '../errors.js';
import { raw, closeFd, fdInfo, setNonBlocking, lastErrno, Errno, NativeBuffer, O_RDONLY, O_WRONLY, O_RDWR } from '../sys/libc.js';

// VHOST_USER_PROTOCOL_F_DEVICE_STATE (QEMU docs/interop/vhost-user.rst, "Migrating back-end
// state"): the frontend hands us one end of a pipe with SET_DEVICE_STATE_FD; "The writing end
// will write all the data it has into it, signalling the end of data by closing its end. The
// reading end must read all of this data (until encountering the end of file) and process it."
// Then CHECK_DEVICE_STATE asks whether that worked. The frontend reads (SAVE) or writes (LOAD)
// the pipe only after our reply, so the transfer runs from the event loop, never blocking it.
// A state that is not ready yet (SAVE while the backend finishes something the state must
// include) is fine by the spec: the frontend reads until EOF, so the bytes may come later.

export enum TransferDirection { SAVE = 0, LOAD = 1 }
/** "0: Stopped ... the vhost-user device is suspended": the only phase the spec defines. */
export const PHASE_STOPPED = 0;
/** Reply bit of SET_DEVICE_STATE_FD: "Bit 8 is the invalid FD flag" (we never return an fd of our own). */
export const STATE_NOFD = 0x100;
/** Largest state we accept on LOAD: a device's offload state is maps and programs, far below this. */
export const MAX_STATE_BYTES = 64 * 2 ** 20;
const CHUNK = 64 * 1024;

export type DeviceStateErrorCode =
  | 'bad-transfer-direction' | 'bad-transfer-phase' | 'bad-transfer-fd' | 'device-not-suspended'
  | 'state-too-large' | 'transfer-incomplete' | 'transfer-failed' | 'no-transfer';

/** A device-state transfer that cannot start or did not complete. */
export class DeviceStateError extends VxError {
  /** A failed LOAD carries the code the backend refused the state with. */
  constructor(code: DeviceStateErrorCode | (string & {}), message: string, opts: { cause?: unknown } = {}) {
    super(code, message, opts);
  }
}

/** What one transfer did (the device's status shows the last one). */
export interface TransferRecord {
  direction: 'save' | 'load';
  bytes: number;
  ms: number;
  ok: boolean;
  /** On failure: the rule's code and the values. */
  code?: string;
  reason?: string;
}

type PollHandle = ReturnType<typeof koffi.node.poll>;

/**
 * One transfer over a frontend-supplied fd. SAVE writes `state` and closes the fd (the EOF the
 * frontend waits for); LOAD reads to EOF (at most MAX_STATE_BYTES) and hands the bytes to
 * `apply`, whose exception refuses the state. Owns the fd from construction on.
 */
export class StateTransfer {
  private readonly started = performance.now();
  private readonly buf = new NativeBuffer(CHUNK);
  private poll: PollHandle | null = null;
  private fd: number;
  private done: TransferRecord | null = null;
  /** SAVE: bytes written so far. LOAD: chunks read so far. */
  private offset = 0;
  private readonly chunks: Uint8Array[] = [];

  private constructor(readonly direction: TransferDirection, fd: number, private state: Uint8Array,
    private readonly apply: (bytes: Uint8Array) => void, private readonly onDone: (r: TransferRecord) => void) {
    this.fd = fd;
  }

  /**
   * Checks the request ("transfer direction", "migration phase", the fd) and starts the
   * transfer. `state` is called for SAVE only; when it answers with a promise, writing starts
   * once it resolves, and its rejection fails the transfer (the fd closes: the frontend sees
   * EOF, then CHECK_DEVICE_STATE reports the rejection's code). Takes ownership of fd, also
   * when it throws.
   */
  static begin(direction: number, phase: number, fd: number, hooks: { state: () => Uint8Array | Promise<Uint8Array>; apply: (b: Uint8Array) => void; onDone: (r: TransferRecord) => void }): StateTransfer {
    let t: StateTransfer;
    let later: Promise<Uint8Array> | null = null;
    try {
      if (direction !== TransferDirection.SAVE && direction !== TransferDirection.LOAD) throw new DeviceStateError('bad-transfer-direction', `transfer direction ${direction} (0 save, 1 load)`);
      if (phase !== PHASE_STOPPED) throw new DeviceStateError('bad-transfer-phase', `migration phase ${phase} (only 0, stopped, is defined)`);
      const info = fdInfo(fd);
      // The spec's channel "must generally behave like a pipe": a pipe or a socket, open the right way.
      if (info.kind !== 'fifo' && info.kind !== 'socket') throw new DeviceStateError('bad-transfer-fd', `transfer fd is a ${info.kind}, not a pipe or socket`);
      const want = direction === TransferDirection.SAVE ? O_WRONLY : O_RDONLY;
      if (info.access !== want && info.access !== O_RDWR) throw new DeviceStateError('bad-transfer-fd', `transfer fd is not open for ${direction === TransferDirection.SAVE ? 'writing' : 'reading'}`);
      setNonBlocking(fd);
      const state = direction === TransferDirection.SAVE ? hooks.state() : new Uint8Array(0);
      if (state instanceof Promise) later = state;
      t = new StateTransfer(direction, fd, later ? new Uint8Array(0) : state as Uint8Array, hooks.apply, hooks.onDone);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
    if (!later) {
      t.startPolling();
      return t;
    }
    later.then((state) => {
      // Cancelled or checked meanwhile: the fd is closed and the record written.
      if (t.done) return;
      t.state = state;
      t.startPolling();
    }, (e: unknown) => {
      if (!t.done) t.complete(e);
    });
    return t;
  }

  /**
   * A poll that cannot start (the fd refused by the event loop) fails the transfer like any other
   * error: the fd is closed and CHECK_DEVICE_STATE reports it. Thrown instead, it would leak the
   * fd from begin() and, after an asynchronous SAVE, reject a promise nobody awaits.
   */
  private startPolling(): void {
    try {
      this.poll = koffi.node.poll(this.fd, this.direction === TransferDirection.SAVE ? { writable: true } : { readable: true, disconnect: true }, () => this.pump());
    } catch (e) {
      this.complete(e);
    }
  }

  get finished(): boolean { return this.done !== null; }

  /**
   * SAVE whose state is still being made: nothing is written (and no EOF given) before it is.
   * Polling starts only with the state in hand, and stops only once done.
   */
  private get waiting(): boolean { return this.done === null && this.poll === null; }

  /** Moves as many bytes as the fd takes now; completes the transfer at the end. */
  private pump(): void {
    if (this.done || this.waiting) return;
    try {
      if (this.direction === TransferDirection.SAVE ? this.writeSome() : this.readSome()) this.complete(null);
    } catch (e) {
      this.complete(e);
    }
  }

  /** True when everything is written. */
  private writeSome(): boolean {
    while (this.offset < this.state.length) {
      const n = Math.min(CHUNK, this.state.length - this.offset);
      this.buf.bytes.set(this.state.subarray(this.offset, this.offset + n), 0);
      const r = raw.write(this.fd, this.buf.address, n);
      if (r < 0) {
        const e = lastErrno();
        if (e === Errno.EAGAIN) return false;
        if (e === Errno.EINTR) continue;
        throw new DeviceStateError('transfer-failed', `writing the state: errno ${e}${e === Errno.EPIPE ? ' (the frontend closed its end)' : ''}`);
      }
      this.offset += r;
    }
    return true;
  }

  /** True at end of file. */
  private readSome(): boolean {
    for (;;) {
      const r = raw.read(this.fd, this.buf.address, CHUNK);
      if (r === 0) return true;
      if (r < 0) {
        const e = lastErrno();
        if (e === Errno.EAGAIN) return false;
        if (e === Errno.EINTR) continue;
        throw new DeviceStateError('transfer-failed', `reading the state: errno ${e}`);
      }
      // The limit holds before the bytes are kept, so a frontend cannot make us buffer more.
      if (this.offset + r > MAX_STATE_BYTES) throw new DeviceStateError('state-too-large', `state exceeds ${MAX_STATE_BYTES} bytes`);
      this.chunks.push(this.buf.bytes.slice(0, r));
      this.offset += r;
    }
  }

  private complete(error: unknown): void {
    let e = error;
    if (e === null && this.direction === TransferDirection.LOAD) {
      const all = new Uint8Array(this.offset);
      let at = 0;
      for (const c of this.chunks) { all.set(c, at); at += c.length; }
      this.chunks.length = 0;
      try { this.apply(all); } catch (err) { e = err; }
    }
    this.release();
    const r: TransferRecord = { direction: this.direction === TransferDirection.SAVE ? 'save' : 'load', bytes: this.offset, ms: Math.round(performance.now() - this.started), ok: e === null };
    if (e !== null) {
      r.code = e instanceof VxError ? e.code : 'internal';
      r.reason = (e as Error).message;
    }
    this.done = r;
    this.onDone(r);
  }

  /**
   * CHECK_DEVICE_STATE: the frontend has seen the end of the transfer ("saving: seen an EOF on
   * the pipe; loading: closed its end"), so what is left can be moved without waiting; a transfer
   * that still cannot finish is reported as incomplete.
   */
  finish(): TransferRecord {
    if (!this.done) {
      this.pump();
      if (!this.done) {
        const why = this.waiting ? 'the state was not ready yet'
          : `${this.direction === TransferDirection.SAVE ? 'the frontend has not read' : 'the frontend has not closed'} the state pipe`;
        this.complete(new DeviceStateError('transfer-incomplete', `${why} (${this.offset} bytes moved)`));
      }
    }
    return this.done!;
  }

  /** Abandons the transfer (a new one, or the frontend went away). */
  cancel(reason: string): void {
    if (!this.done) this.complete(new DeviceStateError('transfer-failed', `transfer abandoned: ${reason}`));
  }

  private release(): void {
    // Stop polling before close(): the fd number may be reused at once.
    this.poll?.close();
    this.poll = null;
    closeFd(this.fd);
    this.fd = -1;
    this.buf.free();
  }
}
