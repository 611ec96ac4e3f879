// Live migration on the vhost-user side, against the real `serve` through the TS frontend:
// the dirty log (SET_LOG_BASE, LOG_ALL, VHOST_VRING_F_LOG) and the device-state transfer
// (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE). Outcomes are read as codes: replies, the control
// API's refusal counts and status, and the backend's own mappings in /proc.
import { describe, test, expect } from 'vitest';
import fs from 'node:fs';
import { useTapDevice } from '../support/frontend/device-rig.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { waitUntil } from '../support/processes.js';
import { memfdCreate, eventfdCreate, pipe } from '../../src/sys/libc.js';
import { Request, ProtocolFeature, F_LOG_ALL, FLAG_VERSION, FLAG_NEED_REPLY, bit, hasBit, u64Payload, vringAddrPayload } from '../../src/vhost-user/protocol.js';
import { logBytesFor } from '../../src/memory/dirty-log.js';
import { MAX_LOG_BYTES } from '../../src/vhost-user/log-base.js';
import { MAX_STATE_BYTES } from '../../src/vhost-user/device-state.js';

const MIGRATION = bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.DEVICE_STATE);
const MEM = 32 << 20;
const LOG_NAME = 'vx-test-log';
const OK_NOFD = 0x100n;
const FAIL_NOFD = 0x101n;

const rig = useTapDevice('mig', 'migr');
const { openFe, openFds } = rig;

interface Status {
  connected: boolean;
  runningVrings: number[];
  refusals: Record<string, number>;
  logging: boolean;
  lastMigration: { direction: string; bytes: number; ms: number; ok: boolean; code?: string; reason?: string } | null;
}

async function device(): Promise<Status> {
  return rig.device();
}

async function refusals(code: string): Promise<number> {
  return (await device()).refusals[code] ?? 0;
}

/** A guest up and running (rings started) with the migration protocol features negotiated. */
async function guest(extra: bigint = MIGRATION): Promise<TestFrontend> {
  const fe = await TestFrontend.connect(rig.sock, { memBytes: MEM, protocolFeatures: extra });
  openFe.push(fe);
  await waitUntil(async () => (await device()).runningVrings.length === 2, 3000, 'rings running');
  return fe;
}

/** A memfd for the log (the test's copy is closed after the test). */
function logFd(bytes: number): number {
  const fd = memfdCreate(LOG_NAME, bytes);
  openFds.push(fd);
  return fd;
}

/** The backend's mappings of a log memfd (it closes the fd once mapped; the mapping stays in /proc). */
function logMappings(): number {
  return fs.readFileSync(`/proc/${rig.be.proc.pid}/maps`, 'utf8').split('\n').filter((l) => l.includes(`memfd:${LOG_NAME}`)).length;
}

const enough = logBytesFor(MEM);

describe('migration features are offered', () => {
  test('GET_FEATURES offers VHOST_F_LOG_ALL; GET_PROTOCOL_FEATURES offers LOG_SHMFD and DEVICE_STATE', async () => {
    const fe = await TestFrontend.connect(rig.sock, { start: false });
    openFe.push(fe);
    const f = new DataView((await fe.request(Request.GET_FEATURES, new Uint8Array(0), [], true))!.buffer).getBigUint64(0, true);
    const p = new DataView((await fe.request(Request.GET_PROTOCOL_FEATURES, new Uint8Array(0), [], true))!.buffer).getBigUint64(0, true);
    expect(hasBit(f, F_LOG_ALL)).toBe(true);
    expect(hasBit(p, ProtocolFeature.LOG_SHMFD)).toBe(true);
    expect(hasBit(p, ProtocolFeature.DEVICE_STATE)).toBe(true);
  });
});

