import { logger, type Logger } from '../log.js';
import { bit, hasBit } from '../vhost-user/protocol.js';
import { BackendRefusal, type VhostUserBackend, type VringConfig } from '../vhost-user/backend.js';
import type { RegionInfo } from '../memory/guest-memory.js';
import type { Port } from '../ports/port.js';
import { OFFERED_FEATURES, OFFERED_PROTOCOL_FEATURES, NetFeature as F, describeFeatures, vnetHeaderLength } from './features.js';
import { DeviceStats } from './stats.js';
import { DatapathThread } from './datapath-thread.js';
import type { OffloadProgram, OffloadShow } from '../offload/broker.js';
import type { Quotas, QuotaUsage } from '../offload/quotas.js';
import { ETH_HLEN, TX_CSUM, TX_TSO4, TX_TSO6, TX_ECN, type OffloadInit } from './datapath-messages.js';
import { progGetFdById } from '../sys/bpf/programs.js';
import type { FrameFormat } from './datapath-messages.js';
import type { XskOffloadTarget } from '../ports/xsk.js';

export interface NetDeviceOptions {
  name: string;
  port: Port;
  /** Queue pairs offered to the frontend (the port must have as many queues). */
  queuePairs: number;
  /** Datapath worker threads; queue pairs are dealt out round-robin. */
  threads: number;
  busyPoll: boolean;
  /** MTU used before (or without) NET_SET_MTU. */
  mtu?: number;
  /** With offload, the last queue pair is the reserved offload pair (docs/offload-protocol.md). */
  offload?: OffloadInit | null;
}

const VLAN_HLEN = 4;
const MAX_GSO_FRAME = 65550;

/**
 * The virtio-net device behind one vhost-user socket: negotiates features, applies MTU and
 * offloads to its port, and hands running vrings to its datapath threads.
 */
export class NetDevice implements VhostUserBackend {
  readonly name: string;
  readonly stats: DeviceStats;
  readonly port: Port;
  private readonly threads: DatapathThread[];
  private readonly log: Logger;
  private features = 0n;
  private mtu: number;
  private readonly running = new Set<number>();
  connected = false;
  /** Set while the process shuts down: offload state then stays pinned for the next process. */
  shuttingDown = false;
  /** The offload broker, which runs on the datapath thread of the offload pair. */
  readonly broker: OffloadHandle | null;
  readonly offloadPair: number;
  lastResetReason = '';

  constructor(private readonly opts: NetDeviceOptions) {
    this.name = opts.name;
    this.port = opts.port;
    this.log = logger(opts.name);
    this.mtu = opts.mtu ?? 1500;
    this.stats = new DeviceStats(opts.queuePairs);
    const n = Math.max(1, Math.min(opts.threads, opts.queuePairs));
    this.offloadPair = opts.offload ? opts.queuePairs - 1 : -1;
    this.threads = Array.from({ length: n }, (_, t) => {
      const pairs = Array.from({ length: opts.queuePairs }, (_, p) => p).filter((p) => p % n === t);
      return new DatapathThread(`${opts.name}/t${t}`, this.stats.shared, pairs, opts.busyPoll, (e) => {
        if (e.kind === 'offload-state') this.offloadState(e.claimed, e.program);
      });
    });
    // Queues over guest RAM (AF_XDP) open when their pair starts; the others open now.
    if (!opts.port.needsGuestMemory) {
      for (let p = 0; p < opts.queuePairs; p++) this.threadFor(p).request({ op: 'host', pair: p, cfg: opts.port.queueConfig(p) });
    }
    this.broker = opts.offload ? new OffloadHandle(this.threadFor(this.offloadPair)) : null;
    if (opts.offload && opts.port.needsGuestMemory) {
      // The xsk port's offload pair is never a data pair: keep host traffic on the others.
      try { opts.port.setQueueEnabled(this.offloadPair, false); } catch (e) { this.log.warn(`offload pair steering: ${(e as Error).message}`); }
    }
    if (opts.offload) {
      const target = (this.port as { offloadTarget?: XskOffloadTarget }).offloadTarget;
      const init = target ? { ...opts.offload, xsk: target } : opts.offload;
      this.threadFor(this.offloadPair).request({ op: 'offload', pair: this.offloadPair, init });
    }
  }

