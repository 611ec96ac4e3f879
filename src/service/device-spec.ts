import { VxError } from '../errors.js';
import { parseSize } from '../offload/quotas.js';
import { TAP_IO_MODES, type TapIoMode } from '../ports/port.js';

/** How a device is described on the command line, in a config file, or over the control API. */
export interface DeviceSpec {
  name: string;
  /** The socket path; with listenFd, only a label (`fd:N`) for logs and status. */
  socket: string;
  /**
   * Server mode: accept on this inherited listening socket instead of binding `socket`
   * (`--fd N`, or fd 3 from systemd socket activation).
   */
  listenFd?: number;
  /** `tap:IFNAME` */
  port: string;
  queues: number;
  client: boolean;
  mtu?: number;
  /** Offer one more queue pair for the offload channel (docs/offload-protocol.md). */
  offload?: boolean;
  /** Pin offloaded programs and maps here so a restarted backend re-adopts them. */
  pinDir?: string;
  /**
   * xsk ports: the pinned-memory quota of the UMEM in bytes (a size string like "512MiB" is
   * accepted too and turned into bytes by validateSpec). Over it the port runs bounce-only.
   */
  pinLimit?: number;
  /** tap ports: io_uring, readv/writev or whichever this host allows (default 'auto'; serve --tap-io). */
  tapIo?: TapIoMode;
}

export type SpecErrorCode =
  | 'bad-port' | 'bad-device-name' | 'no-socket' | 'pin-dir-without-offload' | 'bad-queues' | 'process-wide-option'
  | 'bad-mtu' | 'pin-limit-not-xsk' | 'bad-pin-limit' | 'bad-device-option' | 'unknown-device-key'
  | 'socket-without-port' | 'nothing-to-serve' | 'bad-workers' | 'fd-with-socket' | 'fd-with-client'
  | 'bad-socket-mode' | 'bad-socket-group' | 'bad-tap-io' | 'bad-worker-cpus' | 'bad-worker-nice' | 'bad-worker-fifo' | 'bad-worker-slice'
  | 'bad-reply-poll';

/** The operator's device configuration is wrong: fixed by editing it, never by a reconnect. */
export class SpecError extends VxError {
  constructor(code: SpecErrorCode, message: string) {
    super(code, message);
  }
}

const NAME_RE = /^[A-Za-z0-9_.-]{1,32}$/;

export function parsePort(port: string): { kind: 'tap' | 'xsk'; ifname: string } {
  const m = /^(tap|xsk):([A-Za-z0-9_.-]{1,15})$/.exec(port);
  if (!m) throw new SpecError('bad-port', `port '${port}' is not of the form tap:IFNAME or xsk:IFNAME (IFNAME 1..15 characters)`);
  return { kind: m[1] as 'tap' | 'xsk', ifname: m[2]! };
}

export function validateSpec(s: DeviceSpec): DeviceSpec {
  if (!NAME_RE.test(s.name)) throw new SpecError('bad-device-name', `device name '${s.name}' must be 1..32 of A-Z a-z 0-9 _ . -`);
  if (!s.socket) throw new SpecError('no-socket', `device ${s.name}: a socket path is required`);
  parsePort(s.port);
  if (s.listenFd !== undefined && s.client) throw new SpecError('fd-with-client', `device ${s.name}: an inherited listening socket (--fd) serves; it cannot be used in client mode`);
  if (s.pinDir !== undefined && !s.offload) throw new SpecError('pin-dir-without-offload', `device ${s.name}: a pin directory only makes sense with offload`);
  if (!Number.isInteger(s.queues) || s.queues < 1 || s.queues > 16) throw new SpecError('bad-queues', `device ${s.name}: queues ${s.queues} outside 1..16`);
  if (s.mtu !== undefined && (!Number.isInteger(s.mtu) || s.mtu < 68 || s.mtu > 65535)) throw new SpecError('bad-mtu', `device ${s.name}: mtu ${s.mtu} outside 68..65535`);
  if (s.tapIo !== undefined && !TAP_IO_MODES.includes(s.tapIo)) throw new SpecError('bad-tap-io', `device ${s.name}: tap I/O '${String(s.tapIo)}' is not uring, rw or auto`);
  if (s.pinLimit === undefined) return s;
  if (parsePort(s.port).kind !== 'xsk') throw new SpecError('pin-limit-not-xsk', `device ${s.name}: a pin limit only applies to xsk ports (a tap port pins no guest memory)`);
  // The lower bound depends on the queue count: XskPort checks it when the device is created.
  return { ...s, pinLimit: parsePinLimit(s.pinLimit as unknown, `device ${s.name}`) };
}

