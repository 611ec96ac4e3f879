// A real QEMU guest on `serve --port xsk:IF`: its frames go through AF_XDP over its own RAM.
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import path from 'node:path';
import { startBackend, tempDir, type Backend } from '../harness/backend.js';
import { addAddress, freeTestSubnet, run as runHost, uniqueIfName, deleteLink } from '../harness/netdev.js';
import { GuestVm } from './guest-vm.js';
import { sendRandom, TcpSink } from './host-endpoint.js';

const MAC = '52:54:00:5a:17:09';
const net = freeTestSubnet(18);

async function sh(vm: GuestVm, cmd: string, timeoutMs = 30_000): Promise<string> {
  const r = await vm.run(cmd, timeoutMs);
  if (r.status !== 0) throw new Error(`guest command failed (status ${r.status}): ${cmd}\n${r.output}`);
  return r.output;
}

describe('a QEMU guest on the xsk port (AF_XDP over guest RAM)', () => {
  const ifname = uniqueIfName('vxg');
  const dir = tempDir('xskguest');
  const socket = path.join(dir, 'vhost.sock');
  let be: Backend | undefined;
  let vm: GuestVm | undefined;
  let sink: TcpSink | undefined;

  beforeAll(async () => {
    be = await startBackend(['--socket', socket, '--port', `xsk:${ifname}`, '--queues', '1', '--name', 'xskg'], { dir });
    addAddress(ifname, `${net.host}/24`);
    vm = await GuestVm.boot({ name: 'vx-xskguest', net: { kind: 'vhost-user', socket, queues: 1, mac: MAC, reconnectMs: 1000 } });
    await sh(vm, `ip addr add ${net.guest}/24 dev eth0 && ip link set eth0 up`);
    sink = await TcpSink.listen(net.host);
  }, 150_000);

  afterAll(async () => {
    sink?.close();
    await vm?.shutdown();
    await be?.stop();
    deleteLink(ifname);
  }, 60_000);

  test('no checksum or TSO offloads are negotiated (AF_XDP carries plain frames); ping works both ways', async () => {
    const st = (await be!.call('status')).devices[0];
    expect(st.features).not.toContain('CSUM');
    expect(st.features).not.toContain('HOST_TSO4');
    expect(st.features).toContain('MRG_RXBUF');
    await sh(vm!, `ping -c 3 -w 20 ${net.host}`, 40_000);
    const out = runHost(['ping', '-c', '3', '-w', '20', net.guest], { timeoutMs: 30_000, allowFail: true });
    expect(Number(/(\d+) received/.exec(out)?.[1] ?? 0)).toBeGreaterThanOrEqual(2);
  }, 90_000);

  test('4 MiB each way over TCP arrive with matching sha256; zero JS payload copies in either direction', async () => {
    const before = (await be!.call('stats', { name: 'xskg' }))[0].total;
    await sh(vm!, 'dd if=/dev/urandom of=/tmp/up bs=64k count=64 2>/dev/null');
    const sum = (await sh(vm!, 'sha256sum /tmp/up')).split(/\s+/)[0];
    const got = sink!.next(120_000);
    await sh(vm!, `nc ${net.host} ${sink!.port} </tmp/up`, 120_000);
    expect((await got).sha256).toBe(sum);
    const port = 5401;
    const down = vm!.run(`nc -l -p ${port} </dev/null | sha256sum`, 120_000);
    const sent = await sendRandom(net.guest, port, 4 << 20, { connectTimeoutMs: 20_000, timeoutMs: 120_000 });
    const r = await down;
    expect(r.status).toBe(0);
    expect(r.output.split(/\s+/)[0]).toBe(sent.sha256);
    const after = (await be!.call('stats', { name: 'xskg' }))[0].total;
    const d = (k: string) => after[k] - before[k];
    console.log(`[xsk-guest] tx ${d('txPackets')} rx ${d('rxPackets')} frames; JS copies ${d('jsCopies')} (${d('jsCopyBytes')} bytes)`);
    expect(d('txBytes')).toBeGreaterThan(4 << 20);
    expect(d('rxBytes')).toBeGreaterThan(4 << 20);
    // The guest's buffers are MTU-sized (Linux posts >= 1518 + header): the kernel writes into
    // them and reads from them directly.
    expect(d('jsCopies')).toBe(0);
  }, 240_000);
});
