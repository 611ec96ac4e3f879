// Issue 17's follow-ups on the serving path of the object path, against the real loader child
// and the host kernel, through the device's OffloadChannel in this process (the sink collects
// what the guest would receive):
//   - every request gets an answer: past 64 waiting behind a pending OBJ_LOAD, BUSY at once,
//     logged with the device's name, at most a line a second;
//   - the operator's detach cancels a pending OBJ_LOAD: the child killed, the maps and programs
//     it made gone from the kernel, the guest answered CANCELLED; a reset still answers
//     NOT_CLAIMED (broker-reset) and kills the child too;
//   - the object's maps and programs (and the pinned blobs) carry the device's prefix in the
//     kernel, as the kernel path's do, while the guest keeps its own names.
import { describe, test, expect, afterEach, beforeAll, afterAll } from 'vitest';
import { readdirSync } from 'node:fs';
import { OffloadChannel, MAX_QUEUED_REQUESTS } from '../../src/net/offload-channel.js';
import * as P from '../../src/offload/guest/codec.js';
import { Status } from '../../src/offload/guest/codec.js';
import { bpfPrefix, hostObjectName } from '../../src/offload/host-names.js';
import { rateLimited, type Logger } from '../../src/log.js';
import { progInfo, mapInfo, listMapIds, listProgIds } from '../../src/sys/bpf/info.js';
import { objGet } from '../../src/sys/bpf/pins.js';
import { closeBpfFd } from '../../src/sys/bpf/programs.js';
import { filterObjectWithConfig } from '../support/frontend/offload-client.js';
import { tempDir, mountPinDir, unmountPinDir } from '../support/backend.js';
import { objectLoadersBelow, sleep, waitUntil } from '../support/processes.js';
import { namedKernelObjects, ownBpfFds } from './helpers.js';

interface Rig { ch: OffloadChannel; replies: P.Response[]; warnings: string[]; seq: number }

let rig: Rig | null = null;
afterEach(() => {
  rig?.ch.close();
  rig = null;
  delete process.env.VX_OBJECT_LOADER_DELAY_MS;
  delete process.env.VX_OBJECT_LOADER_HOLD_MS;
});

function channel(device: string, pinDir: string | null = null): Rig {
  const warnings: string[] = [];
  const replies: P.Response[] = [];
  const log: Logger = { debug: () => {}, info: () => {}, warn: (m) => warnings.push(m), error: (m) => warnings.push(m) };
  const ch = new OffloadChannel({ device, pinDir, log }, {
    reply: (m) => replies.push(P.decodeResponse(m)), claimChanged: () => {}, programChanged: () => {},
  });
  rig = { ch, replies, warnings, seq: 1 };
  return rig;
}

/** Sends a request; answered at once unless something is pending. Returns its seq. */
function send(r: Rig, encode: (seq: number) => Uint8Array): number {
  const seq = r.seq++;
  r.ch.handle(encode(seq));
  return seq;
}

/** CLAIM and the whole upload, each answered OK at once. */
function claimAndUpload(r: Rig, objName: string): void {
  send(r, (s) => P.encodeClaim(s, {}));
  for (const req of P.objectUploadRequests(filterObjectWithConfig(4005), () => r.seq, objName)) {
    r.seq++;
    r.ch.handle(req);
  }
  expect(r.replies.map((x) => P.statusName(x.status))).toEqual(r.replies.map(() => 'OK'));
  r.replies.length = 0;
}

/** The device's kernel objects by name. Opens each by id: only while they are held (see stillAlive). */
const ours = (prefix: string) => namedKernelObjects((n) => n.startsWith(`${prefix}_`), (n) => n.startsWith(`${prefix}_`));

/**
 * Which of these ids the kernel still has, without opening them: a PROG_ARRAY whose last user
 * reference goes clears its slots in deferred work, and a map opened by id and closed again
 * before that work ran would take a second reference the work never drops (the map would leak).
 */
async function stillAlive(ids: { maps: number[]; progs: number[] }, waitMs = 3000): Promise<{ maps: number[]; progs: number[] }> {
  const end = Date.now() + waitMs;
  for (;;) {
    const maps = new Set(listMapIds());
    const progs = new Set(listProgIds());
    const left = { maps: ids.maps.filter((id) => maps.has(id)), progs: ids.progs.filter((id) => progs.has(id)) };
    if ((left.maps.length === 0 && left.progs.length === 0) || Date.now() > end) return left;
    await new Promise((res) => setTimeout(res, 20));
  }
}

