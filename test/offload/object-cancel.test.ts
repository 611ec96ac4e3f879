// Issue 17: the operator's `vhost-xdp offload detach` (CLI over the ws control API) while a
// guest's OBJ_LOAD waits for its loader child, on a real `serve`: the CLI says a load was
// cancelled, the guest's OBJ_LOAD answers CANCELLED, the request queued behind it is answered
// next, and no loader child or kernel object of the device is left. The child is held after
// it loaded the object (VX_OBJECT_LOADER_HOLD_MS, honoured only by the child script), so the
// detach always finds the load pending.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { startBackend, tempDir, CLI, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { OffloadClient, requireOk, offloadFrame, isOffloadFrame, filterObjectWithConfig } from '../support/frontend/offload-client.js';
import { uniqueIfName } from '../support/netdev.js';
import { objectLoadersBelow, waitUntil } from '../support/processes.js';
import { Status, encodeObjLoad, encodeObjShow, decodeResponse, objectUploadRequests, type Response } from '../../src/offload/guest/codec.js';
import { bpfPrefix } from '../../src/offload/host-names.js';
import { listMapIds, listProgIds } from '../../src/sys/bpf/info.js';
import { namedKernelObjects } from './helpers.js';

const ETH_HLEN = 14;
const NAME = 'gapcli';

describe('offload detach during a pending OBJ_LOAD', () => {
  let be: Backend;
  let fe: TestFrontend;
  let oc: OffloadClient;

  beforeAll(async () => {
    const dir = tempDir('objcancel');
    const sock = path.join(dir, `${NAME}.sock`);
    be = await startBackend(['--device', `name=${NAME},socket=${sock},port=tap:${uniqueIfName('vxc')},queues=1,offload=1`], {
      dir, env: { ...process.env, VX_OBJECT_LOADER_HOLD_MS: '30000' },
    });
    fe = await TestFrontend.connect(sock, { queuePairs: 2, start: true });
    oc = new OffloadClient(fe, 1);
    requireOk(await oc.claim());
  }, 60_000);

  afterAll(async () => {
    fe?.close();
    await be?.stop();
  });

  test('the CLI reports the cancelled load; OBJ_LOAD answers CANCELLED, the queued OBJ_SHOW NO_SUCH_ELEMENT; nothing is left', async () => {
    for (const req of objectUploadRequests(filterObjectWithConfig(4005), () => oc.nextSeq(), 'vo_cancel')) requireOk(await oc.call(req));
    const loadSeq = oc.nextSeq();
    const showSeq = oc.nextSeq();
    await fe.transmitLarge(1, offloadFrame(encodeObjLoad(loadSeq)));
    await fe.transmitLarge(1, offloadFrame(encodeObjShow(showSeq)));
    // The child has loaded the object (the device's names in the kernel) and holds it.
    const prefix = bpfPrefix(NAME);
    const ours = () => namedKernelObjects((n) => n.startsWith(`${prefix}_`), (n) => n.startsWith(`${prefix}_`));
    await waitUntil(() => objectLoadersBelow(be.proc.pid).length === 1 && ours().maps.length >= 5 && ours().progs.length >= 2, 30_000, 'the loader child to load the object');
    const made = ours();

    const out = execFileSync(process.execPath, [CLI, 'offload', 'detach', NAME, '--control', be.control], { encoding: 'utf8' });
    expect(out).toMatch(new RegExp(`^${NAME}: a pending object load was cancelled`, 'm'));
    expect(out).toMatch(new RegExp(`^${NAME}: no program was attached`, 'm'));

    const got: Response[] = [];
    await waitUntil(() => {
      for (const f of fe.receive(1)) if (isOffloadFrame(f)) got.push(decodeResponse(f.subarray(ETH_HLEN)));
      return got.length >= 2;
    }, 10_000, 'the two answers', 5);
    expect(got.map((r) => [r.seq, r.status])).toEqual([[loadSeq, Status.CANCELLED], [showSeq, Status.NO_SUCH_ELEMENT]]);
    expect(objectLoadersBelow(be.proc.pid)).toEqual([]);
    // Ids only (opening a PROG_ARRAY by id while its deferred clear runs would pin it forever).
    await waitUntil(() => {
      const maps = new Set(listMapIds());
      const progs = new Set(listProgIds());
      return !made.maps.some((id) => maps.has(id)) && !made.progs.some((id) => progs.has(id));
    }, 5_000, 'the kernel objects to go');
    // The next detach has nothing to cancel (--json: the control API's answer as is).
    const again = JSON.parse(execFileSync(process.execPath, [CLI, 'offload', 'detach', NAME, '--json', '--control', be.control], { encoding: 'utf8' }));
    expect(again).toEqual({ detached: false, kind: null, cancelledLoad: false });
  }, 90_000);
});
