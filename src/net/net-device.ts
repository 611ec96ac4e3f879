import { logger, type Logger } from '../log.js';
import { bit, hasBit, F_LOG_ALL } from '../vhost-user/protocol.js';
import { BackendRefusal, type VhostUserBackend, type VringConfig } from '../vhost-user/backend.js';
import type { RegionInfo } from '../memory/guest-memory.js';
import type { LogInfo, UsedRingLog } from '../memory/dirty-log.js';
import type { Port } from '../ports/port.js';
import { OFFERED_FEATURES, OFFERED_PROTOCOL_FEATURES, NetFeature as F, describeFeatures } from './features.js';
import { vnetHeaderLength, txOffloads } from './vnet-header.js';
import { DeviceStats, C, COUNTERS } from './stats.js';
import { encodeDeviceState, decodeDeviceState, MAX_HELD_REPLIES } from './device-state.js';
import { OffloadBroker } from '../offload/broker.js';
import type { WorkerPool, PoolClient } from '../datapath/worker-pool.js';
import type { DeviceRequest, WorkerEvent } from '../datapath/messages.js';
import type { OffloadProgram } from '../offload/broker.js';
import { ETH_HLEN, type FrameFormat } from './frame-format.js';
import { dupCloexec } from '../sys/libc.js';
import { OffloadChannel } from './offload-channel.js';
import { HostSteering } from './host-steering.js';

export interface NetDeviceOptions {
  name: string;
  port: Port;
  /** Queue pairs offered to the frontend (the port must have as many queues). */
  queuePairs: number;
  /** The process's datapath workers; this device's pairs are assigned to them as they start. */
  pool: WorkerPool;
  /** MTU used before (or without) NET_SET_MTU. */
  mtu?: number;
  /** With offload, the last queue pair is the reserved offload pair (docs/offload-protocol.md). */
  offload?: { device: string; pinDir: string | null } | null;
}

const VLAN_HLEN = 4;
const MAX_GSO_FRAME = 65550;

/**
 * The virtio-net device behind one vhost-user socket: negotiates features, applies MTU and
 * offloads to its port, and hands running vrings to the worker pool. A pair gets a worker
 * when its first ring starts and gives it back when both have stopped; the device is known
 * to a worker only while that worker serves one of its pairs.
 */
export class NetDevice implements VhostUserBackend, PoolClient {
  readonly name: string;
  readonly stats: DeviceStats;
  readonly port: Port;
  private readonly pool: WorkerPool;
  private readonly id: number;
  private readonly log: Logger;
  private features = 0n;
  private mtu: number;
  private regions: RegionInfo[] = [];
  /** Running vrings and how they were started (a pair moving to another worker restarts from it). */
  private readonly running = new Map<number, VringConfig>();
  /**
   * The reserved pair's rings the frontend stopped (GET_VRING_BASE) while the guest's offload was
   * claimed, as they stood when stopped (lastAvailIdx: where they stopped). Whether that stop was
   * the guest resetting its device or the VM stopping (migration switch-over, pause) shows only
   * when the ring starts again: see offloadRingStarts.
   */
  private readonly offloadStopped = new Map<number, VringConfig | null>();
  /** Rings of an AF_XDP port stopped while their partner ran: their socket still holds what they posted (see startVring). */
  private readonly stoppedAlone = new Set<number>();
  /**
   * Offload responses while the reserved pair's receive ring is not running: made then (an
   * OBJ_LOAD answered while the VM was stopped for the switch-over), or taken back from the
   * worker when the ring stopped (a guest that had posted no buffers for them). Delivered when
   * the ring runs again, or carried in the migration state to the destination, which delivers
   * them; dropped when the guest resets.
   */
  private readonly heldReplies: Uint8Array[] = [];
  /** Workers that know this device, and the pairs each serves. */
  private readonly onWorker = new Map<number, Set<number>>();
  connected = false;
  /** Set while the process shuts down: offload state then stays pinned for the next process. */
  shuttingDown = false;
  /** The offload channel's broker (main thread), with --offload. */
  readonly broker: OffloadChannel | null;
  readonly offloadPair: number;
  lastResetReason = '';
  /** Where guest writes are marked during migration (null: logging off); posted to every worker serving a pair. */
  dirtyLog: LogInfo | null = null;
  /** Which pairs the host sends to (those whose receive ring the frontend enabled). */
  private readonly steering: HostSteering;