describe('SET_LOG_BASE', () => {
  // With LOG_SHMFD the frontend waits for a reply whose value QEMU does not look at: a refusal
  // cannot be said in it, so the backend hangs up (the migration fails, the source runs on).
  const refusedCases: [string, string, () => [number, number, number]][] = [
    ['log-size', 'a size of 0', () => [logFd(4096), 0, 0]],
    ['log-size', `a size above ${MAX_LOG_BYTES} bytes`, () => [logFd(4096), MAX_LOG_BYTES + 1, 0]],
    ['log-too-small', 'a log that does not cover guest memory', () => [logFd(4096), enough - 1, 0]],
    ['log-file-too-small', 'size + offset past the end of the file', () => [logFd(enough), enough, 1]],
    ['log-offset', 'an offset beyond any file', () => [logFd(enough), enough, 2 ** 53]],
    ['log-not-memory-file', 'an fd that is not a memory file (eventfd)', () => { const fd = eventfdCreate(); openFds.push(fd); return [fd, enough, 0]; }],
  ];
  for (const [code, what, args] of refusedCases) {
    test(`refused (${code}): ${what}; the backend hangs up and maps nothing`, async () => {
      const fe = await guest();
      const before = await refusals(code);
      const [fd, size, offset] = args();
      await expect(fe.setLogBase(fd, size, offset)).rejects.toThrow(/closed the connection/);
      expect(await refusals(code)).toBe(before + 1);
      expect(logMappings()).toBe(0);
    });
  }

  test('without LOG_SHMFD negotiated it is refused like any gated request (REPLY_ACK status), and the session goes on', async () => {
    const fe = await guest(0n);
    const before = await refusals('feature-not-negotiated');
    await expect(fe.request(Request.SET_LOG_BASE, new Uint8Array(16), [logFd(enough)])).rejects.toThrow(/refused by the backend/);
    expect(await refusals('feature-not-negotiated')).toBe(before + 1);
    expect((await device()).connected).toBe(true);
    expect(logMappings()).toBe(0);
  });

  test('a good log is mapped once, replaced by the next one, and unmapped on disconnect', async () => {
    const fe = await guest();
    expect([...(await fe.setLogBase(logFd(enough), enough))]).toEqual([...u64Payload(0)]);
    expect(logMappings()).toBe(1);
    // QEMU resizes the log as memory grows: the old mapping goes, the new one stays.
    expect([...(await fe.setLogBase(logFd(2 * enough), 2 * enough, 0))]).toEqual([...u64Payload(0)]);
    expect(logMappings()).toBe(1);
    fe.close();
    await waitUntil(async () => (await device()).connected === false, 3000, 'session closed');
    expect(logMappings()).toBe(0);
  });

  test('RESET_DEVICE unmaps the log (logging starts again with a new SET_LOG_BASE)', async () => {
    const fe = await guest();
    await fe.setLogBase(logFd(enough), enough, 0);
    await fe.setFeatures(fe.features | bit(F_LOG_ALL));
    expect((await device()).logging).toBe(true);
    await fe.resetDevice();
    expect(logMappings()).toBe(0);
    expect((await device()).logging).toBe(false);
  });

  test('a log at a non-page-aligned offset of its file is accepted', async () => {
    const fe = await guest();
    await fe.setLogBase(logFd(enough + 8192), enough, 4096 + 24);
    expect(logMappings()).toBe(1);
  });
});