  /** The broker's thread reports claim and program changes; the others get their own program fd. */
  private offloadState(claimed: boolean, program: OffloadProgram | null): void {
    const owner = this.threadFor(this.offloadPair);
    const changed = program?.id !== this.broker?.program?.id;
    this.broker?.update(claimed, program);
    // On ports over guest RAM the program runs in the kernel (attached by the broker's thread):
    // the other threads have no per-frame test run to feed.
    if (!changed || this.port.needsGuestMemory) return;
    for (const t of this.threads) {
      if (t === owner) continue;
      let fd = -1;
      if (program) {
        try { fd = progGetFdById(program.id); } catch (e) { this.log.error(`offloaded program ${program.id}: ${(e as Error).message}`); }
      }
      t.request({ op: 'xdp', progFd: fd });
    }
    this.log.info(program ? `offloaded program ${program.id} (tag ${program.tag}, ${program.insns} insns) runs on host->guest frames` : 'no offloaded program');
  }

  vringStopRequested(index: number): void {
    if (this.broker?.claimed && index >> 1 === this.offloadPair) {
      // The guest reset its device (driver unload, reboot): its offload state is gone with it.
      this.broker.reset('the guest stopped the device');
    }
  }

  private threadFor(pair: number): DatapathThread {
    return this.threads[pair % this.threads.length]!;
  }

  deviceFeatures(): bigint {
    let f = OFFERED_FEATURES;
    if (this.opts.queuePairs < 2) f &= ~bit(F.MQ);
    // A port that carries plain frames (AF_XDP) cannot finish checksums or segment for anyone.
    if (this.port.offloads === false) {
      for (const b of [F.CSUM, F.GUEST_CSUM, F.CTRL_GUEST_OFFLOADS, F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_ECN, F.HOST_TSO4, F.HOST_TSO6, F.HOST_ECN]) f &= ~bit(b);
    }
    return f;
  }

  protocolFeatures(): bigint {
    return OFFERED_PROTOCOL_FEATURES;
  }

  maxQueuePairs(): number {
    return this.opts.queuePairs;
  }

  get negotiated(): bigint { return this.features; }
  get currentMtu(): number { return this.mtu; }

  featuresAcked(features: bigint): void {
    if (this.running.size > 0 && features !== this.features) {
      throw new BackendRefusal('features changed while vrings are running');
    }
    this.features = features;
    const has = (b: number) => hasBit(features, b);
    this.port.configureOffloads({
      vnetHeaderLength: vnetHeaderLength(features),
      csum: has(F.GUEST_CSUM),
      tso4: has(F.GUEST_TSO4),
      tso6: has(F.GUEST_TSO6),
      ecn: has(F.GUEST_ECN),
    });
    this.pushFormat();
    this.log.info(`features acked: ${describeFeatures(features).join(' ')}`);
  }

  private format(): FrameFormat {
    const f = this.features;
    const headerLength = vnetHeaderLength(f);
    const gso = hasBit(f, F.GUEST_TSO4) || hasBit(f, F.GUEST_TSO6);
    return {
      eventIdx: hasBit(f, F.RING_EVENT_IDX),
      headerLength,
      mergeable: hasBit(f, F.MRG_RXBUF),
      maxFrame: headerLength + (gso ? MAX_GSO_FRAME : ETH_HLEN + VLAN_HLEN + this.mtu),
      txOffloads: (hasBit(f, F.CSUM) ? TX_CSUM : 0) | (hasBit(f, F.HOST_TSO4) ? TX_TSO4 : 0)
        | (hasBit(f, F.HOST_TSO6) ? TX_TSO6 : 0) | (hasBit(f, F.HOST_ECN) ? TX_ECN : 0),
    };
  }

  private pushFormat(): void {
    const format = this.format();
    for (const t of this.threads) t.request({ op: 'format', format });
  }

  memoryChanged(regions: RegionInfo[]): void {
    if (this.port.needsGuestMemory) {
      // The rings are stopped; the workers drop their queues before the UMEM goes away.
      for (const pair of [...this.openQueues]) this.releaseQueue(pair);
      if (regions.length > 0) {
        const why = this.port.attachMemory?.(regions).bounceReason;
        if (why) this.log.warn(`bounce-only UMEM: ${why}; every frame is copied (counted as jsCopies)`);
      } else {
        this.port.detachMemory?.();
      }
    }
    for (const t of this.threads) t.request({ op: 'memory', regions });
  }

  /** Pairs whose port queue is open in a worker (ports over guest RAM only). */
  private readonly openQueues = new Set<number>();

