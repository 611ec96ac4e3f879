import { logger } from '../log.js';
import { NetDevice } from '../net/net-device.js';
import { describeFeatures } from '../net/features.js';
import { TapPort } from '../ports/tap.js';
import { XskPort } from '../ports/xsk.js';
import type { Port } from '../ports/port.js';
import { VhostUserEndpoint } from '../vhost-user/endpoint.js';
import { parsePort, type DeviceSpec } from './device-spec.js';

export interface DeviceStatus {
  name: string;
  socket: string;
  mode: 'server' | 'client';
  /** pinnedBytes: guest RAM pinned for AF_XDP (xsk ports; 0 otherwise). */
  port: { kind: string; ifname: string; created: boolean; pinnedBytes: number };
  queuePairs: number;
  connected: boolean;
  connections: number;
  features: string[];
  featureBits: string;
  mtu: number;
  runningVrings: number[];
  refusedRequests: number;
  lastDisconnect: string;
  offload: { pair: number; claimed: boolean; program: number | null } | null;
}

/** One served device: its socket endpoint, virtio-net device and host port. */
export class Device {
  readonly spec: DeviceSpec;
  readonly net: NetDevice;
  readonly port: Port;
  private readonly endpoint: VhostUserEndpoint;
  private lastDisconnect = '';

  private constructor(spec: DeviceSpec, port: Port, net: NetDevice) {
    this.spec = spec;
    this.port = port;
    this.net = net;
    const log = logger(spec.name);
    this.endpoint = new VhostUserEndpoint({
      path: spec.socket,
      mode: spec.client ? 'client' : 'server',
      backend: net,
      onDisconnect: (reason) => {
        this.lastDisconnect = reason;
        log.debug(`session ended: ${reason}`);
      },
    });
  }

  static create(spec: DeviceSpec): Device {
    const p = parsePort(spec.port);
    // With offload the guest sees one more pair: the reserved offload channel (a data pair until claimed).
    const pairs = spec.queues + (spec.offload ? 1 : 0);
    const port: Port = p.kind === 'xsk'
      ? XskPort.create(p.ifname, pairs, { mtu: spec.mtu ?? 1500 })
      : TapPort.open(p.ifname, pairs);
    let net: NetDevice | null = null;
    try {
      if (spec.mtu && p.kind === 'tap') port.setMtu(spec.mtu);
      const offload = spec.offload ? { device: spec.name, pinDir: spec.pinDir ?? null } : null;
      net = new NetDevice({ name: spec.name, port, queuePairs: pairs, threads: spec.threads, busyPoll: spec.busyPoll, mtu: spec.mtu, offload });
      const d = new Device(spec, port, net);
      d.endpoint.start();
      return d;
    } catch (e) {
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
      port: { kind: this.port.kind, ifname: this.port.ifname, created, pinnedBytes: (this.port as { pinnedBytes?: number }).pinnedBytes ?? 0 },
      queuePairs: this.net.maxQueuePairs(),
      offload: this.broker ? { pair: this.net.offloadPair, claimed: this.broker.claimed, program: this.broker.program?.id ?? null } : null,
      connected: s !== null,
      connections: this.endpoint.connections,
      features: describeFeatures(this.net.negotiated),
      featureBits: '0x' + this.net.negotiated.toString(16),
      mtu: this.net.currentMtu,
      runningVrings: this.net.runningVrings,
      refusedRequests: (s?.refused ?? 0),
      lastDisconnect: this.lastDisconnect,
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

  async close(): Promise<void> {
    // Shutting down is not a device reset: pinned offload state must outlive the process.
    this.net.shuttingDown = true;
    this.endpoint.stop();
    await this.net.close();
  }
}
