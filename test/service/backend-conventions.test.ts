// QEMU's vhost-user "Backend program conventions" (docs/interop/vhost-user.rst): the capability
// report, an inherited listening socket (--fd, and systemd's LISTEN_FDS hand-over), prompt exit
// on SIGTERM, and what serve must leave alone when the socket file is not its own.
import { describe, test, expect, afterEach } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startBackend, tempDir, CLI, repoRoot, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { expectTraffic } from '../support/frontend/traffic.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, disableIpv6, linkExists } from '../support/netdev.js';
import { UnixSocket } from '../../src/sys/unix-socket.js';
import { closeFd } from '../../src/sys/libc.js';
import { TEST_USER, capsFor } from '../support/unprivileged.js';

const VHOST_USER_MAIN = path.join(repoRoot(), 'dist/src/cli/vhost-user-main.js');

describe('QEMU backend program conventions', () => {
  let be: Backend | undefined;
  let fe: TestFrontend | undefined;
  let ps: PacketSocket | undefined;
  const fds: number[] = [];

  afterEach(async () => {
    ps?.close();
    ps = undefined;
    fe?.close();
    fe = undefined;
    await be?.stop();
    be = undefined;
    for (const fd of fds.splice(0)) closeFd(fd);
  });

  test('--print-capabilities prints {"type":"net","features":[...]} and exits 0, whatever else is on the line', () => {
    for (const argv of [[CLI, 'serve', '--print-capabilities', '--no-such-option', '--fd', 'x'], [VHOST_USER_MAIN, '--print-capabilities']]) {
      const r = spawnSync(process.execPath, argv, { encoding: 'utf8', timeout: 10_000 });
      expect(r.status).toBe(0);
      const caps = JSON.parse(r.stdout) as { type: string; features: unknown[] };
      expect(caps.type).toBe('net');
      expect(Array.isArray(caps.features)).toBe(true);
      expect(caps.features.every((f) => typeof f === 'string')).toBe(true);
      expect(caps.features).toContain('offload');
    }
  });

  /** A listening socket made by "the management layer" (this test), handed to serve as fd 3. */
  function managerSocket(dir: string): { path: string; fd: number } {
    const p = path.join(dir, 'mgr.sock');
    const listener = UnixSocket.listen(p);
    fds.push(listener.fd);
    fs.chmodSync(p, 0o666);
    return { path: p, fd: listener.fd };
  }

  test.each([
    ['--fd 3', false],
    ['LISTEN_FDS/LISTEN_PID (systemd socket activation)', true],
  ] as const)('an inherited listening socket (%s) serves a frontend, unprivileged; the socket file stays the manager\'s', async (_label, activation) => {
    const ifname = uniqueIfName('vxf');
    const dir = tempDir('fd');
    const m = managerSocket(dir);
    be = await startBackend([...(activation ? [] : ['--fd', '3']), '--port', `tap:${ifname}`, '--name', 'fdd'],
      { dir, extraFds: [m.fd], socketActivation: activation, runAs: { user: TEST_USER, caps: capsFor('tap') } });
    // Our copy of the listener is closed: only serve accepts on it now.
    closeFd(fds.pop()!);
    disableIpv6(ifname);
    fe = await TestFrontend.connect(m.path);
    ps = PacketSocket.open(ifname);
    await expectTraffic(fe, ps, 800_000);
    const st = (await be.call('status')).devices[0];
    expect(st.connected).toBe(true);
    expect(st.socket).toBe('fd:3');
    fe.close();
    fe = undefined;
    await be.stop();
    be = undefined;
    // Not a path serve bound: neither claimed (no lock file) nor removed.
    expect(fs.statSync(m.path).isSocket()).toBe(true);
    expect(fs.existsSync(`${m.path}.lock`)).toBe(false);
    expect(linkExists(ifname)).toBe(false);
  });

  test('an fd that is not a listening unix socket is refused with bad-listen-fd, exit status 1, before any port exists', async () => {
    const ifname = uniqueIfName('vxb');
    const dir = tempDir('badfd');
    // fd 3 is a plain file here.
    const file = fs.openSync(path.join(dir, 'not-a-socket'), 'w');
    fds.push(file);
    const r = spawnSync(process.execPath, [CLI, 'serve', '--fd', '3', '--port', `tap:${ifname}`, '--control', path.join(dir, 'ctl')],
      { encoding: 'utf8', timeout: 15_000, stdio: ['ignore', 'pipe', 'pipe', file] });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('[bad-listen-fd]');
    expect(linkExists(ifname)).toBe(false);
    // --fd and --socket together: a usage error (status 2).
    const both = spawnSync(process.execPath, [CLI, 'serve', '--fd', '3', '--socket-path', path.join(dir, 's'), '--port', `tap:${ifname}`],
      { encoding: 'utf8', timeout: 15_000 });
    expect(both.status).toBe(2);
    expect(both.stderr).toContain('--socket are incompatible');
  });

  test('--socket-path is --socket; SIGTERM with a frontend attached ends serve promptly and cleanly (status 0)', async () => {
    const ifname = uniqueIfName('vxs');
    const dir = tempDir('sigterm');
    const sock = path.join(dir, 'dev.sock');
    be = await startBackend(['--socket-path', sock, '--port', `tap:${ifname}`, '--name', 'sig'], { dir });
    disableIpv6(ifname);
    fe = await TestFrontend.connect(sock);
    ps = PacketSocket.open(ifname);
    await expectTraffic(fe, ps, 810_000);
    const t0 = Date.now();
    be.proc.child.kill('SIGTERM');
    const status = await be.proc.exited;
    expect(status.code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(2000);
    be = undefined;
    expect(fs.existsSync(sock)).toBe(false);
    expect(linkExists(ifname)).toBe(false);
  });
});
