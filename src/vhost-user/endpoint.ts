import fs from 'node:fs';
import koffi from 'koffi';
import { UnixSocket } from '../sys/unix-socket.js';
import { claimSocketPath, type SocketClaim } from '../sys/socket-claim.js';
import { logger, type Logger } from '../log.js';
import { Session } from './session.js';
import type { VhostUserBackend } from './backend.js';
import type { TransferRecord } from './device-state.js';

type PollHandle = ReturnType<typeof koffi.node.poll>;

export interface EndpointOptions {
  path: string;
  /** server: we listen and the frontend connects (QEMU `server=off`); client: we connect, with backoff. */
  mode: 'server' | 'client';
  backend: VhostUserBackend;
  /** Socket file permissions in server mode (default 0600). */
  socketMode?: number;
  /** Group the socket file is given in server mode (a gid; default: ours). */
  socketGroup?: number;
  /**
   * Server mode: an inherited listening socket to accept on instead of binding `path` (QEMU's
   * `--fd N`, systemd socket activation; UnixSocket.adoptListener). Its file is not ours: no
   * claim, chmod or unlink.
   */
  inherited?: UnixSocket;
  /** Server mode: the path already claimed by the caller (claimed here when absent). */
  claim?: SocketClaim;
  onConnect?: (s: Session) => void;
  onDisconnect?: (reason: string) => void;
}

const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 5000;

/**
 * The socket side of one device: listens (or connects) and runs one Session at a time.
 * vhost-user is one frontend per device, so a second connection is refused, not queued.
 */
export class VhostUserEndpoint {
  private listener: UnixSocket | null = null;
  private claim: SocketClaim | null = null;
  private listenPoll: PollHandle | null = null;
  private session: Session | null = null;
  private sessionPoll: PollHandle | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private backoff = BACKOFF_MIN_MS;
  private stopped = false;
  private readonly log: Logger;
  connections = 0;
  /** Refused requests by error code, over every session this endpoint ran. */
  readonly refusals = new Map<string, number>();
  /** The last device-state transfer (migration save or load), over every session. */
  lastMigration: TransferRecord | null = null;

  constructor(private readonly opts: EndpointOptions) {
    this.log = logger(opts.backend.name);
    this.claim = opts.claim ?? null;
  }

  start(): void {
    if (this.opts.mode === 'server') this.listen();
    else this.tryConnect();
  }

  get current(): Session | null { return this.session; }

  private listen(): void {
    const { path } = this.opts;
    if (this.opts.inherited) {
      this.listener = this.opts.inherited;
    } else {
      // One owner per socket: a second serve on a live path is refused, a stale file replaced.
      this.claim ??= claimSocketPath(path, (line) => this.log.warn(line));
      this.listener = UnixSocket.listen(path);
      // Group before mode: a group-accessible mode never applies to the wrong group. A frontend
      // running as another user (libvirt's libvirt-qemu) connects through them.
      if (this.opts.socketGroup !== undefined) fs.chownSync(path, -1, this.opts.socketGroup);
      fs.chmodSync(path, this.opts.socketMode ?? 0o600);
    }
    this.listenPoll = koffi.node.poll(this.listener.fd, { readable: true }, () => this.acceptAll());
  }

  private acceptAll(): void {
    for (;;) {
      let s: UnixSocket | null;
      try {
        s = this.listener!.accept();
      } catch (e) {
        this.log.error(`accept: ${(e as Error).message}`);
        return;
      }
      if (!s) return;
      // The old frontend may have hung up without our having read its EOF yet (QEMU restarts
      // race like this): drain it first so a dead session does not lock the device.
      this.session?.onReadable();
      if (this.session) {
        this.log.warn('refusing a second frontend connection while one is active');
        s.close();
        continue;
      }
      this.attach(s);
    }
  }

  private tryConnect(): void {
    this.retryTimer = null;
    if (this.stopped) return;
    let s: UnixSocket;
    try {
      s = UnixSocket.connect(this.opts.path);
    } catch (e) {
      this.log.debug(`connect ${this.opts.path}: ${(e as Error).message}; retrying in ${this.backoff} ms`);
      this.scheduleConnect();
      return;
    }
    this.backoff = BACKOFF_MIN_MS;
    this.attach(s);
  }

  private scheduleConnect(): void {
    if (this.stopped || this.retryTimer) return;
    this.retryTimer = setTimeout(() => this.tryConnect(), this.backoff);
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
  }

  private attach(sock: UnixSocket): void {
    this.connections++;
    const session = new Session(sock, this.opts.backend, (_s, reason) => this.detached(reason), this.refusals, (r) => { this.lastMigration = r; });
    this.session = session;
    this.log.info(`frontend connected (${this.opts.mode} mode, ${this.opts.path})`);
    this.sessionPoll = koffi.node.poll(sock.fd, { readable: true, disconnect: true }, () => session.onReadable());
    this.opts.onConnect?.(session);
  }

  private detached(reason: string): void {
    this.sessionPoll?.close();
    this.sessionPoll = null;
    this.session = null;
    this.log.info(`frontend disconnected: ${reason}`);
    this.opts.onDisconnect?.(reason);
    if (this.opts.mode === 'client' && !this.stopped) this.scheduleConnect();
  }

  /** Closes the session and the listener; removes the socket file we created. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    // Stop polling before close(): the fd number may be reused at once.
    this.sessionPoll?.close();
    this.sessionPoll = null;
    this.session?.close('backend shutting down');
    this.listenPoll?.close();
    this.listenPoll = null;
    if (this.listener) {
      this.listener.close();
      this.listener = null;
    }
    this.claim?.release();
    this.claim = null;
  }
}
