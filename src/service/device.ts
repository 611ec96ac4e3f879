import { logger } from '../log.js';
import { NetDevice } from '../net/net-device.js';
import { describeFeatures } from '../net/features.js';
import { TapPort } from '../ports/tap.js';
import { XskPort } from '../ports/xsk.js';
import type { PinLimitChange } from '../ports/xsk-umem.js';
import type { Port, TapIoStatus } from '../ports/port.js';
import { VhostUserEndpoint } from '../vhost-user/endpoint.js';
import { claimSocketPath, type SocketClaim } from '../sys/socket-claim.js';
import { UnixSocket } from '../sys/unix-socket.js';
import type { TransferRecord } from '../vhost-user/device-state.js';
import { parsePort, type DeviceSpec } from './device-spec.js';
import type { WorkerPool } from '../datapath/worker-pool.js';
import { bpfPrefix } from '../offload/host-names.js';
import type { OffloadFallback, OffloadPath } from '../net/offload-channel.js';

/** A tap port's I/O as status shows it: io_uring, or readv/writev and why. */

export interface DeviceStatus {
  name: string;
  socket: string;
  mode: 'server' | 'client';
  /**
   * pinnedBytes: guest RAM pinned for AF_XDP (xsk ports; 0 otherwise); pinLimitBytes: its quota
   * (null: tap); umem: how the current memory table is served (null: none yet, or tap); io: how
   * a tap's queues move frames (serve --tap-io) and why readv/writev when they do (null: xsk).
   */
  port: { kind: string; ifname: string; created: boolean; adopted: boolean; pinnedBytes: number; pinLimitBytes: number | null; umem: 'zero-copy' | 'bounce' | null; io: TapIoStatus | null };
  queuePairs: number;
  connected: boolean;
  connections: number;
  features: string[];
  featureBits: string;
  mtu: number;
  runningVrings: number[];
  /** The queue pairs the host sends frames to: pair 0, and each other pair whose receive ring the frontend enabled. */
  hostPairs: number[];
  refusedRequests: number;
  /** Requests refused since the device started, by error code (every connection counted). */
  refusals: Record<string, number>;
  lastDisconnect: string;
  /** bpfPrefix: how this device's host BPF objects are named (`<bpfPrefix>_<role>`, offload/host-names.ts). */
  /** runs: where the program runs (absent without one): `tap-tc`, `tap-test-run` or `xdp-native`. */
  offload: { pair: number; claimed: boolean; program: number | null; bpfPrefix: string; runs?: OffloadPath } | null;
  /** Which pool worker serves each running pair. */
  workers: { pair: number; worker: number }[];
  /** Dirty logging for live migration is on (LOG_ALL acked and a log mapped). */
  logging: boolean;
  /** The last device-state transfer of a migration (save on the source, load on the destination). */
  lastMigration: TransferRecord | null;
}

/** Owner group and mode of the vhost-user socket files serve binds (--socket-group, --socket-mode). */
export interface SocketFiles {
  group?: number;
  mode?: number;
}

/**
 * Where the guest's offloaded program runs on the host. name/id/tag: the program as the guest
 * sent it (the broker's load of it); hostName: its kernel name, which names the device
 * (offload/host-names.ts); hostId: the host program that runs it on frames, as `bpftool prog
 * show` lists it: on a tap port the tc program at the tap's egress (`tap-tc`: the guest program
 * translated for tc) or, when it could not be translated, the broker's program itself
 * (`tap-test-run`: BPF_PROG_TEST_RUN on each frame, `fallback` says why); on an xsk port the
 * composed program attached at the veth (guest program + AF_XDP redirect; null while none is
 * attached).
 */
export interface OffloadHost {
  bpfPrefix: string;
  program: { id: number; tag: string; name: string; hostName: string; hostId: number | null; hostProgramName: string | null; runs: OffloadPath; fallback?: OffloadFallback } | null;
}

/** The pinned-memory quota of an xsk device as the control API shows it. */
export interface PinQuota {
  limit: number;
  /** Bytes pinned now (the UMEM of the running memory table; 0 with no guest). */
  used: number;
  /** The smallest limit accepted: the bounce-only UMEM. */
  minimum: number;
  umem: 'zero-copy' | 'bounce' | null;
}

/** One served device: its socket endpoint, virtio-net device and host port. */
export class Device {
  readonly spec: DeviceSpec;
  readonly net: NetDevice;
  readonly port: Port;
  private readonly endpoint: VhostUserEndpoint;
  private lastDisconnect = '';

  private constructor(spec: DeviceSpec, port: Port, net: NetDevice, claim: SocketClaim | null, inherited: UnixSocket | null, files: SocketFiles) {
    this.spec = spec;
    this.port = port;
    this.net = net;
    const log = logger(spec.name);
    this.endpoint = new VhostUserEndpoint({
      path: spec.socket,
      mode: spec.client ? 'client' : 'server',
      backend: net,
      claim: claim ?? undefined,
      inherited: inherited ?? undefined,
      socketMode: files.mode,
      socketGroup: files.group,
      onDisconnect: (reason) => {
        this.lastDisconnect = reason;
        log.debug(`session ended: ${reason}`);
      },
    });
  }

