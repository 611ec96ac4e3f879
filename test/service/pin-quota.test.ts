// The pinned-memory quota of an xsk device: set at serve time, shown and changed through the
// control API and the CLI, checked when a memory table builds the UMEM (over it: bounce-only,
// traffic still flows), and refused with the flag named when the value is bad.
import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { startBackend, tempDir, CLI, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, deleteLink, linkExists } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { udpFrame, seqOf, GUEST_MAC, HOST_MAC } from '../support/frames.js';
import { xdpQuery } from '../../src/sys/bpf/xdp.js';
import { listProgIds } from '../../src/sys/bpf/info.js';
import { ifNameToIndex } from '../../src/sys/libc.js';
import { defaultPeerName } from '../../src/ports/xsk.js';

const MiB = 1024 * 1024;
const GUEST_RAM = 32 * MiB;

describe('pinned-memory quota of an xsk device', () => {
  const xskIf = uniqueIfName('vxq');
  const tapIf = uniqueIfName('vxt');
  const badIf = uniqueIfName('vxb');
  const dir = tempDir('pinq');
  const sock = path.join(dir, 'pq.sock');
  let be: Backend;
  const frontends: TestFrontend[] = [];
  let redirectProg = 0;

  beforeAll(async () => {
    // The serve-wide --pin-limit goes to the xsk device only; the tap device pins nothing.
    be = await startBackend([
      '--pin-limit', '8MiB',
      '--device', `name=pq,socket=${sock},port=xsk:${xskIf}`,
      '--device', `name=tp,socket=${path.join(dir, 'tp.sock')},port=tap:${tapIf}`,
    ], { dir });
    redirectProg = xdpQuery(ifNameToIndex(defaultPeerName(xskIf))).drvProgId;
  });

  afterAll(async () => {
    for (const fe of frontends) fe.close();
    await be?.stop();
    for (const n of [xskIf, tapIf, badIf]) deleteLink(n);
    // The kernel frees the detached program after a grace period; files that count programs run next.
    await waitUntil(() => !listProgIds().includes(redirectProg), 3000, 'redirect program freed').catch(() => undefined);
  });

  const status = async () => (await be.call('status')).devices.find((d: { name: string }) => d.name === 'pq').port;
  const copies = async (): Promise<number> => (await be.call('stats', { name: 'pq' }))[0].total.jsCopies;

  function cli(...args: string[]) {
    const r = spawnSync(process.execPath, [CLI, ...args, '--control', be.control], { encoding: 'utf8', timeout: 10_000 });
    return { code: r.status, out: r.stdout, err: r.stderr };
  }

  async function connect(): Promise<TestFrontend> {
    const fe = await TestFrontend.connect(sock, { memBytes: GUEST_RAM });
    frontends.push(fe);
    await waitUntil(async () => (await status()).pinnedBytes > 0, 5000, 'UMEM registered');
    return fe;
  }

  async function disconnect(fe: TestFrontend): Promise<void> {
    fe.close();
    await waitUntil(async () => (await status()).pinnedBytes === 0, 5000, 'UMEM unpinned after the disconnect');
  }

  /** One frame each way with its sequence number checked; returns the JS copies it took. */
  async function roundTrip(fe: TestFrontend, seq: number): Promise<number> {
    const before = await copies();
    const ps = PacketSocket.open(xskIf);
    try {
      fe.transmit(0, [udpFrame(seq, 200)]);
      expect(ps.recvAll(1, 3000, (f) => seqOf(f) === seq).length).toBe(1);
      ps.send(udpFrame(seq + 1, 200, 1000, HOST_MAC, GUEST_MAC));
      expect((await fe.waitForFrames(0, 1, 3000, (f) => seqOf(f) === seq + 1)).length).toBe(1);
    } finally {
      ps.close();
    }
    return (await copies()) - before;
  }

  test('the serve-time limit is the quota that quota.show, status and `quota show` report', async () => {
    const q = await be.call('quota.show', { name: 'pq' });
    expect(q.pinnedMemory).toMatchObject({ limit: 8 * MiB, used: 0, umem: null });
    expect(q.pinnedMemory.minimum).toBeGreaterThan(0);
    expect(q.limits).toBeUndefined(); // no --offload: only the pin quota exists
    expect(await status()).toMatchObject({ pinLimitBytes: 8 * MiB, pinnedBytes: 0, umem: null });

    const text = cli('quota', 'show', 'pq');
    expect(text.code).toBe(0);
    expect(text.out).toMatch(/pinned memory\s+0 B\s+8\.0 MiB/);
    const json = cli('quota', 'show', 'pq', '--json');
    expect(JSON.parse(json.out)).toEqual(q);
    // `status` shows it too, for the xsk device only.
    const st = cli('status').out;
    expect(st).toMatch(/umem: none \(no guest memory yet\); pinned 0 B of 8\.0 MiB allowed/);
    expect(st.match(/umem:/g)?.length).toBe(1);
  });

  test('a device without offload or pinned memory has no quotas, and says why', async () => {
    await expect(be.call('quota.show', { name: 'tp' })).rejects.toThrow(/not started with --offload.*tap port pins no guest memory/);
    await expect(be.call('quota.set', { name: 'tp', changes: { maxPinnedMemory: '1GiB' } })).rejects.toThrow(/only xsk ports pin guest memory/);
    // On the xsk device the offload quotas need --offload; the pin quota alone is there.
    await expect(be.call('quota.set', { name: 'pq', changes: { maxMaps: '4' } })).rejects.toThrow(/not started with --offload: only the pinned-memory quota/);
  });

  test('under a limit below the guest RAM the UMEM is bounce-only and traffic still flows, as counted copies', async () => {
    const from = be.proc.lineCount;
    const fe = await connect();
    const s = await status();
    expect(s.umem).toBe('bounce');
    // The operator is told why, once per memory table.
    await be.proc.waitForLine(/bounce-only UMEM: guest RAM needs \d+ bytes pinned, over the pin limit of 8388608; every frame is copied/, 3000, from);
    // Only the private bounce chunks are pinned, well inside the limit.
    expect(s.pinnedBytes).toBeLessThanOrEqual(8 * MiB);
    expect((await be.call('quota.show', { name: 'pq' })).pinnedMemory.used).toBe(s.pinnedBytes);
    expect(await roundTrip(fe, 100)).toBeGreaterThanOrEqual(2);
    await disconnect(fe);
  });

  test('a raised limit takes effect at the next memory table: the reconnected guest is zero-copy with its RAM pinned', async () => {
    const fe = await connect();
    expect((await status()).umem).toBe('bounce');
    const set = cli('quota', 'set', 'pq', '--max-pinned-memory', '1GiB', '--json');
    expect(set.code).toBe(0);
    const r = JSON.parse(set.out);
    expect(r.pinnedMemory.limit).toBe(1024 * MiB);
    expect(r.warnings.join('\n')).toMatch(/bounce-only now.*next memory table/);
    expect((await status()).umem).toBe('bounce'); // the running memory table keeps its UMEM
    await disconnect(fe);

    const fe2 = await connect();
    const s = await status();
    expect(s).toMatchObject({ umem: 'zero-copy', pinLimitBytes: 1024 * MiB });
    // All guest RAM, plus the bounce chunks and the 2 MiB-aligned gap in front of the region.
    expect(s.pinnedBytes).toBeGreaterThanOrEqual(GUEST_RAM);
    expect(s.pinnedBytes).toBeLessThanOrEqual(GUEST_RAM + 4 * MiB);
    expect(await roundTrip(fe2, 200)).toBe(0);
    expect(cli('quota', 'show', 'pq').out).toMatch(/pinned memory\s+\d+\.\d MiB\s+1\.0 GiB/);

    // Lowering below what is pinned does not take RAM from the running guest.
    const low = await be.call('quota.set', { name: 'pq', changes: { maxPinnedMemory: 16 * MiB } });
    expect(low.pinnedMemory).toMatchObject({ limit: 16 * MiB, used: s.pinnedBytes, umem: 'zero-copy' });
    expect(low.warnings.join('\n')).toMatch(/below what is pinned now.*takes effect at the next memory table/);
    expect(await roundTrip(fe2, 300)).toBe(0);
    await disconnect(fe2);

    const fe3 = await connect();
    expect((await status()).umem).toBe('bounce');
    await disconnect(fe3);
  });

  test('invalid values are refused naming the flag, and change nothing', async () => {
    const before = (await be.call('quota.show', { name: 'pq' })).pinnedMemory.limit;
    for (const [v, why] of [
      ['12 parsecs', /expected a number with an optional unit/],
      ['1KiB', /must be an integer in \d+\.\.\d+ bytes/],
      ['2TiB', /must be an integer in/],
      [-5, /not a non-negative integer/],
      [1.5, /not a non-negative integer/],
      [true, /expected a size/],
    ] as const) {
      const e = await be.call('quota.set', { name: 'pq', changes: { maxPinnedMemory: v } }).then(() => null, (x: Error) => x);
      expect(e?.message, String(v)).toMatch(/--max-pinned-memory/);
      expect(e?.message, String(v)).toMatch(why);
    }
    // An offload quota on a device without --offload refuses the whole request, pin quota included.
    await expect(be.call('quota.set', { name: 'pq', changes: { maxPinnedMemory: '1GiB', maxMaps: 'x' } })).rejects.toThrow(/offload/);
    expect((await be.call('quota.show', { name: 'pq' })).pinnedMemory.limit).toBe(before);

    const c = cli('quota', 'set', 'pq', '--max-pinned-memory', '1KiB');
    expect(c.code).toBe(1);
    expect(c.err).toMatch(/--max-pinned-memory 1KiB: pin limit 1024 must be an integer/);
  });

  test('serve refuses a pin limit it cannot honour before creating anything', () => {
    const serve = (...args: string[]) => spawnSync(process.execPath, [CLI, 'serve', ...args], { encoding: 'utf8', timeout: 10_000, killSignal: 'SIGKILL' });
    const tap = serve('--socket', path.join(dir, 'b1.sock'), '--port', `tap:${badIf}`, '--pin-limit', '1GiB');
    expect(tap.status).toBe(2);
    expect(tap.stderr).toMatch(/a pin limit only applies to xsk ports/);
    const unit = serve('--device', `name=b2,socket=${path.join(dir, 'b2.sock')},port=xsk:${badIf},pin-limit=lots`);
    expect(unit.status).toBe(2);
    expect(unit.stderr).toMatch(/pin limit 'lots'/);
    const small = serve('--device', `name=b3,socket=${path.join(dir, 'b3.sock')},port=xsk:${badIf},pin-limit=4KiB`);
    expect(small.status).toBe(1);
    expect(small.stderr).toMatch(/device b3: pin limit 4096 must be an integer in/);
    expect(linkExists(badIf)).toBe(false);
  });
});
