// Live migration of a guest's XDP offload (issue 14), end to end: real `serve --offload`
// processes on taps, the TS frontend as the guest and as QEMU's vhost-user side, the program
// in the kernel. The source stops its rings and saves the device state (SET_DEVICE_STATE_FD,
// CHECK_DEVICE_STATE); destinations load it before their rings start, as QEMU 10 does
// (docs/migration.md). Outcomes are read as codes: CHECK's reply, status lastMigration, the
// control API's offload.show, the kernel's objects by name, the backend's bpf fds and pins.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { OffloadRig, type OffloadRigOptions } from '../support/frontend/offload-rig.js';
import { offloadSample, requireOk, lookupU64 } from '../support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6 } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { ownBpfFds, namedKernelObjects, readU64 } from './helpers.js';
import { bpfPrefix, hostObjectName } from '../../src/offload/host-names.js';
import { ProtocolFeature, bit } from '../../src/vhost-user/protocol.js';
import { decodeDeviceState, encodeDeviceState, MAX_HELD_REPLIES, SECTION_OFFLOAD, SECTION_REPLIES } from '../../src/net/device-state.js';
import { HEADER_BYTES, RESPONSE_FLAG, writeHeader } from '../../src/offload/protocol.js';
import { decodeState, STATE_HEADER_BYTES } from '../../src/offload/migration-format.js';
import { BpfMap, mapGetFdById } from '../../src/sys/bpf/maps.js';
import { listMapIds, listProgIds } from '../../src/sys/bpf/info.js';

const MIGRATION = bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.DEVICE_STATE);
const HOST_MAC = '52:54:00:0e:0e:0e';
const NAME = 'mig';
const OK_NOFD = 0x100n;
/** This run's kernel object names (other runs on the host load xdp_drop too). */
const TAG = `om${process.pid}`;
const PROG = `${TAG}_drop`.slice(0, 15);
const MAP_PREFIX = `${TAG}_`;
/** Device state header (8) + offload section header (8): where the offload section's body starts. */
const OFFLOAD_BODY = 16;

const rigs: OffloadRig[] = [];
let nextSeq = 700_000;

/** A device on its own tap; the guest as `o` says (rings running unless start: false). */
async function device(tag: string, o: Partial<OffloadRigOptions> = {}): Promise<OffloadRig> {
  const tap = uniqueIfName('vxm');
  const rig = await OffloadRig.start({ tag, port: 'tap', ifname: tap, name: NAME, hostMac: HOST_MAC, firstSeq: nextSeq, afterStart: () => disableIpv6(tap), ...o });
  nextSeq += 100_000;
  rigs.push(rig);
  return rig;
}

/** A migration's destination: negotiated with the migration features, nothing started. */
const destination = (tag: string, o: Partial<OffloadRigOptions> = {}) => device(tag, { start: false, protocolFeatures: MIGRATION, ...o });

async function status(rig: OffloadRig): Promise<any> {
  return (await rig.be.call('status')).devices[0];
}
const show = (rig: OffloadRig): Promise<any> => rig.be.call('offload.show', { name: NAME });

/** The element at key 0 of a kernel map, read by its id (not through the broker). */
function kernelCount(mapId: number): number {
  const m = BpfMap.fromFd(mapGetFdById(mapId));
  try {
    return readU64(m.lookup(new Uint8Array(4))!);
  } finally {
    m.close();
  }
}

/** Kernel objects this run created, whoever holds them. */
// The kernel's names carry the device's prefix before the guest's (src/offload/host-names.ts).
const ourObjects = () => namedKernelObjects((n) => n.startsWith(hostObjectName(bpfPrefix(NAME), MAP_PREFIX)), (n) => n === hostObjectName(bpfPrefix(NAME), PROG));

afterAll(async () => {
  for (const r of rigs.splice(0)) await r.close();
});

