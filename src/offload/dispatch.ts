// The one place every request is checked before a handler runs. "The dispatcher checks, in
// this order, before any command runs: header present, magic, version, response bit clear,
// `length` within limits and present, known command, request rate (every command but RELEASE
// costs one token), claim" (docs/offload-protocol.md §2); then the command's own rules from
// the table (payload size, flags). Every request gets exactly one response, including one
// that cannot be parsed; nothing thrown escapes.

import { BpfError } from '../sys/bpf/libbpf.js';
import {
  Status, OFFLOAD_MAGIC, OFFLOAD_VERSION, HEADER_BYTES, RESPONSE_FLAG, MAX_MESSAGE_BYTES, UpdateFlag,
  readHeader, commandName, statusName,
} from './protocol.js';
import { encodeResponse, encodeErrorBody } from './host-codec.js';
import { ProtocolError, refuse } from './errors.js';
import { COMMANDS, type CommandSpec } from './commands.js';
import type { OffloadState } from './state.js';

/** What the broker refused, for observers (logs, metrics, tests): the wire status and the rule's stable code. */
export interface RefusalRecord { command: number; seq: number; status: number; code: string; reason: string }

function badRequest(code: string, reason: string): never {
  return refuse(Status.BAD_REQUEST, code, reason);
}

/** The table's per-command rules, checked on the payload before the handler sees it. */
function checkRules(spec: CommandSpec, payload: Uint8Array): void {
  const n = payload.byteLength;
  const size = spec.size;
  if ('exactly' in size && n !== size.exactly) {
    if (size.exactly === 0) badRequest('payload-not-empty', `${spec.name} takes no payload (${n} bytes given)`);
    badRequest('bad-payload-size', `${spec.name}: payload is ${n} bytes; the command takes exactly ${size.exactly}`);
  }
  if ('atLeast' in size && n < size.atLeast) {
    badRequest('bad-payload-size', `${spec.name}: payload is ${n} bytes, shorter than its ${size.atLeast}-byte fixed part`);
  }
  if (spec.flags) {
    // In bounds: every command with flags has them inside its fixed part, checked just above.
    const flags = new DataView(payload.buffer, payload.byteOffset, n).getUint32(spec.flags.offset, true);
    if (spec.flags.allowed === 'zero' && flags !== 0) badRequest('flags-not-zero', `${spec.name}: flags must be 0, got ${flags}`);
    // "ELEM_UPDATE flags: 0 ANY, 1 NOEXIST, 2 EXIST; others BAD_REQUEST" (§3).
    if (spec.flags.allowed === 'update' && flags > UpdateFlag.EXIST) {
      badRequest('bad-update-flags', `update flags ${flags}: only ANY (0), NOEXIST (1), EXIST (2)`);
    }
  }
}

export class Dispatcher {
  private total = 0;
  private readonly byStatus: Record<string, number> = {};

  constructor(private readonly st: OffloadState, private readonly onRefusal?: (r: RefusalRecord) => void) {}

  get requests(): { total: number; byStatus: Record<string, number> } {
    return { total: this.total, byStatus: { ...this.byStatus } };
  }

  handle(request: Uint8Array): Uint8Array {
    const at = { command: 0, seq: 0 };
    try {
      const c = this.check(request, at);
      return this.ok(at, c.spec.run(this.st, c.payload));
    } catch (e) {
      return this.fail(at.command, at.seq, this.asRefusal(e, at.command));
    }
  }

  /**
   * handle() for the serving path: the same checks, in the same order, synchronously; a
   * command with an asynchronous handler (OBJ_LOAD) answers with a promise, every other one
   * answers at once, as handle() does. Never throws, the promise never rejects.
   */
  serve(request: Uint8Array): Uint8Array | Promise<Uint8Array> {
    const at = { command: 0, seq: 0 };
    try {
      const c = this.check(request, at);
      if (!c.spec.runAsync) return this.ok(at, c.spec.run(this.st, c.payload));
      return c.spec.runAsync(this.st, c.payload).then(
        (body) => this.ok(at, body),
      ).catch((e: unknown) => this.fail(at.command, at.seq, this.asRefusal(e, at.command)));
    } catch (e) {
      return this.fail(at.command, at.seq, this.asRefusal(e, at.command));
    }
  }

  /**
   * The answer to a request its channel could not queue behind a pending one: BUSY, with the
   * request's command and seq when its header is readable (else 0, as for a short request),
   * counted and observed like any refusal. Nothing of the request is judged or run.
   */
  busy(request: Uint8Array, waiting: number): Uint8Array {
    const h = readHeader(request);
    const command = h && (h.command & RESPONSE_FLAG) === 0 ? h.command : 0;
    return this.fail(command, h?.seq ?? 0, new ProtocolError(Status.BUSY, 'queue-full',
      `${waiting} requests already wait behind a pending OBJ_LOAD; retry once it is answered`, { a: waiting }));
  }

