import path from 'node:path';
import { beforeAll, afterAll, afterEach } from 'vitest';
import { startBackend, tempDir, type Backend } from '../backend.js';
import type { TestFrontend } from './test-frontend.js';
import { uniqueIfName, linkExists, deleteLink, disableIpv6 } from '../netdev.js';
import { waitUntil } from '../processes.js';
import { closeFd } from '../../../src/sys/libc.js';

export interface DeviceRigOptions {
  /** 'tap' (default) or 'xsk' (AF_XDP over guest RAM; serve makes the veth pair). */
  port?: 'tap' | 'xsk';
  /** Turn IPv6 off on the interface, so the host sends the guest nothing of its own. */
  quiet?: boolean;
}

/** One `serve` with one tap (or xsk) device of one queue pair, shared by a test file. */
export interface DeviceRig {
  readonly be: Backend;
  readonly sock: string;
  /** The port's interface (a tap, or the host end of an xsk port's veth pair). */
  readonly ifname: string;
  /** Frontends and fds of the running test: closed after each test. */
  readonly openFe: TestFrontend[];
  readonly openFds: number[];
  /** The device's entry of the control API's status. */
  device(): Promise<any>;
}

/**
 * Registers the file's hooks: starts the backend before all tests, closes what a test opened
 * after it (and waits for the session to end: one frontend per device, so the next test's
 * connection must not race this one's teardown), and stops everything at the end.
 */
export function useTapDevice(name: string, tag: string, opts: DeviceRigOptions = {}): DeviceRig {
  let tap = '';
  const port = opts.port ?? 'tap';
  const rig = {
    be: undefined as unknown as Backend,
    sock: '',
    ifname: '',
    openFe: [] as TestFrontend[],
    openFds: [] as number[],
    device: async () => (await rig.be.call('status')).devices.find((d: { name: string }) => d.name === name),
  };
  beforeAll(async () => {
    const dir = tempDir(tag);
    tap = uniqueIfName(`vx${tag.slice(0, 3)}`);
    rig.sock = path.join(dir, `${tag}.sock`);
    rig.ifname = tap;
    rig.be = await startBackend(['--device', `name=${name},socket=${rig.sock},port=${port}:${tap},queues=1`], { dir });
    if (opts.quiet) disableIpv6(tap);
  });
  afterAll(async () => {
    for (const fe of rig.openFe) fe.close();
    await rig.be?.stop();
    if (tap && linkExists(tap)) deleteLink(tap);
  });
  afterEach(async () => {
    for (const fe of rig.openFe.splice(0)) fe.close();
    for (const fd of rig.openFds.splice(0)) closeFd(fd);
    await waitUntil(async () => (await rig.device()).connected === false, 3000, 'session closed');
  });
  return rig;
}
