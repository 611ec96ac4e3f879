// Prometheus metrics (`serve --metrics HOST:PORT`), through prom-client. Everything is read
// when Prometheus scrapes: the datapath counters from each device's SharedArrayBuffer (plain
// loads; the workers never wait for a reader and nothing is posted to them), the rest from
// the main thread's own state. docs/metrics.md lists every metric.

import http from 'node:http';
import net from 'node:net';
import { Registry, Counter, Gauge, collectDefaultMetrics } from 'prom-client';
import { VxError } from '../errors.js';
import { logger } from '../log.js';
import type { PairCounters } from '../net/stats.js';
import type { Device, OffloadHost } from './device.js';

const log = logger('metrics');

/** Where --metrics listens. */
export interface MetricsAddress { host: string; port: number }

/**
 * `PORT`, `HOST:PORT` or `[V6]:PORT`. Without a host: loopback (127.0.0.1), so metrics are
 * never exposed beyond the machine unless an address is given.
 */
export function parseMetricsAddress(s: string): MetricsAddress {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d+)$/.exec(s) ?? /^()()(\d+)$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  const host = m ? (m[1] || m[2] || '127.0.0.1') : '';
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new VxError('bad-metrics-address', `--metrics ${s}: give PORT (loopback) or HOST:PORT ([ADDR]:PORT for IPv6)`);
  }
  return { host, port };
}

/** Drop reasons as they appear in vhost_xdp_drops_total: counter → {direction, reason}. */
export const DROP_REASONS: readonly { counter: keyof PairCounters; direction: 'rx' | 'tx'; reason: string }[] = [
  { counter: 'rxDropOversize', direction: 'rx', reason: 'oversize' },
  { counter: 'rxErrBuffer', direction: 'rx', reason: 'bad_buffer' },
  { counter: 'rxErrHost', direction: 'rx', reason: 'host_error' },
  { counter: 'rxRingBroken', direction: 'rx', reason: 'ring_broken' },
  { counter: 'xdpDrop', direction: 'rx', reason: 'offload_drop' },
  { counter: 'xdpAborted', direction: 'rx', reason: 'offload_aborted' },
  { counter: 'txErrFrame', direction: 'tx', reason: 'bad_frame' },
  { counter: 'txDropOversize', direction: 'tx', reason: 'oversize' },
  { counter: 'txDropHostBusy', direction: 'tx', reason: 'host_busy' },
  { counter: 'txDropLinkDown', direction: 'tx', reason: 'link_down' },
  { counter: 'txDropRefused', direction: 'tx', reason: 'refused' },
  { counter: 'txDropClaimed', direction: 'tx', reason: 'offload_channel' },
  { counter: 'txErrHost', direction: 'tx', reason: 'host_error' },
  { counter: 'txRingBroken', direction: 'tx', reason: 'ring_broken' },
];

/** One device as read at one scrape. */
interface DeviceSample {
  name: string;
  pairs: PairCounters[];
  port: { kind: string; ifname: string; stats: ReturnType<Device['port']['stats']> };
  status: ReturnType<Device['status']>;
  offload: null | {
    claimed: boolean;
    program: OffloadHost['program'];
    maps: number;
    mapMemory: number;
    requests: Record<string, number>;
    bpfPrefix: string;
  };
}

function sample(d: Device): DeviceSample {
  const snap = d.statsSnapshot();
  const b = d.broker;
  let offload: DeviceSample['offload'] = null;
  if (b) {
    const host = d.offloadHost()!;
    const usage = b.quotas().usage;
    offload = {
      claimed: b.claimed,
      program: host.program,
      maps: usage.maps,
      mapMemory: usage.mapMemory,
      requests: b.requests.byStatus,
      bpfPrefix: host.bpfPrefix,
    };
  }
  return { name: snap.name, pairs: snap.pairs, port: { kind: d.port.kind, ifname: d.port.ifname, stats: snap.port }, status: d.status(), offload };
}

type Emit = (labels: Record<string, string | number>, value: number) => void;

