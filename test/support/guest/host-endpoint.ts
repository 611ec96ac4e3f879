import { createHash, randomFillSync } from 'node:crypto';
import dgram from 'node:dgram';
import net from 'node:net';

/**
 * Host ends of guest TCP transfers: a sink that hashes what a guest sends, and a source that
 * sends random bytes to a guest listener. Both hash on the fly, so a transfer's checksum is
 * known on the host without keeping the bytes.
 */

export interface TransferResult {
  bytes: number;
  sha256: string;
  /** From the connection's first moment (accept / connect) to its close. */
  ms: number;
}

export function mibPerSec(r: TransferResult): number {
  return r.bytes / 2 ** 20 / (r.ms / 1000);
}

/** Listens on host:port; each accepted connection is read to EOF and hashed. */
export class TcpSink {
  private readonly results: TransferResult[] = [];
  private readonly waiters: ((r: TransferResult) => void)[] = [];
  private readonly sockets = new Set<net.Socket>();
  /** Bytes received so far over all connections, including unfinished ones. */
  received = 0;

  private constructor(private readonly server: net.Server, readonly port: number) {}

  static listen(host: string, port = 0): Promise<TcpSink> {
    return new Promise((resolve, reject) => {
      const server = net.createServer({ allowHalfOpen: true });
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        const sink = new TcpSink(server, (server.address() as net.AddressInfo).port);
        server.on('connection', (s) => sink.accept(s));
        resolve(sink);
      });
    });
  }

  private accept(s: net.Socket): void {
    this.sockets.add(s);
    const t0 = Date.now();
    const hash = createHash('sha256');
    let bytes = 0;
    s.on('data', (b: Buffer) => {
      bytes += b.length;
      this.received += b.length;
      hash.update(b);
    });
    s.on('error', () => undefined);
    s.on('end', () => {
      // The sender half-closed after its last byte; closing our side lets it exit.
      s.end();
      this.deliver({ bytes, sha256: hash.digest('hex'), ms: Date.now() - t0 });
    });
    s.on('close', () => this.sockets.delete(s));
  }

  private deliver(r: TransferResult): void {
    const w = this.waiters.shift();
    if (w) w(r);
    else this.results.push(r);
  }

  /** The next completed connection (in completion order). */
  next(timeoutMs: number): Promise<TransferResult> {
    const ready = this.results.shift();
    if (ready) return Promise.resolve(ready);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new Error(`no complete transfer on port ${this.port} within ${timeoutMs} ms`));
      }, timeoutMs);
      const waiter = (r: TransferResult): void => {
        clearTimeout(timer);
        resolve(r);
      };
      this.waiters.push(waiter);
    });
  }

  /** Drops any completed results not yet taken (e.g. of an interrupted transfer). */
  discard(): TransferResult[] {
    return this.results.splice(0);
  }

  close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    return new Promise((r) => this.server.close(() => r()));
  }
}

export interface SendOptions {
  /** The listener may not be up yet: connection refusals are retried until this passes. */
  connectTimeoutMs?: number;
  /** Whole transfer, from the first connect attempt. */
  timeoutMs?: number;
  chunkBytes?: number;
}

/**
 * Connects to host:port, sends `bytes` random bytes, half-closes and waits for the peer to
 * close (the guest's `nc -l` exits on EOF, after it has written everything out).
 */
export async function sendRandom(host: string, port: number, bytes: number, opts: SendOptions = {}): Promise<TransferResult> {
  const deadline = Date.now() + (opts.timeoutMs ?? 120_000);
  const connectDeadline = Date.now() + (opts.connectTimeoutMs ?? 15_000);
  for (;;) {
    try {
      return await sendOnce(host, port, bytes, opts.chunkBytes ?? 256 * 1024, deadline);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if ((code === 'ECONNREFUSED' || code === 'EHOSTUNREACH') && Date.now() < connectDeadline) {
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      throw e;
    }
  }
}

function sendOnce(host: string, port: number, bytes: number, chunkBytes: number, deadline: number): Promise<TransferResult> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    const s = net.createConnection({ host, port, allowHalfOpen: true });
    let t0 = 0;
    let sent = 0;
    let failed: Error | null = null;
    const timer = setTimeout(() => {
      failed = new Error(`send to ${host}:${port} timed out after ${sent} of ${bytes} bytes`);
      s.destroy();
    }, Math.max(1, deadline - Date.now()));
    const pump = (): void => {
      while (sent < bytes) {
        const n = Math.min(chunkBytes, bytes - sent);
        const chunk = randomFillSync(Buffer.allocUnsafe(n));
        hash.update(chunk);
        sent += n;
        if (!s.write(chunk)) {
          s.once('drain', pump);
          return;
        }
      }
      s.end();
    };
    s.once('connect', () => {
      t0 = Date.now();
      pump();
    });
    s.on('data', () => undefined);
    s.on('error', (e) => {
      failed ??= e;
    });
    s.on('close', () => {
      clearTimeout(timer);
      if (failed || sent < bytes) reject(failed ?? new Error(`connection to ${host}:${port} closed after ${sent} of ${bytes} bytes`));
      else resolve({ bytes, sha256: hash.digest('hex'), ms: Date.now() - t0 });
    });
  });
}

/**
 * Sends `count` UDP datagrams of `bytes` bytes from host address `from` (source port `sport`,
 * any free one by default) to to:port, `gapMs` apart (a burst would overflow the tap's queue
 * and lose some), then closes the socket.
 */
export async function sendUdp(from: string, to: string, port: number, count: number, opts: { bytes?: number; gapMs?: number; sport?: number } = {}): Promise<void> {
  const s = dgram.createSocket('udp4');
  try {
    await new Promise<void>((resolve, reject) => { s.once('error', reject); s.bind({ address: from, port: opts.sport ?? 0 }, () => resolve()); });
    const payload = Buffer.alloc(opts.bytes ?? 64, 0x5a);
    for (let i = 0; i < count; i++) {
      await new Promise<void>((resolve, reject) => s.send(payload, port, to, (e) => (e ? reject(e) : resolve())));
      await new Promise((r) => setTimeout(r, opts.gapMs ?? 5));
    }
  } finally {
    s.close();
  }
}
