import { describe, it, expect, afterAll } from 'vitest';
import * as P from '../../src/offload/guest/codec.js';
import { Cmd, Status } from '../../src/offload/guest/codec.js';
import * as H from '../../src/offload/host-codec.js';
import { OffloadBroker } from '../../src/offload/broker.js';
import { parseSize, validateQuotas } from '../../src/offload/quotas.js';
import type { VxError } from '../../src/errors.js';

/** The error `fn` throws (the test fails when it returns). */
function thrown(fn: () => unknown): VxError & { subject?: string } {
  try { fn(); } catch (e) { return e as VxError & { subject?: string }; }
  throw new Error('expected a throw');
}

const hdr = (msg: Uint8Array) => P.readHeader(msg)!;
const payload = (msg: Uint8Array) => msg.subarray(P.HEADER_BYTES, P.HEADER_BYTES + hdr(msg).length);
const bytes = (...b: number[]) => new Uint8Array(b);

const brokers: OffloadBroker[] = [];
afterAll(() => { for (const b of brokers) b.reset('test end'); });
/** The stable code of the broker's latest refusal (host side; the guest sees status and reason). */
let lastCode = '';
function broker(): OffloadBroker {
  const b = new OffloadBroker({ device: `proto${brokers.length}`, onRefusal: (r) => { lastCode = r.code; } });
  brokers.push(b);
  return b;
}

