// Live migration's dirty log against every path that writes guest memory, through real `serve`
// processes: the TS frontend hands over a log memfd it maps itself and checks the bits against
// what it knows was written — the guest ranges of every used RX chain it consumed and the used
// rings — and against what changed: a page whose bytes changed, and that the driver does not
// write itself, must be dirty; a page nobody wrote must stay clean.
//
// Paths: tap RX (readv into 2 KiB slots, into multi-segment chains, across mergeable buffers),
// xsk RX (the kernel writing frames into guest RAM through AF_XDP, and the bounce copies for
// chains the UMEM cannot take in place), offload replies on the reserved pair, TX (used
// entries only). Rings of 1024 entries: each used ring spans three pages, so a word logged at
// the wrong place (or not at all) shows up as a page.
import { describe, test, expect, beforeAll, afterAll, afterEach } from 'vitest';
import { useTapDevice, type DeviceRig } from '../support/frontend/device-rig.js';
import { TestFrontend, addPages } from '../support/frontend/test-frontend.js';
import type { GuestLog, GuestRange } from '../support/frontend/guest-log.js';
import type { DriverBuffer } from '../support/frontend/driver-queue.js';
import { OffloadRig } from '../support/frontend/offload-rig.js';
import { requireOk } from '../support/frontend/offload-client.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf, GUEST_MAC, HOST_MAC } from '../support/frames.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';
import { waitUntil, sleep } from '../support/processes.js';
import { ProtocolFeature, bit } from '../../src/vhost-user/protocol.js';

const PAGE = 4096;
const QSIZE = 1024;
const MEM = 32 << 20;
const LOG_SHMFD = bit(ProtocolFeature.LOG_SHMFD);
const RX0 = 0;
const TX0 = 1;

/** What one round of traffic is checked against. */
interface Round {
  fe: TestFrontend;
  log: GuestLog;
  /** Guest memory when the round started (the log was clean then). */
  before: Uint8Array;
}

/** Clears the log and starts recording what the device reports written. */
function beginRound(fe: TestFrontend, log: GuestLog): Round {
  for (let p = 0; p < fe.pairs.length; p++) fe.receive(p); // nothing left over from an earlier round
  log.clear();
  fe.rxWrites = [];
  return { fe, log, before: fe.snapshot() };
}

const sorted = (s: Iterable<number>): number[] => [...s].sort((a, b) => a - b);

/**
 * The log after a round in which vrings `rings` published used entries:
 * - every page of every RX range the device reported written, and the page of each ring's
 *   used->idx, is dirty;
 * - nothing else is dirty but the rest of those used rings (where the elements went);
 * - every page whose bytes changed, other than the driver's own (descriptors, avail rings, TX
 *   buffers), is dirty: a write no used element reports cannot hide.
 */
function expectLogged(r: Round, rings: number[]): { writes: GuestRange[]; dirty: Set<number> } {
  const writes = r.fe.rxWrites ?? [];
  const changed = r.fe.changedPages(r.before);
  const dirty = r.log.dirtyPages();
  const wrote = new Set<number>();
  for (const w of writes) addPages(wrote, w);
  for (const i of rings) addPages(wrote, { gpa: r.fe.usedGpa(i) + 2, len: 2 });
  const allowed = new Set(wrote);
  for (const i of rings) addPages(allowed, r.fe.usedRing(i));
  const driver = r.fe.driverPages();
  expect(sorted([...wrote].filter((p) => !dirty.has(p))), 'written but not logged').toEqual([]);
  expect(sorted([...dirty].filter((p) => !allowed.has(p))), 'logged but never written').toEqual([]);
  expect(sorted([...changed].filter((p) => !driver.has(p) && !dirty.has(p))), 'changed but not logged').toEqual([]);
  return { writes, dirty };
}

/** Sends n frames from the host into the port and waits until the guest consumed all of them. */
async function hostToGuest(fe: TestFrontend, ps: PacketSocket, first: number, n: number, payload = (i: number) => 40 + i * 80): Promise<void> {
  for (let i = 0; i < n; i++) ps.send(udpFrame(first + i, payload(i), 3000 + (i % 4), HOST_MAC, GUEST_MAC));
  const got = await fe.waitForFrames(0, n, 5000, (f) => { const s = seqOf(f); return s !== null && s >= first && s < first + n; });
  expect(got.length).toBe(n);
}

/** Sends n frames from the guest and waits until the device returned every TX buffer. */
async function guestToHost(fe: TestFrontend, first: number, n: number): Promise<void> {
  for (let i = 0; i < n; i++) expect(fe.transmit(0, [udpFrame(first + i, 64 + i * 31)])).toBe(1);
  await waitUntil(() => fe.txInFlight(0) === 0, 3000, 'TX buffers returned');
}

/**
 * Receive chains the frontend lays out itself, each in its own 6-page area (untouched pages
 * around every segment): a 10-byte segment ending at a page boundary (the header split over
 * it and the next), a 600-byte one crossing the next page boundary, and a 3000-byte one
 * starting 1000 bytes before another boundary. A frame that needs less than 1610 bytes with
 * its header ends inside the last segment's first page: the second page must stay clean.
 */
