// The object path end to end (docs/offload-protocol.md §8): the TS frontend plays `vxdp`,
// uploads bpf/xdp_filter_obj.o in chunks over the reserved pair of a real `serve --offload`,
// and host frames meet it on the host→guest path: through BPF_PROG_TEST_RUN on a tap port,
// natively composed on an xsk port (where the tail call into udp_filter must come back to
// the composed entry, or PASS frames would go up the host's stack instead of to the guest).
// With `--pin-dir` (the rig's default) the object is pinned: serve killed with SIGKILL and
// restarted re-adopts it, handles, map contents and drops continuing (§5, §8).
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { OffloadRig } from '../support/frontend/offload-rig.js';
import { requireOk, loadObject, filterObjectWithConfig, sumPerCpuU64 } from '../support/frontend/offload-client.js';
import { uniqueIfName, disableIpv6, vethXdpCounters } from '../support/netdev.js';
import { defaultPeerName } from '../../src/ports/xsk.js';
import {
  Status, encodeObjShow, encodeObjUnload, encodeElemLookup, encodeElemUpdate, decodeObjShowBody, decodeU32Body,
  type ObjShow,
} from '../../src/offload/guest/codec.js';
import { waitUntil } from '../support/processes.js';
import { gone, readU64 } from './helpers.js';
import { CLI } from '../support/backend.js';
import { listMapIds } from '../../src/sys/bpf/info.js';
import { execFileSync } from 'node:child_process';

const C_SEEN = 0, C_PASSED = 1, C_DROPPED = 2;
const DROP_SPORT = 4005; // the sample's compiled config says 4003: the patched .rodata wins

function flowKey(sport: number): Uint8Array {
  const k = new Uint8Array(12);
  k.set([198, 18, 0, 1, 198, 18, 0, 2], 0);
  new DataView(k.buffer).setUint16(8, sport, true);
  new DataView(k.buffer).setUint16(10, 9, true);
  return k;
}
const u32 = (n: number) => { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, n, true); return b; };