/** The metric families, each filled from the samples taken for the current scrape. */
function families(reg: Registry, current: () => DeviceSample[]): void {
  type Fill = (s: DeviceSample, emit: Emit) => void;
  // Values are set from the samples at each scrape: a counter is re-added from zero (prom-client
  // counters only go up), a gauge set.
  const counter = (name: string, help: string, labelNames: string[], fill: Fill) => new Counter({
    name, help, labelNames, registers: [reg],
    collect() { this.reset(); for (const s of current()) fill(s, (l, v) => this.inc(l, v)); },
  });
  const gauge = (name: string, help: string, labelNames: string[], fill: Fill) => new Gauge({
    name, help, labelNames, registers: [reg],
    collect() { this.reset(); for (const s of current()) fill(s, (l, v) => this.set(l, v)); },
  });
  const perQueue = (c: keyof PairCounters) => (s: DeviceSample, emit: Emit) => {
    s.pairs.forEach((p, q) => emit({ device: s.name, queue: q }, p[c]));
  };
  const Q = ['device', 'queue'];

  counter('vhost_xdp_rx_packets_total', 'Frames delivered to the guest (host to guest), per queue pair', Q, perQueue('rxPackets'));
  counter('vhost_xdp_rx_bytes_total', 'Bytes delivered to the guest, vnet header excluded', Q, perQueue('rxBytes'));
  counter('vhost_xdp_tx_packets_total', 'Guest frames handed to the host (guest to host), per queue pair', Q, perQueue('txPackets'));
  counter('vhost_xdp_tx_bytes_total', 'Bytes of guest frames handed to the host, vnet header excluded', Q, perQueue('txBytes'));
  counter('vhost_xdp_drops_total', 'Frames lost, by direction and reason (docs/metrics.md lists the reasons)', [...Q, 'direction', 'reason'], (s, emit) => {
    s.pairs.forEach((p, q) => {
      for (const r of DROP_REASONS) emit({ device: s.name, queue: q, direction: r.direction, reason: r.reason }, p[r.counter]);
    });
  });
  counter('vhost_xdp_rx_no_buffer_total', 'Bursts that found the guest without a usable receive buffer while the host had frames (they wait in the host queue)', Q, perQueue('rxNoBuffers'));
  counter('vhost_xdp_kicks_total', 'Guest kicks (TX ring notifications) handled', Q, perQueue('kicks'));
  counter('vhost_xdp_calls_total', 'Interrupts signalled to the guest (call eventfd writes)', Q, perQueue('calls'));
  counter('vhost_xdp_reply_polls_total', 'Reply windows a worker polled the transmit ring for after a delivery (serve --reply-poll)', Q, perQueue('replyPolls'));
  counter('vhost_xdp_reply_poll_hits_total', 'Reply windows that took the guest\'s answer without its kick', Q, perQueue('replyPollHits'));
  counter('vhost_xdp_copies_total', 'Payload copies made in JavaScript (bounce copies), by direction', [...Q, 'direction'], (s, emit) => {
    s.pairs.forEach((p, q) => {
      emit({ device: s.name, queue: q, direction: 'rx' }, p.rxCopies);
      emit({ device: s.name, queue: q, direction: 'tx' }, p.txCopies);
    });
  });
  counter('vhost_xdp_copied_bytes_total', 'Bytes copied in JavaScript (bounce copies), by direction', [...Q, 'direction'], (s, emit) => {
    s.pairs.forEach((p, q) => {
      emit({ device: s.name, queue: q, direction: 'rx' }, p.rxCopyBytes);
      emit({ device: s.name, queue: q, direction: 'tx' }, p.txCopyBytes);
    });
  });
  counter('vhost_xdp_offload_verdicts_total', 'Verdicts of the offloaded program on host to guest frames counted by the backend (tap ports)', [...Q, 'verdict'], (s, emit) => {
    if (!s.offload) return;
    s.pairs.forEach((p, q) => {
      emit({ device: s.name, queue: q, verdict: 'pass' }, p.xdpPass);
      emit({ device: s.name, queue: q, verdict: 'drop' }, p.xdpDrop);
      emit({ device: s.name, queue: q, verdict: 'tx' }, p.xdpTx);
      emit({ device: s.name, queue: q, verdict: 'aborted' }, p.xdpAborted);
    });
  });

  // Per device.
  gauge('vhost_xdp_connected', '1 while a vhost-user frontend is connected', ['device'], (s, emit) => emit({ device: s.name }, s.status.connected ? 1 : 0));
  counter('vhost_xdp_connections_total', 'vhost-user connections accepted or made', ['device'], (s, emit) => emit({ device: s.name }, s.status.connections));
  gauge('vhost_xdp_running_vrings', 'Rings the frontend has started', ['device'], (s, emit) => emit({ device: s.name }, s.status.runningVrings.length));
  gauge('vhost_xdp_queue_pairs', 'Queue pairs the guest sees (the offload channel included)', ['device'], (s, emit) => emit({ device: s.name }, s.status.queuePairs));
  gauge('vhost_xdp_host_queue_pairs', 'Queue pairs the host sends frames to (pair 0, and those whose receive ring the guest enabled)', ['device'], (s, emit) => emit({ device: s.name }, s.status.hostPairs.length));
  gauge('vhost_xdp_migration_logging', '1 while dirty logging for live migration is on', ['device'], (s, emit) => emit({ device: s.name }, s.status.logging ? 1 : 0));
  counter('vhost_xdp_vhost_user_refusals_total', 'vhost-user requests refused, by error code (every connection of the device)', ['device', 'code'], (s, emit) => {
    for (const [code, n] of Object.entries(s.status.refusals)) emit({ device: s.name, code }, n);
  });
  gauge('vhost_xdp_pinned_bytes', 'Guest RAM pinned for the AF_XDP UMEM (xsk ports; 0 on tap)', ['device'], (s, emit) => emit({ device: s.name }, s.status.port.pinnedBytes));
  gauge('vhost_xdp_pin_limit_bytes', 'Pinned-memory quota (xsk ports only)', ['device'], (s, emit) => {
    if (s.status.port.pinLimitBytes !== null) emit({ device: s.name }, s.status.port.pinLimitBytes);
  });
  gauge('vhost_xdp_umem_bounce_only', '1 when the UMEM is bounce-only (every frame copied), 0 zero-copy (xsk ports with guest memory)', ['device'], (s, emit) => {
    if (s.status.port.umem) emit({ device: s.name }, s.status.port.umem === 'bounce' ? 1 : 0);
  });
  const portLabels = ['device', 'port', 'ifname', 'direction'];
  const portFill = (rx: keyof DeviceSample['port']['stats'], tx: keyof DeviceSample['port']['stats']) => (s: DeviceSample, emit: Emit) => {
    const base = { device: s.name, port: s.port.kind, ifname: s.port.ifname };
    // The host interface's own view: its tx is toward the guest, its rx from the guest.
    emit({ ...base, direction: 'to_guest' }, s.port.stats[tx]);
    emit({ ...base, direction: 'from_guest' }, s.port.stats[rx]);
  };
  counter('vhost_xdp_port_packets_total', "The host interface's kernel packet counters (tap, or the veth's host end)", portLabels, portFill('rxPackets', 'txPackets'));
  counter('vhost_xdp_port_bytes_total', "The host interface's kernel byte counters", portLabels, portFill('rxBytes', 'txBytes'));
  counter('vhost_xdp_port_dropped_total', "The host interface's kernel drop counters (to_guest: frames the host queue could not hold, e.g. while the guest had no buffers)", portLabels, portFill('rxDropped', 'txDropped'));

  // Offload (devices started with --offload).
  gauge('vhost_xdp_offload_claimed', '1 while the guest holds the offload channel', ['device'], (s, emit) => {
    if (s.offload) emit({ device: s.name }, s.offload.claimed ? 1 : 0);
  });
  gauge('vhost_xdp_offload_program_info', "The guest's offloaded program (value 1): the broker's program id and tag, the guest's name, the host object name and the id of the host program that runs it", ['device', 'id', 'tag', 'name', 'host_name', 'host_id'], (s, emit) => {
    const p = s.offload?.program;
    if (p) emit({ device: s.name, id: p.id, tag: p.tag, name: p.name, host_name: p.hostName, host_id: p.hostId ?? '' }, 1);
  });
  gauge('vhost_xdp_offload_program_id', 'Kernel id of the host program that runs the offload (absent without one)', ['device'], (s, emit) => {
    const p = s.offload?.program;
    if (p) emit({ device: s.name }, p.hostId ?? p.id);
  });
  gauge('vhost_xdp_offload_maps', 'Offloaded maps', ['device'], (s, emit) => { if (s.offload) emit({ device: s.name }, s.offload.maps); });
  gauge('vhost_xdp_offload_map_memory_bytes', 'Memory of the offloaded maps, as charged to the max-map-memory quota', ['device'], (s, emit) => {
    if (s.offload) emit({ device: s.name }, s.offload.mapMemory);
  });
  counter('vhost_xdp_offload_requests_total', 'Offload requests answered, by response status (QUOTA_EXCEEDED and RATE_LIMITED are quota refusals)', ['device', 'status'], (s, emit) => {
    if (!s.offload) return;
    for (const [status, n] of Object.entries(s.offload.requests)) emit({ device: s.name, status }, n);
  });
  gauge('vhost_xdp_offload_bpf_prefix_info', 'The prefix of the host BPF object names of the device (bpftool prog/map show), value 1', ['device', 'prefix'], (s, emit) => {
    if (s.offload) emit({ device: s.name, prefix: s.offload.bpfPrefix }, 1);
  });
}

