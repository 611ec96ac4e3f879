// One test per rule of the vhost-user dispatcher (src/vhost-user/session.ts `handle()` and
// message-reader.ts): each sends the real `serve` process one message that breaks exactly that
// rule, through the project's TS frontend on the device's unix socket, and reads the outcome
// as a code: the REPLY_ACK status, the refused-request counter of the control API, the device
// state the handler would have changed, or the connection being closed. Never log text.
import { describe, test, expect } from 'vitest';
import { countFds } from '../support/backend.js';
import { useTapDevice } from '../support/frontend/device-rig.js';
import { TestFrontend, DEFAULT_FEATURES } from '../support/frontend/test-frontend.js';
import { waitUntil, sleep } from '../support/processes.js';
import { eventfdCreate, memfdCreate } from '../../src/sys/libc.js';
import {
  Request, ProtocolFeature, FLAG_VERSION, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, MAX_PAYLOAD, F_PROTOCOL_FEATURES,
  bit, u64Payload, vringStatePayload, memTablePayload,
} from '../../src/vhost-user/protocol.js';

const ACK = FLAG_VERSION | FLAG_NEED_REPLY;
const NONE = new Uint8Array(0);
/** queues=1: vrings 0 and 1 exist, 2 is the first index out of range. */
const VRINGS = 2;

const rig = useTapDevice('disp', 'dispatch');
const { openFe, openFds } = rig;

async function device(): Promise<{ connected: boolean; refusedRequests: number; featureBits: string; mtu: number; runningVrings: number[] }> {
  return rig.device();
}

const refused = async (): Promise<number> => (await device()).refusedRequests;

/** An eventfd the test owns (closed after the test; the backend gets its own copy). */
function eventfd(): number {
  const fd = eventfdCreate();
  openFds.push(fd);
  return fd;
}

/**
 * A fresh session: the features handshake only (GET_FEATURES, then SET_PROTOCOL_FEATURES with
 * exactly `proto`, or nothing at all when `proto` is null). No rings, no memory.
 */
async function session(proto: ProtocolFeature[] | null = [ProtocolFeature.REPLY_ACK]): Promise<TestFrontend> {
  const fe = await TestFrontend.connect(rig.sock, { start: false });
  openFe.push(fe);
  await fe.request(Request.GET_FEATURES, NONE, [], true);
  if (proto !== null) {
    const bits = proto.reduce((m, b) => m | bit(b), 0n);
    // REPLY_ACK applies from the next request on, not to the one that negotiates it.
    await fe.request(Request.SET_PROTOCOL_FEATURES, u64Payload(bits));
    fe.protocolFeatures = bits;
  }
  await waitUntil(async () => (await device()).connected, 3000, 'session open');
  return fe;
}

/** Sends one request with NEED_REPLY (unless other flags are given) and returns the REPLY_ACK status. */
async function ackStatus(fe: TestFrontend, request: number, payload: Uint8Array, fds: number[] = [], flags = ACK): Promise<bigint> {
  fe.sendRaw(request, flags, payload, fds);
  const r = await fe.readReply();
  if (!r) throw new Error(`no REPLY_ACK for request ${request}`);
  expect(r.request).toBe(request);
  expect(r.flags & FLAG_REPLY).toBe(FLAG_REPLY);
  expect(r.payload.length).toBe(8);
  return new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true);
}

/** A bare header announcing `size` payload bytes (sent on its own, unlike encodeMessage's). */
function header(request: number, flags: number, size: number): Uint8Array {
  const h = new Uint8Array(HEADER_SIZE);
  const v = new DataView(h.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, size, true);
  return h;
}

/** Resolves once the backend has hung up on `fe` (readReply sees EOF). */
async function expectHangUp(fe: TestFrontend): Promise<void> {
  await expect(fe.readReply(3000)).rejects.toThrow(/closed the connection/);
  await waitUntil(async () => (await device()).connected === false, 3000, 'backend closed the session');
}

/** The features a guest would ack: what the backend offers, masked with the TS frontend's. */
async function ackableFeatures(fe: TestFrontend): Promise<bigint> {
  const p = await fe.request(Request.GET_FEATURES, NONE, [], true);
  return new DataView(p!.buffer, p!.byteOffset).getBigUint64(0, true) & DEFAULT_FEATURES;
}

/** The backend's open fd count once it stops moving (control API connections close asynchronously). */
async function settledFdCount(): Promise<number> {
  let last = countFds(rig.be.proc.pid);
  for (let i = 0; i < 30; i++) {
    await sleep(100);
    const now = countFds(rig.be.proc.pid);
    if (now === last) return now;
    last = now;
  }
  return last;
}