describe('requests behind a pending OBJ_LOAD', () => {
  test(`past ${MAX_QUEUED_REQUESTS} waiting, a request is answered BUSY at once (a = the limit), logged with the device name; the rest in order after the load`, async () => {
    process.env.VX_OBJECT_LOADER_DELAY_MS = '1500';
    const r = channel('gapbusy');
    claimAndUpload(r, 'vo_busy');
    const loadSeq = send(r, (s) => P.encodeObjLoad(s));
    const caps: number[] = [];
    for (let i = 0; i < MAX_QUEUED_REQUESTS + 6; i++) caps.push(send(r, (s) => P.encodeCaps(s)));

    // The six that found the queue full: answered already, while the load still runs.
    expect(r.replies.map((x) => x.seq)).toEqual(caps.slice(MAX_QUEUED_REQUESTS));
    for (const x of r.replies) {
      expect(x.status).toBe(Status.BUSY);
      expect(x.command).toBe(P.Cmd.CAPS);
      expect(x.detail?.a).toBe(MAX_QUEUED_REQUESTS);
    }
    // One line for the burst, naming the device.
    expect(r.warnings.length).toBe(1);
    expect(r.warnings[0]).toContain('gapbusy');

    await waitUntil(() => r.replies.length === MAX_QUEUED_REQUESTS + 7, 30_000, 'the load and the queued requests', 20);
    const rest = r.replies.slice(6);
    expect(rest.map((x) => x.seq)).toEqual([loadSeq, ...caps.slice(0, MAX_QUEUED_REQUESTS)]);
    expect(rest.map((x) => x.status)).toEqual(rest.map(() => Status.OK));
    expect(r.ch.requests.byStatus.BUSY).toBe(6);
  }, 60_000);

  test('the overflow log line is rate-limited: one a second, the next says how many were left out', () => {
    let t = 0;
    const lines: string[] = [];
    const warn = rateLimited((m) => lines.push(m), 1000, () => t);
    for (let i = 0; i < 50; i++) { warn('busy'); t += 10; }
    t = 1500;
    warn('busy');
    expect(lines).toEqual(['busy', 'busy (49 more such lines left out)']);
  });
});

describe('cancelling a pending OBJ_LOAD', () => {
  test('the operator detach kills the loader child, its maps and programs leave the kernel, OBJ_LOAD answers CANCELLED; the next request and a new load go on', async () => {
    const device = 'gapcan';
    const prefix = bpfPrefix(device);
    // The child has loaded the object and sent its fds, then waits before its report.
    process.env.VX_OBJECT_LOADER_HOLD_MS = '30000';
    const r = channel(device);
    const fds = ownBpfFds();
    claimAndUpload(r, 'vo_can');
    const loadSeq = send(r, (s) => P.encodeObjLoad(s));
    const showSeq = send(r, (s) => P.encodeObjShow(s));
    // While the child holds them: two programs and five maps, named for the device.
    await waitUntil(() => ours(prefix).progs.length >= 2 && ours(prefix).maps.length >= 5, 30_000, 'the child to load the object', 20);
    const made = ours(prefix);
    const children = objectLoadersBelow(process.pid);
    expect(children.length).toBe(1);

    expect(r.ch.detach()).toEqual({ detached: false, kind: null, cancelledLoad: true });
    await waitUntil(() => r.replies.length === 2, 10_000, 'the answers', 20);
    expect(r.replies.map((x) => [x.seq, x.status])).toEqual([[loadSeq, Status.CANCELLED], [showSeq, Status.NO_SUCH_ELEMENT]]);
    expect(r.ch.show().program).toBeNull();
    expect(r.ch.show().maps).toEqual([]);
    expect(objectLoadersBelow(process.pid)).toEqual([]);
    // A program drops its map references after an RCU grace period: stillAlive gives the kernel a moment.
    expect(await stillAlive(made)).toEqual({ maps: [], progs: [] });
    expect(ownBpfFds()).toBe(fds);
    // Nothing pending any more: a second detach has nothing to cancel.
    expect(r.ch.detach()).toEqual({ detached: false, kind: null, cancelledLoad: false });

    delete process.env.VX_OBJECT_LOADER_HOLD_MS;
    r.replies.length = 0;
    claimAndUpload(r, 'vo_can');
    send(r, (s) => P.encodeObjLoad(s));
    await waitUntil(() => r.replies.length === 1, 30_000, 'the second load', 20);
    expect(r.replies[0]!.status).toBe(Status.OK);
  }, 90_000);

  test('a device reset during the load kills the child and its answer is not delivered to the guest after the reset', async () => {
    process.env.VX_OBJECT_LOADER_DELAY_MS = '30000';
    const r = channel('gaprst');
    claimAndUpload(r, 'vo_rst');
    const loadSeq = send(r, (s) => P.encodeObjLoad(s));
    await waitUntil(() => objectLoadersBelow(process.pid).length === 1, 30_000, 'the loader child', 20);
    r.ch.reset('device reset');
    // The answer (NOT_CLAIMED, broker-reset) belongs to the driver before the reset: the new
    // driver must not see a reply to a request it never sent, so the channel drops it.
    await waitUntil(() => objectLoadersBelow(process.pid).length === 0, 10_000, 'the child to end', 20);
    await sleep(200);
    expect(r.replies.filter((x) => x.seq === loadSeq)).toEqual([]);
  }, 60_000);
});