  private releaseQueue(pair: number): void {
    this.openQueues.delete(pair);
    try {
      this.threadFor(pair).request({ op: 'host', pair, cfg: null });
    } finally {
      // Closing the socket is what stops the kernel writing into guest buffers.
      this.port.releaseQueue?.(pair);
    }
  }

  startVring(cfg: VringConfig): void {
    const pair = cfg.index >> 1;
    if (this.port.needsGuestMemory && !this.openQueues.has(pair)) {
      // The reserved pair has no AF_XDP socket: offload replies must be written by the datapath.
      // Its data frames (a stock guest's, before any claim) leave through the port's reserved queue.
      const cfg = pair === this.offloadPair && this.port.reservedQueueConfig ? this.port.reservedQueueConfig(pair) : this.port.queueConfig(pair);
      this.threadFor(pair).request({ op: 'host', pair, cfg });
      this.openQueues.add(pair);
    }
    this.threadFor(cfg.index >> 1).request({ op: 'start', vring: cfg });
    this.running.add(cfg.index);
    this.connected = true;
    this.log.debug(`vring ${cfg.index} started (size ${cfg.size}, base ${cfg.lastAvailIdx})`);
  }

  stopVring(index: number): number {
    // Forget the ring even when the worker fails to answer: a ring we still think runs would
    // block every later feature change on this device.
    try {
      const last = this.threadFor(index >> 1).request({ op: 'stop', index });
      this.log.debug(`vring ${index} stopped at ${last}`);
      return last;
    } finally {
      this.running.delete(index);
      const pair = index >> 1;
      // Both rings of a pair share one AF_XDP socket: release it once neither runs.
      if (this.openQueues.has(pair) && !this.running.has(2 * pair) && !this.running.has(2 * pair + 1)) this.releaseQueue(pair);
    }
  }

  updateCallFd(index: number, fd: number): void {
    this.threadFor(index >> 1).request({ op: 'call', index, fd });
  }

  setMtu(mtu: number): void {
    if (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535) throw new BackendRefusal(`MTU ${mtu} outside 68..65535`);
    this.port.setMtu(mtu);
    this.mtu = mtu;
    this.pushFormat();
    this.log.info(`MTU ${mtu} applied to ${this.port.ifname}`);
  }

  sendRarp(mac: Uint8Array): void {
    // Guests announce themselves (GUEST_ANNOUNCE) after migration; we have no migration yet.
    this.log.info(`SEND_RARP for ${[...mac].map((b) => b.toString(16).padStart(2, '0')).join(':')} (nothing to do without migration)`);
  }

  sessionReset(reason: string): void {
    for (const index of [...this.running]) {
      try { this.stopVring(index); } catch (e) { this.log.warn(`stop vring ${index}: ${(e as Error).message}`); }
    }
    this.features = 0n;
    this.connected = false;
    this.lastResetReason = reason;
    if (this.broker && !this.shuttingDown) this.broker.reset(reason);
    // Drop the worker's view of guest memory before the session unmaps it.
    for (const t of this.threads) t.request({ op: 'memory', regions: [] });
  }

  get runningVrings(): number[] { return [...this.running].sort((a, b) => a - b); }

  async close(): Promise<void> {
    this.shuttingDown = true;
    for (const t of this.threads) await t.terminate();
    this.port.close();
  }
}

/**
 * The main thread's view of a broker that runs on a datapath thread: state from its events,
 * control calls as synchronous requests.
 */
export class OffloadHandle {
  claimed = false;
  program: OffloadProgram | null = null;

  constructor(private readonly thread: DatapathThread) {}

  update(claimed: boolean, program: OffloadProgram | null): void {
    this.claimed = claimed;
    this.program = program;
  }

  show(): OffloadShow { return this.thread.call({ op: 'offload-call', method: 'show' }) as OffloadShow; }
  quotas(): { limits: Quotas; usage: QuotaUsage } { return this.thread.call({ op: 'offload-call', method: 'quotas' }) as { limits: Quotas; usage: QuotaUsage }; }
  setQuotas(changes: Record<string, unknown>): { limits: Quotas; usage: QuotaUsage; warnings: string[] } {
    return this.thread.call({ op: 'offload-call', method: 'setQuotas', arg: changes }) as { limits: Quotas; usage: QuotaUsage; warnings: string[] };
  }
  detach(): boolean { return this.thread.call({ op: 'offload-call', method: 'detach' }) as boolean; }
  reset(reason: string): void { this.thread.call({ op: 'offload-call', method: 'reset', arg: reason }); }
}