  constructor(private readonly opts: NetDeviceOptions) {
    this.name = opts.name;
    this.port = opts.port;
    this.pool = opts.pool;
    this.log = logger(opts.name);
    this.mtu = opts.mtu ?? 1500;
    this.stats = new DeviceStats(opts.queuePairs);
    const kport = opts.port;
    if (opts.offload && kport.kernelVerdicts) {
      // A tap running the program at its tc egress: those verdicts are counted in the kernel.
      // They go to the reserved pair's row, as imported ones do (no worker counts verdicts there).
      this.stats.setExternal(opts.queuePairs - 1, () => {
        const v = kport.kernelVerdicts!();
        return { xdpPass: v.pass, xdpDrop: v.drop, xdpTx: v.tx, xdpAborted: v.aborted };
      });
    }
    this.offloadPair = opts.offload ? opts.queuePairs - 1 : -1;
    this.id = this.pool.register(this);
    this.steering = new HostSteering(opts.port, opts.queuePairs, this.log);
    // The xsk port's offload pair is never a data pair: host traffic stays on the others.
    if (opts.offload && opts.port.needsGuestMemory) this.steering.hold(this.offloadPair, true, 'is the reserved offload pair');
    let broker: OffloadChannel | null = null;
    if (opts.offload) {
      const port = this.port;
      const attach = port.attachProgram ? port.attachProgram.bind(port) : undefined;
      const attachInKernel = !attach && port.attachInKernel ? port.attachInKernel.bind(port) : undefined;
      try {
        broker = new OffloadChannel({ ...opts.offload, attach, attachInKernel, ifname: port.ifname, log: this.log }, {
          reply: (m) => this.offloadReply(m),
          claimChanged: (claimed) => {
            this.eachWorker({ op: 'offload', pair: this.offloadPair, claimed });
            this.holdClaimedPair(claimed);
          },
          programChanged: (p) => this.programChanged(p),
        });
      } catch (e) {
        this.pool.unregister(this.id);
        throw e;
      }
    }
    this.broker = broker;
    if (broker?.claimed) this.holdClaimedPair(true);
  }

  /** A tap's reserved pair carries only offload messages while claimed: host frames stay off its queue. */
  private holdClaimedPair(claimed: boolean): void {
    if (this.port.needsGuestMemory) return; // held for good (constructor)
    this.steering.hold(this.offloadPair, claimed, claimed ? 'is claimed by the guest\'s offload' : 'is released by the guest\'s offload');
  }

  vringEnabled(index: number, enabled: boolean): void {
    this.steering.ringEnabled(index, enabled);
  }

  /** The pairs the host sends frames to. */
  get hostPairs(): number[] { return this.steering.pairs; }

  /** Events from the workers that serve this device's pairs. */
  onWorkerEvent(e: WorkerEvent): void {
    if (e.kind === 'offload-request') {
      if (!this.broker) return;
      try {
        this.broker.handle(e.message);
      } catch (err) {
        this.log.error(`offload request: ${(err as Error).message}`);
      }
    }
  }

  private offloadReply(message: Uint8Array): void {
    const w = this.pool.workerOf(this.id, this.offloadPair);
    // Only a running receive ring can deliver: a worker holding responses for a stopped one
    // would take them along when the pair leaves it (SAVE would not see them).
    if (w >= 0 && this.running.has(2 * this.offloadPair)) {
      this.sendReply(w, message);
      return;
    }
    // The ring stopped in between (VM stopped, migration switch-over, a reset): held until the
    // pair runs, or until we know the guest reset. Bounded like the worker's own queue.
    this.holdReplies([message], 'the reserved pair is not running');
  }

  /**
   * Keeps responses for the guest, after those already held (newest last); past the bound the
   * oldest go, as on the worker, so the state never carries more than a destination accepts.
   */
  private holdReplies(replies: readonly Uint8Array[], why: string, older = false): void {
    if (replies.length === 0) return;
    if (older) this.heldReplies.unshift(...replies);
    else this.heldReplies.push(...replies);
    const over = this.heldReplies.length - MAX_HELD_REPLIES;
    if (over > 0) {
      this.heldReplies.splice(0, over);
      this.log.warn(`${over} offload response(s) dropped: more than ${MAX_HELD_REPLIES} held for a guest without receive buffers`);
    }
    this.log.debug(`offload reply held: ${why} (${this.heldReplies.length} held)`);
  }