for (const port of ['tap', 'xsk'] as const) {
  describe(`object path on a ${port} port`, () => {
    let rig: OffloadRig;
    const ifname = uniqueIfName(port === 'tap' ? 'vxt' : 'vxk');
    const dev = `obj${port}`;
    let show: ObjShow;
    const handle = (name: string) => show.maps.find((m) => m.name === name || m.name.endsWith(name))!.handle;
    const lookup = async (h: number, key: Uint8Array) => requireOk(await rig.oc.call(encodeElemLookup(rig.oc.nextSeq(), h, key))).body;
    const pinNames = () => { try { return readdirSync(path.join(rig.pinRoot, dev)); } catch { return []; } };

    beforeAll(async () => {
      rig = await OffloadRig.start({
        tag: `obj${port}`, port, ifname, name: dev, hostMac: port === 'tap' ? '52:54:00:1a:1a:1a' : '52:54:00:1b:1b:1b',
        firstSeq: port === 'tap' ? 700_000 : 800_000, ...(port === 'tap' ? { afterStart: () => disableIpv6(ifname) } : {}),
      });
      requireOk(await rig.oc.claim());
    }, 60_000);

    afterAll(async () => {
      await rig?.close();
    });

    test('the object uploads in chunks and loads: two programs, five maps (LRU_HASH, PERCPU_ARRAY, PROG_ARRAY, .rodata, .bss)', async () => {
      const loaded = await loadObject(rig.oc, filterObjectWithConfig(DROP_SPORT), { name: `vo_${port}`, chunk: 1500 });
      expect(loaded).toMatchObject({ progCount: 2, mapCount: 5 });
      show = decodeObjShowBody(requireOk(await rig.oc.call(encodeObjShow(rig.oc.nextSeq()))).body);
      expect(show.objName).toBe(`vo_${port}`);
      expect(show.progName).toBe('xdp_filter');
      expect(show.tag).toBe(loaded.tag);
      expect(show.possibleCpus).toBeGreaterThanOrEqual(1);
      expect(show.maps.map((m) => [m.name, m.type]).sort()).toEqual([
        ['counters', 6], ['flows', 9], ['jump', 3], [`vo_${port}.bss`, 2], [`vo_${port}.rodata`, 2],
      ]);
      // Its tail calls keep a tap on test-run (issue 18): the PROG_ARRAY holds XDP programs,
      // which a tc program cannot tail-call; serve says so in its log and offload show.
      const host = (await rig.be.call('offload.show', { name: dev })).host.program;
      if (port === 'tap') {
        expect(host).toMatchObject({ runs: 'tap-test-run', fallback: { code: 'tc-tail-call' } });
        expect(rig.be.proc.tail(400)).toMatch(/stays on per-frame BPF_PROG_TEST_RUN .*bpf_tail_call.*\[tc-tail-call\].*the xsk port is the fast path/);
      } else {
        expect(host.runs).toBe('xdp-native');
      }
    }, 30_000);

    test('host frames are dropped or passed as the config says; host counters, the PERCPU counters and the LRU flows agree', async () => {
      const host0 = await rig.be.call('offload.show', { name: dev });
      const drops0 = port === 'xsk' ? vethXdpCounters(defaultPeerName(ifname)).xdp_drops ?? 0 : 0;
      const cpus = show.possibleCpus;
      const counters = handle('counters');
      const before = [C_SEEN, C_PASSED, C_DROPPED].map(() => 0);
      for (const c of [C_SEEN, C_PASSED, C_DROPPED]) {
        const v = await lookup(counters, u32(c));
        expect(v.byteLength).toBe(cpus * 8); // possible_cpus × round_up(8, 8)
        before[c] = sumPerCpuU64(v);
      }
      // 40 frames, source ports 4000..4007 in turn: the five from DROP_SPORT die on the host.
      expect(await rig.hostToGuest(40)).toBe(35);
      // One request at a time: the client matches one response per call.
      const after: number[] = [];
      for (const c of [C_SEEN, C_PASSED, C_DROPPED]) after[c] = sumPerCpuU64(await lookup(counters, u32(c)));
      expect(after[C_DROPPED]! - before[C_DROPPED]!).toBe(5);
      expect(after[C_PASSED]! - before[C_PASSED]!).toBe(35);
      expect(after[C_SEEN]! - before[C_SEEN]!).toBeGreaterThanOrEqual(40);
      const flows = handle('flows');
      const count = async (sport: number) => readU64(await lookup(flows, flowKey(sport)));
      expect(await count(DROP_SPORT)).toBe(5);
      expect(await count(4000)).toBe(5);
      // The entry's fallback after a failed tail call counts in .bss: it never ran.
      expect(readU64(await lookup(handle('.bss'), u32(0)))).toBe(0);
      if (port === 'tap') {
        const host1 = await rig.be.call('offload.show', { name: dev });
        expect(host1.verdicts.drop - host0.verdicts.drop).toBe(5);
        expect(host1.verdicts.pass - host0.verdicts.pass).toBeGreaterThanOrEqual(35);
      } else {
        expect(vethXdpCounters(defaultPeerName(ifname)).xdp_drops! - drops0).toBeGreaterThanOrEqual(5);
      }
    }, 30_000);

    test('a PROG_ARRAY is not read or written by handle (its elements would be host program ids); .rodata is read-only', async () => {
      const r = await rig.oc.call(encodeElemLookup(rig.oc.nextSeq(), handle('jump'), u32(0)));
      expect(r.status).toBe(Status.BAD_REQUEST);
      const w = await rig.oc.call(encodeElemUpdate(rig.oc.nextSeq(), handle('.rodata'), u32(0), new Uint8Array(8)));
      expect(w.status).toBe(Status.KERNEL_ERROR);
    });

    test('pinned: serve killed with SIGKILL and restarted keeps the same programs, handles and map contents, and drops go on', async () => {
      const dropped = async () => sumPerCpuU64(await lookup(handle('counters'), u32(C_DROPPED)));
      const flows = async (sport: number) => readU64(await lookup(handle('flows'), flowKey(sport)));
      // A guest write into the LRU map must survive too.
      requireOk(await rig.oc.call(encodeElemUpdate(rig.oc.nextSeq(), handle('flows'), flowKey(9999), new Uint8Array(8).fill(7))));
      const dropped0 = await dropped();
      const flows0 = await flows(DROP_SPORT);
      const before = await rig.be.call('offload.show', { name: dev });
      expect(pinNames()).toEqual(expect.arrayContaining(['meta_obj', ...show.maps.map((m) => `map_${m.handle}`)]));
      expect(pinNames().filter((n) => /^obj\d+_p\d+$/.test(n)).length).toBe(2);

      await rig.restart();
      await waitUntil(async () => (await rig.be.call('status')).devices[0].offload.claimed, 3000, 'claim re-adopted');
      // Restored whole (the entry's code judged again, so an xsk port composes it), nothing refused.
      await rig.be.proc.waitForLine(/restored from .*program id/, 3000);
      expect(rig.be.proc.tail(400)).not.toMatch(/not restored/);
      const after = await rig.be.call('offload.show', { name: dev });
      expect(after.program.id).toBe(before.program.id);
      expect(after.object).toEqual(before.object);
      const ids = (s: { maps: { handle: number; id: number }[] }) => s.maps.map((m) => [m.handle, m.id]);
      expect(ids(after)).toEqual(ids(before));
      expect(decodeObjShowBody(requireOk(await rig.oc.call(encodeObjShow(rig.oc.nextSeq()))).body)).toEqual(show);
      expect(await flows(DROP_SPORT)).toBe(flows0);
      expect(Array.from(await lookup(handle('flows'), flowKey(9999)))).toEqual(new Array(8).fill(7));

      const drops0 = port === 'xsk' ? vethXdpCounters(defaultPeerName(ifname)).xdp_drops ?? 0 : 0;
      expect(await rig.hostToGuest(40)).toBe(35);
      expect(await dropped()).toBe(dropped0 + 5);
      expect(await flows(DROP_SPORT)).toBe(flows0 + 5);
      if (port === 'xsk') expect(vethXdpCounters(defaultPeerName(ifname)).xdp_drops! - drops0).toBeGreaterThanOrEqual(5);
      else expect((await rig.be.call('offload.show', { name: dev })).verdicts.drop).toBeGreaterThanOrEqual(5);
    }, 60_000);

    test('OBJ_UNLOAD restores delivery and leaves no host program or map of the object', async () => {
      const s = await rig.be.call('offload.show', { name: dev });
      const progIds: number[] = s.object.programs.map((p: { id: number }) => p.id);
      const mapIds: number[] = s.maps.filter((m: { handle: number }) => s.object.mapHandles.includes(m.handle)).map((m: { id: number }) => m.id);
      expect(progIds.length).toBe(2);
      expect(mapIds.length).toBe(5);
      expect(decodeU32Body(requireOk(await rig.oc.call(encodeObjUnload(rig.oc.nextSeq()))).body)).toBe(1);
      expect(await rig.hostToGuest(20)).toBe(20);
      for (const id of progIds) expect(gone('prog', id)).toBe(true);
      for (const id of mapIds) expect(gone('map', id)).toBe(true);
      const after = await rig.be.call('offload.show', { name: dev });
      expect(after.program).toBe(null);
      expect(after.maps).toEqual([]);
      expect(pinNames().filter((n) => n !== 'state')).toEqual([]);
      expect((await rig.oc.call(encodeObjShow(rig.oc.nextSeq()))).status).toBe(Status.NO_SUCH_ELEMENT);
      expect(decodeU32Body(requireOk(await rig.oc.call(encodeObjUnload(rig.oc.nextSeq()))).body)).toBe(0);
    }, 30_000);

    test('the operator\'s CLI detach of an object says so (kind object, not a program whose maps stay): its programs and maps are gone', async () => {
      await loadObject(rig.oc, filterObjectWithConfig(DROP_SPORT), { name: `vo_${port}_d`, chunk: 1500 });
      const s = await rig.be.call('offload.show', { name: dev });
      const mapIds: number[] = s.maps.map((m: { id: number }) => m.id);
      expect(mapIds.length).toBe(5);
      const out = JSON.parse(execFileSync(process.execPath, [CLI, 'offload', 'detach', dev, '--json', '--control', rig.be.control], { encoding: 'utf8' }));
      expect(out).toEqual({ detached: true, kind: 'object', cancelledLoad: false });
      // Ids only: opening a PROG_ARRAY by id while its deferred clear runs would keep it alive.
      await waitUntil(() => { const live = new Set(listMapIds()); return !mapIds.some((id) => live.has(id)); }, 5000, 'the object\'s maps to go');
      expect(await rig.be.call('offload.show', { name: dev })).toMatchObject({ program: null, object: null, maps: [] });
      expect(await rig.hostToGuest(10)).toBe(10);
    }, 30_000);
  });
}
