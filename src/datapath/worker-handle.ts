import { Worker, MessageChannel, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { BackendRefusal } from '../vhost-user/backend.js';
import { eventfdCreate, eventfdSignal, closeFd } from '../sys/libc.js';
import type { WorkerPlacement } from './placement.js';
import { CTL_SEQ, CTL_STATUS, CTL_TID, CTL_VALUE, type WorkerEvent, type WorkerRequest, type WorkerData } from './messages.js';

const workerUrl = new URL('./worker.js', import.meta.url);
const REQUEST_TIMEOUT_MS = 5000;
const YOUNG_GENERATION_MB = 2;

/** The datapath refused or failed a request; the session logs it as a refusal of the request. */
export class DatapathError extends BackendRefusal {
  constructor(message: string) {
    super(message, 'datapath-failed');
  }
}

/**
 * Main-thread handle of one datapath worker. Requests are synchronous: vhost-user handlers
 * (GET_VRING_BASE, SET_MEM_TABLE) must know the worker has let go before they answer. The
 * worker takes them between bursts, so a queue never changes hands mid-chain.
 */
export class WorkerHandle {
  private readonly worker: Worker;
  private readonly port: MessagePort;
  private readonly controlFd: number;
  private readonly control = new SharedArrayBuffer(16);
  private readonly ctl = new Int32Array(this.control);
  private seq = 0;
  private dead: string | null = null;

  constructor(readonly name: string, readonly index: number, busyPoll: boolean, replyPollUs: number, placement: WorkerPlacement, onEvent: (e: WorkerEvent) => void) {
    this.controlFd = eventfdCreate(true);
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    const wd: WorkerData & { port: MessagePort } = { name, controlFd: this.controlFd, control: this.control, busyPoll, replyPollUs, index, placement, port: port2 };
    // The datapath allocates nothing per frame: a small young generation is plenty, and every
    // worker's semi-spaces are resident memory the process pays whatever it serves.
    this.worker = new Worker(workerUrl, { workerData: wd, transferList: [port2], resourceLimits: { maxYoungGenerationSizeMb: YOUNG_GENERATION_MB } });
    this.worker.on('error', (e) => { this.dead = `worker error: ${e.message}`; });
    this.worker.on('message', (m: WorkerEvent | { ready: true }) => { if ('kind' in m) onEvent(m); });
    this.worker.on('exit', (code) => { this.dead ??= `worker exited (${code})`; });
    this.worker.unref();
  }

  /** The kernel thread id the worker reported (/proc/PID/task/TID), for `status`; 0 before it started. */
  get threadId(): number { return Atomics.load(this.ctl, CTL_TID); }

  request(req: WorkerRequest): number {
    if (this.dead) throw new DatapathError(`${this.name}: ${this.dead}`);
    const seq = ++this.seq;
    this.port.postMessage({ seq, req });
    eventfdSignal(this.controlFd);
    const deadline = Date.now() + REQUEST_TIMEOUT_MS;
    for (;;) {
      const answered = Atomics.load(this.ctl, CTL_SEQ);
      if (answered === seq) break;
      const left = deadline - Date.now();
      if (left <= 0 || this.dead) {
        this.dead ??= `no answer to ${req.op} within ${REQUEST_TIMEOUT_MS} ms`;
        throw new DatapathError(`${this.name}: ${this.dead}`);
      }
      Atomics.wait(this.ctl, CTL_SEQ, answered, Math.min(left, 100));
    }
    if (Atomics.load(this.ctl, CTL_STATUS) !== 0) {
      const message = (this.answer(seq, 'error') as string | undefined) ?? 'request failed';
      const what = req.op === 'device' ? req.req.op : req.op;
      throw new DatapathError(`${this.name}: ${what}: ${message}`);
    }
    return Atomics.load(this.ctl, CTL_VALUE);
  }

  /**
   * A request the caller need not wait for: the worker takes it between bursts, in order with
   * every other request (a later request() is answered only after it), and logs its failure
   * itself. For work the main thread hands over, not for changes a vhost-user reply depends on.
   */
  post(req: WorkerRequest): void {
    if (this.dead) throw new DatapathError(`${this.name}: ${this.dead}`);
    this.port.postMessage({ seq: ++this.seq, req, posted: true });
    eventfdSignal(this.controlFd);
  }

  /** A request the worker answers with data (DataAnswer); undefined when it posted none. */
  requestData(req: WorkerRequest): unknown {
    this.request(req);
    return this.answer(this.seq, 'data');
  }

  /** Drains what the worker posted on the request port; `key` of the message for `seq`, if any. */
  private answer(seq: number, key: 'error' | 'data'): unknown {
    let found: unknown;
    for (let m = receiveMessageOnPort(this.port); m; m = receiveMessageOnPort(this.port)) {
      const msg = m.message as { seq: number; error?: string; data?: unknown };
      if (msg.seq === seq && key in msg) found = msg[key];
    }
    return found;
  }

  async terminate(): Promise<void> {
    if (!this.dead) {
      try { this.request({ op: 'exit' }); } catch { /* already gone */ }
    }
    await this.worker.terminate().catch(() => 0);
    this.port.close();
    closeFd(this.controlFd);
  }
}
