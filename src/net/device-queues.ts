import type { MessagePort } from 'node:worker_threads';
import { EPOLLIN, eventfdDrain, eventfdSignal } from '../sys/libc.js';
import { GuestMemory } from '../memory/guest-memory.js';
import { SplitQueue } from '../virtio/split-queue.js';
import { DirtyLog } from '../memory/dirty-log.js';
import { openHostQueue } from '../ports/open-queue.js';
import type { HostQueue } from '../ports/host-queue.js';
import type { VringConfig } from '../vhost-user/backend.js';
import { logger, type Logger } from '../log.js';
import { TestRunner } from '../sys/bpf/test-run.js';
import { MAX_HELD_REPLIES } from './device-state.js';
import { closeBpfFd } from '../sys/bpf/programs.js';
import { BURST, TX_BURST, type PathContext } from './queue-path.js';
import { RxPath } from './rx-path.js';
import { TxPath, type OffloadLink } from './tx-path.js';
import { C, COUNTERS } from './stats.js';
import { ReplyPoll } from './reply-poll.js';
import { DEFAULT_FORMAT, type FrameFormat } from './frame-format.js';
import type { Watcher } from '../datapath/watcher.js';
import type { DataAnswer, DeviceRequest, WorkerEvent } from '../datapath/messages.js';

interface Running { cfg: VringConfig; queue: SplitQueue; rx?: RxPath; tx?: TxPath; }

/**
 * One device's queues on one datapath worker: the pairs the pool assigned here, the device's
 * view of guest memory, its frame format and its offloaded program. Everything per device that
 * used to be a worker's globals, so one worker serves many devices.
 */
export class DeviceQueues {
  private readonly log: Logger;
  private readonly stats: Float64Array;
  private memory: GuestMemory | null = null;
  /** The migration dirty log (this thread's view of the session's mapping) while logging is on. */
  private dirtyLog: DirtyLog | null = null;
  private format: FrameFormat = DEFAULT_FORMAT;
  private readonly hosts = new Map<number, HostQueue>();
  private readonly vrings = new Map<number, Running>();
  private pendingVrings = new Set<number>();
  /** Swapped with pendingVrings each turn (servePending), so a turn allocates nothing. */
  private servingVrings = new Set<number>();
  /** The offloaded program for per-frame test runs (tap ports), shared by this device's RX paths. */
  private runner: { fd: number; runner: TestRunner } | null = null;
  /** The reserved pair's link to the broker (main thread), when that pair is served here. */
  private offloadPair = -1;
  private link: (OffloadLink & { pending: Uint8Array[] }) | null = null;
  /** Each pair's reply window (serve --reply-poll), kept across ring restarts: what it learnt still holds. */
  private readonly replies = new Map<number, ReplyPoll>();
  /** The pairs whose window is open now. */
  private readonly replyPolling = new Set<number>();

  /** `replyPollUs`: the bound of each pair's reply window, 0 for none (busy-polling workers need none). */
  constructor(readonly id: number, readonly name: string, stats: SharedArrayBuffer, private readonly busyPoll: boolean,
              private readonly replyPollUs: number, private readonly watcher: Watcher, private readonly port: MessagePort) {
    this.log = logger(`${name}/datapath`);
    this.stats = new Float64Array(stats);
  }

