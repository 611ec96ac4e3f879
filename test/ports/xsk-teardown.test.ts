// The xsk port leaves nothing behind: no AF_XDP socket (and so no pinned UMEM) after a
// disconnect, no veth or program after SIGTERM, and a restart after SIGKILL takes over cleanly.
import { describe, test, expect, afterAll } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, countFds, type Backend } from '../support/backend.js';
import { TestFrontend } from '../support/frontend/test-frontend.js';
import { PacketSocket } from '../support/packet-socket.js';
import { uniqueIfName, linkExists, deleteLink } from '../support/netdev.js';
import { waitUntil } from '../support/processes.js';
import { udpFrame, seqOf, GUEST_MAC, HOST_MAC } from '../support/frames.js';
import { progGetFdById, closeBpfFd } from '../../src/sys/bpf/programs.js';
import { listProgIds, progInfo } from '../../src/sys/bpf/info.js';
import { bpfPrefix, hostObjectName } from '../../src/offload/host-names.js';


/** Ids of the redirect programs vhost-xdp loads for this file's xsk device (named for it: src/offload/host-names.ts). */
function redirectProgs(): number[] {
  return listProgIds().filter((id) => {
    let fd = -1;
    try {
      fd = progGetFdById(id);
      return progInfo(fd).name === hostObjectName(bpfPrefix('xskd'), 'xsk_redir');
    } catch {
      return false;
    } finally {
      if (fd >= 0) closeBpfFd(fd);
    }
  });
}

describe('xsk port teardown', () => {
  const ifname = uniqueIfName('vxk');
  const dir = tempDir('xskdown');
  const sock = path.join(dir, 'dev.sock');
  const args = ['--socket', sock, '--port', `xsk:${ifname}`, '--queues', '2', '--name', 'xskd'];
  let be: Backend | undefined;

  afterAll(async () => {
    await be?.stop('SIGKILL');
    deleteLink(ifname);
  });

  const pinned = async (): Promise<number> => (await be!.call('status')).devices[0].port.pinnedBytes;

  async function roundTrip(seq: number): Promise<void> {
    const fe = await TestFrontend.connect(sock, { queuePairs: 2 });
    const ps = PacketSocket.open(ifname);
    try {
      // The UMEM over the guest's memory is registered (pinned) while the pairs run.
      await waitUntil(async () => (await pinned()) > 0, 5000, 'UMEM pinned');
      fe.transmit(0, [udpFrame(seq, 100)]);
      expect(ps.recvAll(1, 3000, (f) => seqOf(f) === seq).length).toBe(1);
      ps.send(udpFrame(seq + 1, 100, 1000, HOST_MAC, GUEST_MAC));
      const got = [...(await fe.waitForFrames(0, 1, 1500, (f) => seqOf(f) === seq + 1)), ...(await fe.waitForFrames(1, 1, 1500, (f) => seqOf(f) === seq + 1))];
      expect(got.length).toBe(1);
    } finally {
      ps.close();
      fe.close();
    }
  }

  test('a frontend disconnect closes the AF_XDP sockets (UMEM unpinned); a reconnect opens new ones', async () => {
    const before = redirectProgs().length;
    be = await startBackend(args, { dir });
    expect(redirectProgs().length).toBe(before + 1);
    expect(await pinned()).toBe(0);
    await roundTrip(500);
    await waitUntil(async () => (await pinned()) === 0, 5000, 'UMEM unpinned after the disconnect');
    const fds = countFds(be.proc.pid);
    for (let i = 0; i < 3; i++) {
      await roundTrip(1000 * (i + 1));
      await waitUntil(async () => (await pinned()) === 0, 5000, 'UMEM unpinned after the disconnect');
    }
    // Every AF_XDP socket of the three sessions is closed again.
    await waitUntil(() => countFds(be!.proc.pid) === fds, 3000, 'fd count back to its baseline').catch(() => undefined);
    expect(countFds(be.proc.pid)).toBe(fds);
  });

  test('SIGKILL leaves the veth behind; a restarted backend takes it over, and SIGTERM removes veth and program', async () => {
    const progsBefore = redirectProgs();
    await be!.stop('SIGKILL');
    expect(linkExists(ifname)).toBe(true); // the kernel keeps what a killed process made
    be = await startBackend(args, { dir });
    await roundTrip(9000);
    // The leftover program went with the old veth; only the new one remains.
    expect(redirectProgs().length).toBe(progsBefore.length);
    await be.stop('SIGTERM');
    be = undefined;
    expect(linkExists(ifname)).toBe(false);
    expect(redirectProgs().length).toBe(progsBefore.length - 1);
  });
});