function pageCrossingChains(fe: TestFrontend, n: number): DriverBuffer[][] {
  const base = fe.alloc(n * 6 * PAGE);
  return Array.from({ length: n }, (_, i) => {
    const a = base + i * 6 * PAGE;
    return [
      { gpa: a + PAGE - 10, len: 10, writable: true },
      { gpa: a + 2 * PAGE - 300, len: 600, writable: true },
      { gpa: a + 4 * PAGE - 1000, len: 3000, writable: true },
    ];
  });
}

/** One-segment chains of 700 bytes, each crossing a page boundary, one per 2-page area. */
function smallChains(fe: TestFrontend, n: number): DriverBuffer[][] {
  const base = fe.alloc(n * 2 * PAGE);
  return Array.from({ length: n }, (_, i) => [{ gpa: base + i * 2 * PAGE + PAGE - 350, len: 700, writable: true }]);
}

/** Per-device setup shared by the tap and xsk describes: a guest with migration logging available. */
function useLoggingGuest(rig: DeviceRig, name: string): {
  guest(rxFill?: 'slots' | 'manual'): Promise<TestFrontend>;
  ps(): PacketSocket;
  logs: GuestLog[];
  stats(): Promise<{ jsCopies: number; rxPackets: number }>;
} {
  let ps: PacketSocket | null = null;
  const logs: GuestLog[] = [];
  afterEach(() => {
    for (const l of logs.splice(0)) l.close();
  });
  afterAll(() => ps?.close());
  return {
    logs,
    async guest(rxFill = 'slots') {
      const fe = await TestFrontend.connect(rig.sock, { memBytes: MEM, queueSize: QSIZE, protocolFeatures: LOG_SHMFD, rxFill });
      rig.openFe.push(fe);
      await waitUntil(async () => (await rig.device()).runningVrings.length === 2, 5000, 'rings running');
      return fe;
    },
    ps() {
      ps ??= PacketSocket.open(rig.ifname);
      return ps;
    },
    async stats() {
      const s = (await rig.be.call('stats', { name }))[0];
      return { jsCopies: s.total.jsCopies, rxPackets: s.total.rxPackets };
    },
  };
}

describe('tap port', () => {
  const rig = useTapDevice('dlog', 'dlog', { quiet: true });
  const g = useLoggingGuest(rig, 'dlog');

  test('with a log mapped but LOG_ALL off, traffic both ways marks nothing', async () => {
    const fe = await g.guest();
    const log = await fe.startDirtyLog({ logAll: false });
    g.logs.push(log);
    expect((await rig.device()).logging).toBe(false);
    await hostToGuest(fe, g.ps(), 100, 8);
    await guestToHost(fe, 150, 8);
    expect(sorted(log.dirtyPages())).toEqual([]);
  });

  test('host→guest into 2 KiB slots: exactly the pages the frames went to, and the RX used ring', async () => {
    const fe = await g.guest();
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    const r = beginRound(fe, log);
    await hostToGuest(fe, g.ps(), 200, 16);
    const { writes, dirty } = expectLogged(r, [RX0]);
    expect(writes.length).toBe(16);
    // The used ring's idx page, and no page of the TX ring.
    expect(log.isDirty(fe.usedGpa(RX0))).toBe(true);
    expect(log.isDirty(fe.usedGpa(TX0))).toBe(false);
    expect(dirty.size).toBeGreaterThan(1);
  });

  test('host→guest into multi-segment chains that cross pages: only the first len bytes are logged', async () => {
    const fe = await g.guest('manual');
    const chains = pageCrossingChains(fe, 8);
    expect(fe.postRx(0, chains)).toBe(8);
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    const r = beginRound(fe, log);
    // 1000-byte payloads: 1042-byte frames + 12-byte header end inside the third segment's first page.
    await hostToGuest(fe, g.ps(), 300, 8, () => 1000);
    const { writes } = expectLogged(r, [RX0]);
    expect(writes.length).toBe(3 * 8);
    for (const c of chains) {
      const last = c[2]!;
      expect(log.isDirty(last.gpa)).toBe(true);
      expect(log.isDirty(last.gpa + last.len - 1)).toBe(false);
    }
  });

  test('host→guest across mergeable buffers: every chain of a frame is logged, unused chains stay clean', async () => {
    const fe = await g.guest('manual');
    const chains = smallChains(fe, 40);
    expect(fe.postRx(0, chains)).toBe(40);
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    const r = beginRound(fe, log);
    // 1400-byte frames + header over 700-byte buffers: three chains each, 30 of the 40.
    await hostToGuest(fe, g.ps(), 400, 10, () => 1358);
    const { writes } = expectLogged(r, [RX0]);
    expect(writes.length).toBe(30);
    for (const c of chains.slice(30)) expect(log.isDirty(c[0]!.gpa)).toBe(false);
  });

  test('guest→host writes no payload: only the TX used ring is dirty', async () => {
    const fe = await g.guest();
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    const r = beginRound(fe, log);
    await guestToHost(fe, 500, 32);
    await sleep(50);
    const { dirty } = expectLogged(r, [TX0]);
    const used = addPages(new Set(), fe.usedRing(TX0));
    expect([...dirty].every((p) => used.has(p))).toBe(true);
    expect(log.isDirty(fe.usedGpa(TX0))).toBe(true);
  });

  test('LOG_ALL off stops the marking at once and lets go of the log; a new log base and LOG_ALL resume it, with the rings running', async () => {
    const fe = await g.guest();
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    let r = beginRound(fe, log);
    await hostToGuest(fe, g.ps(), 600, 8);
    await guestToHost(fe, 650, 8);
    expectLogged(r, [RX0, TX0]);
    await fe.setLogAll(false);
    expect((await rig.device()).logging).toBe(false);
    log.clear();
    await hostToGuest(fe, g.ps(), 700, 8);
    await guestToHost(fe, 750, 8);
    await sleep(50);
    expect(sorted(log.dirtyPages())).toEqual([]);
    // QEMU frees its log when logging goes off and hands one over again before the next
    // migration turns LOG_ALL back on (vhost_dev_log_resize, then the features).
    await fe.setLogBase(log.fd, log.size);
    await fe.setLogAll(true);
    expect((await rig.device()).runningVrings).toEqual([0, 1]);
    r = beginRound(fe, log);
    await hostToGuest(fe, g.ps(), 800, 8);
    await guestToHost(fe, 850, 8);
    expectLogged(r, [RX0, TX0]);
  });
});