  /**
   * The reserved receive ring stopped on worker w: what the worker still held for it (the guest
   * had posted no buffers) comes back here, ahead of anything held since, so it travels in the
   * migration state or goes to whichever worker serves the ring next.
   */
  private takeWorkerReplies(w: number): void {
    let got: unknown;
    try {
      got = this.pool.worker(w).requestData({ op: 'device', device: this.id, req: { op: 'take-replies' } });
    } catch (e) {
      this.log.error(`offload responses held by worker ${w} lost: ${(e as Error).message}`);
      return;
    }
    const replies = Array.isArray(got) ? got.filter((r): r is Uint8Array => r instanceof Uint8Array) : [];
    this.holdReplies(replies, 'the worker held them for a guest without receive buffers', true);
  }

  /** Hands the held responses to the worker whose reserved receive ring now runs (it delivers them once the guest has buffers). */
  private releaseHeldReplies(w: number): void {
    for (const reply of this.heldReplies.splice(0)) this.sendReply(w, reply);
  }

  /** A response to worker w, not waited for: a stop or move of the pair is a later request, answered only after it. */
  private sendReply(w: number, reply: Uint8Array): void {
    this.pool.worker(w).post({ op: 'device', device: this.id, req: { op: 'offload-reply', reply } });
  }

  /** Tap ports run the program per frame on every worker of the device, each with its own fd. */
  private programChanged(program: OffloadProgram | null): void {
    for (const w of this.onWorker.keys()) this.sendProgram(w, program);
  }

  private sendProgram(w: number, program: OffloadProgram | null): void {
    if (this.port.needsGuestMemory) return; // the program runs in the kernel (OffloadChannel)
    let fd = -1;
    if (program) {
      // A duplicate of the broker's own fd, not BPF_PROG_GET_FD_BY_ID: that needs CAP_SYS_ADMIN,
      // which an unprivileged serve does not hold (docs/least-privilege.md). The broker's fd is
      // open for as long as the program is published, and workers share this fd table.
      try { fd = dupCloexec(program.fd, `offloaded program ${program.id}`); } catch (e) { this.log.error(`offloaded program ${program.id}: ${(e as Error).message}`); }
    }
    this.request(w, { op: 'xdp', progFd: fd });
  }

  private request(w: number, req: DeviceRequest): number {
    return this.pool.worker(w).request({ op: 'device', device: this.id, req });
  }

  private eachWorker(req: DeviceRequest): void {
    for (const w of this.onWorker.keys()) this.request(w, req);
  }

  /** Makes the device known to worker w: its memory, frame format, program and offload pair. */
  private attachTo(w: number): void {
    if (this.onWorker.has(w)) return;
    this.pool.worker(w).request({ op: 'attach', device: this.id, name: this.name, stats: this.stats.shared });
    this.onWorker.set(w, new Set());
    this.request(w, { op: 'memory', regions: this.regions });
    this.request(w, { op: 'format', format: this.format() });
    if (this.dirtyLog) this.request(w, { op: 'log', log: this.dirtyLog });
    if (this.broker) {
      this.request(w, { op: 'offload', pair: this.offloadPair, claimed: this.broker.claimed });
      if (this.broker.datapathProgram) this.sendProgram(w, this.broker.datapathProgram);
    }
  }

  private detachFrom(w: number): void {
    if (!this.onWorker.delete(w)) return;
    this.pool.worker(w).request({ op: 'detach', device: this.id });
  }

  /** Gives a starting pair a worker and opens its host queue there. */
  private placePair(pair: number, to = -1): number {
    const w = to >= 0 ? to : this.pool.assign(this.id, pair);
    this.attachTo(w);
    this.onWorker.get(w)!.add(pair);
    // The reserved pair has no AF_XDP socket: offload replies must be written by the datapath.
    // Its data frames (a stock guest's, before any claim) leave through the port's reserved queue.
    const cfg = pair === this.offloadPair && this.port.needsGuestMemory && this.port.reservedQueueConfig
      ? this.port.reservedQueueConfig(pair) : this.port.queueConfig(pair);
    this.request(w, { op: 'host', pair, cfg });
    return w;
  }

  /** Closes a pair's host queue on its worker; the worker forgets the device when it was the last pair. */
  private unplacePair(pair: number): number {
    const w = this.pool.workerOf(this.id, pair);
    if (w < 0) return w;
    try {
      this.request(w, { op: 'host', pair, cfg: null });
    } finally {
      // Closing the socket is what stops the kernel writing into guest buffers.
      this.port.releaseQueue?.(pair);
      const pairs = this.onWorker.get(w);
      pairs?.delete(pair);
      if (pairs && pairs.size === 0) this.detachFrom(w);
    }
    return w;
  }

