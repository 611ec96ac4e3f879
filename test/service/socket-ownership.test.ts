import { describe, test, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { startBackend, tempDir, CLI, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { uniqueIfName, linkExists, deleteLink } from '../support/netdev.js';

/** A second `serve`, run to its exit: the way an operator's mistake would look. */
function serveOnce(args: string[]): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, 'serve', ...args], { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, stderr: r.stderr };
}

describe('one owner per socket', () => {
  let dir: string;
  let be: Backend;
  let sock: string;
  let tap: string;

  beforeAll(async () => {
    dir = tempDir('owner');
    sock = path.join(dir, 'dev.sock');
    tap = uniqueIfName('vxown');
    be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--name', 'first'], { dir });
  });

  afterAll(async () => {
    await be?.stop();
  });

  async function firstStillServes(): Promise<void> {
    const st = await be.call('status');
    expect(st.pid).toBe(be.proc.pid);
    const fe = await TestFrontend.connect(sock, { queuePairs: 1 });
    try {
      expect((await be.call('status')).devices[0].connected).toBe(true);
    } finally {
      fe.close();
    }
  }

  test('a second serve on a live vhost-user socket exits non-zero naming the path and the owner, touching nothing', async () => {
    const otherTap = uniqueIfName('vxown');
    const r = serveOnce(['--socket', sock, '--port', `tap:${otherTap}`, '--name', 'second', '--control', path.join(dir, 'other.sock')]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('[socket-in-use]');
    expect(r.stderr).toContain(sock);
    expect(r.stderr).toContain(`pid ${be.proc.pid}`);
    // It failed before creating its port, and left the first one's socket file in place.
    expect(linkExists(otherTap)).toBe(false);
    expect(fs.existsSync(sock)).toBe(true);
    await firstStillServes();
  });

  test('a second serve on a live control socket exits non-zero and `status` still reaches the first', async () => {
    const otherTap = uniqueIfName('vxown');
    const r = serveOnce(['--socket', path.join(dir, 'other-dev.sock'), '--port', `tap:${otherTap}`, '--control', be.control]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('[socket-in-use]');
    expect(r.stderr).toContain(be.control);
    expect(linkExists(otherTap)).toBe(false);
    expect(fs.existsSync(path.join(dir, 'other-dev.sock'))).toBe(false);
    await firstStillServes();
  });

  test('the socket files a SIGKILLed serve leaves behind are stale: the next serve replaces them and says so', async () => {
    await be.stop('SIGKILL');
    expect(fs.existsSync(sock)).toBe(true);
    expect(fs.existsSync(be.control)).toBe(true);
    // The killed process created the tap: it is not ours to keep, and the restart re-creates it.
    if (linkExists(tap)) deleteLink(tap);
    be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--name', 'first'], { dir });
    await firstStillServes();
  });

  test('SIGTERM removes the sockets and their lock files: nothing is left to look stale', async () => {
    await be.stop('SIGTERM');
    for (const f of [sock, `${sock}.lock`, be.control, `${be.control}.lock`]) expect(fs.existsSync(f)).toBe(false);
  });
});
