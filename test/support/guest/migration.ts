import net from 'node:net';
import path from 'node:path';
import { existsSync } from 'node:fs';
import { sleep, waitUntil } from '../processes.js';
import { GuestVm, type GuestVmOptions } from './guest-vm.js';

/**
 * Live migration between two QEMUs on this host: a guest booted with a QMP socket, a second
 * QEMU waiting with `-incoming unix:PATH`, and QMP `migrate` polled to its end. Each QEMU is a
 * GuestVm, so the destination's console (the guest's own shell, migrated) is driven with run().
 */

/** A QMP connection. Commands are answered in order; events are kept in `events`. */
export class Qmp {
  private buf = '';
  private readonly waiting: ((msg: any) => void)[] = [];
  readonly events: { event: string; data?: any; at: number }[] = [];

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('error', () => undefined);
    sock.on('close', () => {
      for (const w of this.waiting.splice(0)) w({ error: { desc: 'QMP connection closed' } });
    });
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line);
        if (msg.QMP) continue;
        if (msg.event) {
          this.events.push({ event: msg.event, data: msg.data, at: Date.now() });
          continue;
        }
        this.waiting.shift()?.(msg);
      }
    });
  }

  static async connect(file: string, timeoutMs = 20_000): Promise<Qmp> {
    await waitUntil(() => existsSync(file), timeoutMs, `QMP socket ${file}`);
    const sock = net.createConnection(file);
    await new Promise<void>((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
    const q = new Qmp(sock);
    await q.cmd('qmp_capabilities');
    return q;
  }

  /** Rejects after timeoutMs: QEMU's monitor stalls while its main loop waits on a backend's reply. */
  cmd(execute: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<any> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${execute}: no QMP answer within ${timeoutMs} ms`)), timeoutMs);
      this.waiting.push((msg) => {
        clearTimeout(timer);
        if (msg.error) reject(new Error(`${execute}: ${msg.error.desc}`));
        else resolve(msg.return);
      });
      this.sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    });
  }

  close(): void { this.sock.destroy(); }
}

/** A QEMU (GuestVm) and its QMP connection. */
export interface QmpGuest {
  vm: GuestVm;
  qmp: Qmp;
}

/**
 * QEMU's source reports a migration completed once it has sent everything, unless the
 * destination may answer: with `return-path` on both sides a destination that fails to load
 * (a backend refusing the device state at CHECK_DEVICE_STATE) fails the migration on the
 * source, which then runs on. Without it the source stays paused and the destination exits.
 */
async function enableReturnPath(qmp: Qmp): Promise<void> {
  await qmp.cmd('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }] });
}

function withQmp(opts: GuestVmOptions, dir: string): { opts: GuestVmOptions; socket: string } {
  const socket = path.join(dir, `${opts.name ?? 'guest'}.qmp`);
  return { opts: { ...opts, qemuArgs: [...(opts.qemuArgs ?? []), '-qmp', `unix:${socket},server=on,wait=off`] }, socket };
}

/** Boots a guest (GuestVm.boot) with a QMP socket in dir. */
export async function bootWithQmp(opts: GuestVmOptions, dir: string): Promise<QmpGuest> {
  const q = withQmp(opts, dir);
  const vm = await GuestVm.boot(q.opts);
  try {
    const qmp = await Qmp.connect(q.socket);
    await enableReturnPath(qmp);
    return { vm, qmp };
  } catch (e) {
    await vm.shutdown();
    throw e;
  }
}

/**
 * Starts the destination QEMU: same machine and device options as the source, waiting on a
 * unix socket in dir. Resolves once QMP answers and the socket listens.
 */
export async function startIncoming(opts: GuestVmOptions, dir: string): Promise<QmpGuest & { uri: string }> {
  const listen = path.join(dir, `${opts.name ?? 'guest'}.mig`);
  const q = withQmp(opts, dir);
  const vm = GuestVm.incoming(q.opts, `unix:${listen}`);
  try {
    const qmp = await Qmp.connect(q.socket);
    await enableReturnPath(qmp);
    await waitUntil(() => existsSync(listen), 20_000, 'the destination listening for the migration');
    return { vm, qmp, uri: `unix:${listen}` };
  } catch (e) {
    await vm.shutdown();
    throw e;
  }
}

export type MigrationStatus = 'completed' | 'failed' | 'cancelled';

/** query-migrate at the end, and what the caller measured. */
export interface MigrationOutcome {
  status: MigrationStatus;
  info: any;
  /** From the `migrate` command to the terminal status seen. */
  ms: number;
}

/**
 * Sends `migrate` to the source and polls query-migrate every 50 ms until it ends (completed,
 * failed, cancelled). `onPoll` runs after each poll with the current info (e.g. to cancel).
 */
export async function migrate(src: Qmp, uri: string, opts: { timeoutMs?: number; onPoll?: (info: any) => unknown } = {}): Promise<MigrationOutcome> {
  const t0 = Date.now();
  await src.cmd('migrate', { uri });
  for (;;) {
    const info = await src.cmd('query-migrate');
    if (info.status === 'completed' || info.status === 'failed' || info.status === 'cancelled') {
      return { status: info.status, info, ms: Date.now() - t0 };
    }
    if (Date.now() - t0 > (opts.timeoutMs ?? 120_000)) throw new Error(`migration still ${info.status} after ${Date.now() - t0} ms`);
    await opts.onPoll?.(info);
    await sleep(50);
  }
}

/** Ends a QEMU through QMP `quit` (a migrated-away source cannot power itself off), SIGKILL as the fallback. */
export async function quit(g: QmpGuest): Promise<void> {
  if (g.vm.running) {
    await Promise.race([g.qmp.cmd('quit').catch(() => undefined), sleep(3000)]);
    await Promise.race([g.vm.exited, sleep(5000)]);
  }
  g.qmp.close();
  await g.vm.shutdown();
}

/** Waits until the destination runs the guest (QMP status running). */
export async function waitRunning(g: QmpGuest, timeoutMs = 30_000): Promise<void> {
  await waitUntil(async () => (await g.qmp.cmd('query-status')).status === 'running', timeoutMs, `${g.vm.name} running`);
}
