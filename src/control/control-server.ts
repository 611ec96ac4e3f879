import fs from 'node:fs';
import http from 'node:http';
import { WebSocketServer, type WebSocket } from 'ws';
import { logger } from '../log.js';
import { VxError } from '../errors.js';
import { claimSocketPath, type SocketClaim } from '../sys/socket-claim.js';

export type Method = (params: Record<string, unknown>) => unknown | Promise<unknown>;

/** A control request refused by rule; `code` goes back to the client in the error answer. */
export class ControlError extends VxError {
  constructor(code: string, message: string) {
    super(code, message);
  }
}

const log = logger('control');
const MAX_MESSAGE = 64 * 1024;

/**
 * The ws control API on a unix socket (mode 0600: whoever can write to it can detach offloads
 * and change quotas). Requests are {id, method, params}; answers {id, result} or {id, error}.
 */
export class ControlServer {
  private readonly http: http.Server;
  private readonly wss: WebSocketServer;

  private constructor(readonly path: string, private readonly methods: Record<string, Method>, private readonly claim: SocketClaim) {
    this.http = http.createServer((_req, res) => { res.writeHead(426).end('use a websocket\n'); });
    this.wss = new WebSocketServer({ server: this.http, maxPayload: MAX_MESSAGE });
    this.wss.on('connection', (ws) => ws.on('message', (data) => void this.answer(ws, data.toString())));
  }

  static async listen(path: string, methods: Record<string, Method>, mode = 0o600): Promise<ControlServer> {
    // One owner per socket: a second serve must not leave the first unreachable by `status`.
    const claim = claimSocketPath(path, (line) => log.warn(line));
    const s = new ControlServer(path, methods, claim);
    try {
      await new Promise<void>((resolve, reject) => {
        s.http.once('error', reject);
        s.http.listen(path, () => resolve());
      });
    } catch (e) {
      claim.release();
      throw e;
    }
    fs.chmodSync(path, mode);
    return s;
  }

  private async answer(ws: WebSocket, text: string): Promise<void> {
    let id: unknown = null;
    try {
      const req = JSON.parse(text) as { id?: unknown; method?: unknown; params?: unknown };
      id = req.id ?? null;
      if (typeof req.method !== 'string' || !Object.hasOwn(this.methods, req.method)) {
        throw new ControlError('unknown-method', `unknown method '${String(req.method)}' (known: ${Object.keys(this.methods).join(', ')})`);
      }
      const params = (req.params && typeof req.params === 'object' ? req.params : {}) as Record<string, unknown>;
      const result = await this.methods[req.method]!(params);
      ws.send(JSON.stringify({ id, result }));
    } catch (e) {
      const code = e instanceof ControlError ? e.code : e instanceof SyntaxError ? 'bad-json' : 'failed';
      if (!(e instanceof ControlError)) log.warn(`request failed: ${(e as Error).message}`);
      ws.send(JSON.stringify({ id, error: { code, message: (e as Error).message } }));
    }
  }

  async close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    await new Promise<void>((r) => this.wss.close(() => r()));
    await new Promise<void>((r) => this.http.close(() => r()));
    this.claim.release();
  }
}
