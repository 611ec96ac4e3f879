import { rateLimited, type Logger } from '../log.js';
import { OffloadBroker, type OffloadDetach, type OffloadProgram, type OffloadProgramInfo, type OffloadShow } from '../offload/broker.js';
import type { VerdictCounters } from '../offload/migration.js';
import { validateQuotas, type Quotas, type QuotaUsage } from '../offload/quotas.js';
import { MigrationStateError } from '../offload/errors.js';
import { objectLoadTimeoutMs } from '../offload/object-commands.js';
import type { KernelAttach, ProgramSource } from '../ports/port.js';

/** What the channel needs from its device: where replies, claims and programs go. */
export interface OffloadSink {
  /** A response for the guest, delivered on the reserved pair's receive ring. */
  reply(message: Uint8Array): void;
  claimChanged(claimed: boolean): void;
  /** Tap ports: the program to test-run on every host->guest frame changed. */
  programChanged(program: OffloadProgram | null): void;
}

export interface OffloadChannelOptions {
  device: string;
  pinDir: string | null;
  /**
   * The port's own way to attach a program (Port.attachProgram: xsk runs it natively at its
   * veth end); without one, programs go to the datapath to test-run per frame (sink.programChanged).
   */
  attach?: (source: ProgramSource | null, warn: (message: string) => void) => string;
  /**
   * Tap ports (Port.attachInKernel): the program runs in the kernel at the tap's tc egress
   * when it can be translated, else the datapath test-runs it (sink.programChanged).
   */
  attachInKernel?: (source: ProgramSource | null) => KernelAttach;
  /** The host interface, for log lines. */
  ifname?: string;
  log: Logger;
}

/** Where the offloaded program runs: natively at the xsk port's veth, at a tap's tc egress, or per frame through BPF_PROG_TEST_RUN. */
export type OffloadPath = 'xdp-native' | 'tap-tc' | 'tap-test-run';
/** Why a tap's program is test-run per frame rather than run at its tc egress: the refusing rule's code and the line. */
export type OffloadFallback = { code: string; reason: string };

/**
 * The reserved pair's broker, on the main thread with the rest of the control plane: requests
 * arrive from whichever worker serves the pair (copied out of guest memory there), replies go
 * back to it. Control messages are rare; a thread hop each costs microseconds, and the broker's
 * state (maps, program, pins) then lives in one place whatever worker the pair moves to.
 */
/** Guest requests that may wait behind a pending one; the guest's next ones are answered BUSY at once. */
export const MAX_QUEUED_REQUESTS = 64;
/** What settled() allows past the loader's own timeout: the killed child's exit and its fds. */
const SETTLE_MARGIN_MS = 2000;

export class OffloadChannel {
  readonly broker: OffloadBroker;
  /** The pending request's answer, delivered (null: none pending). */
  private inFlight: Promise<void> | null = null;
  private closed = false;
  private readonly queue: Uint8Array[] = [];
  /** A guest can send overflowing requests at will: one log line a second at most. */
  private readonly overflowLog = rateLimited((m) => this.opts.log.warn(m), 1000);
  /** Bumped when the device resets: answers to the requests of the guest before it are dropped. */
  private generation = 0;
  private inKernel = false;
  /** Why the tap's program is on test-run (a rule code), null when it is not. */
  private fallback: OffloadFallback | null = null;

  constructor(private readonly opts: OffloadChannelOptions, private readonly sink: OffloadSink) {
    const b = OffloadBroker.restore({ device: opts.device, pinDir: opts.pinDir, log: (l) => opts.log.info(l) });
    this.broker = b;
    if (b.claimed) opts.log.info(`re-adopted pinned offload state from ${opts.pinDir}`);
    b.onClaimChange((claimed) => sink.claimChanged(claimed));
    b.onProgramChange((p) => this.programChanged(p));
    if (opts.attach) this.attachInPort();
    else if (opts.attachInKernel && b.program) this.tryKernel(b.program, false);
  }

