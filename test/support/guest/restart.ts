import type { Backend } from '../backend.js';
import { spawnManaged, sleep } from '../processes.js';
import { guestSh, type GuestVm } from './guest-vm.js';
import { TcpSink, type TransferResult } from './host-endpoint.js';

/**
 * A backend crash under a real guest (issue 15): `serve` SIGKILLed and started again with the
 * same command line while QEMU (chardev reconnect-ms) waits to reconnect, timed from the new
 * process's spawn. Shared by the guest tests and `npm run bench -- restart`.
 */

/** Milliseconds from spawning the new `serve` to each step of the recovery. */
export interface RestartTimings {
  /** Its ready line: ports re-adopted, sockets listening. */
  readyMs: number;
  /** QEMU reconnected and every vring runs again (polled through `status`). */
  reconnectedMs: number;
  /** The first echo reply from the guest to a host ping every 50 ms; null when not measured. */
  flowingMs: number | null;
}

export interface RestartOptions {
  /** The backend to kill. */
  old: Backend;
  /** Starts `serve` again with the same command line. */
  start: () => Promise<Backend>;
  /** vrings QEMU runs once it is back (2 per enabled queue pair). */
  vrings: number;
  /** The guest's address, pinged from the host to time frames flowing; omit when host frames cannot get through (an offloaded drop). */
  guestAddr?: string;
  timeoutMs?: number;
}

/** SIGKILLs opts.old, waits for it to die, starts the new backend and times its recovery. */
export async function killAndRestart(opts: RestartOptions): Promise<{ be: Backend; timings: RestartTimings }> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  // -n: no name lookups; -i 0.05 (root may go below 0.2 s); -W 1 keeps a lost echo from blocking output.
  const ping = opts.guestAddr ? spawnManaged('ping', ['-D', '-n', '-i', '0.05', '-W', '1', opts.guestAddr], { name: 'restart-ping' }) : null;
  try {
    opts.old.proc.killNow('SIGKILL');
    await opts.old.proc.exited;
    // Replies printed before the new serve was spawned do not count.
    let firstReply = 0;
    let t0 = Number.POSITIVE_INFINITY;
    ping?.onLine((line) => {
      const now = Date.now();
      if (firstReply === 0 && now >= t0 && /bytes from/.test(line)) firstReply = now;
    });
    t0 = Date.now();
    const be = await opts.start();
    const readyMs = Date.now() - t0;
    let reconnectedMs = 0;
    const deadline = t0 + timeoutMs;
    while (reconnectedMs === 0) {
      const st = (await be.call('status')).devices[0] as { connected: boolean; runningVrings: number[] };
      if (st.connected && st.runningVrings.length === opts.vrings) reconnectedMs = Date.now() - t0;
      else if (Date.now() > deadline) throw new Error(`QEMU did not reconnect with ${opts.vrings} vrings running within ${timeoutMs} ms: ${JSON.stringify(st)}\n${be.proc.tail(20)}`);
      else await sleep(20);
    }
    while (ping && firstReply === 0) {
      if (Date.now() > deadline) throw new Error(`no echo reply from ${opts.guestAddr} within ${timeoutMs} ms of the restart\n${ping.tail(5)}\n${be.proc.tail(20)}`);
      await sleep(10);
    }
    return { be, timings: { readyMs, reconnectedMs, flowingMs: ping ? firstReply - t0 : null } };
  } finally {
    await ping?.stop('SIGINT', 1000);
  }
}

export function formatTimings(t: RestartTimings): string {
  return `serve ready ${t.readyMs} ms, QEMU reconnected with every vring running ${t.reconnectedMs} ms, ` +
    `frames flowing (first echo reply) ${t.flowingMs === null ? 'not measured' : `${t.flowingMs} ms`} after serve was spawned`;
}


export interface StreamAcrossOptions<T> {
  vm: GuestVm;
  /** The host's address the guest sends to (a TcpSink listens there). */
  host: string;
  /** Whole MiB. */
  bytes: number;
  /** Runs once the stream is under way (kills and restarts the backend). */
  during: () => Promise<T>;
  timeoutMs?: number;
}

export interface StreamAcrossResult<T> {
  /** What the host received, hashed. */
  result: TransferResult;
  /** sha256 of the file the guest sent. */
  sent: string;
  /** Bytes the host had received when `during` started. */
  atInterrupt: number;
  during: T;
}

/**
 * The guest streams `bytes` random bytes to the host over one TCP connection (busybox nc in
 * the background); once some have arrived, `during` runs; the same connection is then followed
 * to its end. The caller compares `sent` with `result.sha256`.
 */
export async function streamAcross<T>(o: StreamAcrossOptions<T>): Promise<StreamAcrossResult<T>> {
  const timeoutMs = o.timeoutMs ?? 240_000;
  const file = '/tmp/vx-stream';
  if (!Number.isInteger(o.bytes / 2 ** 20)) throw new Error('streamAcross sends whole MiB');
  await guestSh(o.vm, `dd if=/dev/urandom of=${file} bs=1M count=${o.bytes / 2 ** 20} 2>/dev/null`, 120_000);
  const sent = (await guestSh(o.vm, `sha256sum ${file}`, 60_000)).split(/\s+/)[0]!;
  const sink = await TcpSink.listen(o.host);
  try {
    const done = sink.next(timeoutMs);
    await guestSh(o.vm, `nc ${o.host} ${sink.port} <${file} >/dev/null 2>&1 &`, 30_000);
    const start = Date.now();
    while (sink.received < Math.min(2 ** 21, o.bytes / 8)) {
      if (Date.now() - start > 60_000) throw new Error(`the guest's stream did not get going: ${sink.received} B in 60 s`);
      await sleep(20);
    }
    const atInterrupt = sink.received;
    const during = await o.during();
    const result = await done;
    await guestSh(o.vm, `rm -f ${file}`, 30_000);
    return { result, sent, atInterrupt, during };
  } finally {
    await sink.close();
  }
}