describe('vhost-user dispatcher rules (checked before any handler runs)', () => {
  test('version: a header whose version bits are not 1 is refused', async () => {
    const fe = await session();
    expect(await ackStatus(fe, Request.SET_OWNER, NONE, [], 0x2 | FLAG_NEED_REPLY)).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_OWNER, NONE, [], 0x0 | FLAG_NEED_REPLY)).not.toBe(0n);
    expect(await refused()).toBe(2);
    // The same request with version 1 is fine.
    expect(await ackStatus(fe, Request.SET_OWNER, NONE)).toBe(0n);
    expect(await refused()).toBe(2);
  });

  test('unknown request: an id without a handler is refused and the session goes on', async () => {
    const fe = await session();
    expect(await ackStatus(fe, 99, NONE)).not.toBe(0n);
    // In the spec but not implemented here (legacy endianness): refused the same way.
    expect(await ackStatus(fe, Request.SET_VRING_ENDIAN, vringStatePayload(0, 0))).not.toBe(0n);
    expect(await refused()).toBe(2);
    expect(await ackStatus(fe, Request.SET_OWNER, NONE)).toBe(0n);
  });

  test('payload size: a payload outside the request\'s bounds is refused before its handler runs', async () => {
    const fe = await session();
    const want = await ackableFeatures(fe);
    expect(want & bit(F_PROTOCOL_FEATURES)).not.toBe(0n);
    // SET_FEATURES takes exactly 8 bytes: valid features in the first 8 of 16, or cut to 4.
    const long = new Uint8Array(16);
    long.set(u64Payload(want));
    expect(await ackStatus(fe, Request.SET_FEATURES, long)).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_FEATURES, u64Payload(want).subarray(0, 4))).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_OWNER, new Uint8Array(1))).not.toBe(0n);
    expect(await refused()).toBe(3);
    // The handler never ran: nothing was negotiated. The right size is accepted.
    expect(BigInt((await device()).featureBits)).toBe(0n);
    expect(await ackStatus(fe, Request.SET_FEATURES, u64Payload(want))).toBe(0n);
    expect(BigInt((await device()).featureBits)).toBe(want);
  });

  test('fd count: a request with more or fewer fds than it takes is refused, and the fds sent are closed', async () => {
    const fe = await session();
    const want = await ackableFeatures(fe);
    const fdsBefore = await settledFdCount();
    // SET_FEATURES takes no fd.
    expect(await ackStatus(fe, Request.SET_FEATURES, u64Payload(want), [eventfd()])).not.toBe(0n);
    expect(BigInt((await device()).featureBits)).toBe(0n);
    // SET_MEM_TABLE takes 1..8 fds: none, and nine.
    const region = { gpa: 0, size: 1 << 20, uva: 0x7f00_0000_0000, mmapOffset: 0 };
    expect(await ackStatus(fe, Request.SET_MEM_TABLE, memTablePayload([region]))).not.toBe(0n);
    const nine = Array.from({ length: 9 }, () => {
      const fd = memfdCreate('vx-dispatch', 1 << 20);
      openFds.push(fd);
      return fd;
    });
    expect(await ackStatus(fe, Request.SET_MEM_TABLE, memTablePayload([region]), nine)).not.toBe(0n);
    // SET_VRING_CALL takes at most one.
    expect(await ackStatus(fe, Request.SET_VRING_CALL, u64Payload(0), [eventfd(), eventfd()])).not.toBe(0n);
    expect(await refused()).toBe(4);
    // Every fd that arrived with a refused request was closed again.
    expect(await settledFdCount()).toBe(fdsBefore);
  });

  test('protocol feature gate: a request behind a protocol feature is refused until that feature is negotiated', async () => {
    const fe = await session([ProtocolFeature.REPLY_ACK]);
    const mtuBefore = (await device()).mtu;
    expect(await ackStatus(fe, Request.RESET_DEVICE, NONE)).not.toBe(0n);
    expect(await ackStatus(fe, Request.NET_SET_MTU, u64Payload(1400))).not.toBe(0n);
    expect(await ackStatus(fe, Request.SEND_RARP, u64Payload(0x5254_0012_3456))).not.toBe(0n);
    expect(await ackStatus(fe, Request.REM_MEM_REG, new Uint8Array(40))).not.toBe(0n);
    expect(await refused()).toBe(4);
    expect((await device()).mtu).toBe(mtuBefore);
    fe.close();
    await waitUntil(async () => (await device()).connected === false, 3000, 'first session closed');

    // Negotiated, the same requests pass the gate.
    const fe2 = await session([ProtocolFeature.REPLY_ACK, ProtocolFeature.RESET_DEVICE, ProtocolFeature.NET_MTU]);
    expect(await ackStatus(fe2, Request.RESET_DEVICE, NONE)).toBe(0n);
    expect(await ackStatus(fe2, Request.NET_SET_MTU, u64Payload(1400))).toBe(0n);
    expect(await refused()).toBe(0);
  });

  test('protocol feature gate: before SET_PROTOCOL_FEATURES no protocol feature counts as negotiated', async () => {
    const fe = await session(null);
    fe.sendRaw(Request.RESET_DEVICE, FLAG_VERSION, NONE);
    await waitUntil(refused, 3000, 'RESET_DEVICE refused');
    expect(await refused()).toBe(1);
  });

  test('vring index: an index past the device\'s last vring is refused, by every vring request', async () => {
    const fe = await session();
    expect(await ackStatus(fe, Request.SET_VRING_NUM, vringStatePayload(VRINGS, 256))).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_BASE, vringStatePayload(VRINGS, 0))).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_ENABLE, vringStatePayload(0xffff_ffff, 1))).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_CALL, u64Payload(VRINGS), [eventfd()])).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_KICK, u64Payload(0xff), [eventfd()])).not.toBe(0n);
    expect(await refused()).toBe(5);
    // The last vring that exists is accepted.
    expect(await ackStatus(fe, Request.SET_VRING_NUM, vringStatePayload(VRINGS - 1, 256))).toBe(0n);
    expect(await refused()).toBe(5);
  });

  test('vring fd word: bits beyond the index and the invalid-fd flag are refused, as is a flag that contradicts the fds attached', async () => {
    const fe = await session();
    expect(await ackStatus(fe, Request.SET_VRING_CALL, u64Payload(0x200), [eventfd()])).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_CALL, u64Payload(0x100), [eventfd()])).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_CALL, u64Payload(0), [])).not.toBe(0n);
    expect(await refused()).toBe(3);
    expect(await ackStatus(fe, Request.SET_VRING_CALL, u64Payload(0x100), [])).toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_CALL, u64Payload(1), [eventfd()])).toBe(0n);
  });

  test('REPLY_ACK negotiated: NEED_REPLY is answered with status 0 on success and a non-zero status on refusal', async () => {
    const fe = await session([ProtocolFeature.REPLY_ACK]);
    expect(await ackStatus(fe, Request.SET_OWNER, NONE)).toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_NUM, vringStatePayload(0, 3))).not.toBe(0n); // not a power of two
    expect(await ackStatus(fe, Request.SET_VRING_NUM, vringStatePayload(0, 64))).toBe(0n);
    expect(await refused()).toBe(1);
    // Without NEED_REPLY nothing comes back: the next reply is GET_FEATURES' own.
    fe.sendRaw(Request.SET_OWNER, FLAG_VERSION, NONE);
    fe.sendRaw(Request.SET_VRING_NUM, FLAG_VERSION, vringStatePayload(VRINGS, 64));
    fe.sendRaw(Request.GET_FEATURES, FLAG_VERSION, NONE);
    expect((await fe.readReply())?.request).toBe(Request.GET_FEATURES);
    expect(await refused()).toBe(2);
  });

  test('REPLY_ACK not negotiated: NEED_REPLY gets no answer, success or refusal; a refusal is only counted', async () => {
    const fe = await session([]);
    fe.sendRaw(Request.SET_OWNER, ACK, NONE);
    fe.sendRaw(Request.SET_VRING_NUM, ACK, vringStatePayload(VRINGS, 64));
    fe.sendRaw(Request.GET_FEATURES, FLAG_VERSION, NONE);
    expect((await fe.readReply())?.request).toBe(Request.GET_FEATURES);
    expect(await refused()).toBe(1);
  });

  test('replying request: a refused request that always has a reply closes the connection instead of answering', async () => {
    const fe = await session();
    // GET_VRING_BASE for a vring that does not exist has no answer the frontend could trust.
    fe.sendRaw(Request.GET_VRING_BASE, FLAG_VERSION, vringStatePayload(VRINGS, 0));
    await expectHangUp(fe);
  });

  test('replying request: one behind a protocol feature not negotiated (GET_QUEUE_NUM without MQ) closes the connection', async () => {
    const fe = await session([ProtocolFeature.REPLY_ACK]);
    fe.sendRaw(Request.GET_QUEUE_NUM, FLAG_VERSION, NONE);
    await expectHangUp(fe);
  });

  test('header size limit: a header announcing more than MAX_PAYLOAD bytes closes the connection before anything is buffered', async () => {
    const fe = await session();
    fe.sock.send(header(Request.SET_MEM_TABLE, ACK, MAX_PAYLOAD + 1));
    await expectHangUp(fe);
  });

  test('fds only with the header: fds attached to payload bytes close the connection', async () => {
    const fe = await session();
    fe.sock.send(header(Request.SET_VRING_CALL, FLAG_VERSION, 8));
    fe.sock.send(u64Payload(0), [eventfd()]);
    await expectHangUp(fe);
  });

  test('a refusal leaves the session usable: a guest bring-up succeeds on the same connection after refusals of each kind', async () => {
    const fe = await session();
    expect(await ackStatus(fe, Request.SET_OWNER, NONE, [], 0x2 | FLAG_NEED_REPLY)).not.toBe(0n);
    expect(await ackStatus(fe, 99, NONE)).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_OWNER, new Uint8Array(4))).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_OWNER, NONE, [eventfd()])).not.toBe(0n);
    expect(await ackStatus(fe, Request.RESET_DEVICE, NONE)).not.toBe(0n);
    expect(await ackStatus(fe, Request.SET_VRING_NUM, vringStatePayload(VRINGS, 64))).not.toBe(0n);
    expect(await refused()).toBe(6);
    // Everything a guest's bring-up sends (TestFrontend.setup, each request acked), then traffic state.
    await fe.setup();
    expect(await refused()).toBe(6);
    await waitUntil(async () => (await device()).runningVrings.length === VRINGS, 3000, 'both vrings running');
  });
});