  get claimed(): boolean { return this.broker.claimed; }
  get program(): OffloadProgram | null { return this.broker.program; }

  /** The program the datapath must run per frame: none when the port runs it in the kernel. */
  get datapathProgram(): OffloadProgram | null {
    return this.opts.attach || this.inKernel ? null : this.broker.program;
  }

  /** Where the current program runs (null: no program). */
  get path(): OffloadPath | null {
    if (!this.broker.program) return null;
    if (this.opts.attach) return 'xdp-native';
    return this.inKernel ? 'tap-tc' : 'tap-test-run';
  }

  /** Why a tap's program runs on test-run rather than at tc egress. */
  get fallbackReason(): OffloadFallback | null { return this.path === 'tap-test-run' ? this.fallback : null; }

  /**
   * One request from the guest; the broker copies nothing it has not checked. Answered on the
   * spot unless one is pending (an OBJ_LOAD waiting on its loader child): then it queues behind
   * it, so the device's requests run and are answered in the order the guest sent them, and no
   * request of this guest changes the broker while its load is in flight.
   */
  handle(message: Uint8Array): void {
    if (this.closed) return;
    if (this.inFlight) {
      if (this.queue.length >= MAX_QUEUED_REQUESTS) {
        // Answered at once, ahead of the requests it could not join: every request gets an answer.
        this.overflowLog(`device ${this.opts.device}: offload request answered BUSY: ${MAX_QUEUED_REQUESTS} requests already wait behind a pending OBJ_LOAD`);
        this.reply(this.broker.busy(message, MAX_QUEUED_REQUESTS));
        return;
      }
      this.queue.push(message);
      return;
    }
    this.run(message);
  }

  /** Runs requests until one is pending or none is left. */
  private run(first: Uint8Array): void {
    let message: Uint8Array | undefined = first;
    while (message && !this.closed) {
      const out = this.broker.serve(message);
      if (out instanceof Promise) {
        const generation = this.generation;
        this.inFlight = out.then((reply) => {
          this.inFlight = null;
          if (this.closed) return;
          if (generation === this.generation) this.reply(reply);
          else this.opts.log.debug('offload answer dropped: its request came before the device was reset');
          const next = this.queue.shift();
          if (next) this.run(next);
        });
        return;
      }
      this.reply(out);
      message = this.queue.shift();
    }
  }

  private reply(message: Uint8Array): void {
    try { this.sink.reply(message); } catch (e) { this.opts.log.error(`offload reply lost: ${(e as Error).message}`); }
  }

  private programChanged(p: OffloadProgram | null): void {
    if (this.opts.attach) this.attachInPort();
    else if (this.opts.attachInKernel) this.tryKernel(p, true);
    else this.sink.programChanged(p);
    this.opts.log.info(p ? `offloaded program ${p.id} (tag ${p.tag}, ${p.insns} insns) runs on host->guest frames` : 'no offloaded program');
  }

  /**
   * Tap: the kernel first. Whichever way the program goes, the new one is in place before the
   * old one is taken away (a frame may meet both for an instant, never neither): in the kernel
   * the link swaps programs atomically and the datapath is told after; on test-run the datapath
   * gets the new program before the tc program goes.
   */
  private tryKernel(p: OffloadProgram | null, tellDatapath: boolean): void {
    const log = this.opts.log;
    const attach = this.opts.attachInKernel!;
    let inKernel = false;
    this.fallback = null;
    if (p) {
      const source = this.broker.programSource;
      let r: { line: string; inKernel: boolean; code?: string };
      if (!source) {
        r = { line: 'the program was re-adopted from pins without a source that passes the checks again', inKernel: false, code: 'tc-no-source' };
      } else {
        try {
          r = attach(source);
        } catch (e) {
          r = { line: (e as Error).message, inKernel: false, code: (e as { code?: string }).code ?? 'tc-attach-failed' };
        }
      }
      inKernel = r.inKernel;
      if (inKernel) {
        log.info(r.line);
      } else {
        this.fallback = { code: r.code ?? 'tc-refused', reason: r.line };
        log.warn(`tap ${this.opts.ifname ?? '?'}: offloaded program ${p.id} stays on per-frame BPF_PROG_TEST_RUN (tap-test-run), not at the tap's tc egress: ${r.line} [${this.fallback.code}]. `
          + 'Every host->guest frame then costs a read and a test-run syscall, dropped or not: the xsk port is the fast path for offload');
      }
    }
    this.inKernel = inKernel;
    if (tellDatapath) this.sink.programChanged(inKernel ? null : p);
    if (!inKernel) {
      try { attach(null); } catch (e) { log.error(`tc egress program not removed: ${(e as Error).message}`); }
    }
  }

