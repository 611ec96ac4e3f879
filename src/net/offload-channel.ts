import type { Logger } from '../log.js';
import { OffloadBroker, type OffloadProgram, type OffloadShow } from '../offload/broker.js';
import type { VerdictCounters } from '../offload/migration.js';
import { validateQuotas, type Quotas, type QuotaUsage } from '../offload/quotas.js';
import { ComposedProgram } from '../offload/compose.js';
import { xdpAttach, XDP_FLAGS_DRV_MODE } from '../sys/bpf/xdp.js';
import { setBounceReceive, type XskOffloadTarget } from '../ports/xsk.js';

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
  /** On an xsk port the program runs natively on the backend's veth end, composed with the XSKMAP redirect. */
  xsk?: XskOffloadTarget;
  log: Logger;
}

/**
 * The reserved pair's broker, on the main thread with the rest of the control plane: requests
 * arrive from whichever worker serves the pair (copied out of guest memory there), replies go
 * back to it. Control messages are rare; a thread hop each costs microseconds, and the broker's
 * state (maps, program, pins) then lives in one place whatever worker the pair moves to.
 */
export class OffloadChannel {
  readonly broker: OffloadBroker;
  private composed: ComposedProgram | null = null;

  constructor(private readonly opts: OffloadChannelOptions, private readonly sink: OffloadSink) {
    const b = OffloadBroker.restore({ device: opts.device, pinDir: opts.pinDir, log: (l) => opts.log.info(l) });
    this.broker = b;
    if (b.claimed) opts.log.info(`re-adopted pinned offload state from ${opts.pinDir}`);
    b.onClaimChange((claimed) => sink.claimChanged(claimed));
    b.onProgramChange((p) => this.programChanged(p));
    if (opts.xsk) this.attachComposed();
  }

  get claimed(): boolean { return this.broker.claimed; }
  get program(): OffloadProgram | null { return this.broker.program; }

  /** One request from the guest; the broker copies nothing it has not checked. */
  handle(message: Uint8Array): void {
    this.sink.reply(this.broker.handle(message));
  }

  private programChanged(p: OffloadProgram | null): void {
    if (this.opts.xsk) this.attachComposed();
    else this.sink.programChanged(p);
    this.opts.log.info(p ? `offloaded program ${p.id} (tag ${p.tag}, ${p.insns} insns) runs on host->guest frames` : 'no offloaded program');
  }

  /**
   * AF_XDP: the guest program runs in the kernel at the veth's ingress, composed with the
   * redirect to this device's sockets; nothing runs per frame in JavaScript.
   */
  private attachComposed(): void {
    const xsk = this.opts.xsk!;
    const src = this.broker.programSource;
    let next: ComposedProgram | null = null;
    try {
      if (src) next = ComposedProgram.load(src.code, { xskMapFd: xsk.xskMapFd, name: 'vx_xsk_guest' }, src.license);
      xdpAttach(xsk.peerIfindex, next ? next.fd : xsk.redirectFd, XDP_FLAGS_DRV_MODE);
    } catch (e) {
      next?.close();
      this.opts.log.error(`offloaded program not attached to the veth: ${(e as Error).message}`);
      return;
    }
    // The attached program holds its own reference: the previous one can go.
    this.composed?.close();
    this.composed = next;
    try {
      setBounceReceive(xsk, next !== null);
    } catch (e) {
      this.opts.log.warn(`host end of the veth: ${(e as Error).message} (XDP_TX bounces may not reach the host)`);
    }
    this.opts.log.info(next ? `composed program ${next.id} (guest program + AF_XDP redirect) attached natively` : 'plain AF_XDP redirect attached');
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
  quotas(): { limits: Quotas; usage: QuotaUsage } { return this.broker.quotas(); }
  setQuotas(changes: Record<string, unknown>): { limits: Quotas; usage: QuotaUsage; warnings: string[] } {
    return this.broker.setQuotas(validateQuotas(changes));
  }
  detach(): boolean { return this.broker.detach(); }
  reset(reason: string): void {
    if (this.broker.claimed) this.broker.reset(reason);
  }

  close(): void {
    this.composed?.close();
    this.composed = null;
    this.broker.close();
  }
}
