// Ports outlive the process (issue 15): a crash leaves the host port with the operator's
// configuration on it, a restart with the same command re-attaches to it, a clean shutdown
// removes what we made, and a tap we did not make is never removed.
import { describe, test, expect, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf } from '../support/frames.js';
import { uniqueIfName, linkExists, deleteLink, linkIdentity, setMtu, addAddress, disableIpv6, run, type LinkIdentity } from '../support/netdev.js';
import { defaultPeerName } from '../../src/ports/xsk.js';

interface HostView extends LinkIdentity { master: string | null }

function hostView(ifname: string): HostView {
  const master = fs.existsSync(`/sys/class/net/${ifname}/master`) ? path.basename(fs.realpathSync(`/sys/class/net/${ifname}/master`)) : null;
  return { ...linkIdentity(ifname), master };
}

/** The operator's configuration: an address, an MTU, a bridge. */
function configure(ifname: string, bridge: string, cidr: string): void {
  disableIpv6(ifname);
  setMtu(ifname, 1400);
  addAddress(ifname, cidr);
  run(['ip', 'link', 'add', bridge, 'type', 'bridge']);
  run(['ip', 'link', 'set', ifname, 'master', bridge]);
}

async function guestToHost(sock: string, host: string, base: number): Promise<void> {
  const fe = await TestFrontend.connect(sock, { queuePairs: 1 });
  const ps = PacketSocket.open(host);
  try {
    const sent = Array.from({ length: 20 }, (_, i) => base + i);
    for (const s of sent) expect(fe.transmit(0, [udpFrame(s, 100)])).toBe(1);
    expect(new Set(ps.recvAll(sent.length, 5000, (f) => seqOf(f) !== null).map((f) => seqOf(f)!))).toEqual(new Set(sent));
  } finally {
    ps.close();
    fe.close();
  }
}

const bridges: string[] = [];
const links: string[] = [];
afterAll(() => {
  for (const l of [...links, ...bridges]) if (linkExists(l)) deleteLink(l);
});

describe.each(['tap', 'xsk'] as const)('a %s port survives a crash of serve', (kind) => {
  const ifname = uniqueIfName(`vxs${kind[0]}`);
  const bridge = uniqueIfName('vxsbr');
  const dir = tempDir(`surv${kind}`);
  const sock = path.join(dir, 'dev.sock');
  const args = ['--socket', sock, '--port', `${kind}:${ifname}`, '--name', 'surv'];
  let be: Backend;
  let before: HostView;
  links.push(ifname);
  bridges.push(bridge);

  afterAll(async () => {
    await be?.stop();
  });

  test('SIGKILL leaves the port with its configuration; the same command re-attaches to it unchanged', async () => {
    be = await startBackend(args, { dir });
    configure(ifname, bridge, kind === 'tap' ? '198.18.231.1/24' : '198.18.232.1/24');
    before = hostView(ifname);
    expect((await be.call('status')).devices[0].port.adopted).toBe(false);
    await guestToHost(sock, ifname, 100);
    await be.stop('SIGKILL');
    expect(hostView(ifname)).toEqual(before);
    be = await startBackend(args, { dir });
    const st = (await be.call('status')).devices[0].port;
    expect(st.adopted).toBe(true);
    expect(st.created).toBe(true);
    expect(hostView(ifname)).toEqual(before);
    await guestToHost(sock, ifname, 200);
  });

  test('SIGTERM removes the port we made (re-adopted or not)', async () => {
    await be.stop('SIGTERM');
    expect(linkExists(ifname)).toBe(false);
    if (kind === 'xsk') expect(linkExists(defaultPeerName(ifname))).toBe(false);
  });
});

describe('a tap that was there before serve', () => {
  test('is attached to, keeps its configuration, and is never removed', async () => {
    const tap = uniqueIfName('vxpre');
    links.push(tap);
    run(['ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap', 'vnet_hdr']);
    disableIpv6(tap);
    const dir = tempDir('pretap');
    const sock = path.join(dir, 'dev.sock');
    const be = await startBackend(['--socket', sock, '--port', `tap:${tap}`, '--name', 'pre'], { dir });
    try {
      const st = (await be.call('status')).devices[0].port;
      expect(st.created).toBe(false);
      expect(st.adopted).toBe(false);
      await guestToHost(sock, tap, 300);
    } finally {
      await be.stop('SIGTERM');
    }
    expect(linkExists(tap)).toBe(true);
    deleteLink(tap);
  });
});
