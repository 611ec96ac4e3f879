import fs from 'node:fs';
import path from 'node:path';
import { logger } from '../log.js';
import { ControlServer, ControlError, type Method } from '../control/control-server.js';
import { Device } from './device.js';
import type { DeviceSpec } from './device-spec.js';
import { validateQuotas } from '../offload/quotas.js';

const log = logger('vhost-xdp');

/** Every device of one process plus the control API; tears all of it down on stop(). */
export class Service {
  readonly devices = new Map<string, Device>();
  private control: ControlServer | null = null;
  private stopping: Promise<void> | null = null;

  static async start(specs: DeviceSpec[], controlPath: string | null): Promise<Service> {
    const svc = new Service();
    const names = new Set<string>();
    for (const s of specs) {
      if (names.has(s.name)) throw new Error(`two devices are named '${s.name}'`);
      names.add(s.name);
    }
    try {
      for (const spec of specs) {
        svc.devices.set(spec.name, Device.create(spec));
        log.info(`device ${spec.name}: ${spec.client ? 'connecting to' : 'listening on'} ${spec.socket}, port ${spec.port}, ${spec.queues} queue pair(s)`);
      }
      if (controlPath) {
        fs.mkdirSync(path.dirname(controlPath), { recursive: true });
        svc.control = await ControlServer.listen(controlPath, svc.methods());
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
      status: () => ({ pid: process.pid, devices: [...this.devices.values()].map((d) => d.status()) }),
      stats: (p) => (p.name ? [this.device(p.name).statsSnapshot()] : [...this.devices.values()].map((d) => d.statsSnapshot())),
      'offload.show': (p) => {
        const d = this.device(p.name);
        const t = d.net.stats.total();
        return { ...this.broker(d).show(), verdicts: { pass: t.xdpPass, drop: t.xdpDrop, tx: t.xdpTx, aborted: t.xdpAborted } };
      },
      'offload.detach': (p) => ({ detached: this.broker(this.device(p.name)).detach() }),
      'quota.show': (p) => this.broker(this.device(p.name)).quotas(),
      'quota.set': (p) => {
        const changes = (p.changes && typeof p.changes === 'object' ? p.changes : {}) as Record<string, unknown>;
        validateQuotas(changes); // refuse bad values here, with the flag named, before the datapath sees them
        return this.broker(this.device(p.name)).setQuotas(changes);
      },
    };
  }

  private broker(d: Device) {
    if (!d.broker) throw new ControlError('no-offload', `device '${d.spec.name}' was not started with --offload`);
    return d.broker;
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      await this.control?.close();
      for (const d of this.devices.values()) {
        try { await d.close(); } catch (e) { log.error(`closing ${d.spec.name}: ${(e as Error).message}`); }
      }
      this.devices.clear();
    })();
    return this.stopping;
  }
}
