import { Worker, MessageChannel, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { BackendRefusal } from '../vhost-user/backend.js';
import { eventfdCreate, eventfdSignal, closeFd } from '../sys/libc.js';
import { CTL_SEQ, CTL_STATUS, CTL_VALUE, type DatapathEvent, type DatapathRequest, type DatapathWorkerData } from './datapath-messages.js';

const workerUrl = new URL('./datapath-worker.js', import.meta.url);
const REQUEST_TIMEOUT_MS = 5000;

/** The datapath refused or failed a request; the session logs it as a refusal of the request. */
export class DatapathError extends BackendRefusal {
  constructor(message: string) {
    super(message);
    this.name = 'DatapathError';
  }
}

/**
 * Main-thread handle of one datapath worker. Requests are synchronous: vhost-user handlers
 * (GET_VRING_BASE, SET_MEM_TABLE) must know the worker has let go before they answer.
 */
export class DatapathThread {
  private readonly worker: Worker;
  private readonly port: MessagePort;
  private readonly controlFd: number;
  private readonly control = new SharedArrayBuffer(12);
  private readonly ctl = new Int32Array(this.control);
  private seq = 0;
  private dead: string | null = null;

  constructor(readonly name: string, stats: SharedArrayBuffer, readonly pairs: number[], busyPoll: boolean, onEvent: (e: DatapathEvent) => void = () => {}) {
    this.controlFd = eventfdCreate(true);
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    const wd: DatapathWorkerData & { port: MessagePort } = {
      name, controlFd: this.controlFd, control: this.control, stats, busyPoll, pairs, port: port2,
    };
    this.worker = new Worker(workerUrl, { workerData: wd, transferList: [port2] });
    this.worker.on('error', (e) => { this.dead = `worker error: ${e.message}`; });
    this.worker.on('message', (m: DatapathEvent | { ready: true }) => { if ('kind' in m) onEvent(m); });
    this.worker.on('exit', (code) => { this.dead ??= `worker exited (${code})`; });
    this.worker.unref();
  }

  /** A request whose answer is an object (posted by the worker beside the status word). */
  call(req: DatapathRequest): unknown {
    this.request(req);
    for (let m = receiveMessageOnPort(this.port); m; m = receiveMessageOnPort(this.port)) {
      const msg = m.message as { seq: number; result?: unknown };
      if (msg.seq === this.seq && 'result' in msg) return msg.result;
    }
    return undefined;
  }

  request(req: DatapathRequest): number {
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
      let message = 'request failed';
      for (let m = receiveMessageOnPort(this.port); m; m = receiveMessageOnPort(this.port)) {
        const msg = m.message as { seq: number; error: string };
        if (msg.seq === seq) message = msg.error;
      }
      throw new DatapathError(`${this.name}: ${req.op}: ${message}`);
    }
    return Atomics.load(this.ctl, CTL_VALUE);
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