describe('logging on and off while the rings run', () => {
  test('SET_FEATURES with and without LOG_ALL turns logging on and off without stopping the rings; status shows it', async () => {
    const fe = await guest();
    const base = fe.features;
    expect((await device()).logging).toBe(false);
    await fe.setLogBase(logFd(enough), enough, 0);
    // A log alone does not log: LOG_ALL says when.
    expect((await device()).logging).toBe(false);
    await fe.setFeatures(base | bit(F_LOG_ALL));
    let st = await device();
    expect(st.logging).toBe(true);
    expect(st.runningVrings).toEqual([0, 1]);
    await fe.setFeatures(base);
    st = await device();
    expect(st.logging).toBe(false);
    expect(st.runningVrings).toEqual([0, 1]);
  });

  test('any other feature change while rings run is still refused', async () => {
    const fe = await guest();
    const before = await refusals('backend-refused');
    const other = fe.features ^ bit(0); // CSUM
    await expect(fe.setFeatures(other | bit(F_LOG_ALL))).rejects.toThrow(/refused/);
    expect(await refusals('backend-refused')).toBe(before + 1);
    expect((await device()).logging).toBe(false);
  });

  test('SET_VRING_ADDR may set and clear VHOST_VRING_F_LOG on a running ring; the ring keeps running and carries traffic', async () => {
    const fe = await guest();
    await fe.setLogBase(logFd(enough), enough, 0);
    await fe.setFeatures(fe.features | bit(F_LOG_ALL));
    await fe.setVringLog(0, true);
    await fe.setVringLog(1, true);
    expect((await device()).runningVrings).toEqual([0, 1]);
    // The restarted TX ring still moves frames to the tap (and returns the buffers).
    const frame = new Uint8Array(60).fill(0xab);
    expect(fe.transmit(0, [frame])).toBe(1);
    await waitUntil(async () => fe.txInFlight(0) === 0, 3000, 'TX buffer returned');
    await fe.setVringLog(0, false);
    expect((await device()).runningVrings).toEqual([0, 1]);
  });

  test('SET_VRING_ADDR that moves a running ring is refused (vring-addr-changed); unknown flag bits are refused (bad-vring-flags)', async () => {
    const fe = await guest();
    const a = fe.vringAddrs[0]!;
    const moved = await refusals('vring-addr-changed');
    await expect(fe.request(Request.SET_VRING_ADDR, vringAddrPayload({ ...a, usedUser: a.usedUser + 4096 }))).rejects.toThrow(/refused/);
    expect(await refusals('vring-addr-changed')).toBe(moved + 1);
    const flags = await refusals('bad-vring-flags');
    await expect(fe.request(Request.SET_VRING_ADDR, vringAddrPayload({ ...a, flags: 0x2 }))).rejects.toThrow(/refused/);
    expect(await refusals('bad-vring-flags')).toBe(flags + 1);
    expect((await device()).runningVrings).toEqual([0, 1]);
  });
});