describe('xsk port (the kernel writes into guest RAM)', () => {
  const rig = useTapDevice('dlogx', 'dlogx', { port: 'xsk', quiet: true });
  const g = useLoggingGuest(rig, 'dlogx');

  test('frames AF_XDP writes in place into 2 KiB slots are logged (no JS copy)', async () => {
    const fe = await g.guest();
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    const s0 = await g.stats();
    const r = beginRound(fe, log);
    await hostToGuest(fe, g.ps(), 1000, 16);
    const { writes } = expectLogged(r, [RX0]);
    expect(writes.length).toBe(16);
    const s1 = await g.stats();
    expect(s1.rxPackets - s0.rxPackets).toBe(16);
    expect(s1.jsCopies - s0.jsCopies).toBe(0);
  });

  test('bounce copies into chained small buffers are logged, segment by segment', async () => {
    const fe = await g.guest('manual');
    const chains = pageCrossingChains(fe, 8);
    expect(fe.postRx(0, chains)).toBe(8);
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    const s0 = await g.stats();
    const r = beginRound(fe, log);
    await hostToGuest(fe, g.ps(), 1100, 8, () => 1000);
    const { writes } = expectLogged(r, [RX0]);
    expect(writes.length).toBe(3 * 8);
    expect((await g.stats()).jsCopies - s0.jsCopies).toBe(8);
    for (const c of chains) expect(log.isDirty(c[2]!.gpa + c[2]!.len - 1)).toBe(false);
  });

  test('guest→host through AF_XDP writes only the TX used ring', async () => {
    const fe = await g.guest();
    const log = await fe.startDirtyLog();
    g.logs.push(log);
    const r = beginRound(fe, log);
    await guestToHost(fe, 1200, 32);
    await sleep(50);
    const { dirty } = expectLogged(r, [TX0]);
    const used = addPages(new Set(), fe.usedRing(TX0));
    expect([...dirty].every((p) => used.has(p))).toBe(true);
  });
});

describe('offload replies on the reserved pair', () => {
  let rig: OffloadRig;
  const tap = uniqueIfName('vxdl');
  beforeAll(async () => {
    rig = await OffloadRig.start({
      tag: 'dlogoff', port: 'tap', ifname: tap, name: 'dlogoff', hostMac: HOST_MAC, firstSeq: 2000,
      afterStart: () => disableIpv6(tap), frontend: { memBytes: MEM, queueSize: QSIZE, protocolFeatures: LOG_SHMFD },
    });
  });
  afterAll(async () => {
    await rig?.close();
  });

  test('the reply frames the broker writes into the guest are logged, with both rings of the pair', async () => {
    const fe = rig.fe;
    const log = await fe.startDirtyLog();
    try {
      const r = beginRound(fe, log);
      requireOk(await rig.oc.claim());
      await waitUntil(() => fe.txInFlight(1) === 0, 3000, 'request buffer returned');
      await sleep(50);
      const { writes } = expectLogged(r, [2, 3]);
      expect(writes.length).toBeGreaterThanOrEqual(1);
      expect(log.isDirty(fe.usedGpa(2))).toBe(true);
      expect(log.isDirty(fe.usedGpa(3))).toBe(true);
      // Pair 0 carried nothing: its rings stay clean.
      expect(log.isDirty(fe.usedGpa(0))).toBe(false);
      expect(log.isDirty(fe.usedGpa(1))).toBe(false);
    } finally {
      log.close();
    }
  });
});
