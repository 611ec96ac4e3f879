// Restoring a pinned object in this process (docs/offload-protocol.md §5, §8): a broker that
// loaded an object and closed (as a killed backend would leave its pins) is restored whole, and
// a pin dir tampered with refuses the object with a code in the log, never a crash: its maps and
// programs leave the kernel, its pins go, the rest of the device (claim, PROG_SET-path maps) stays.
import { describe, test, expect, beforeAll, afterAll, afterEach } from 'vitest';
import { readdirSync, renameSync, symlinkSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { OffloadBroker } from '../../src/offload/broker.js';
import * as P from '../../src/offload/guest/codec.js';
import { Status } from '../../src/offload/guest/codec.js';
import { BpfMap, BpfMapType } from '../../src/sys/bpf/maps.js';
import { objPin } from '../../src/sys/bpf/pins.js';
import { tempDir, mountPinDir, unmountPinDir } from '../support/backend.js';
import { filterObjectWithConfig } from '../support/frontend/offload-client.js';
import { Guest, gone, ownBpfFds } from './helpers.js';

let pinRoot = '';
const brokers: OffloadBroker[] = [];
beforeAll(() => { pinRoot = mountPinDir(tempDir('objpinunit')); });
afterAll(() => { if (pinRoot) unmountPinDir(pinRoot); });
afterEach(() => { for (const b of brokers.splice(0)) { b.reset('test end'); b.close(); } });

let n = 0;
/** A claimed device with one PROG_SET-path map and the sample object loaded; closed, pins kept. */
function loadedAndClosed(): { device: string; dir: string; plainMap: number; show: ReturnType<OffloadBroker['show']> } {
  const device = `objpin${n++}`;
  const b = new OffloadBroker({ device, pinDir: pinRoot });
  const g = new Guest(b);
  g.claim();
  const plainMap = g.createMap({ type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 4 });
  for (const req of P.objectUploadRequests(filterObjectWithConfig(4005), () => g.seq, 'vx_pin', 8192)) {
    g.seq++;
    expect(P.decodeResponse(b.handle(req)).status).toBe(Status.OK);
  }
  g.ok((s) => P.encodeObjLoad(s));
  const show = b.show();
  b.close();
  return { device, dir: join(pinRoot, device), plainMap, show };
}

function restore(device: string): { b: OffloadBroker; log: string[] } {
  const log: string[] = [];
  const b = OffloadBroker.restore({ device, pinDir: pinRoot, log: (l) => log.push(l) });
  brokers.push(b);
  return { b, log };
}

function expectObjectGone(show: ReturnType<OffloadBroker['show']>, dir: string): void {
  for (const p of show.object!.programs) expect(gone('prog', p.id)).toBe(true);
  for (const h of show.object!.mapHandles) expect(gone('map', show.maps.find((m) => m.handle === h)!.id)).toBe(true);
  const names = readdirSync(dir);
  expect(names.filter((x) => x === 'meta_obj' || /^obj\d+_/.test(x))).toEqual([]);
  for (const h of show.object!.mapHandles) expect(names).not.toContain(`map_${h}`);
}

describe('a pinned object in this process', () => {
  test('is restored whole: same programs, handles and maps, and code the xsk port can compose', () => {
    const fds = ownBpfFds();
    const { device, show, plainMap } = loadedAndClosed();
    const { b, log } = restore(device);
    const again = b.show();
    expect(again.program!.id).toBe(show.program!.id);
    expect(again.object).toEqual(show.object);
    expect(again.maps.map((m) => [m.handle, m.id, m.typeId])).toEqual(show.maps.map((m) => [m.handle, m.id, m.typeId]));
    expect(again.maps.map((m) => m.typeId)).toEqual(expect.arrayContaining([BpfMapType.LRU_HASH, BpfMapType.PERCPU_ARRAY, BpfMapType.PROG_ARRAY]));
    expect(b.programSource).not.toBe(null);
    expect(log.join('\n')).not.toMatch(/not restored/);
    expect(again.maps.some((m) => m.handle === plainMap)).toBe(true);
    // The object's bytes were pinned too: a restored object can still migrate.
    expect(OffloadBroker.describeState(b.exportState()).program).toMatchObject({ name: 'xdp_filter', tag: show.program!.tag });
    // OBJ_UNLOAD after the restore: nothing of the object stays, pins included.
    const g = new Guest(b);
    expect(P.decodeU32Body(g.ok((s) => P.encodeObjUnload(s)).body)).toBe(1);
    expectObjectGone(show, join(pinRoot, device));
    b.reset('done');
    expect(ownBpfFds()).toBe(fds);
  });

  test('meta_obj that is not ours (not JSON) refuses the object (pin-object-meta); the rest of the device is restored', () => {
    const { device, dir, show, plainMap } = loadedAndClosed();
    unlinkSync(join(dir, 'meta_obj'));
    symlinkSync('{"version":1,"gen":', join(dir, 'meta_obj'));
    const { b, log } = restore(device);
    expect(log.join('\n')).toMatch(/object not restored \(pin-object-meta\)/);
    expect(b.show().program).toBe(null);
    expect(b.claimed).toBe(true);
    expect(b.show().maps.map((m) => m.handle)).toEqual([plainMap]);
    expectObjectGone(show, dir);
  });

  test('program pins swapped: the recorded tags do not match (pin-object-mismatch)', () => {
    const { device, dir, show } = loadedAndClosed();
    const [p0, p1] = readdirSync(dir).filter((x) => /^obj\d+_p\d$/.test(x)).sort();
    renameSync(join(dir, p0!), join(dir, 'swap'));
    renameSync(join(dir, p1!), join(dir, p0!));
    renameSync(join(dir, 'swap'), join(dir, p1!));
    const { b, log } = restore(device);
    expect(log.join('\n')).toMatch(/not restored \(pin-object-mismatch\)/);
    expect(b.show().program).toBe(null);
    expectObjectGone(show, dir);
  });

  test("a map pin of the object replaced by a map of a type no device may hold (pin-object-map-missing)", () => {
    const { device, dir, show } = loadedAndClosed();
    const h = show.object!.mapHandles[0]!;
    unlinkSync(join(dir, `map_${h}`));
    const other = BpfMap.create(BpfMapType.DEVMAP, 4, 4, 1);
    try { objPin(other.fd, join(dir, `map_${h}`)); } finally { other.close(); }
    const { b, log } = restore(device);
    expect(log.join('\n')).toMatch(/not restored \(pin-object-map-missing\)/);
    expect(b.show().program).toBe(null);
    expectObjectGone(show, dir);
  });

  test('garbage in place of the entry code: the object runs, but is not composed (the code is judged again)', () => {
    const { device, dir, show } = loadedAndClosed();
    const code = readdirSync(dir).find((x) => /^obj\d+_code$/.test(x))!;
    unlinkSync(join(dir, code));
    const junk = BpfMap.create(BpfMapType.ARRAY, 4, 4096, 16);
    try {
      for (let i = 0; i < 16; i++) junk.update(new Uint8Array(new Uint32Array([i]).buffer), new Uint8Array(4096).fill(0x85));
      objPin(junk.fd, join(dir, code));
    } finally { junk.close(); }
    const { b, log } = restore(device);
    expect(log.join('\n')).toMatch(/entry code not restored/);
    expect(b.show().program!.id).toBe(show.program!.id);
    expect(b.programSource).toBe(null);
  });
});