describe('device state transfer', () => {
  /** A session with the protocol features and no running rings (the device is suspended). */
  async function suspended(): Promise<TestFrontend> {
    const fe = await TestFrontend.connect(rig.sock, { memBytes: MEM, protocolFeatures: MIGRATION, start: false });
    openFe.push(fe);
    const p = new DataView((await fe.request(Request.GET_PROTOCOL_FEATURES, new Uint8Array(0), [], true))!.buffer).getBigUint64(0, true);
    const want = p & (MIGRATION | bit(ProtocolFeature.REPLY_ACK));
    await fe.request(Request.SET_PROTOCOL_FEATURES, u64Payload(want));
    fe.protocolFeatures = want;
    return fe;
  }

  test('save then load round-trips the (empty, versioned) state; status records both', async () => {
    const src = await suspended();
    const saved = await src.saveDeviceState();
    expect(saved.reply).toBe(OK_NOFD);
    expect(saved.check).toBe(0n);
    expect(saved.state.length).toBe(8);
    let last = (await device()).lastMigration!;
    expect(last).toMatchObject({ direction: 'save', bytes: 8, ok: true });
    src.close();
    await waitUntil(async () => (await device()).connected === false, 3000, 'source gone');
    const dst = await suspended();
    const loaded = await dst.loadDeviceState(saved.state);
    expect(loaded.reply).toBe(OK_NOFD);
    expect(loaded.written).toBe(8);
    expect(loaded.check).toBe(0n);
    last = (await device()).lastMigration!;
    expect(last).toMatchObject({ direction: 'load', bytes: 8, ok: true });
    expect(last.ms).toBeGreaterThanOrEqual(0);
  });

  test('a garbage state makes CHECK_DEVICE_STATE fail with the backend\'s code (bad-device-state)', async () => {
    const fe = await suspended();
    const before = await refusals('bad-device-state');
    const r = await fe.loadDeviceState(new TextEncoder().encode('not a vhost-xdp state'));
    expect(r.reply).toBe(OK_NOFD);
    expect(r.check).not.toBe(0n);
    expect(await refusals('bad-device-state')).toBe(before + 1);
    expect((await device()).lastMigration).toMatchObject({ direction: 'load', ok: false, code: 'bad-device-state' });
    // The session goes on: a good state loads afterwards.
    const ok = await fe.loadDeviceState((await fe.saveDeviceState()).state);
    expect(ok.check).toBe(0n);
  });

  test('an empty state (the frontend closed at once) is refused by the backend', async () => {
    const fe = await suspended();
    const r = await fe.loadDeviceState(new Uint8Array(0));
    expect(r.check).not.toBe(0n);
    expect((await device()).lastMigration).toMatchObject({ ok: false, code: 'bad-device-state', bytes: 0 });
  });

  test(`a state above ${MAX_STATE_BYTES} bytes is cut off (state-too-large): the backend closes the pipe and CHECK fails`, async () => {
    const fe = await suspended();
    const r = await fe.loadDeviceState(new Uint8Array(MAX_STATE_BYTES + 65536), { timeoutMs: 20_000 });
    expect(r.reply).toBe(OK_NOFD);
    expect(r.check).not.toBe(0n);
    const last = (await device()).lastMigration!;
    expect(last).toMatchObject({ direction: 'load', ok: false, code: 'state-too-large' });
    // The limit holds before bytes are kept: the backend never held more than the cap.
    expect(last.bytes).toBeLessThanOrEqual(MAX_STATE_BYTES);
  }, 30_000);

  test('CHECK_DEVICE_STATE while the frontend still holds the pipe open reports transfer-incomplete', async () => {
    const fe = await suspended();
    const before = await refusals('transfer-incomplete');
    const r = await fe.loadDeviceState(new Uint8Array(4), { keepOpen: true });
    expect(r.check).not.toBe(0n);
    expect(await refusals('transfer-incomplete')).toBe(before + 1);
  });

  test('CHECK_DEVICE_STATE without a transfer fails (no-transfer)', async () => {
    const fe = await suspended();
    const before = await refusals('no-transfer');
    expect(await fe.checkDeviceState()).toBe(1n);
    expect(await refusals('no-transfer')).toBe(before + 1);
  });

  // Each refusal answers "error, no fd" (0x101) and closes the fd it was given.
  const badStarts: [string, string, (fe: TestFrontend) => Promise<bigint>][] = [
    ['bad-transfer-direction', 'direction 2', async (fe) => { const [r, w] = pipe(); openFds.push(r, w); return fe.setDeviceStateFd(2, 0, w); }],
    ['bad-transfer-phase', 'phase 1 (only "stopped" exists)', async (fe) => { const [r, w] = pipe(); openFds.push(r, w); return fe.setDeviceStateFd(0, 1, w); }],
    ['bad-transfer-fd', 'a memfd instead of a pipe', async (fe) => fe.setDeviceStateFd(0, 0, logFd(4096))],
    ['bad-transfer-fd', 'the read end of a pipe to save into', async (fe) => { const [r, w] = pipe(); openFds.push(r, w); return fe.setDeviceStateFd(0, 0, r); }],
  ];
  for (const [code, what, start] of badStarts) {
    test(`SET_DEVICE_STATE_FD refused (${code}): ${what}`, async () => {
      const fe = await suspended();
      const before = await refusals(code);
      expect(await start(fe)).toBe(FAIL_NOFD);
      expect(await refusals(code)).toBe(before + 1);
      expect((await device()).connected).toBe(true);
    });
  }

  test('SET_DEVICE_STATE_FD while a ring runs is refused (device-not-suspended)', async () => {
    const fe = await guest();
    const before = await refusals('device-not-suspended');
    const [r, w] = pipe();
    openFds.push(r, w);
    expect(await fe.setDeviceStateFd(0, 0, w)).toBe(FAIL_NOFD);
    expect(await refusals('device-not-suspended')).toBe(before + 1);
  });

  test('without DEVICE_STATE negotiated the requests answer failure instead of hanging up', async () => {
    const fe = await TestFrontend.connect(rig.sock, { start: false });
    openFe.push(fe);
    await fe.request(Request.GET_FEATURES, new Uint8Array(0), [], true);
    await fe.request(Request.SET_PROTOCOL_FEATURES, u64Payload(bit(ProtocolFeature.REPLY_ACK)));
    fe.protocolFeatures = bit(ProtocolFeature.REPLY_ACK);
    const [r, w] = pipe();
    openFds.push(r, w);
    expect(await fe.setDeviceStateFd(0, 0, w)).toBe(FAIL_NOFD);
    expect(await fe.checkDeviceState()).toBe(1n);
    fe.sendRaw(Request.SET_OWNER, FLAG_VERSION | FLAG_NEED_REPLY, new Uint8Array(0));
    expect((await fe.readReply())!.payload[0]).toBe(0);
  });
});
