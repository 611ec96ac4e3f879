// CLAIM, CAPS and RELEASE: taking the offload pair, describing what this device allows, and
// handing the pair back. Payload sizes are checked by the dispatch table before these run.

import { Status, OFFLOAD_VERSION, MAX_MESSAGE_BYTES, MIN_RESPONSE_LIMIT } from './protocol.js';
import { decodeClaim, encodeCapsBody } from './host-codec.js';
import { refuse } from './errors.js';
import type { OffloadState } from './state.js';

export function claim(st: OffloadState, p: Uint8Array): Uint8Array {
  const c = decodeClaim(p);
  if (c.minVersion > OFFLOAD_VERSION || c.maxVersion < OFFLOAD_VERSION) {
    refuse(Status.UNSUPPORTED_VERSION, 'unsupported-version',
      `guest speaks versions ${c.minVersion}..${c.maxVersion}, this host ${OFFLOAD_VERSION}..${OFFLOAD_VERSION}`,
      { a: OFFLOAD_VERSION, b: OFFLOAD_VERSION });
  }
  // "max_response_bytes, ≥ 1024; 0 = 61,440" (§1 Limits).
  let limit = MAX_MESSAGE_BYTES;
  if (c.maxResponseBytes !== 0) {
    if (c.maxResponseBytes < MIN_RESPONSE_LIMIT) {
      refuse(Status.BAD_REQUEST, 'response-limit-too-small', `max_response_bytes ${c.maxResponseBytes} is below the minimum of ${MIN_RESPONSE_LIMIT}`);
    }
    limit = Math.min(limit, c.maxResponseBytes);
  }
  const first = !st.claim;
  const at = st.claim?.at ?? st.isoNow();
  if (st.pins) {
    // Persist before acknowledging, so an acknowledged claim survives a restart.
    st.pins.ensureDir();
    st.pins.writeClaim({ version: 1, device: st.device, claimedAt: at, nextHandle: st.maps.nextHandle, responseLimit: limit });
  }
  st.claim = { at, responseLimit: limit };
  if (first) {
    st.log(`claimed (response limit ${limit} bytes)`);
    st.emitClaim();
  }
  return encodeCapsBody(st.caps());
}

export function caps(st: OffloadState): Uint8Array {
  return encodeCapsBody(st.caps());
}

export function release(st: OffloadState): undefined {
  st.reset('guest released the offload pair');
  return undefined;
}