  handle(req: DeviceRequest): number | DataAnswer {
    switch (req.op) {
      case 'memory':
        this.setMemory(req.regions.length > 0 ? new GuestMemory(req.regions) : null);
        return 0;
      case 'host':
        this.closeHost(req.pair);
        if (req.cfg) {
          const h = openHostQueue(req.cfg);
          try {
            this.watcher.add(h.fd, this.vrings.has(req.pair * 2) ? EPOLLIN : 0, () => this.onHost(req.pair));
          } catch (e) {
            h.close?.();
            throw e;
          }
          this.hosts.set(req.pair, h);
          this.applyProgram(req.pair);
          this.applyClaim(req.pair);
        }
        return 0;
      case 'log':
        // Synchronous: once this returns no queue here writes to the old log, which the
        // session unmaps next.
        this.dirtyLog = req.log ? new DirtyLog(req.log) : null;
        for (const v of this.vrings.values()) v.queue.setDirtyLog(this.dirtyLog, v.cfg);
        return 0;
      case 'vring-log': {
        const run = this.vrings.get(req.index);
        if (!run) throw new Error(`vring ${req.index} is not running`);
        run.cfg = { ...run.cfg, logUsed: req.log.logUsed, logGuestAddr: req.log.logGuestAddr };
        run.queue.setDirtyLog(this.dirtyLog, run.cfg);
        return 0;
      }
      case 'format':
        this.format = req.format;
        return 0;
      case 'start':
        this.start(req.vring);
        return 0;
      case 'stop':
        return this.stop(req.index);
      case 'call': {
        const run = this.vrings.get(req.index);
        if (run) {
          (run.rx ?? run.tx)!.callFd = req.fd;
          // Used entries may have been published while the old fd was QEMU's masked one; with
          // EVENT_IDX the guest would then wait forever. One spurious interrupt is harmless.
          if (req.fd >= 0) eventfdSignal(req.fd);
        }
        return 0;
      }
      case 'xdp':
        this.setProgram(req.progFd);
        return 0;
      case 'offload':
        this.setOffload(req.pair, req.claimed);
        return 0;
      case 'offload-reply':
        this.queueReply(req.reply);
        return 0;
      case 'take-replies':
        return { data: this.link?.pending.splice(0) ?? [] };
    }
  }

  private setOffload(pair: number, claimed: boolean): void {
    if (!this.link || this.offloadPair !== pair) {
      this.offloadPair = pair;
      this.link = {
        claimed, pending: [],
        // Copied out of guest memory already (TxPath): the broker on the main thread validates it.
        post: (message) => {
          const ev: WorkerEvent = { kind: 'offload-request', device: this.id, message };
          this.port.postMessage(ev, [message.buffer as ArrayBuffer]);
        },
      };
      const tx = this.vrings.get(pair * 2 + 1)?.tx;
      if (tx) tx.offload = this.link;
    }
    const changed = this.link.claimed !== claimed;
    this.link.claimed = claimed;
    this.applyClaim(pair);
    if (changed) this.log.info(`offload pair ${pair} ${claimed ? 'claimed by the guest' : 'released: back to data use'}`);
    this.flushReplies();
  }

  /**
   * A claimed pair carries only offload messages: nothing here reads its host queue (idempotent).
   * The host stops sending to it too (the device's HostSteering holds the queue out of use).
   */
  private applyClaim(pair: number): void {
    if (pair !== this.offloadPair) return;
    const claimed = this.isClaimed(pair);
    this.applyProgram(pair);
    if (this.vrings.has(pair * 2)) this.hostArmed(pair, !claimed);
  }

  private queueReply(reply: Uint8Array): void {
    const link = this.link;
    if (!link) throw new Error('no offload pair on this worker');
    // Bounded, oldest dropped: a guest that never posts receive buffers cannot make us hoard responses (the bound migration carries too).
    if (link.pending.length >= MAX_HELD_REPLIES) link.pending.shift();
    link.pending.push(reply);
    this.flushReplies();
  }

  /**
   * Sends queued offload responses while the guest has buffers for them. Out of buffers with
   * some still held, it asks for a kick past every buffer taken: with EVENT_IDX (virtio 1.x,
   * split virtqueue notification suppression) the driver notifies only when its avail index
   * passes the device's avail_event, and each buffer popped here left avail_event behind, so a
   * refill would otherwise never wake us. Buffers may race that request: look once more.
   */
  private flushReplies(): void {
    const link = this.link;
    const rx = this.vrings.get(this.offloadPair * 2)?.rx;
    if (!link || !rx) return;
    for (;;) {
      const held = link.pending.length;
      while (link.pending.length > 0 && rx.deliverMessage(link.pending[0]!)) link.pending.shift();
      if (link.pending.length === 0) return;
      rx.queue.setKickNotification(true);
      // Nothing delivered with buffers there (a broken ring): the next kick or restart retries.
      if (rx.queue.availableCount() === 0 || link.pending.length === held) return;
    }
  }

  private isClaimed(pair: number): boolean {
    return pair === this.offloadPair && this.link !== null && this.link.claimed;
  }

  private setProgram(progFd: number): void {
    if (this.runner) {
      this.runner.runner.dispose();
      closeBpfFd(this.runner.fd);
      this.runner = null;
    }
    if (progFd >= 0) this.runner = { fd: progFd, runner: new TestRunner(progFd) };
    for (const pair of this.hosts.keys()) this.applyProgram(pair);
  }