  /** The port runs the program itself (in the kernel): it attaches it, the datapath never sees it. */
  private attachInPort(): void {
    const log = this.opts.log;
    try {
      log.info(this.opts.attach!(this.broker.programSource, (m) => log.warn(m)));
    } catch (e) {
      log.error(`offloaded program not attached to the port: ${(e as Error).message}`);
    }
  }

  /** Whether a guest request (an OBJ_LOAD waiting on its loader child) is still to be answered. */
  get pending(): boolean { return this.inFlight !== null; }

  /**
   * Resolves once no request is pending, the ones queued behind it answered too: what the
   * migration state must show (an object still loading would otherwise be left out, and its
   * guest told it loaded on a host it is leaving). Bounded: a load ends within its loader's
   * timeout (the default wait), but a guest could queue load after load; past `timeoutMs` this
   * rejects with 'state-load-pending', which fails the migration while the source runs on.
   */
  async settled(timeoutMs = objectLoadTimeoutMs() + SETTLE_MARGIN_MS): Promise<void> {
    const until = Date.now() + timeoutMs;
    while (this.inFlight && !this.closed) {
      const left = until - Date.now();
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), Math.max(left, 0)); });
      const timedOut = await Promise.race([this.inFlight.then(() => false), late]);
      clearTimeout(timer);
      if (timedOut) {
        throw new MigrationStateError('state-load-pending',
          `device ${this.opts.device}: a guest request (OBJ_LOAD) was still pending after ${timeoutMs} ms; the state cannot leave without it`);
      }
    }
  }

  /** The offload section of the device's migration state (read-only: the source keeps running). */
  exportState(counters: VerdictCounters): Uint8Array {
    return this.broker.exportState({ counters });
  }

  /** Fills the fresh broker from a migrating guest's state; the listeners attach its program. */
  importState(bytes: Uint8Array): VerdictCounters | null {
    return this.broker.importState(bytes).counters;
  }

  show(): OffloadShow { return this.broker.show(); }
  programInfo(): OffloadProgramInfo | null { return this.broker.programInfo(); }
  get bpfPrefix(): string { return this.broker.bpfPrefix; }
  get requests(): { total: number; byStatus: Record<string, number> } { return this.broker.requests; }
  quotas(): { limits: Quotas; usage: QuotaUsage } { return this.broker.quotas(); }
  setQuotas(changes: Record<string, unknown>): { limits: Quotas; usage: QuotaUsage; warnings: string[] } {
    return this.broker.setQuotas(validateQuotas(changes));
  }
  detach(): OffloadDetach { return this.broker.detach(); }
  /**
   * The guest reset its device: what its old driver asked is void. Requests still queued go;
   * a pending OBJ_LOAD's child is killed by the broker's reset (its result would be discarded)
   * and its answer dropped, so the new driver's first requests wait milliseconds, not seconds.
   */
  reset(reason: string): void {
    this.generation++;
    this.queue.length = 0;
    if (this.broker.claimed) this.broker.reset(reason);
  }

  close(): void {
    this.closed = true;
    this.queue.length = 0;
    this.broker.close();
  }
}

