import { BackendRefusal } from '../vhost-user/backend.js';

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

export interface DeviceStateSections {
  offload: Uint8Array | null;
}

export function encodeDeviceState(s: DeviceStateSections): Uint8Array {
  const sections: [number, Uint8Array][] = [];
  if (s.offload) sections.push([SECTION_OFFLOAD, s.offload]);
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
  const out: DeviceStateSections = { offload: null };
  let at = HEADER;
  for (let i = 0; i < count; i++) {
    if (at + SECTION_HEADER > b.length) throw new BackendRefusal(`device state section ${i} header runs past the ${b.length} bytes present`, 'bad-device-state');
    const type = v.getUint16(at, true);
    const flags = v.getUint16(at + 2, true);
    const len = v.getUint32(at + 4, true);
    if (flags !== 0) throw new BackendRefusal(`device state section ${i}: flags 0x${flags.toString(16)} (must be 0)`, 'bad-device-state');
    if (len > b.length - at - SECTION_HEADER) throw new BackendRefusal(`device state section ${i}: ${len} bytes, ${b.length - at - SECTION_HEADER} present`, 'bad-device-state');
    const body = b.slice(at + SECTION_HEADER, at + SECTION_HEADER + len);
    if (type !== SECTION_OFFLOAD) throw new BackendRefusal(`device state section type ${type} is unknown to this backend`, 'bad-device-state');
    if (out.offload) throw new BackendRefusal('device state carries two offload sections', 'bad-device-state');
    out.offload = body;
    at += SECTION_HEADER + len;
  }
  if (at !== b.length) throw new BackendRefusal(`device state has ${b.length - at} bytes after its last section`, 'bad-device-state');
  return out;
}
