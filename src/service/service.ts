import fs from 'node:fs';
import path from 'node:path';
import { logger } from '../log.js';
import { ControlServer, ControlError, type Method } from '../control/control-server.js';
import { Device, type SocketFiles } from './device.js';
import { pinLimitBytes, type DeviceSpec } from './device-spec.js';
import { validateQuotas } from '../offload/quotas.js';
import { WorkerPool, defaultWorkers, type PoolOptions } from '../datapath/worker-pool.js';
import { DEFAULT_REPLY_POLL_US } from '../net/reply-poll.js';

/** The quota.set key of the pinned-memory quota (bytes, or a size string like "1GiB"). */
export const PIN_QUOTA_KEY = 'maxPinnedMemory';

const log = logger('vhost-xdp');

/** Every device of one process plus the control API; tears all of it down on stop(). */
export class Service {
  readonly devices = new Map<string, Device>();
  private control: ControlServer | null = null;
  private stopping: Promise<void> | null = null;

  private constructor(readonly pool: WorkerPool) {}

  /**
   * Datapath options default to one worker per core this process may run on (one per listed
   * CPU with placement.cpus), sleeping in epoll after a reply window (DEFAULT_REPLY_POLL_US).
   */
  static async start(specs: DeviceSpec[], controlPath: string | null, datapath: Partial<PoolOptions> = {}, files: SocketFiles = {}): Promise<Service> {
    const workers = datapath.workers ?? (datapath.placement?.cpus?.length || defaultWorkers());
    const svc = new Service(new WorkerPool({ workers, busyPoll: datapath.busyPoll ?? false, replyPollUs: datapath.replyPollUs ?? DEFAULT_REPLY_POLL_US, placement: datapath.placement }));
    const names = new Set<string>();
    for (const s of specs) {
      if (names.has(s.name)) throw new Error(`two devices are named '${s.name}'`);
      names.add(s.name);
    }
    try {
      // The control socket first: a second serve pointed at a live one's control socket must
      // fail before it creates any port or socket of its own.
      if (controlPath) {
        fs.mkdirSync(path.dirname(controlPath), { recursive: true });
        svc.control = await ControlServer.listen(controlPath, svc.methods());
      }
      for (const spec of specs) {
        svc.devices.set(spec.name, Device.create(spec, svc.pool, files));
        log.info(`device ${spec.name}: ${spec.client ? 'connecting to' : 'listening on'} ${spec.socket}, port ${spec.port}, ${spec.queues} queue pair(s)`);
      }
    } catch (e) {
      await svc.stop();
      throw e;
    }
    return svc;
  }

  device(name: unknown): Device {
    const d = typeof name === 'string' ? this.devices.get(name) : undefined;
    if (!d) throw new ControlError('no-device', `no device named '${String(name)}' (devices: ${[...this.devices.keys()].join(', ') || 'none'})`);
    return d;
  }

  methods(): Record<string, Method> {
    return {
      status: () => ({ pid: process.pid, workers: this.pool.placement(), devices: [...this.devices.values()].map((d) => d.status()) }),
      stats: (p) => (p.name ? [this.device(p.name).statsSnapshot()] : [...this.devices.values()].map((d) => d.statsSnapshot())),
      'offload.show': (p) => {
        const d = this.device(p.name);
        const t = d.net.stats.total();
        return { ...this.broker(d).show(), host: d.offloadHost(), verdicts: { pass: t.xdpPass, drop: t.xdpDrop, tx: t.xdpTx, aborted: t.xdpAborted } };
      },
      // OffloadDetach: the program or object removed (kind), an OBJ_LOAD in flight cancelled.
      'offload.detach': (p) => this.broker(this.device(p.name)).detach(),
      // The offload broker's quotas (limits/usage, with --offload) and, on xsk ports, the
      // pinned-memory quota (pinnedMemory); a device needs at least one of them.
      'quota.show': (p) => {
        const d = this.device(p.name);
        const pin = d.pinQuota();
        if (!pin) return this.broker(d, true).quotas();
        return { ...(d.broker ? d.broker.quotas() : {}), pinnedMemory: pin };
      },
      'quota.set': (p) => {
        const d = this.device(p.name);
        const all = (p.changes && typeof p.changes === 'object' ? p.changes : {}) as Record<string, unknown>;
        const { [PIN_QUOTA_KEY]: pinRaw, ...changes } = all;
        const setPin = pinRaw !== undefined;
        const setOffload = Object.values(changes).some((v) => v !== undefined);
        const xsk = d.xsk;
        if (setPin && !xsk) throw new ControlError('no-pin-quota', `device '${d.spec.name}' has a ${d.port.kind} port: only xsk ports pin guest memory`);
        if (setOffload || !xsk) this.broker(d, true);
        // Every value is checked before any is applied, so a refused request changes nothing.
        try {
          validateQuotas(changes); // with the flag named, before the datapath sees them
        } catch (e) {
          throw new ControlError('bad-quota', (e as Error).message);
        }
        let pinBytes = 0;
        if (setPin) {
          try {
            pinBytes = xsk!.checkPinLimit(pinLimitBytes(pinRaw));
          } catch (e) {
            throw new ControlError('bad-quota', `--max-pinned-memory ${String(pinRaw)}: ${(e as Error).message}`);
          }
        }
        const out = d.broker ? d.broker.setQuotas(changes) : { warnings: [] as string[] };
        const pinWarnings = setPin ? d.setPinQuota(pinBytes)!.warnings : [];
        if (!xsk) return out;
        return { ...out, warnings: [...out.warnings, ...pinWarnings], pinnedMemory: d.pinQuota()! };
      },
    };
  }

  /** forQuota: say which quotas the device does have instead. */
  private broker(d: Device, forQuota = false) {
    if (!d.broker) {
      const why = !forQuota ? '' : d.xsk ? ': only the pinned-memory quota (maxPinnedMemory) applies'
        : `, and its ${d.port.kind} port pins no guest memory: it has no quotas`;
      throw new ControlError('no-offload', `device '${d.spec.name}' was not started with --offload${why}`);
    }
    return d.broker;
  }

  /**
   * Shutdown on a signal: whatever happens to the orderly stop (a deadline, a failure), the ports
   * we created must go with the process. `final`: the orderly stop ran out of time.
   */
  abandonPorts(final: boolean): void {
    for (const d of this.devices.values()) {
      try { d.port.abandon?.(final); } catch (e) { log.error(`${d.spec.name}: ${(e as Error).message}`); }
    }
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      await this.control?.close();
      for (const d of this.devices.values()) {
        try { await d.close(); } catch (e) { log.error(`closing ${d.spec.name}: ${(e as Error).message}`); }
      }
      this.devices.clear();
      await this.pool.close();
    })();
    return this.stopping;
  }
}
