import { BackendRefusal } from '../vhost-user/backend.js';
import { HEADER_BYTES, MAX_MESSAGE_BYTES, OFFLOAD_MAGIC, RESPONSE_FLAG, readHeader } from '../offload/protocol.js';
import { Reader, Writer } from '../offload/wire.js';
import { ProtocolError } from '../offload/errors.js';

// The device's state in QEMU's migration stream (VHOST_USER_PROTOCOL_F_DEVICE_STATE, carried
// as the `virtio-net-device/backend` section): a header, then typed sections. The rings and
// features travel through QEMU itself; what only the backend knows goes here.
//   u32 magic 'VXDS' | u16 version | u16 section count
//   per section: u16 type | u16 flags (0) | u32 length | body
// docs/migration.md describes it; the offload section's body is docs/offload-protocol.md §7.
const MAGIC = 0x56584453;
const VERSION = 1;
const HEADER = 8;
const SECTION_HEADER = 8;

export const SECTION_OFFLOAD = 1;
/**
 * Offload responses the guest has not received yet (its reserved pair stopped before they could
 * be delivered: an OBJ_LOAD answered while the VM was stopped for the switch-over, or answers
 * the worker held for a guest without receive buffers). Body:
 * u16 count, then per response u32 length and the offload message. Written only when there are
 * some, so a state without them reads on a backend that predates the section.
 */
export const SECTION_REPLIES = 2;
/** Responses a device holds for a stopped reserved pair, at most (as many as a worker holds for a guest without buffers). */
export const MAX_HELD_REPLIES = 64;

const bad = (why: string): never => { throw new BackendRefusal(`device state: ${why}`, 'bad-device-state'); };

export interface DeviceStateSections {
  offload: Uint8Array | null;
  /** Offload responses still owed to the guest, oldest first. */
  replies?: readonly Uint8Array[];
}

function encodeReplies(replies: readonly Uint8Array[]): Uint8Array {
  const w = new Writer(2 + replies.reduce((n, r) => n + 4 + r.byteLength, 0)).u16(replies.length);
  for (const r of replies) w.u32(r.byteLength).bytes(r);
  return w.finish();
}

/**
 * The replies section. Each must be an offload response whose header fits it, at most
 * MAX_MESSAGE_BYTES, at most MAX_HELD_REPLIES of them: they go to the guest as they are.
 */
function decodeReplies(r: Reader): Uint8Array[] {
  const count = r.u16('response count');
  if (count > MAX_HELD_REPLIES) bad(`replies section: ${count} responses (at most ${MAX_HELD_REPLIES})`);
  // Each response is a length and at least a header: a count the bytes cannot hold is refused before the loop.
  r.fits(count, 4 + HEADER_BYTES, 'response count');
  const out: Uint8Array[] = [];
  for (let i = 0; i < count; i++) {
    const len = r.u32(`response ${i} length`);
    if (len < HEADER_BYTES || len > MAX_MESSAGE_BYTES) bad(`replies section: response ${i} is ${len} bytes (${HEADER_BYTES}..${MAX_MESSAGE_BYTES})`);
    // A copy: the response outlives the transfer buffer (it is queued for the guest).
    const m = r.take(len, `response ${i}`).slice();
    const h = readHeader(m)!;
    if (h.magic !== OFFLOAD_MAGIC || (h.command & RESPONSE_FLAG) === 0 || h.length > len - HEADER_BYTES) bad(`replies section: response ${i} is not an offload response`);
    out.push(m);
  }
  r.end();
  return out;
}

export function encodeDeviceState(s: DeviceStateSections): Uint8Array {
  const sections: [number, Uint8Array][] = [];
  if (s.offload) sections.push([SECTION_OFFLOAD, s.offload]);
  if (s.replies && s.replies.length > 0) sections.push([SECTION_REPLIES, encodeReplies(s.replies)]);
  const w = new Writer(HEADER + sections.reduce((n, [, b]) => n + SECTION_HEADER + b.length, 0))
    .u32(MAGIC).u16(VERSION).u16(sections.length);
  for (const [type, body] of sections) w.u16(type).u16(0).u32(body.length).bytes(body);
  return w.finish();
}

/**
 * Splits a state from the migration stream into its sections. Untrusted: every length is
 * checked against what is present before anything is sliced (wire.Reader), and unknown or
 * repeated sections are refused (a newer source's state must fail the migration, not
 * half-load). The offload body is a copy, so nothing aliases the transfer buffer.
 */
export function decodeDeviceState(b: Uint8Array): DeviceStateSections {
  try {
    return decode(new Reader(b, 'device state'));
  } catch (e) {
    // The Reader's refusals (a count or a length past the bytes present, trailing bytes) are this state's.
    if (e instanceof ProtocolError) bad(e.message);
    throw e;
  }
}

function decode(r: Reader): DeviceStateSections {
  if (r.remaining < HEADER) bad(`${r.remaining} bytes, no vhost-xdp header`);
  if (r.u32('magic') !== MAGIC) bad('no vhost-xdp header (magic)');
  const version = r.u16('version');
  if (version !== VERSION) throw new BackendRefusal(`device state version ${version} (this backend reads ${VERSION})`, 'bad-device-state-version');
  const count = r.u16('section count');
  const out: { offload: Uint8Array | null; replies: Uint8Array[] } = { offload: null, replies: [] };
  const seen = new Set<number>();
  for (let i = 0; i < count; i++) {
    const type = r.u16(`section ${i} type`);
    const flags = r.u16(`section ${i} flags`);
    const len = r.u32(`section ${i} length`);
    if (flags !== 0) bad(`section ${i}: flags 0x${flags.toString(16)} (must be 0)`);
    const body = r.take(len, `section ${i} body`);
    if (type !== SECTION_OFFLOAD && type !== SECTION_REPLIES) bad(`section type ${type} is unknown to this backend`);
    if (seen.has(type)) bad(`section type ${type} appears twice`);
    seen.add(type);
    if (type === SECTION_OFFLOAD) out.offload = body.slice();
    else out.replies = decodeReplies(new Reader(body, 'device state replies section'));
  }
  r.end();
  return out;
}
