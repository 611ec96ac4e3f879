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
    const lines = body.replace(/\r/g, '').split('\n').slice(1, -1);
    return { output: lines.join('\n'), status: Number(m[1]) };
  }
}

function step(msg: string): void {
  console.log(`\n== ${msg}`);
}

export function demoCommand(y: Argv) {
  return y.command('demo', 'End-to-end demo: serve + a real QEMU guest (TCG) on a tap port, traffic both ways, counters', (a) => a
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
    step(`serve --socket ${sock} --port tap:${tap}`);
    const svc = await Service.start([{ name: 'demo', socket: sock, port: `tap:${tap}`, queues: 1, client: false, threads: 1, busyPoll: false }], null);
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
      step('booting a Debian 6.1 guest under TCG (about 10-20 s)');
      const t0 = Date.now();
      qemu = spawn(path.join(root, 'qemu-scripts/launch-guest.sh'), ['--socket', sock, '--queues', '1', '--mac', '52:54:00:de:00:01', '--mtu', '1400', '--accel', 'tcg'], { stdio: ['pipe', 'pipe', 'inherit'] });
      const con = new Console(qemu);
      await con.waitFor(READY, 120_000);
      console.log(`guest ready in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      await con.run('dmesg -n 1');
      spawnSync('ip', ['addr', 'add', '198.18.77.1/24', 'dev', tap]);
      await con.run('ip addr add 198.18.77.2/24 dev eth0 && ip link set eth0 up');
      const link = await con.run('sleep 1; ip -br link show eth0');
      console.log(`guest: ${link.output.trim()}`);
      console.log(`host:  ${tap} mtu ${fs.readFileSync(`/sys/class/net/${tap}/mtu`, 'utf8').trim()} (set by the guest's host_mtu through NET_SET_MTU)`);
      step('guest -> host: ping -c 5 198.18.77.1');
      const ping = await con.run('ping -c 5 -W 2 198.18.77.1', 30_000);
      console.log(ping.output);
      step('host -> guest: ping -c 5 198.18.77.2');
      const hp = spawnSync('ping', ['-c', '5', '-W', '2', '198.18.77.2'], { encoding: 'utf8' });
      console.log(hp.stdout.trim());
      step('counters');
      const s = device.statsSnapshot();
      const st = device.status();
      console.log(`negotiated: ${st.features.join(' ')}`);
      const rows: [string, number | string][] = [
        ['guest -> host frames (backend tx)', s.total.txPackets],
        ['host -> guest frames (backend rx)', s.total.rxPackets],
        ['tap kernel rx / tx', `${s.port.rxPackets} / ${s.port.txPackets}`],
        ['kicks from guest / interrupts to guest', `${s.total.kicks} / ${s.total.calls}`],
        ['payload copies in JavaScript', s.total.jsCopies],
      ];
      for (const [k, v] of rows) console.log(`  ${k.padEnd(42)} ${String(v).padStart(12)}`);
      const ok = ping.status === 0 && hp.status === 0;
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