describe("the object's host names", () => {
  let pinRoot: string | null = null;
  beforeAll(() => { pinRoot = mountPinDir(tempDir('objnames')); });
  afterAll(() => { if (pinRoot) unmountPinDir(pinRoot); });

  test('maps, programs and pinned blobs are <prefix>_<name> in the kernel (15 characters at most); the guest keeps its names', async () => {
    const device = 'gapnam';
    const prefix = bpfPrefix(device);
    const r = channel(device, pinRoot);
    claimAndUpload(r, 'vo_names');
    send(r, (s) => P.encodeObjLoad(s));
    await waitUntil(() => r.replies.length === 1, 30_000, 'the load', 20);
    expect(r.replies[0]!.status).toBe(Status.OK);

    const show = r.ch.show();
    // The guest's names, as OBJ_SHOW and `offload show` give them.
    expect(show.maps.map((m) => m.name).sort()).toEqual(['counters', 'flows', 'jump', 'vo_names.bss', 'vo_names.rodata']);
    for (const m of show.maps) {
      expect(m.hostName).toBe(hostObjectName(prefix, m.name));
      expect(m.hostName.length).toBeLessThanOrEqual(15);
    }
    expect(show.program!.hostName).toBe(hostObjectName(prefix, show.program!.name));
    // Every program of the object, the tail-call target included, as the kernel names it.
    const kernel = ours(prefix);
    for (const p of show.object!.programs) {
      expect(kernel.progs).toContain(p.id);
    }
    for (const m of show.maps) expect(kernel.maps).toContain(m.id);
    expect(show.object!.programs.map((p) => p.name).sort()).toEqual(['udp_filter', 'xdp_filter']);

    // The pins: the object's programs and maps are the same kernel objects; the blobs are the device's too.
    const dir = `${pinRoot}/${device}`;
    const blobs: string[] = [];
    for (const n of readdirSync(dir)) {
      if (!/^obj\d+_(p\d+|code|elf)$/.test(n) && !/^map_\d+$/.test(n)) continue;
      const fd = objGet(`${dir}/${n}`);
      try {
        const name = n.includes('_p') ? progInfo(fd).name : mapInfo(fd).name;
        expect(name.startsWith(`${prefix}_`)).toBe(true);
        if (/_(code|elf)$/.test(n)) blobs.push(name);
      } finally {
        closeBpfFd(fd);
      }
    }
    expect(blobs.sort()).toEqual([hostObjectName(prefix, 'obj_code'), hostObjectName(prefix, 'obj_elf')]);

    // OBJ_UNLOAD: nothing of the device's left in the kernel (pins included).
    send(r, (s) => P.encodeObjUnload(s));
    r.ch.reset('test done');
    expect(await stillAlive(kernel)).toEqual({ maps: [], progs: [] });
  }, 60_000);
});