  static create(spec: DeviceSpec, pool: WorkerPool, files: SocketFiles = {}): Device {
    const p = parsePort(spec.port);
    // With offload the guest sees one more pair: the reserved offload channel (a data pair until claimed).
    const pairs = spec.queues + (spec.offload ? 1 : 0);
    // The socket before the port: a second serve on a live socket must not touch its port.
    // An inherited listening socket (--fd) is not a path we bind: nothing to claim, but it is
    // checked before the port exists, as a claim is.
    const inherited = spec.listenFd !== undefined && !spec.client ? UnixSocket.adoptListener(spec.listenFd) : null;
    const claim = spec.client || inherited ? null : claimSocketPath(spec.socket, (line) => logger(spec.name).warn(line));
    let port: Port;
    try {
      port = p.kind === 'xsk'
        ? XskPort.create(p.ifname, pairs, { mtu: spec.mtu ?? 1500, pinLimitBytes: spec.pinLimit, bpfPrefix: bpfPrefix(spec.name) })
        : TapPort.open(p.ifname, pairs, { io: spec.tapIo ?? 'auto', bpfPrefix: bpfPrefix(spec.name) });
    } catch (e) {
      claim?.release();
      inherited?.close();
      // A refused pin limit: say which device it was given for.
      if (e instanceof RangeError) throw new RangeError(`device ${spec.name}: ${e.message}`);
      throw e;
    }
    let net: NetDevice | null = null;
    let d: Device | null = null;
    try {
      if (spec.mtu && p.kind === 'tap') port.setMtu(spec.mtu);
      const offload = spec.offload ? { device: spec.name, pinDir: spec.pinDir ?? null } : null;
      net = new NetDevice({ name: spec.name, port, queuePairs: pairs, pool, mtu: spec.mtu, offload });
      d = new Device(spec, port, net, claim, inherited, files);
      d.endpoint.start();
      return d;
    } catch (e) {
      if (d) d.endpoint.stop();
      else {
        claim?.release();
        inherited?.close();
      }
      if (net) void net.close();
      else port.close();
      throw e;
    }
  }

  status(): DeviceStatus {
    const s = this.endpoint.current;
    const created = (this.port as { created?: boolean }).created ?? false;
    return {
      name: this.spec.name,
      socket: this.spec.socket,
      mode: this.spec.client ? 'client' : 'server',
      port: {
        kind: this.port.kind, ifname: this.port.ifname, created, adopted: (this.port as { adopted?: boolean }).adopted ?? false, pinnedBytes: (this.port as { pinnedBytes?: number }).pinnedBytes ?? 0,
        pinLimitBytes: this.xsk?.pinLimitBytes ?? null, umem: this.xsk?.umemInfo?.mode ?? null,
        io: this.port instanceof TapPort ? this.port.ioStatus : null,
      },
      queuePairs: this.net.maxQueuePairs(),
      offload: this.broker ? { pair: this.net.offloadPair, claimed: this.broker.claimed, program: this.broker.program?.id ?? null, bpfPrefix: this.broker.bpfPrefix, ...(this.broker.path ? { runs: this.broker.path } : {}) } : null,
      connected: s !== null,
      connections: this.endpoint.connections,
      features: describeFeatures(this.net.negotiated),
      featureBits: '0x' + this.net.negotiated.toString(16),
      mtu: this.net.currentMtu,
      runningVrings: this.net.runningVrings,
      hostPairs: this.net.hostPairs,
      refusedRequests: (s?.refused ?? 0),
      refusals: Object.fromEntries(this.endpoint.refusals),
      lastDisconnect: this.lastDisconnect,
      workers: this.net.placement,
      logging: s?.logging ?? false,
      lastMigration: this.endpoint.lastMigration,
    };
  }

  statsSnapshot() {
    return {
      name: this.spec.name,
      total: this.net.stats.total(),
      // Every pair the guest sees, the reserved offload pair included.
      pairs: Array.from({ length: this.net.maxQueuePairs() }, (_, p) => this.net.stats.pair(p)),
      port: this.port.stats(),
    };
  }

  get broker() { return this.net.broker; }

  /** Null without --offload. */
  offloadHost(): OffloadHost | null {
    const b = this.broker;
    if (!b) return null;
    const p = b.programInfo();
    if (!p) return { bpfPrefix: b.bpfPrefix, program: null };
    const x = this.xsk;
    if (!x) {
      const tc = this.port instanceof TapPort ? this.port.tcProgram : null;
      if (b.path === 'tap-tc' && tc) return { bpfPrefix: b.bpfPrefix, program: { ...p, hostId: tc.id, hostProgramName: tc.name, runs: 'tap-tc' } };
      const fallback = b.fallbackReason;
      return { bpfPrefix: b.bpfPrefix, program: { ...p, hostId: p.id, hostProgramName: p.hostName, runs: 'tap-test-run', ...(fallback ? { fallback } : {}) } };
    }
    const a = x.attachedProgram;
    return { bpfPrefix: b.bpfPrefix, program: { ...p, hostId: a.composed ? a.id : null, hostProgramName: a.composed ? a.name : null, runs: 'xdp-native' } };
  }

  /** The port when it pins guest memory (xsk), else null. */
  get xsk(): XskPort | null { return this.port instanceof XskPort ? this.port : null; }

  /** The pinned-memory quota (xsk ports only). */
  pinQuota(): PinQuota | null {
    const x = this.xsk;
    if (!x) return null;
    return { limit: x.pinLimitBytes, used: x.pinnedBytes, minimum: x.minPinLimitBytes, umem: x.umemInfo?.mode ?? null };
  }

  /** Changes the pin quota; throws RangeError for a value the port refuses, null on a tap port. */
  setPinQuota(bytes: number): PinLimitChange | null {
    const x = this.xsk;
    if (!x) return null;
    const r = x.setPinLimit(bytes);
    logger(this.spec.name).info(`pin limit set to ${r.limit} bytes (${r.pinned} pinned)${r.warnings.length ? `: ${r.warnings.join('; ')}` : ''}`);
    return r;
  }

  async close(): Promise<void> {
    // Shutting down is not a device reset: pinned offload state must outlive the process.
    this.net.shuttingDown = true;
    this.endpoint.stop();
    await this.net.close();
  }
}