describe('a claimed XDP offload moves with the guest through the device-state transfer', () => {
  let a: OffloadRig;
  let b: OffloadRig;
  let dropMap = 0;
  /** A's drop count when it saved; A's offload.show then; the state bytes; the ring bases. */
  let countAtSave = 0;
  let atSave: any;
  let state: Uint8Array;
  let bases: number[] = [];

  beforeAll(async () => {
    a = await device('offmig-a', { protocolFeatures: MIGRATION });
  });

  test('source: the guest offloads xdp_drop, host frames die on the host; with the rings stopped the state saves (CHECK 0) and carries the offload', async () => {
    requireOk(await a.oc.claim());
    [dropMap] = (await offloadSample(a.oc, 'xdp_drop', { prog: PROG, mapPrefix: MAP_PREFIX })) as [number];
    expect(await a.hostToGuest(30)).toBe(0);
    expect(await lookupU64(a.oc, dropMap)).toBeGreaterThanOrEqual(30);
    const before = await show(a);

    // QEMU at switch-over: every ring stopped (GET_VRING_BASE), then SAVE and CHECK.
    bases = await a.fe.stopRings();
    expect((await status(a)).runningVrings).toEqual([]);
    const saved = await a.fe.saveDeviceState();
    expect(saved.reply).toBe(OK_NOFD);
    expect(saved.check).toBe(0n);
    expect(saved.state.length).toBeGreaterThan(8);
    expect((await status(a)).lastMigration).toMatchObject({ direction: 'save', ok: true, bytes: saved.state.length });
    state = saved.state;

    // SAVE is read-only: the source still holds what it held before the rings stopped.
    atSave = await show(a);
    expect(atSave.claimed).toBe(true);
    expect(atSave.program).toMatchObject({ id: before.program.id, tag: before.program.tag, name: PROG });
    countAtSave = kernelCount(atSave.maps[0].id);
    expect(countAtSave).toBe(atSave.verdicts.drop);

    // The bytes say the same: the claim, the program's tag, the map under its handle with the count.
    const off = decodeState(decodeDeviceState(state).offload!);
    expect(off.claim).not.toBeNull();
    expect(off.program?.tag).toBe(atSave.program.tag);
    expect(off.maps.map((m) => m.handle)).toEqual([dropMap]);
    expect(readU64(off.maps[0]!.values)).toBe(countAtSave);
    expect(off.counters).toMatchObject({ drop: atSave.verdicts.drop });
  });

  test('destination: LOAD (CHECK 0) re-creates the claim, the program (same tag), the maps under the same handles with their values, and the verdict counters', async () => {
    b = await destination('offmig-b');
    const loaded = await b.fe.loadDeviceState(state);
    expect(loaded).toMatchObject({ reply: OK_NOFD, written: state.length, check: 0n });
    expect((await status(b)).lastMigration).toMatchObject({ direction: 'load', ok: true, bytes: state.length });
    const s = await show(b);
    expect(s.claimed).toBe(true);
    expect(s.program).toMatchObject({ tag: atSave.program.tag, name: PROG, mapHandles: atSave.program.mapHandles });
    expect(s.program.id).not.toBe(atSave.program.id);
    expect(s.maps.map((m: any) => [m.handle, m.type, m.keySize, m.valueSize, m.maxEntries, m.name]))
      .toEqual(atSave.maps.map((m: any) => [m.handle, m.type, m.keySize, m.valueSize, m.maxEntries, m.name]));
    expect(kernelCount(s.maps[0].id)).toBe(countAtSave);
    expect(s.verdicts).toEqual(atSave.verdicts);
  });

  test('destination after the guest resumed (rings started): host frames are dropped on the host, the count goes on from the source\'s, the same handle answers on the reserved pair', async () => {
    await b.fe.start();
    await waitUntil(async () => (await status(b)).runningVrings.length === 4, 3000, 'rings running on B');
    expect(await b.hostToGuest(25)).toBe(0);
    const s = await show(b);
    expect(s.verdicts.drop).toBeGreaterThanOrEqual(atSave.verdicts.drop + 25);
    // Through the offload protocol, by the handle the guest got on the source.
    const count = await lookupU64(b.oc, dropMap);
    expect(count).toBeGreaterThanOrEqual(countAtSave + 25);
    expect(count).toBe(s.verdicts.drop);
    expect(s.program.tag).toBe(atSave.program.tag);
  });

  test('source after SAVE, migration cancelled: the rings resume from their bases, the program still drops host frames and the map counts on', async () => {
    await a.fe.resumeRings(bases);
    await waitUntil(async () => (await status(a)).runningVrings.length === 4, 3000, 'rings running on A');
    expect(await a.hostToGuest(10)).toBe(0);
    const s = await show(a);
    expect(s.claimed).toBe(true);
    expect(s.program.id).toBe(atSave.program.id);
    expect(await lookupU64(a.oc, dropMap)).toBeGreaterThanOrEqual(countAtSave + 10);
  });

  describe('destinations that refuse the state: CHECK fails with a code, nothing is left behind', () => {
    let c: OffloadRig;
    let d: OffloadRig;
    /** D's bpf fds with nothing offloaded. */
    let dFds = 0;

    beforeAll(async () => {
      c = await destination('offmig-c', { offload: false });
      d = await destination('offmig-d');
      dFds = ownBpfFds(d.be.proc.pid!);
    });

    /** D holds no offload: not in the broker, not in its fds, not pinned; this run's kernel objects are A's and B's only. */
    async function expectNothingOnD(): Promise<void> {
      expect(await show(d)).toMatchObject({ claimed: false, program: null, maps: [] });
      expect(ownBpfFds(d.be.proc.pid!)).toBe(dFds);
      expect(fs.existsSync(path.join(d.pinRoot, NAME))).toBe(false);
      const held = await Promise.all([show(a), show(b)]);
      const known = { maps: held.flatMap((s) => s.maps.map((m: any) => m.id)).sort(), progs: held.map((s) => s.program.id).sort() };
      await waitUntil(() => {
        const o = ourObjects();
        return JSON.stringify({ maps: o.maps.sort(), progs: o.progs.sort() }) === JSON.stringify(known);
      }, 3000, 'only A\'s and B\'s objects in the kernel');
    }

    test('a backend without --offload refuses a claimed offload (offload-not-enabled)', async () => {
      const before = (await status(c)).refusals['offload-not-enabled'] ?? 0;
      const r = await c.fe.loadDeviceState(state);
      expect(r.reply).toBe(OK_NOFD);
      expect(r.check).not.toBe(0n);
      const st = await status(c);
      expect(st.lastMigration).toMatchObject({ direction: 'load', ok: false, code: 'offload-not-enabled' });
      expect(st.refusals['offload-not-enabled']).toBe(before + 1);
    });

    test('a backend without --offload accepts the state of an --offload device whose guest never claimed (CHECK 0), and the guest runs there', async () => {
      // D's guest has claimed nothing: its state carries an unclaimed offload section.
      const unclaimed = await d.fe.saveDeviceState();
      expect(unclaimed.check).toBe(0n);
      expect(decodeDeviceState(unclaimed.state).offload).not.toBeNull();
      expect(decodeState(decodeDeviceState(unclaimed.state).offload!).claim).toBeNull();
      const r = await c.fe.loadDeviceState(unclaimed.state);
      expect(r.check).toBe(0n);
      expect((await status(c)).lastMigration).toMatchObject({ direction: 'load', ok: true });
      await c.fe.start();
      await waitUntil(async () => (await status(c)).runningVrings.length === 4, 3000, 'rings running on C');
      expect(await c.hostToGuest(5)).toBe(5);
    });

    // Each damages A's state and fixes nothing up (the CRC stays as A wrote it), except the
    // last, which re-wraps a cut offload section in a well-formed device-state envelope so the
    // offload decoder, not the envelope's, is the one that refuses.
    const offloadBody = () => decodeDeviceState(state).offload!;
    /** A well-formed empty OK response to seq (what a held reply looks like). */
    const response = (seq: number): Uint8Array => {
      const r = new Uint8Array(HEADER_BYTES + 4);
      writeHeader(r, RESPONSE_FLAG | 0x0101, seq, 4);
      return r;
    };
    /** u16/u32 fields, little-endian, as the replies section spells them. */
    const le = (...fields: [2 | 4, number][]): Uint8Array => {
      const out = new Uint8Array(fields.reduce((n, [w]) => n + w, 0));
      const v = new DataView(out.buffer);
      let at = 0;
      for (const [w, x] of fields) {
        if (w === 2) v.setUint16(at, x, true);
        else v.setUint32(at, x, true);
        at += w;
      }
      return out;
    };
    const cat = (...parts: Uint8Array[]): Uint8Array => Uint8Array.from(parts.flatMap((p) => [...p]));
    /**
     * A's offload section, then raw sections after it (the encoder writes only well-formed
     * ones): [type, flags, body], each with its length, the header's count raised to match.
     */
    const withSections = (...extra: [number, number, Uint8Array][]): Uint8Array => {
      const head = encodeDeviceState({ offload: offloadBody() });
      new DataView(head.buffer, head.byteOffset).setUint16(6, 1 + extra.length, true);
      return cat(head, ...extra.flatMap(([type, flags, body]) => [le([2, type], [2, flags], [4, body.length]), body]));
    };
    const rawReplies = (body: Uint8Array) => withSections([SECTION_REPLIES, 0, body]);
    const flipped = (at: number) => {
      const s = state.slice();
      s[at] = s[at]! ^ 0x5a;
      return s;
    };
    const damaged: [string, string, () => Uint8Array][] = [
      ['state-checksum', 'a byte flipped in the verdict counters (the last section)', () => flipped(state.length - 8)],
      ['bad-state-magic', 'a byte of the offload section\'s magic flipped', () => flipped(OFFLOAD_BODY)],
      ['bad-device-state', 'the state cut inside the offload section (its length now runs past the end)', () => state.slice(0, state.length - 24)],
      ['state-truncated', 'the offload section cut short inside a well-formed envelope', () => {
        const body = offloadBody();
        return encodeDeviceState({ offload: body.slice(0, body.length - 24) });
      }],
      ['state-truncated', 'only the offload header left', () => encodeDeviceState({ offload: offloadBody().slice(0, STATE_HEADER_BYTES - 4) })],
      // The replies section goes to the guest as it is: only offload responses, only as many as a device holds.
      ['bad-device-state', 'a held reply that is not an offload response', () => encodeDeviceState({ offload: offloadBody(), replies: [new Uint8Array(HEADER_BYTES)] })],
      ['bad-device-state', 'more held replies than a device keeps', () => encodeDeviceState({ offload: offloadBody(), replies: Array.from({ length: MAX_HELD_REPLIES + 1 }, (_, i) => response(i)) })],
      ['bad-device-state', 'a held reply whose header claims more payload than it has', () => {
        const r = response(1);
        new DataView(r.buffer).setUint32(12, 5, true);
        return encodeDeviceState({ offload: offloadBody(), replies: [r] });
      }],
      // Raw replies sections: every count and length is checked against the bytes present.
      ['bad-device-state', 'a replies section too short for its count', () => rawReplies(new Uint8Array(1))],
      ['bad-device-state', 'a replies count over the bound, with no responses behind it', () => rawReplies(le([2, 0xffff]))],
      ['bad-device-state', 'a replies count past the responses present', () => rawReplies(cat(le([2, 3], [4, HEADER_BYTES + 4]), response(1)))],
      ['bad-device-state', 'a held reply length past the section end', () => rawReplies(cat(le([2, 1], [4, 0x1000]), response(1)))],
      ['bad-device-state', 'a held reply length near 2^32', () => rawReplies(cat(le([2, 1], [4, 0xfffffff0]), response(1)))],
      ['bad-device-state', 'a held reply shorter than an offload header', () => rawReplies(cat(le([2, 1], [4, 4]), new Uint8Array(4)))],
      ['bad-device-state', 'bytes after the last held reply', () => rawReplies(cat(le([2, 1], [4, HEADER_BYTES + 4]), response(1), new Uint8Array(1)))],
      // The envelope's own rules.
      ['bad-device-state', 'an unknown section type', () => withSections([9, 0, new Uint8Array(4)])],
      ['bad-device-state', 'the offload section twice', () => withSections([SECTION_OFFLOAD, 0, offloadBody()])],
      ['bad-device-state', 'section flags that are not 0', () => withSections([SECTION_REPLIES, 1, cat(le([2, 1], [4, HEADER_BYTES + 4]), response(1))])],
      ['bad-device-state', 'a section header cut short', () => cat(withSections(), le([2, SECTION_REPLIES]))],
      ['bad-device-state', 'bytes after the last section', () => cat(encodeDeviceState({ offload: offloadBody() }), new Uint8Array(3))],
      ['bad-device-state', 'a header shorter than 8 bytes', () => state.slice(0, 6)],
      ['bad-device-state-version', 'a device state of version 2', () => {
        const s = state.slice();
        new DataView(s.buffer).setUint16(4, 2, true);
        return s;
      }],
    ];
    for (const [code, what, make] of damaged) {
      test(`a damaged state is refused (${code}): ${what}`, async () => {
        const r = await d.fe.loadDeviceState(make());
        expect(r.reply).toBe(OK_NOFD);
        expect(r.check).not.toBe(0n);
        expect((await status(d)).lastMigration).toMatchObject({ direction: 'load', ok: false, code });
        await expectNothingOnD();
      });
    }

    test('a destination whose quota is lower than the state needs refuses it (state-quota) and holds no program or map', async () => {
      const q = await d.be.call('quota.set', { name: NAME, changes: { maxMaps: '0' } });
      expect(q.limits.maxMaps).toBe(0);
      const r = await d.fe.loadDeviceState(state);
      expect(r.check).not.toBe(0n);
      expect((await status(d)).lastMigration).toMatchObject({ direction: 'load', ok: false, code: 'state-quota' });
      await expectNothingOnD();
      // The refusal was the quota's: with room for the map the same state lands.
      await d.be.call('quota.set', { name: NAME, changes: { maxMaps: '16' } });
      expect((await d.fe.loadDeviceState(state)).check).toBe(0n);
      expect((await show(d)).program.tag).toBe(atSave.program.tag);
    });
  });

  test('a stop is not a reset, but a guest that resets its device (its rings start anew, not where they stopped) loses its offload', async () => {
    const held = await show(a);
    await a.fe.stopRings();
    expect((await show(a)).program.id).toBe(held.program.id);
    // The driver comes back (reboot, reload without RELEASE): new rings from index 0.
    await a.fe.start();
    await waitUntil(async () => (await status(a)).runningVrings.length === 4, 3000, 'rings running on A');
    expect(await show(a)).toMatchObject({ claimed: false, program: null, maps: [] });
    await waitUntil(() => !listMapIds().includes(held.maps[0].id) && !listProgIds().includes(held.program.id), 3000, 'program and map freed');
    expect(await a.hostToGuest(5)).toBe(5);
  });
});
