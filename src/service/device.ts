import { logger } from '../log.js';
import { NetDevice } from '../net/net-device.js';
import { describeFeatures } from '../net/features.js';
import { TapPort } from '../ports/tap.js';
import type { Port } from '../ports/port.js';
import { VhostUserEndpoint } from '../vhost-user/endpoint.js';
import { parsePort, type DeviceSpec } from './device-spec.js';

export interface DeviceStatus {
  name: string;
  socket: string;
  mode: 'server' | 'client';
  port: { kind: string; ifname: string; created: boolean };
  queuePairs: number;
  connected: boolean;
  connections: number;
  features: string[];
  featureBits: string;
  mtu: number;
  runningVrings: number[];
  refusedRequests: number;
  lastDisconnect: string;
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
    const port = TapPort.open(p.ifname, spec.queues);
    let net: NetDevice | null = null;
    try {
      if (spec.mtu) port.setMtu(spec.mtu);
      net = new NetDevice({ name: spec.name, port, queuePairs: spec.queues, threads: spec.threads, busyPoll: spec.busyPoll, mtu: spec.mtu });
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
    const tap = this.port as TapPort;
    return {
      name: this.spec.name,
      socket: this.spec.socket,
      mode: this.spec.client ? 'client' : 'server',
      port: { kind: this.port.kind, ifname: this.port.ifname, created: tap.created ?? false },
      queuePairs: this.spec.queues,
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
      pairs: Array.from({ length: this.spec.queues }, (_, p) => this.net.stats.pair(p)),
      port: this.port.stats(),
    };
  }

  async close(): Promise<void> {
    this.endpoint.stop();
    await this.net.close();
  }
}
