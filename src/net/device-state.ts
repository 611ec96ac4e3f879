import { BackendRefusal } from '../vhost-user/backend.js';
import { HEADER_BYTES, MAX_MESSAGE_BYTES, OFFLOAD_MAGIC, RESPONSE_FLAG, readHeader } from '../offload/protocol.js';

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
 * be delivered: an OBJ_LOAD answered while the VM was stopped for the switch-over). Body:
 * u16 count, then per response u32 length and the offload message. Written only when there are
 * some, so a state without them reads on a backend that predates the section.
 */
export const SECTION_REPLIES = 2;
/** Responses a device holds for a stopped reserved pair, at most (as many as a worker holds for a guest without buffers). */
export const MAX_HELD_REPLIES = 64;

export interface DeviceStateSections {
  offload: Uint8Array | null;
  /** Offload responses still owed to the guest, oldest first. */
  replies?: readonly Uint8Array[];
}

function encodeReplies(replies: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(2 + replies.reduce((n, r) => n + 4 + r.byteLength, 0));
  const v = new DataView(out.buffer);
  v.setUint16(0, replies.length, true);
  let at = 2;
  for (const r of replies) {
    v.setUint32(at, r.byteLength, true);
    out.set(r, at + 4);
    at += 4 + r.byteLength;
  }
  return out;
}

/**
 * The replies section. Each must be an offload response whose header fits it, at most
 * MAX_MESSAGE_BYTES, at most MAX_HELD_REPLIES of them: they go to the guest as they are.
 */
function decodeReplies(b: Uint8Array): Uint8Array[] {
  const bad = (why: string): never => { throw new BackendRefusal(`device state replies section: ${why}`, 'bad-device-state'); };
  if (b.length < 2) bad(`${b.length} bytes, no count`);
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const count = v.getUint16(0, true);
  if (count > MAX_HELD_REPLIES) bad(`${count} responses (at most ${MAX_HELD_REPLIES})`);
  const out: Uint8Array[] = [];
  let at = 2;
  for (let i = 0; i < count; i++) {
    if (at + 4 > b.length) bad(`response ${i}'s length runs past the ${b.length} bytes present`);
    const len = v.getUint32(at, true);
    if (len < HEADER_BYTES || len > MAX_MESSAGE_BYTES) bad(`response ${i} is ${len} bytes (${HEADER_BYTES}..${MAX_MESSAGE_BYTES})`);
    if (len > b.length - at - 4) bad(`response ${i}: ${len} bytes, ${b.length - at - 4} present`);
    const r = b.slice(at + 4, at + 4 + len);
    const h = readHeader(r)!;
    if (h.magic !== OFFLOAD_MAGIC || (h.command & RESPONSE_FLAG) === 0 || h.length > len - HEADER_BYTES) bad(`response ${i} is not an offload response`);
    out.push(r);
    at += 4 + len;
  }
  if (at !== b.length) bad(`${b.length - at} bytes after the last response`);
  return out;
}

export function encodeDeviceState(s: DeviceStateSections): Uint8Array {
  const sections: [number, Uint8Array][] = [];
  if (s.offload) sections.push([SECTION_OFFLOAD, s.offload]);
  if (s.replies && s.replies.length > 0) sections.push([SECTION_REPLIES, encodeReplies(s.replies)]);
  const total = HEADER + sections.reduce((n, [, b]) => n + SECTION_HEADER + b.length, 0);
  const out = new Uint8Array(total);
  const v = new DataView(out.buffer);
  v.setUint32(0, MAGIC, true);
  v.setUint16(4, VERSION, true);
  v.setUint16(6, sections.length, true);
  let at = HEADER;
  for (const [type, body] of sections) {
    v.setUint16(at, type, true);
    v.setUint16(at + 2, 0, true);
    v.setUint32(at + 4, body.length, true);
    out.set(body, at + SECTION_HEADER);
    at += SECTION_HEADER + body.length;
  }
  return out;
}

/**
 * Splits a state from the migration stream into its sections. Untrusted: every length is
 * checked against what is present before anything is sliced, and unknown or repeated
 * sections are refused (a newer source's state must fail the migration, not half-load).
 * The bodies are copies, so nothing aliases the transfer buffer.
 */
export function decodeDeviceState(b: Uint8Array): DeviceStateSections {
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  if (b.length < HEADER || v.getUint32(0, true) !== MAGIC) throw new BackendRefusal(`device state of ${b.length} bytes has no vhost-xdp header`, 'bad-device-state');
  const version = v.getUint16(4, true);
  if (version !== VERSION) throw new BackendRefusal(`device state version ${version} (this backend reads ${VERSION})`, 'bad-device-state-version');
  const count = v.getUint16(6, true);
  const out: { offload: Uint8Array | null; replies: Uint8Array[] } = { offload: null, replies: [] };
  const seen = new Set<number>();
  let at = HEADER;
  for (let i = 0; i < count; i++) {
    if (at + SECTION_HEADER > b.length) throw new BackendRefusal(`device state section ${i} header runs past the ${b.length} bytes present`, 'bad-device-state');
    const type = v.getUint16(at, true);
    const flags = v.getUint16(at + 2, true);
    const len = v.getUint32(at + 4, true);
    if (flags !== 0) throw new BackendRefusal(`device state section ${i}: flags 0x${flags.toString(16)} (must be 0)`, 'bad-device-state');
    if (len > b.length - at - SECTION_HEADER) throw new BackendRefusal(`device state section ${i}: ${len} bytes, ${b.length - at - SECTION_HEADER} present`, 'bad-device-state');
    const body = b.slice(at + SECTION_HEADER, at + SECTION_HEADER + len);
    if (type !== SECTION_OFFLOAD && type !== SECTION_REPLIES) throw new BackendRefusal(`device state section type ${type} is unknown to this backend`, 'bad-device-state');
    if (seen.has(type)) throw new BackendRefusal(`device state carries section type ${type} twice`, 'bad-device-state');
    seen.add(type);
    if (type === SECTION_OFFLOAD) out.offload = body;
    else out.replies = decodeReplies(body);
    at += SECTION_HEADER + len;
  }
  if (at !== b.length) throw new BackendRefusal(`device state has ${b.length - at} bytes after its last section`, 'bad-device-state');
  return out;
}
