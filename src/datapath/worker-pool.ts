import os from 'node:os';
import { logger } from '../log.js';
import { WorkerHandle } from './worker-handle.js';
import type { WorkerEvent } from './messages.js';
import type { WorkerPlacement } from './placement.js';

const log = logger('datapath');

/** A device as the pool sees it: where its workers' events go, and how to move one of its pairs. */
export interface PoolClient {
  readonly name: string;
  onWorkerEvent(e: WorkerEvent): void;
  /**
   * Moves a running pair to another worker (stop, reassign, start again at the same ring
   * position). False when it did not move (not placed, or already on `to`): the pool tries another.
   */
  relocate(pair: number, to: number): boolean;
}

export interface PoolOptions {
  /** Worker threads at most; they start as queues need them. */
  workers: number;
  busyPoll: boolean;
  /** Bound of each queue pair's reply window in µs (serve --reply-poll); 0 or absent: none, and none with busyPoll. */
  replyPollUs?: number;
  /** CPUs and nice value the workers give themselves (serve --worker-cpus, --worker-nice). */
  placement?: WorkerPlacement;
}

/** Where each running queue pair is served, for `status` and tests. */
export interface Placement {
  worker: number;
  /** Kernel thread id (/proc/PID/task/TID); 0 until the worker has started. */
  threadId: number;
  /** The CPU it is pinned to, or null (it runs where the process may). */
  cpu: number | null;
  /** The nice value it set itself to, or null (inherited). */
  nice: number | null;
  /** Its SCHED_FIFO priority, or null (the policy it inherited). */
  fifo: number | null;
  /** The EEVDF slice in µs it asked for, or null (the kernel's base slice). */
  slice: number | null;
  /** The bound of its reply windows in µs, or null (none, or busy-polling). */
  replyPoll: number | null;
  queues: { device: string; pair: number }[];
}

/** The cores this process may run on (sched affinity), the default pool size. */
export function defaultWorkers(): number {
  return Math.max(1, os.availableParallelism());
}

/**
 * A fixed pool of datapath threads shared by every device of the process. Each V8 isolate
 * costs about 12.5 MB: a thread per device made a host with 200 VMs spend 2.5 GB on
 * networking. Queue pairs are assigned when they start, to the worker serving the fewest
 * pairs, and moved when devices leave the pool unbalanced by two pairs or more.
 */
export class WorkerPool {
  private readonly handles: (WorkerHandle | null)[];
  private readonly load: number[];
  private readonly clients = new Map<number, PoolClient>();
  /** `${device}:${pair}` → worker index. */
  private readonly assigned = new Map<string, number>();
  private nextDevice = 1;
  private rebalancing = false;
  private closed = false;
  /** What each worker's reply windows are bounded by: none beside busy-poll, which polls anyway. */
  private readonly replyPollUs: number;

  constructor(readonly opts: PoolOptions) {
    if (!Number.isInteger(opts.workers) || opts.workers < 1 || opts.workers > 256) {
      throw new RangeError(`workers ${opts.workers} outside 1..256`);
    }
    this.handles = new Array<WorkerHandle | null>(opts.workers).fill(null);
    this.load = new Array<number>(opts.workers).fill(0);
    this.replyPollUs = opts.busyPoll ? 0 : opts.replyPollUs ?? 0;
  }

  get size(): number { return this.handles.length; }

  /** A device joins the pool; the number names it in every request to a worker. */
  register(client: PoolClient): number {
    const id = this.nextDevice++;
    this.clients.set(id, client);
    return id;
  }

  unregister(device: number): void {
    this.clients.delete(device);
  }

  worker(index: number): WorkerHandle {
    let h = this.handles[index];
    if (!h) {
      if (this.closed) throw new Error('the worker pool is closed');
      h = new WorkerHandle(`datapath/w${index}`, index, this.opts.busyPoll, this.replyPollUs, this.opts.placement ?? {}, (e) => this.clients.get(e.device)?.onWorkerEvent(e));
      this.handles[index] = h;
      log.debug(`worker ${index} started`);
    }
    return h;
  }

  /** The worker serving a pair, or -1. */
  workerOf(device: number, pair: number): number {
    return this.assigned.get(`${device}:${pair}`) ?? -1;
  }

  /** Gives a starting pair a worker: the one serving fewest pairs (lowest index on a tie). */
  assign(device: number, pair: number, to = -1): number {
    const key = `${device}:${pair}`;
    const have = this.assigned.get(key);
    if (have !== undefined) return have;
    let w = to;
    if (w < 0) {
      w = 0;
      for (let i = 1; i < this.load.length; i++) if (this.load[i]! < this.load[w]!) w = i;
    }
    this.assigned.set(key, w);
    this.load[w]!++;
    return w;
  }

  /** A pair stopped: its worker serves one pair fewer, and the pool may move another to even out. */
  release(device: number, pair: number): void {
    const key = `${device}:${pair}`;
    const w = this.assigned.get(key);
    if (w === undefined) return;
    this.assigned.delete(key);
    this.load[w]!--;
    this.rebalance();
  }

  /** Moves pairs from the busiest worker to the idlest while they differ by two or more. */
  private rebalance(): void {
    if (this.rebalancing || this.closed) return;
    this.rebalancing = true;
    try {
      for (let moves = 0; moves < this.assigned.size; moves++) {
        let hi = 0;
        let lo = 0;
        for (let i = 1; i < this.load.length; i++) {
          if (this.load[i]! > this.load[hi]!) hi = i;
          if (this.load[i]! < this.load[lo]!) lo = i;
        }
        if (this.load[hi]! - this.load[lo]! < 2) return;
        if (!this.moveOne(hi, lo)) return;
      }
    } finally {
      this.rebalancing = false;
    }
  }

  private moveOne(from: number, to: number): boolean {
    for (const [key, w] of [...this.assigned]) {
      if (w !== from) continue;
      const [device, pair] = key.split(':').map(Number) as [number, number];
      const client = this.clients.get(device);
      if (!client) continue;
      try {
        if (client.relocate(pair, to)) {
          log.info(`${client.name}: pair ${pair} moved from worker ${from} to worker ${to}`);
          return true;
        }
      } catch (e) {
        log.error(`${client.name}: moving pair ${pair} to worker ${to}: ${(e as Error).message}`);
      }
    }
    return false;
  }

  /** Moves an assignment (the device has stopped the pair on `from` and starts it on `to`). */
  reassign(device: number, pair: number, to: number): void {
    const key = `${device}:${pair}`;
    const w = this.assigned.get(key);
    if (w !== undefined) this.load[w]!--;
    this.assigned.set(key, to);
    this.load[to]!++;
  }

  placement(): Placement[] {
    const { cpus, nice, fifo, slice } = this.opts.placement ?? {};
    return this.handles.map((h, i) => ({
      worker: i,
      threadId: h?.threadId ?? 0,
      cpu: cpus && cpus.length > 0 ? cpus[i % cpus.length]! : null,
      nice: nice ?? null,
      fifo: fifo ?? null,
      slice: fifo === undefined && slice ? slice : null,
      replyPoll: this.replyPollUs || null,
      queues: [...this.assigned].filter(([, w]) => w === i).map(([key]) => {
        const [device, pair] = key.split(':').map(Number) as [number, number];
        return { device: this.clients.get(device)?.name ?? String(device), pair };
      }),
    }));
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const h of this.handles) await h?.terminate();
    this.handles.fill(null);
  }
}