/** "512MiB", "4G", a byte count, from untyped input (JSON, the control API): bytes, or a RangeError. */
export function pinLimitBytes(v: unknown): number {
  if (typeof v !== 'string' && typeof v !== 'number') throw new RangeError('expected a size such as 512MiB');
  return parseSize(v);
}

/** pinLimitBytes, or a SpecError that starts with `what`. */
export function parsePinLimit(v: unknown, what: string): number {
  try {
    return pinLimitBytes(v);
  } catch (e) {
    throw new SpecError('bad-pin-limit', `${what}: pin limit '${String(v)}': ${(e as Error).message}`);
  }
}

/**
 * Parses `name=dev1,socket=/run/x.sock,port=tap:vx1,queues=2,client=1,mtu=1500`
 * (xsk ports also `pin-limit=512MiB`). A default pin limit applies to xsk ports only.
 */
export function parseDeviceOption(text: string, defaults: Omit<DeviceSpec, 'name' | 'socket' | 'port'>): DeviceSpec {
  const kv = new Map<string, string>();
  for (const part of text.split(',')) {
    const i = part.indexOf('=');
    if (i <= 0) throw new SpecError('bad-device-option', `--device '${text}': '${part}' is not key=value`);
    kv.set(part.slice(0, i).trim(), part.slice(i + 1).trim());
  }
  const known = new Set(['name', 'socket', 'port', 'queues', 'client', 'mtu', 'offload', 'pin-dir', 'pin-limit']);
  for (const k of ['threads', 'busy-poll']) {
    // Datapath threads are a pool shared by every device now, not a per-device setting.
    if (kv.has(k)) throw new SpecError('process-wide-option', `--device '${text}': '${k}' is a process-wide option now (serve --${k === 'threads' ? 'workers' : k})`);
  }
  for (const k of kv.keys()) if (!known.has(k)) throw new SpecError('unknown-device-key', `--device '${text}': unknown key '${k}' (known: ${[...known].join(', ')})`);
  const bool = (v: string | undefined, d: boolean) => (v === undefined ? d : v === '1' || v === 'true' || v === 'yes');
  const num = (v: string | undefined, d: number | undefined) => (v === undefined ? d : Number(v));
  return validateSpec({
    name: kv.get('name') ?? '',
    socket: kv.get('socket') ?? '',
    port: kv.get('port') ?? '',
    queues: num(kv.get('queues'), defaults.queues)!,
    client: bool(kv.get('client'), defaults.client),
    mtu: num(kv.get('mtu'), defaults.mtu),
    offload: bool(kv.get('offload'), defaults.offload ?? false),
    pinDir: kv.get('pin-dir') ?? defaults.pinDir,
    tapIo: defaults.tapIo,
    pinLimit: kv.has('pin-limit') ? parsePinLimit(kv.get('pin-limit'), `--device '${text}'`) : pinLimitDefault(kv.get('port') ?? '', defaults.pinLimit),
  });
}

/** The serve-wide pin limit for a device given no own one: xsk ports take it, tap ports have none. */
export function pinLimitDefault(port: string, pinLimit: number | undefined): number | undefined {
  return /^xsk:/.test(port) ? pinLimit : undefined;
}