  /** Every rule before a handler runs; throws the refusal. `at` gets the command and seq as soon as they are read. */
  private check(request: Uint8Array, at: { command: number; seq: number }): { spec: CommandSpec; payload: Uint8Array } {
    const st = this.st;
    const h = readHeader(request);
    if (!h) badRequest('short-header', `request is ${request.byteLength} bytes, shorter than the ${HEADER_BYTES}-byte header`);
    const command = h.command;
    at.command = command;
    at.seq = h.seq;
    if (h.magic !== OFFLOAD_MAGIC) badRequest('bad-magic', `bad magic 0x${h.magic.toString(16)} (want 0x${OFFLOAD_MAGIC.toString(16)})`);
    if (h.version !== OFFLOAD_VERSION) {
      refuse(Status.UNSUPPORTED_VERSION, 'unsupported-version',
        `protocol version ${h.version} is not supported (this host speaks ${OFFLOAD_VERSION}..${OFFLOAD_VERSION})`,
        { a: OFFLOAD_VERSION, b: OFFLOAD_VERSION });
    }
    if ((command & RESPONSE_FLAG) !== 0) badRequest('response-bit-set', `command 0x${command.toString(16)} has the response bit set`);
    if (h.length > MAX_MESSAGE_BYTES - HEADER_BYTES) {
      refuse(Status.TOO_LARGE, 'message-too-large', `payload length ${h.length} is over the ${MAX_MESSAGE_BYTES - HEADER_BYTES}-byte limit`,
        { c: MAX_MESSAGE_BYTES });
    }
    if (h.length > request.byteLength - HEADER_BYTES) {
      badRequest('length-exceeds-message', `payload length ${h.length} but only ${request.byteLength - HEADER_BYTES} bytes present`);
    }
    const spec = COMMANDS.get(command) ?? refuse(Status.UNKNOWN_COMMAND, 'unknown-command', `unknown command 0x${command.toString(16)}`);
    if (spec.costsToken) {
      const wait = st.bucket.take();
      if (wait > 0) {
        refuse(Status.RATE_LIMITED, 'rate-limited',
          `over this device's max-ops-per-sec quota of ${st.limits.maxOpsPerSec}; retry in ${wait} ms`, { a: wait });
      }
    }
    if (st.closed) refuse(Status.NOT_CLAIMED, 'broker-closed', 'the offload broker of this device is closed');
    if (spec.needsClaim && !st.claim) {
      refuse(Status.NOT_CLAIMED, 'not-claimed', `${commandName(command)} before CLAIM: the offload pair is not claimed`);
    }
    // Bytes after `length` are frame padding (Ethernet minimum size) and are ignored.
    const payload = request.subarray(HEADER_BYTES, HEADER_BYTES + h.length);
    checkRules(spec, payload);
    return { spec, payload };
  }

  /** The OK response, unless it is over the claimed response limit. */
  private ok(at: { command: number; seq: number }, body: Uint8Array | undefined): Uint8Array {
    const out = encodeResponse(at.command, at.seq, Status.OK, '', body);
    if (out.byteLength > this.st.responseLimit()) {
      refuse(Status.TOO_LARGE, 'response-too-large',
        `response of ${out.byteLength} bytes is over the claimed response limit of ${this.st.responseLimit()}`);
    }
    this.count(Status.OK);
    return out;
  }

  /** Anything a handler throws, as the refusal the guest gets. */
  private asRefusal(e: unknown, command: number): ProtocolError {
    if (e instanceof ProtocolError) return e;
    if (e instanceof BpfError) {
      return new ProtocolError(Status.KERNEL_ERROR, 'kernel-error', e.message.split('\n')[0] ?? e.code, { a: e.errno });
    }
    this.st.log(`internal error on ${commandName(command)}: ${(e as Error)?.stack ?? String(e)}`);
    return new ProtocolError(Status.KERNEL_ERROR, 'internal-error', `internal error: ${(e as Error)?.message ?? String(e)}`);
  }

  private count(status: number): void {
    this.total++;
    const k = statusName(status);
    this.byStatus[k] = (this.byStatus[k] ?? 0) + 1;
  }

  private fail(command: number, seq: number, e: ProtocolError): Uint8Array {
    this.count(e.status);
    if (this.onRefusal) {
      try {
        this.onRefusal({ command: command & 0x7fff, seq, status: e.status, code: e.code, reason: e.message });
      } catch { /* an observer must not break the broker */ }
    }
    return encodeResponse(command & 0x7fff, seq, e.status, e.message, encodeErrorBody(e.detail, e.extra));
  }
}