/** GET /metrics over HTTP; anything else 404. */
export class MetricsServer {
  private samples: DeviceSample[] = [];
  /** Scrapes one at a time: the samples of one are not replaced while its families are written. */
  private queue: Promise<void> = Promise.resolve();

  private constructor(private readonly server: http.Server, readonly address: MetricsAddress, private readonly registry: Registry) {}

  static async listen(at: MetricsAddress, devices: () => Iterable<Device>): Promise<MetricsServer> {
    const registry = new Registry();
    // process_* and nodejs_* (the main thread: memory, fds, event loop lag).
    collectDefaultMetrics({ register: registry });
    let srv: MetricsServer | null = null;
    families(registry, () => srv?.samples ?? []);
    const server = http.createServer((req, res) => {
      const s = srv!;
      s.queue = s.queue.then(() => s.answer(req, res, devices));
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) => reject(new VxError('metrics-listen', `--metrics ${at.host}:${at.port}: ${e.code ?? e.message}`)));
      server.listen(at.port, at.host, () => resolve());
    });
    const a = server.address() as net.AddressInfo;
    srv = new MetricsServer(server, { host: at.host, port: a.port }, registry);
    log.info(`Prometheus metrics on http://${net.isIPv6(at.host) ? `[${at.host}]` : at.host}:${a.port}/metrics`);
    return srv;
  }

  private async answer(req: http.IncomingMessage, res: http.ServerResponse, devices: () => Iterable<Device>): Promise<void> {
    const url = (req.url ?? '').split('?')[0];
    if (url !== '/metrics' || (req.method !== 'GET' && req.method !== 'HEAD')) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: GET /metrics\n');
      return;
    }
    try {
      this.samples = [...devices()].map(sample);
      const body = await this.registry.metrics();
      res.writeHead(200, { 'content-type': this.registry.contentType }).end(req.method === 'HEAD' ? undefined : body);
    } catch (e) {
      log.warn(`scrape failed: ${(e as Error).message}`);
      res.writeHead(500, { 'content-type': 'text/plain' }).end('scrape failed\n');
    } finally {
      this.samples = [];
    }
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.closeAllConnections();
      this.server.close(() => resolve());
    });
  }
}
