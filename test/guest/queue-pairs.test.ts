// A real QEMU guest with 1 vCPU on a device with 2 queue pairs: Linux's virtio_net then uses
// pair 0 alone, and QEMU sends SET_VRING_ENABLE 0 for pair 1's rings. Host traffic must stay
// on pair 0: before the backend followed those messages, every flow the host hashed to the
// second queue (the tap's second queue file; the xsk port's second queue) was lost, about
// half of them. One guest per port kind; each boots in seconds under TCG.
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { startBackend, tempDir, type Backend } from '../support/backend.js';
import { addAddress, CleanupStack, disableIpv6, freeTestSubnet, setLinkUp, uniqueIfName } from '../support/netdev.js';
import { GuestVm, guestSh } from '../support/guest/guest-vm.js';
import { sendUdp } from '../support/guest/host-endpoint.js';

const FLOWS = 32;
const PER_FLOW = 5;

describe.each(['tap', 'xsk'] as const)('a 1-vCPU QEMU guest on 2 queue pairs, %s port', (kind) => {
  const net = freeTestSubnet(18);
  const mac = kind === 'tap' ? '52:54:00:5a:17:21' : '52:54:00:5a:17:22';
  const ifname = uniqueIfName(kind === 'tap' ? 'vxp' : 'vxk');
  const dir = tempDir(`qp-${kind}`);
  const socket = path.join(dir, 'vhost.sock');
  const cleanup = new CleanupStack();
  let be: Backend | undefined;
  let vm: GuestVm | undefined;

  beforeAll(async () => {
    cleanup.link(ifname);
    cleanup.push('stop backend', () => be?.stop());
    be = await startBackend(['--socket', socket, '--port', `${kind}:${ifname}`, '--queues', '2', '--name', `qp${kind}`], { dir, name: `vx-qp-${kind}` });
    if (kind === 'tap') disableIpv6(ifname);
    addAddress(ifname, `${net.host}/24`);
    setLinkUp(ifname);
    cleanup.push('shut the guest down', () => vm?.shutdown());
    vm = await GuestVm.boot({ name: `vx-qp-${kind}`, smp: 1, append: 'vxdp.stock=1', net: { kind: 'vhost-user', socket, queues: 2, mac, reconnectMs: 1000 } });
    await guestSh(vm, `ip addr add ${net.guest}/24 dev eth0 && ip link set eth0 up`);
  }, 150_000);

  afterAll(async () => {
    await cleanup.run();
  }, 60_000);

  test(`the guest uses pair 0 alone; every one of ${FLOWS} host flows reaches it`, async () => {
    const guest = vm!;
    // The driver set up one pair of queues (one per vCPU).
    expect((await guestSh(guest, 'ls /sys/class/net/eth0/queues')).trim().split(/\s+/).sort()).toEqual(['rx-0', 'tx-0']);
    await guestSh(guest, `ping -c 2 -w 20 ${net.host}`, 40_000);
    const d = (await be!.call('status')).devices[0];
    expect(d.runningVrings).toEqual([0, 1]);
    expect(d.hostPairs).toEqual([0]);
    const rx = async (): Promise<number> => Number(await guestSh(guest, 'cat /sys/class/net/eth0/statistics/rx_packets'));
    const before = await rx();
    for (let f = 0; f < FLOWS; f++) await sendUdp(net.host, net.guest, 9999, PER_FLOW, { sport: 41000 + f, gapMs: 2 });
    let got = 0;
    const deadline = Date.now() + 10_000;
    while ((got = (await rx()) - before) < FLOWS * PER_FLOW && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
    expect(got).toBeGreaterThanOrEqual(FLOWS * PER_FLOW);
  }, 90_000);
});