  /**
   * The offloaded program goes to the pair's port queue (a port method: tap runs it per frame,
   * DESIGN.md decision 7); a claimed pair carries only offload messages and runs none.
   */
  private applyProgram(pair: number): void {
    this.hosts.get(pair)?.setProgram?.(this.isClaimed(pair) ? null : this.runner?.runner ?? null);
  }

  private context(pair: number): PathContext {
    return {
      name: this.name, stats: this.stats, pair,
      onBroken: (index, why) => {
        this.log.warn(`vring ${index} stopped: ${why} (device needs reset)`);
        const v = this.vrings.get(index);
        if (v && v.cfg.errFd >= 0) eventfdSignal(v.cfg.errFd);
      },
    };
  }

  private hostArmed(pair: number, armed: boolean): void {
    const h = this.hosts.get(pair);
    if (h) this.watcher.modify(h.fd, armed ? EPOLLIN : 0);
  }

  private start(cfg: VringConfig): void {
    const memory = this.memory;
    if (!memory) throw new Error(`vring ${cfg.index}: no memory table`);
    const pair = cfg.index >> 1;
    const host = this.hosts.get(pair);
    if (!host) throw new Error(`vring ${cfg.index}: no host queue for pair ${pair}`);
    if (this.vrings.has(cfg.index)) throw new Error(`vring ${cfg.index} is already running`);
    const format = this.format;
    const q = new SplitQueue(memory, { size: cfg.size, descGpa: cfg.descGpa, availGpa: cfg.availGpa, usedGpa: cfg.usedGpa },
      { eventIdx: format.eventIdx, name: `${this.name}/q${cfg.index}` });
    q.lastAvailIdx = cfg.lastAvailIdx;
    // Resume where the guest's used ring is (after a reconnect the frontend only tells us avail).
    const usedRegion = memory.regionFor(cfg.usedGpa, 4);
    q.usedIdx = usedRegion.view.getUint16(cfg.usedGpa - usedRegion.gpa + 2, true);
    q.setDirtyLog(this.dirtyLog, cfg);
    const run: Running = { cfg, queue: q };
    const ctx = this.context(pair);
    if (cfg.index % 2 === 0) {
      run.rx = new RxPath(q, cfg.index, cfg.callFd, ctx, host, memory, format);
      // Kicks on the receive queue matter only while we wait for buffers.
      q.setKickNotification(false);
    } else {
      const tx = new TxPath(q, cfg.index, cfg.callFd, ctx, host, memory, format);
      tx.offload = pair === this.offloadPair ? this.link : null;
      run.tx = tx;
    }
    this.watcher.add(cfg.kickFd, EPOLLIN, () => this.onKick(cfg.index));
    this.vrings.set(cfg.index, run);
    if (run.rx) this.hostArmed(pair, !this.isClaimed(pair));
    if (this.serve(cfg.index)) this.markPending(cfg.index);
  }

  private stop(index: number): number {
    const run = this.vrings.get(index);
    if (!run) throw new Error(`vring ${index} is not running`);
    this.watcher.remove(run.cfg.kickFd);
    this.vrings.delete(index);
    this.pendingVrings.delete(index);
    this.replyPolling.delete(index >> 1);
    if (run.rx) this.hostArmed(index >> 1, false);
    const last = run.rx ? run.rx.stop() : run.tx!.stop();
    run.rx?.free();
    run.tx?.free();
    return last;
  }

  private setMemory(next: GuestMemory | null): void {
    // The session stops every ring before it changes memory; a ring still running here would
    // read regions about to be unmapped, so stop it rather than trust that.
    for (const i of [...this.vrings.keys()]) {
      this.log.warn(`vring ${i} still running at a memory change; stopping it`);
      this.stop(i);
    }
    this.memory = next;
  }

  /** Forgets a pair's host queue; it is closed even when epoll no longer holds its fd. */
  private closeHost(pair: number): void {
    const old = this.hosts.get(pair);
    if (!old) return;
    this.hosts.delete(pair);
    try {
      this.watcher.remove(old.fd);
    } finally {
      old.close?.();
    }
  }

  /** Stops every ring and closes the host queues this worker opened; the device leaves the worker. */
  close(): void {
    this.setProgram(-1);
    for (const i of [...this.vrings.keys()]) {
      try { this.stop(i); } catch (e) { this.log.warn(`stop vring ${i}: ${(e as Error).message}`); }
    }
    for (const pair of [...this.hosts.keys()]) this.closeHost(pair);
    this.memory = null;
  }