  relocate(pair: number, to: number): boolean {
    // The claimed offload pair moves too: replacePair carries the responses its worker holds.
    const from = this.pool.workerOf(this.id, pair);
    if (from < 0 || from === to) return false;
    this.replacePair(pair, from, to);
    return true;
  }

  /**
   * Stops the pair's running rings on worker `from` (between two bursts, never mid-chain, their
   * ring positions kept), closes its host queue there, opens a fresh one on `to` and starts the
   * rings again where they stopped. Moving a pair and renewing its AF_XDP socket are both this.
   */
  private replacePair(pair: number, from: number, to: number): void {
    const cfgs = [2 * pair, 2 * pair + 1].map((i) => this.running.get(i)).filter((c): c is VringConfig => c !== undefined);
    for (const cfg of cfgs) cfg.lastAvailIdx = this.request(from, { op: 'stop', index: cfg.index });
    // The worker forgets the device once its last pair leaves: what it held goes with the ring.
    const offloadRx = pair === this.offloadPair && this.running.has(2 * pair);
    if (offloadRx) this.takeWorkerReplies(from);
    this.unplacePair(pair);
    if (to !== from) this.pool.reassign(this.id, pair, to);
    this.placePair(pair, to);
    for (const cfg of cfgs) this.request(to, { op: 'start', vring: cfg });
    if (offloadRx) this.offloadRxRuns(to);
  }

  /**
   * The reserved receive ring runs on worker w: the responses held meanwhile go there. Unclaimed
   * by now (RELEASE, a reset), nobody is waiting for them.
   */
  private offloadRxRuns(w: number): void {
    if (this.broker?.claimed) this.releaseHeldReplies(w);
    else this.heldReplies.length = 0;
  }

  vringStopRequested(index: number): void {
    // QEMU stops every ring the same way when the guest resets its device and when the VM
    // stops (the migration's switch-over, before SAVE; a pause): the offload stays until the
    // ring starts again, so SAVE finds it and a cancelled migration resumes with it.
    if (this.broker?.claimed && index >> 1 === this.offloadPair && this.running.has(index)) this.offloadStopped.set(index, null);
  }

  /**
   * A reserved ring starting again where it stopped (same rings, same last avail index) is the
   * same driver going on (VM continued, migration cancelled). Anything else is a guest that
   * reset its device (reboot, a driver that left without RELEASE): its offload state is gone
   * with it, before the new driver's first frame.
   */
  private offloadRingStarts(cfg: VringConfig): void {
    if (!this.offloadStopped.has(cfg.index)) return;
    const was = this.offloadStopped.get(cfg.index);
    this.offloadStopped.delete(cfg.index);
    const same = was && was.descGpa === cfg.descGpa && was.availGpa === cfg.availGpa && was.usedGpa === cfg.usedGpa
      && was.size === cfg.size && was.lastAvailIdx === cfg.lastAvailIdx;
    // A new driver: answers to the old one's requests would only confuse it.
    if (!same) this.heldReplies.length = 0;
    if (!same && this.broker?.claimed) {
      this.offloadStopped.clear();
      this.broker.reset('the guest reset the device');
    }
  }

