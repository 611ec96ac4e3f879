import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { Argv } from 'yargs';
import { setLogLevel } from '../log.js';
import { Service } from '../service/service.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const READY = /VHOST-XDP-GUEST-READY/;

/** Drives the guest's serial console: one command at a time, exit status captured. */
class Console {
  private text = '';
  private seq = 0;
  constructor(private readonly qemu: ChildProcess) {
    qemu.stdout!.on('data', (d: Buffer) => { this.text += d.toString('utf8'); });
  }
  waitFor(re: RegExp, timeoutMs: number, from = 0): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    return new Promise((resolve, reject) => {
      const tick = () => {
        const m = this.text.slice(from).match(re);
        if (m) return resolve(m);
        if (Date.now() > deadline || this.qemu.exitCode !== null) return reject(new Error(`guest console: no ${re} within ${timeoutMs} ms\n${this.text.slice(-2000)}`));
        setTimeout(tick, 50);
      };
      tick();
    });
  }
  async run(cmd: string, timeoutMs = 30_000): Promise<{ output: string; status: number }> {
    const n = ++this.seq;
    const from = this.text.length;
    this.qemu.stdin!.write(`${cmd}; echo __VX_${n}_DONE $?\n`);
    const m = await this.waitFor(new RegExp(`__VX_${n}_DONE (\\d+)`), timeoutMs, from);
    const body = this.text.slice(from, from + m.index!);
    // The echo of the command itself (wrapped by the terminal when long) is not output.
    const lines = body.replace(/\r/g, '').split('\n').slice(1, -1).filter((l) => !l.includes('__VX_'));
    return { output: lines.join('\n'), status: Number(m[1]) };
  }
}

/** A 198.18.x.0/24 (benchmark range) no host interface uses: other guests may be running. */
function freeSubnet(): string {
  const used = spawnSync('ip', ['-4', '-o', 'addr', 'show'], { encoding: 'utf8' }).stdout;
  for (let i = 0; i < 200; i++) {
    const net = `198.18.${(process.pid + i) % 200 + 20}`;
    if (!used.includes(` ${net}.`)) return net;
  }
  throw new Error('no free 198.18.x.0/24 on this host');
}

function step(msg: string): void {
  console.log(`\n== ${msg}`);
}