  private markPending(index: number): void {
    this.pendingVrings.add(index);
    this.watcher.pending();
  }

  /** Runs one vring until its burst is used; returns true when it has more work. */
  private serve(index: number): boolean {
    const run = this.vrings.get(index);
    if (!run) return false;
    if (run.tx) {
      const more = run.tx.process(TX_BURST, !this.busyPoll);
      const rp = this.replies.get(index >> 1);
      if (rp?.awaiting && run.tx.lastTaken > 0 && rp.answered(performance.now())) {
        this.stats[(index >> 1) * COUNTERS.length + C.replyPollHits]! += 1;
      }
      return more;
    }
    const rx = run.rx!;
    if (this.isClaimed(index >> 1)) {
      // The offload channel: only responses go to the guest, and its buffer refills wake us.
      rx.queue.setKickNotification(true);
      this.flushReplies();
      return false;
    }
    const r = rx.process(BURST);
    if (rx.lastDelivered && this.replyPollUs > 0) this.delivered(index >> 1);
    if (r === 'starved' && !rx.starving) {
      rx.starving = true;
      this.hostArmed(index >> 1, false);
      rx.queue.setKickNotification(true);
      // Buffers may have arrived between the last pop and enabling kicks.
      if (rx.queue.availableCount() > 0) return this.wake(index);
    }
    return r === 'more';
  }

  private wake(index: number): boolean {
    const run = this.vrings.get(index);
    const pair = index >> 1;
    if (run?.rx && pair === this.offloadPair && this.link?.pending.length) this.flushReplies();
    if (run?.rx?.starving && !this.isClaimed(pair)) {
      run.rx.starving = false;
      run.rx.queue.setKickNotification(false);
      this.hostArmed(pair, true);
    }
    return this.serve(index);
  }

  private onKick(index: number): void {
    const run = this.vrings.get(index);
    if (!run) return;
    eventfdDrain(run.cfg.kickFd);
    this.stats[(index >> 1) * COUNTERS.length + C.kicks]! += 1;
    if (this.wake(index)) this.markPending(index);
  }

  private onHost(pair: number): void {
    if (this.serve(pair * 2)) this.markPending(pair * 2);
  }

  /** True while transmit completions are outstanding (ring ports: AF_XDP completions come without a wakeup). */
  inFlight(): boolean {
    for (const v of this.vrings.values()) if (v.tx && v.tx.inFlight > 0) return true;
    return false;
  }

  pollInFlight(): void {
    for (const [i, v] of this.vrings) {
      if (v.tx && v.tx.inFlight > 0 && v.tx.process(TX_BURST, !this.busyPoll)) this.markPending(i);
    }
  }

  /** Frames went into the guest on `pair`: open its reply window, if it has one. */
  private delivered(pair: number): void {
    let rp = this.replies.get(pair);
    if (!rp) this.replies.set(pair, rp = new ReplyPoll(this.replyPollUs));
    rp.delivered(performance.now());
    if (rp.windowUs > 0) {
      this.replyPolling.add(pair);
      this.stats[pair * COUNTERS.length + C.replyPolls]! += 1;
    }
  }

  /**
   * Looks at the transmit ring of every pair inside its reply window (the worker calls this
   * instead of sleeping). True while a window is still open. The clock is read only when one is.
   */
  pollReplies(): boolean {
    if (this.replyPolling.size === 0) return false;
    const now = performance.now();
    for (const pair of this.replyPolling) {
      const rp = this.replies.get(pair)!;
      if (!rp.polling(now)) {
        this.replyPolling.delete(pair);
        continue;
      }
      const i = pair * 2 + 1;
      if (!this.vrings.has(i)) continue;
      if (this.serve(i)) this.markPending(i);
      if (!rp.awaiting) this.replyPolling.delete(pair);
    }
    return this.replyPolling.size > 0;
  }

  servePending(): void {
    const again = this.pendingVrings;
    this.pendingVrings = this.servingVrings;
    this.servingVrings = again;
    for (const i of again) if (this.serve(i)) this.markPending(i);
    again.clear();
  }

  serveAll(): void {
    for (const i of this.vrings.keys()) this.serve(i);
  }
}