  /** Workers and the pairs they serve for this device, for status. */
  get placement(): { pair: number; worker: number }[] {
    const out: { pair: number; worker: number }[] = [];
    for (const [w, pairs] of this.onWorker) for (const pair of pairs) out.push({ pair, worker: w });
    return out.sort((a, b) => a.pair - b.pair);
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
    // LOG_ALL alone may change while rings run (migration starts/stops logging); the session handles it.
    const changed = (features ^ this.features) & ~bit(F_LOG_ALL);
    if (this.running.size > 0 && changed !== 0n) {
      throw new BackendRefusal('features changed while vrings are running');
    }
    this.features = features;
    if (this.running.size > 0) return;
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
      txOffloads: txOffloads(f),
    };
  }

  private pushFormat(): void {
    const format = this.format();
    this.eachWorker({ op: 'format', format });
  }

  memoryChanged(regions: RegionInfo[]): void {
    // The session stops every ring first; a pair still placed would keep a queue over old memory.
    for (const index of [...this.running.keys()]) {
      this.log.warn(`vring ${index} still running at a memory change; stopping it`);
      this.stopVring(index);
    }
    if (this.port.needsGuestMemory) {
      if (regions.length > 0) {
        const why = this.port.attachMemory?.(regions).bounceReason;
        if (why) this.log.warn(`bounce-only UMEM: ${why}; every frame is copied (counted as jsCopies)`);
      } else {
        this.port.detachMemory?.();
      }
    }
    this.regions = regions;
    this.eachWorker({ op: 'memory', regions });
  }

  startVring(cfg: VringConfig): void {
    this.offloadRingStarts(cfg);
    const pair = cfg.index >> 1;
    let w = this.pool.workerOf(this.id, pair);
    const placed = w < 0;
    if (placed) w = this.placePair(pair);
    else if (this.stoppedAlone.delete(cfg.index) && this.running.has(cfg.index ^ 1)) {
      // A ring restarting alone while its partner runs: an AF_XDP socket gives back what it was
      // handed only when it is closed, so the ring would find its previous run's buffers in the
      // socket's rings. The pair gets a fresh socket on the same worker first.
      this.replacePair(pair, w, w);
    }
    try {
      this.request(w, { op: 'start', vring: cfg });
    } catch (e) {
      if (placed && !this.running.has(2 * pair) && !this.running.has(2 * pair + 1)) this.releasePair(pair);
      throw e;
    }
    this.running.set(cfg.index, { ...cfg });
    if (cfg.index === 2 * this.offloadPair) this.offloadRxRuns(w);
    this.connected = true;
    this.log.debug(`vring ${cfg.index} started on worker ${w} (size ${cfg.size}, base ${cfg.lastAvailIdx})`);
  }

  private releasePair(pair: number): void {
    try {
      this.unplacePair(pair);
    } finally {
      this.pool.release(this.id, pair);
    }
  }

  stopVring(index: number): number {
    const pair = index >> 1;
    // Forget the ring even when the worker fails to answer: a ring we still think runs would
    // block every later feature change on this device.
    try {
      const w = this.pool.workerOf(this.id, pair);
      if (w < 0 || !this.running.has(index)) throw new BackendRefusal(`vring ${index} is not running`, 'vring-not-running');
      const last = this.request(w, { op: 'stop', index });
      this.log.debug(`vring ${index} stopped at ${last}`);
      if (index === 2 * this.offloadPair) this.takeWorkerReplies(w);
      if (this.offloadStopped.has(index)) this.offloadStopped.set(index, { ...this.running.get(index)!, lastAvailIdx: last });
      return last;
    } finally {
      this.running.delete(index);
      // Both rings of a pair share one host queue (one AF_XDP socket): release it once neither runs.
      if (!this.running.has(2 * pair) && !this.running.has(2 * pair + 1)) {
        this.stoppedAlone.delete(index ^ 1);
        this.releasePair(pair);
      } else if (this.port.needsGuestMemory) {
        this.stoppedAlone.add(index);
      }
    }
  }

  updateCallFd(index: number, fd: number): void {
    const cfg = this.running.get(index);
    if (!cfg) return;
    cfg.callFd = fd;
    this.request(this.pool.workerOf(this.id, index >> 1), { op: 'call', index, fd });
  }

  setMtu(mtu: number): void {
    if (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535) throw new BackendRefusal(`MTU ${mtu} outside 68..65535`);
    this.port.setMtu(mtu);
    this.mtu = mtu;
    this.pushFormat();
    this.log.info(`MTU ${mtu} applied to ${this.port.ifname}`);
  }

  sendRarp(mac: Uint8Array): void {
    // QEMU sends this after a migration only to a guest that cannot announce itself
    // (GUEST_ANNOUNCE not negotiated); we offer GUEST_ANNOUNCE, so the guest's own gratuitous
    // ARP does the job. Logged so an operator can see the switch-over reached this backend.
    this.log.info(`SEND_RARP for ${[...mac].map((b) => b.toString(16).padStart(2, '0')).join(':')} (the guest announces itself: GUEST_ANNOUNCE)`);
  }

  sessionReset(reason: string): void {
    for (const index of [...this.running.keys()]) {
      try { this.stopVring(index); } catch (e) { this.log.warn(`stop vring ${index}: ${(e as Error).message}`); }
    }
    this.features = 0n;
    this.connected = false;
    this.lastResetReason = reason;
    this.steering.reset();
    this.offloadStopped.clear();
    this.stoppedAlone.clear();
    this.heldReplies.length = 0;
    if (this.broker && !this.shuttingDown) this.broker.reset(reason);
    // Drop the workers' view of guest memory before the session unmaps it.
    this.regions = [];
    this.eachWorker({ op: 'memory', regions: [] });
  }

  vringLogChanged(index: number, log: UsedRingLog): void {
    const cfg = this.running.get(index);
    const w = this.pool.workerOf(this.id, index >> 1);
    if (!cfg || w < 0) throw new BackendRefusal(`vring ${index} is not running`, 'vring-not-running');
    this.request(w, { op: 'vring-log', index, log: { logUsed: log.logUsed, logGuestAddr: log.logGuestAddr } });
    cfg.logUsed = log.logUsed;
    cfg.logGuestAddr = log.logGuestAddr;
  }

  dirtyLogChanged(log: LogInfo | null): void {
    this.dirtyLog = log;
    // Every worker that serves a pair of this device marks through its own view of the log.
    this.eachWorker({ op: 'log', log });
    this.log.info(log ? `migration logging on (${log.size} bytes of log)` : 'migration logging off');
  }

  /**
   * Migration out (SET_DEVICE_STATE_FD, save): the offload state, read-only, so a cancelled or
   * failed migration leaves this device as it was. A refusal fails the migration.
   *
   * A guest request still pending (an OBJ_LOAD whose loader child runs) is waited for: the state
   * then holds its result, and its response, made while the rings are stopped, travels with it
   * (held replies). The wait is bounded by the loader's own timeout; past it the save fails with
   * 'state-load-pending' and the source runs on.
   */
  saveState(): Uint8Array | Promise<Uint8Array> {
    const b = this.broker;
    if (!b?.pending) return this.encodeState();
    const t0 = performance.now();
    this.log.info(`device ${this.name}: migration state waits for the guest's pending offload request`);
    return b.settled().then(() => {
      this.log.info(`device ${this.name}: pending offload request settled after ${Math.round(performance.now() - t0)} ms; saving`);
      return this.encodeState();
    }, (e: unknown) => {
      this.log.warn(`device ${this.name}: migration state refused (${(e as { code?: string }).code ?? 'internal'}): ${(e as Error).message}`);
      throw e;
    });
  }

  private encodeState(): Uint8Array {
    if (!this.broker) return encodeDeviceState({ offload: null });
    const t = this.stats.total();
    const counters = { pass: t.xdpPass, drop: t.xdpDrop, tx: t.xdpTx, aborted: t.xdpAborted };
    return encodeDeviceState({ offload: this.broker.exportState(counters), replies: this.heldReplies });
  }

  /**
   * Migration in (load): the state is untrusted input. A claimed offload cannot land on a
   * backend without --offload; an unclaimed one (a guest that never offloaded) can.
   */
  loadState(state: Uint8Array): void {
    const { offload, replies } = decodeDeviceState(state);
    if (!offload) return;
    if (!this.broker) {
      const held = OffloadBroker.describeState(offload);
      if (held.claimed || held.maps > 0 || held.program) {
        throw new BackendRefusal(`the guest's offload (${held.maps} map(s), ${held.program ? `program ${held.program.name}` : 'no program'}) cannot land here: this device was started without --offload`, 'offload-not-enabled');
      }
      return;
    }
    const counters = this.broker.importState(offload);
    if (counters) {
      // Verdicts counted on the source continue here: they go to the reserved pair's row,
      // which no worker writes verdicts to (a claimed pair carries no data frames).
      const base = this.offloadPair * COUNTERS.length;
      const v = this.stats.values;
      v[base + C.xdpPass]! += counters.pass;
      v[base + C.xdpDrop]! += counters.drop;
      v[base + C.xdpTx]! += counters.tx;
      v[base + C.xdpAborted]! += counters.aborted;
    }
    // Owed to the guest by the source: delivered once the reserved pair runs here.
    if (this.broker.claimed && replies) this.heldReplies.push(...replies);
    this.log.info(`offload state loaded: ${this.broker.claimed ? 'claimed' : 'unclaimed'}, program ${this.broker.program?.id ?? 'none'}${this.heldReplies.length ? `, ${this.heldReplies.length} response(s) for the guest` : ''}`);
  }

  get runningVrings(): number[] { return [...this.running.keys()].sort((a, b) => a - b); }

  async close(): Promise<void> {
    this.shuttingDown = true;
    for (const index of [...this.running.keys()]) {
      try { this.stopVring(index); } catch (e) { this.log.warn(`stop vring ${index}: ${(e as Error).message}`); }
    }
    for (const w of [...this.onWorker.keys()]) {
      try { this.detachFrom(w); } catch (e) { this.log.warn(`worker ${w}: ${(e as Error).message}`); }
    }
    this.broker?.close();
    this.pool.unregister(this.id);
    this.port.close();
  }
}
