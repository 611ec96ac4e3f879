// contrib/systemd/vhost-xdp@.{service,socket} serve a frontend. systemd is not PID 1 on the test
// machines, so this test does what systemd would, from the unit files as written: it makes the
// socket of the .socket unit (owner, group, mode), the RuntimeDirectory=, runs the ExecStartPre=
// '+' line as root, and then the ExecStart= line exactly as parsed (specifiers and $VAR
// expansion applied, nothing else changed) under setpriv with the unit's User=/Group=,
// AmbientCapabilities=, CapabilityBoundingSet=, NoNewPrivileges= and UMask=, fd 3 the socket
// and LISTEN_FDS/LISTEN_PID set. The other hardening options (ProtectSystem=, PrivateTmp=,
// RestrictAddressFamilies=, DeviceAllow=...) need systemd itself and are not exercised here.
import { describe, test, expect, afterAll, beforeAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startBackend, repoRoot, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { OffloadClient, offloadSample, requireOk, hostFramesReceived } from '../support/frontend/offload-client.js';
import { expectTraffic } from '../support/frontend/traffic.js';
import { PacketSocket } from '../support/packet-socket.js';
import { disableIpv6, linkExists } from '../support/netdev.js';
import { waitUntil, sleep } from '../support/processes.js';
import { UnixSocket } from '../../src/sys/unix-socket.js';
import { ensureUser, capMask, processCredentials } from '../support/unprivileged.js';
import { parseUnit, value, values, unitEnvironment, commandLine, capabilities, expandSpecifiers } from '../support/systemd-unit.js';

const UNITS = path.join(repoRoot(), 'contrib/systemd');
const service = parseUnit(fs.readFileSync(path.join(UNITS, 'vhost-xdp@.service'), 'utf8'));
const socketUnit = parseUnit(fs.readFileSync(path.join(UNITS, 'vhost-xdp@.socket'), 'utf8'));
const BIN_TARGET = path.join(repoRoot(), 'dist/src/cli/vhost-user-main.js');

function gidOf(group: string): number {
  return Number(execFileSync('getent', ['group', group], { encoding: 'utf8' }).split(':')[2]);
}

describe('contrib/systemd/vhost-xdp@.service, its ExecStart= run as the unit says (systemd not PID 1: setpriv)', () => {
  const instance = `u${(process.pid % 100000).toString(36)}${Date.now() % 1000}`;
  const cleanups: (() => void)[] = [];
  let be: Backend | undefined;
  let fe: TestFrontend | undefined;
  let ps: PacketSocket | undefined;
  let listenPath = '';

  beforeAll(() => {
    // The service's User= (a system user, left in place after the run).
    const user = value(service, 'Service', 'User')!;
    ensureUser(user);
    // The executable the unit names: an `npm install -g` puts it there; else this build, for the run.
    const exe = commandLine(value(service, 'Service', 'ExecStart')!, instance, {}).argv[0]!;
    if (!fs.existsSync(exe)) {
      fs.chmodSync(BIN_TARGET, 0o755);
      fs.symlinkSync(BIN_TARGET, exe);
      cleanups.push(() => fs.unlinkSync(exe));
    } else if (!(fs.lstatSync(exe).isSymbolicLink() && fs.realpathSync(exe) === fs.realpathSync(BIN_TARGET))) {
      // Someone's installed vhost-xdp: run it only if it is this build.
      throw new Error(`${exe} exists and is not this build (${BIN_TARGET}); remove it or link it here`);
    }
  });

  afterAll(async () => {
    ps?.close();
    fe?.close();
    await be?.stop();
    for (const c of cleanups.reverse()) { try { c(); } catch { /* best effort */ } }
  });

  test('the socket unit\'s socket (fd 3) serves a frontend: traffic both ways, an offloaded xdp_drop, pins in the unit\'s pin dir; SIGTERM stops it cleanly', async () => {
    const user = value(service, 'Service', 'User')!;
    const group = value(service, 'Service', 'Group') ?? user;
    const { uid } = ensureUser(user);
    const gid = gidOf(group);

    // What systemd does for vhost-xdp@INSTANCE.socket.
    listenPath = expandSpecifiers(value(socketUnit, 'Socket', 'ListenStream')!, instance);
    /** Removes a directory this test made, once empty (another instance may still use it). */
    const rmdirIfMade = (d: string) => { if (!fs.existsSync(d)) cleanups.push(() => { try { fs.rmdirSync(d); } catch { /* in use */ } }); };
    rmdirIfMade(path.dirname(listenPath));
    fs.mkdirSync(path.dirname(listenPath), { recursive: true, mode: Number.parseInt(value(socketUnit, 'Socket', 'DirectoryMode') ?? '0755', 8) });
    const listener = UnixSocket.listen(listenPath);
    cleanups.push(() => fs.rmSync(listenPath, { force: true }));
    fs.chownSync(listenPath, ensureUser(value(socketUnit, 'Socket', 'SocketUser')!).uid, gidOf(value(socketUnit, 'Socket', 'SocketGroup')!));
    fs.chmodSync(listenPath, Number.parseInt(value(socketUnit, 'Socket', 'SocketMode')!, 8));

    // RuntimeDirectory=: /run/DIR owned by User=/Group=.
    for (const d of values(service, 'Service', 'RuntimeDirectory')) {
      const dir = path.join('/run', expandSpecifiers(d, instance));
      fs.mkdirSync(dir, { recursive: true });
      fs.chownSync(dir, uid, gid);
      fs.chmodSync(dir, Number.parseInt(value(service, 'Service', 'RuntimeDirectoryMode') ?? '0755', 8));
      cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    }

    const env = unitEnvironment(service, instance);
    const pinDir = env.VHOST_XDP_OPTS!.split(/\s+/)[env.VHOST_XDP_OPTS!.split(/\s+/).indexOf('--pin-dir') + 1]!;
    rmdirIfMade(pinDir);
    // ExecStartPre=: '+' lines run as root, exactly as written.
    for (const line of values(service, 'Service', 'ExecStartPre')) {
      const c = commandLine(line, instance, env);
      expect(c.privileged).toBe(true);
      execFileSync(c.argv[0]!, c.argv.slice(1));
    }
    cleanups.push(() => fs.rmSync(path.join(pinDir, instance), { recursive: true, force: true }));
    expect(fs.statSync(pinDir).uid).toBe(uid);

    // ExecStart= under the unit's credentials.
    const start = commandLine(value(service, 'Service', 'ExecStart')!, instance, env);
    const ambient = capabilities(service, 'AmbientCapabilities');
    const bounding = capabilities(service, 'CapabilityBoundingSet');
    const caps = (l: string[]) => `-all${l.map((c) => `,+${c}`).join('')}`;
    const setpriv = ['setpriv', `--reuid=${user}`, `--regid=${gid}`, '--init-groups',
      `--inh-caps=${caps(ambient)}`, `--ambient-caps=${caps(ambient)}`, `--bounding-set=${caps(bounding)}`,
      ...(value(service, 'Service', 'NoNewPrivileges') === 'yes' ? ['--no-new-privs'] : []), '--', ...start.argv];
    const control = start.argv[start.argv.indexOf('--control') + 1]!;
    be = await startBackend([], {
      argv: setpriv, control, dir: path.dirname(control), extraFds: [listener.fd], socketActivation: true,
      umask: value(service, 'Service', 'UMask'), env: { ...process.env, ...env }, name: `vhost-xdp@${instance}`,
    });
    listener.close(); // serve has its own copy now, as with systemd
    const cred = processCredentials(be.proc.pid);
    expect(cred.uid).toBe(uid);
    expect(cred.effective).toBe(capMask(ambient));
    expect(cred.bounding).toBe(capMask(bounding));
    expect(fs.readFileSync(`/proc/${be.proc.pid}/status`, 'utf8')).toMatch(/^NoNewPrivs:\s+1$/m);

    const ifname = env.VHOST_XDP_PORT!.replace(/^tap:/, '');
    disableIpv6(ifname);
    // --offload: the guest sees one more pair, the offload channel.
    fe = await TestFrontend.connect(listenPath, { queuePairs: 2 });
    ps = PacketSocket.open(ifname);
    await expectTraffic(fe, ps, 900_000, [0, 1]);
    const oc = new OffloadClient(fe, 1);
    requireOk(await oc.claim());
    await waitUntil(async () => (await be!.call('status')).devices[0].offload.claimed, 3000, 'claim visible');
    await offloadSample(oc, 'xdp_drop');
    await sleep(100);
    expect(await hostFramesReceived(ps, fe, 901_000, 30, '52:54:00:c0:c0:c1')).toBe(0);
    expect(fs.readdirSync(path.join(pinDir, instance)).length).toBeGreaterThan(0);
    expect(fs.statSync(path.join(pinDir, instance)).uid).toBe(uid);

    // KillSignal=
    const t0 = Date.now();
    be.proc.child.kill((value(service, 'Service', 'KillSignal') ?? 'SIGTERM') as NodeJS.Signals);
    expect((await be.proc.exited).code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(Number(value(service, 'Service', 'TimeoutStopSec') ?? '90') * 1000);
    be = undefined;
    expect(linkExists(ifname)).toBe(false);
    // The socket is the socket unit's: still there for the next start.
    expect(fs.statSync(listenPath).isSocket()).toBe(true);
  });
});