export function demoCommand(y: Argv) {
  return y.command('demo', 'End-to-end demo: serve --offload + a real QEMU guest that offloads xdp_drop.o with ip link; host traffic before/after', (a) => a
    .option('keep', { type: 'boolean', default: false, describe: 'leave the guest running until Ctrl-C' }),
  async (argv) => {
    setLogLevel('warn');
    const kernel = path.join(root, 'vm-images/out/vmlinuz');
    if (!fs.existsSync(kernel)) {
      console.error('vhost-xdp demo: vm-images/out is missing; run `npm run demo` (it builds the image) or vm-images/build.sh');
      process.exit(1);
    }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vx-demo-'));
    const sock = path.join(dir, 'vx0.sock');
    const tap = `vxdemo${process.pid % 1000}`;
    step(`serve --socket ${sock} --port tap:${tap} --queues 1 --offload   (the guest sees 2 queue pairs: 1 data + the offload pair)`);
    const svc = await Service.start([{ name: 'demo', socket: sock, port: `tap:${tap}`, queues: 1, client: false, offload: true }], null, { workers: 1 });
    const device = svc.devices.get('demo')!;
    let qemu: ChildProcess | null = null;
    const cleanup = async () => {
      if (qemu && qemu.exitCode === null) {
        qemu.kill('SIGTERM');
        await new Promise((r) => setTimeout(r, 500));
        if (qemu.exitCode === null) qemu.kill('SIGKILL');
      }
      await svc.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    };
    process.once('SIGINT', () => void cleanup().then(() => process.exit(130)));
    try {
      step('booting a Debian 6.1 guest under TCG (about 10-20 s); its virtio_net is the offload-aware one');
      const t0 = Date.now();
      qemu = spawn(path.join(root, 'qemu-scripts/launch-guest.sh'), ['--socket', sock, '--queues', '2', '--mac', '52:54:00:de:00:01', '--mtu', '1400', '--accel', 'tcg'], { stdio: ['pipe', 'pipe', 'inherit'] });
      const con = new Console(qemu);
      await con.waitFor(READY, 120_000);
      console.log(`guest ready in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      await con.run('dmesg -n 1');
      const claim = await con.run('dmesg | grep "XDP offload" | tail -1');
      console.log(`guest dmesg: ${claim.output.trim()}`);
      const net = freeSubnet();
      spawnSync('ip', ['addr', 'add', `${net}.1/24`, 'dev', tap]);
      await con.run(`ip addr add ${net}.2/24 dev eth0 && ip link set eth0 up && sleep 1`);
      await con.run(`ping -c 2 -W 2 ${net}.1`, 30_000);
      const guestRx = async () => Number((await con.run('cat /sys/class/net/eth0/statistics/rx_packets')).output.trim());
      const FLOOD = 200;
      const phase = async (label: string) => {
        const before = device.statsSnapshot();
        const rx0 = await guestRx();
        const hp = spawnSync('ping', ['-c', String(FLOOD), '-i', '0.005', '-W', '1', '-q', `${net}.2`], { encoding: 'utf8' });
        const replies = Number(/(\d+) received/.exec(hp.stdout)?.[1] ?? 0);
        const after = device.statsSnapshot();
        const d = (k: string) => (after.total as Record<string, number>)[k]! - (before.total as Record<string, number>)[k]!;
        return { label, sent: FLOOD, tapOut: after.port.txPackets - before.port.txPackets, dropped: d('xdpDrop'), delivered: d('rxPackets'), guestRx: (await guestRx()) - rx0, replies };
      };
      step(`host -> guest: ${FLOOD} pings, no offload`);
      const plain = await phase('no offload');
      step('in the guest: ip link set dev eth0 xdpoffload obj /bpf/xdp_drop.o sec xdp');
      const off = await con.run('ip link set dev eth0 xdpoffload obj /bpf/xdp_drop.o sec xdp 2>&1 && ip link show dev eth0', 60_000);
      console.log(off.output);
      const show = device.broker?.show();
      if (show?.program) console.log(`host: program id ${show.program.id} tag ${show.program.tag} '${show.program.name}', maps ${show.maps.map((m) => `${m.handle}:${m.type}`).join(' ')}`);
      step(`host -> guest: ${FLOOD} pings, xdp_drop offloaded`);
      const dropped = await phase('xdp_drop offloaded');
      const dump = await con.run('bpftool map dump name drop_count');
      console.log(`guest: bpftool map dump name drop_count (the host's map)\n${dump.output}`);
      await con.run('ip link set dev eth0 xdpoffload off');
      step(`host -> guest: ${FLOOD} pings, offload removed again`);
      const restored = await phase('offload off');
      step('summary');
      const rows = [plain, dropped, restored];
      const cols: [string, (r: typeof plain) => number][] = [
        ['frames sent', (r) => r.sent], ['tap -> backend', (r) => r.tapOut], ['dropped on host', (r) => r.dropped],
        ['delivered to guest', (r) => r.delivered], ['guest rx counter', (r) => r.guestRx], ['ping replies', (r) => r.replies],
      ];
      console.log(`  ${''.padEnd(20)}${rows.map((r) => r.label.padStart(20)).join('')}`);
      for (const [name, f] of cols) console.log(`  ${name.padEnd(20)}${rows.map((r) => String(f(r)).padStart(20)).join('')}`);
      const t = device.statsSnapshot().total;
      console.log(`  verdicts on the host: pass ${t.xdpPass} drop ${t.xdpDrop} tx ${t.xdpTx} aborted ${t.xdpAborted}; payload copies in JavaScript: ${t.jsCopies}`);
      const ok = plain.replies > FLOOD * 0.9 && dropped.replies === 0 && dropped.dropped >= FLOOD && dropped.guestRx < 5 && restored.replies > FLOOD * 0.9;
      console.log(`\ndemo ${ok ? 'succeeded' : 'FAILED'}`);
      if (argv.keep) {
        console.log('guest kept running; Ctrl-C to stop');
        await new Promise(() => undefined);
      }
      await cleanup();
      process.exit(ok ? 0 : 1);
    } catch (e) {
      console.error(`vhost-xdp demo: ${(e as Error).message}`);
      await cleanup();
      process.exit(1);
    }
  });
}