describe('offload wire format', () => {
  it("magic 0x50445856 is the bytes 'V','X','D','P' in memory; header fields are little-endian", () => {
    const m = P.encodeRequest(Cmd.CAPS, 0x01020304, bytes(9, 9));
    expect([...m.subarray(0, 4)]).toEqual([0x56, 0x58, 0x44, 0x50]);
    expect(Buffer.from(m.subarray(0, 4)).toString('latin1')).toBe('VXDP');
    expect([...m.subarray(4, 16)]).toEqual([1, 0, 0x02, 0x01, 4, 3, 2, 1, 2, 0, 0, 0]);
    expect(hdr(m)).toEqual({ magic: P.OFFLOAD_MAGIC, version: 1, command: Cmd.CAPS, seq: 0x01020304, length: 2 });
  });

  it('no command number coincides with a virtio-net control class', () => {
    for (const v of Object.values(Cmd)) {
      expect(v).toBeGreaterThan(0xff);
      expect(v & P.RESPONSE_FLAG).toBe(0);
    }
  });

  it('round-trips every request through its backend decoder', () => {
    expect(H.decodeClaim(payload(P.encodeClaim(1, { minVersion: 1, maxVersion: 3, maxResponseBytes: 4096 }))))
      .toEqual({ minVersion: 1, maxVersion: 3, maxResponseBytes: 4096 });
    for (const [enc, cmd] of [[P.encodeCaps, Cmd.CAPS], [P.encodeRelease, Cmd.RELEASE], [P.encodeProgUnset, Cmd.PROG_UNSET]] as const) {
      const m = enc(7);
      expect(hdr(m)).toMatchObject({ command: cmd, seq: 7, length: 0 });
    }
    const mc = { type: 1, keySize: 4, valueSize: 8, maxEntries: 64, flags: 1, name: 'blocklist' };
    expect(H.decodeMapCreate(payload(P.encodeMapCreate(2, mc)))).toEqual(mc);
    expect(H.decodeMapFree(payload(P.encodeMapFree(3, 5)))).toEqual({ handle: 5 });
    const key = bytes(1, 2, 3, 4);
    const val = bytes(5, 6, 7, 8, 9, 10, 11, 12);
    const lookup = H.decodeElem(payload(P.encodeElemLookup(4, 2, key)), 'x');
    expect([lookup.handle, lookup.flags, [...lookup.data]]).toEqual([2, 0, [1, 2, 3, 4]]);
    const upd = H.decodeElem(payload(P.encodeElemUpdate(5, 2, key, val, P.UpdateFlag.EXIST)), 'x');
    expect([upd.handle, upd.flags, upd.data.byteLength]).toEqual([2, 2, 12]);
    expect(hdr(P.encodeElemDelete(6, 2, key)).command).toBe(Cmd.ELEM_DELETE);
    expect(H.decodeElem(payload(P.encodeGetFirstKey(7, 2)), 'x').data.byteLength).toBe(0);
    expect(hdr(P.encodeGetNextKey(8, 2, key)).command).toBe(Cmd.GET_NEXT_KEY);
    const lb = H.decodeLookupBatch(payload(P.encodeLookupBatch(9, 2, 50, bytes(1, 0, 0, 0, 0, 0, 0, 0))));
    expect([lb.handle, lb.maxCount, lb.cursor.byteLength]).toEqual([2, 50, 8]);
    const ub = H.decodeBatch(payload(P.encodeUpdateBatch(10, 2, new Uint8Array(8), new Uint8Array(16), 2, 1)), 'x');
    expect([ub.handle, ub.flags, ub.count, ub.data.byteLength]).toEqual([2, 1, 2, 24]);
    const db = H.decodeBatch(payload(P.encodeDeleteBatch(11, 2, new Uint8Array(8), 2)), 'x');
    expect([db.count, db.data.byteLength]).toEqual([2, 8]);
    const insns = new Uint8Array(24).fill(1);
    const ps = H.decodeProgSet(payload(P.encodeProgSet(12, { license: 'Dual MIT/GPL', insns, mapHandles: [3, 1], name: 'xdp_prog' })));
    expect(ps).toMatchObject({ flags: 0, name: 'xdp_prog', license: 'Dual MIT/GPL', mapHandles: [3, 1] });
    expect([...ps.insns]).toEqual([...insns]);
  });

  it('round-trips every response shape through the guest decoders', () => {
    const caps: P.Caps = {
      version: 1, maxRequestBytes: 61440, maxResponseBytes: 2048, maxProgInsns: 4096, maxMaps: 16, maxEntries: 65536,
      maxKeySize: 512, maxValueSize: 32768, maxOpsPerSec: 1000, verifierLogBytes: 1000, maxMapMemory: 2 ** 33,
      usedMaps: 2, usedMapMemory: 12345, mapTypes: [1, 2, 9], helpers: [1, 2, 3],
    };
    const r = P.decodeResponse(H.encodeResponse(Cmd.CAPS, 42, Status.OK, '', H.encodeCapsBody(caps)));
    expect(r).toMatchObject({ command: Cmd.CAPS, seq: 42, status: Status.OK, reason: '' });
    expect(P.decodeCapsBody(r.body)).toEqual(caps);
    const err = P.decodeResponse(H.encodeResponse(Cmd.PROG_SET, 43, Status.VERIFIER_REJECTED, 'rejected',
      H.encodeErrorBody({ a: 13, b: 0, c: 0 }, H.encodeVerifierLog('0: R1 invalid\n'.repeat(3000), 1000))));
    expect(err).toMatchObject({ status: Status.VERIFIER_REJECTED, reason: 'rejected', detail: { a: 13, b: 0, c: 0 } });
    expect(err.verifierLog!.length).toBeLessThanOrEqual(1000);
    expect(err.verifierLog!.endsWith('R1 invalid\n')).toBe(true); // the tail is kept
    // Reasons are bounded (512 bytes) and cut on a character boundary.
    const long = P.decodeResponse(H.encodeResponse(Cmd.CAPS, 1, Status.BAD_REQUEST, 'é'.repeat(400)));
    expect(Buffer.byteLength(long.reason)).toBeLessThanOrEqual(P.MAX_REASON_BYTES);
    expect(long.reason).toBe('é'.repeat(256));
    expect(hdr(H.encodeResponse(Cmd.MAP_FREE, 1, 0, '')).command).toBe(Cmd.MAP_FREE | 0x8000);
    // OK bodies: what the broker encodes is what a guest decodes.
    expect(P.decodeProgSetBody(H.encodeProgSetBody(7, bytes(1, 2, 3, 4, 5, 6, 7, 0xff)))).toEqual({ insns: 7, tag: '01020304050607ff' });
    expect(P.decodeMapCreateBody(H.encodeMapCreateBody(3, 2 ** 33))).toEqual({ handle: 3, chargedBytes: 2 ** 33 });
    expect(P.decodeU32Body(H.encodeU32Body(0xfffffffe))).toBe(0xfffffffe);
    const lbb = P.decodeLookupBatchBody(H.encodeLookupBatchBody(2, true, bytes(9), bytes(1, 2), bytes(3, 4, 5, 6)), 1, 2);
    expect([lbb.count, lbb.done, [...lbb.cursor], [...lbb.keys], [...lbb.values]]).toEqual([2, true, [9], [1, 2], [3, 4, 5, 6]]);
  });

  it('truncated, oversized and garbage requests get the right status from the broker and never throw', () => {
    const b = broker();
    const st = (m: Uint8Array) => P.decodeResponse(b.handle(m));
    expect(st(new Uint8Array(3)).status).toBe(Status.BAD_REQUEST);
    expect(st(new Uint8Array(16)).status).toBe(Status.BAD_REQUEST); // magic 0
    const wrongVersion = P.encodeRequest(Cmd.CLAIM, 5, new Uint8Array(8), 2);
    expect(st(wrongVersion)).toMatchObject({ status: Status.UNSUPPORTED_VERSION, seq: 5 });
    expect(st(P.encodeRequest(0x0199, 6))).toMatchObject({ status: Status.UNKNOWN_COMMAND, command: 0x0199 });
    expect(st(P.encodeRequest(Cmd.CAPS | 0x8000, 6)).status).toBe(Status.BAD_REQUEST);
    expect(st(P.encodeCaps(1)).status).toBe(Status.NOT_CLAIMED);
    expect(st(P.encodeMapCreate(1, { type: 2, keySize: 4, valueSize: 4, maxEntries: 1 })).status).toBe(Status.NOT_CLAIMED);
    // A claim for versions this host does not speak.
    expect(st(P.encodeClaim(1, { minVersion: 2, maxVersion: 4 })).status).toBe(Status.UNSUPPORTED_VERSION);
    expect(st(P.encodeClaim(1, { maxResponseBytes: 100 })).status).toBe(Status.BAD_REQUEST);
    expect(st(P.encodeClaim(1)).status).toBe(Status.OK);
    // Header length larger than the bytes present; larger than any message.
    const trunc = P.encodeMapCreate(2, { type: 2, keySize: 4, valueSize: 4, maxEntries: 1 });
    expect(st(trunc.subarray(0, trunc.byteLength - 1)).status).toBe(Status.BAD_REQUEST);
    const huge = P.encodeCaps(3);
    new DataView(huge.buffer).setUint32(12, 1 << 20, true);
    expect(st(huge).status).toBe(Status.TOO_LARGE);
    // Trailing frame padding after `length` is ignored.
    const padded = new Uint8Array(60);
    padded.set(P.encodeCaps(4));
    expect(st(padded).status).toBe(Status.OK);
    // Payload shorter than the command's fixed part, or with extra bytes, is BAD_REQUEST.
    expect(st(P.encodeRequest(Cmd.MAP_CREATE, 5, new Uint8Array(10))).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('bad-payload-size');
    expect(st(P.encodeRequest(Cmd.MAP_FREE, 5, new Uint8Array(5))).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('bad-payload-size');
    expect(st(P.encodeRequest(Cmd.CAPS, 5, new Uint8Array(1))).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('payload-not-empty');
    expect(st(P.encodeRequest(Cmd.ELEM_LOOKUP_BATCH, 5, new Uint8Array(15))).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('bad-payload-size');
    // Flags are checked by the command table before the handle: "flags (0)", and ELEM_UPDATE's 0..2.
    const flagged = P.encodeElemLookup(5, 99, bytes(0, 0, 0, 0));
    new DataView(flagged.buffer).setUint32(P.HEADER_BYTES + 4, 1, true);
    expect(st(flagged).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('flags-not-zero');
    expect(st(P.encodeElemUpdate(5, 99, bytes(0, 0, 0, 0), bytes(0, 0, 0, 0), 3)).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('bad-update-flags');
    expect(st(P.encodeElemUpdate(5, 99, bytes(0, 0, 0, 0), bytes(0, 0, 0, 0), P.UpdateFlag.EXIST)).status).toBe(Status.BAD_MAP_HANDLE);
    expect(st(P.encodeProgSet(5, { license: 'GPL', insns: new Uint8Array(8), mapHandles: [], flags: 2 })).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('flags-not-zero');
    // Names: not NUL-padded, or with characters the kernel refuses.
    const badName = P.encodeMapCreate(6, { type: 2, keySize: 4, valueSize: 4, maxEntries: 1 });
    badName.set(new Uint8Array(16).fill(0x41), P.HEADER_BYTES + 20);
    expect(st(badName).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('name-not-terminated');
    badName.set([0x2f, 0, 0x41], P.HEADER_BYTES + 20);
    expect(st(badName).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('name-not-padded');
    // Counts whose products exceed the payload, and a license with a NUL.
    const ps = P.encodeProgSet(7, { license: 'GPL', insns: new Uint8Array(16), mapHandles: [] });
    const v = new DataView(ps.buffer);
    v.setUint32(P.HEADER_BYTES + 4, 0xffffffff, true);
    expect(st(ps).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('insn-count-exceeds-payload');
    v.setUint32(P.HEADER_BYTES + 4, 2, true);
    v.setUint32(P.HEADER_BYTES + 8, 0x40000000, true);
    expect(st(ps).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('map-count-exceeds-payload');
    v.setUint32(P.HEADER_BYTES + 8, 0, true);
    ps[P.HEADER_BYTES + 32 + 1] = 0;
    expect(st(ps).status).toBe(Status.BAD_REQUEST);
    expect(lastCode).toBe('license-has-nul');
    const batch = P.encodeUpdateBatch(8, 1, new Uint8Array(4), new Uint8Array(4), 1);
    new DataView(batch.buffer).setUint32(P.HEADER_BYTES + 8, 0x7fffffff, true);
    expect(st(batch).status).toBe(Status.BAD_MAP_HANDLE); // handle first; no map 1 yet
    // Seq is echoed even on failure.
    expect(st(P.encodeRequest(0x0777, 0xdeadbeef)).seq).toBe(0xdeadbeef);
  });

  it('guest-side decoding refuses malformed responses with ProtocolError', () => {
    expect(() => P.decodeResponse(new Uint8Array(4))).toThrow(P.ProtocolError);
    expect(thrown(() => P.decodeResponse(P.encodeCaps(1))).code).toBe('not-a-response');
    const r = H.encodeResponse(Cmd.CAPS, 1, 0, 'x');
    new DataView(r.buffer).setUint32(12, 999, true);
    expect(thrown(() => P.decodeResponse(r)).code).toBe('length-exceeds-message');
  });

  it('quota sizes parse with units and are range-checked by name', () => {
    expect(parseSize('16MiB')).toBe(16 * 1024 * 1024);
    expect(parseSize('16M')).toBe(16 * 1024 * 1024);
    expect(parseSize('16MB')).toBe(16_000_000);
    expect(parseSize('4096')).toBe(4096);
    expect(parseSize('1.5KiB')).toBe(1536);
    expect(thrown(() => parseSize('lots')).code).toBe('bad-size');
    expect(validateQuotas({ maxMapMemory: '1GiB', maxMaps: '4' })).toEqual({ maxMapMemory: 2 ** 30, maxMaps: 4 });
    expect(thrown(() => validateQuotas({ maxEntries: 0 }))).toMatchObject({ code: 'bad-quota', subject: 'max-entries' });
    expect(thrown(() => validateQuotas({ maxOpsPerSec: 'fast' }))).toMatchObject({ code: 'bad-quota', subject: 'max-ops-per-sec' });
    expect(thrown(() => validateQuotas({ bogus: 1 } as never))).toMatchObject({ code: 'unknown-quota', subject: 'bogus' });
  });
});
