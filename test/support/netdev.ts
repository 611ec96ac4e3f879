import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';

/**
 * Host-side network setup for tests: namespaces, veth pairs, link state and counters, via
 * iproute2. Setup is not a hot path, so shelling out keeps this small and obviously correct.
 */

export interface LinkStats {
  rxPackets: number;
  txPackets: number;
  rxBytes: number;
  txBytes: number;
  rxDropped: number;
  txDropped: number;
}

export class CommandError extends Error {
  constructor(readonly argv: readonly string[], readonly status: number | null, readonly stderr: string) {
    super(`${argv.join(' ')} failed (status ${status}): ${stderr.trim()}`);
    this.name = 'CommandError';
  }
}

/** Runs a command synchronously; throws CommandError with stderr on a non-zero status. */
export function run(argv: readonly string[], opts: { allowFail?: boolean; timeoutMs?: number } = {}): string {
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', timeout: opts.timeoutMs ?? 10_000 });
  if (r.error) {
    if (opts.allowFail) return '';
    throw new CommandError(argv, null, r.error.message);
  }
  if (r.status !== 0 && !opts.allowFail) throw new CommandError(argv, r.status, r.stderr ?? '');
  return r.stdout ?? '';
}

function ip(args: readonly string[], netns?: string, allowFail = false): string {
  return run(['ip', ...(netns ? ['-n', netns] : []), ...args], { allowFail });
}

let ifCounter = 0;

/**
 * An interface name unique within this process and unlikely to collide with other test
 * processes: prefix + pid (base 36) + counter, cut to the kernel's 15-character limit
 * (IFNAMSIZ - 1). Keep prefixes short (≤ 5 chars) so the counter survives the cut.
 */
export function uniqueIfName(prefix: string): string {
  const n = (ifCounter++).toString(36);
  const pid = process.pid.toString(36);
  const room = 15 - n.length;
  const base = `${prefix}${pid}`;
  return `${base.length > room ? base.slice(base.length - room) : base}${n}`;
}

/** A unique network-namespace name (no length limit, but keep it readable). */
export function uniqueNetnsName(prefix = 'vxt'): string {
  return `${prefix}-${process.pid}-${(ifCounter++).toString(36)}`;
}

export function netnsExists(name: string): boolean {
  return existsSync(`/var/run/netns/${name}`);
}

/** Creates a network namespace and brings its loopback up. */
export function createNetns(name: string): void {
  ip(['netns', 'add', name]);
  ip(['link', 'set', 'lo', 'up'], name);
}

export function deleteNetns(name: string): void {
  if (netnsExists(name)) ip(['netns', 'delete', name], undefined, true);
}

export interface VethOptions {
  /** Put end `b` into this namespace (a stays in the caller's namespace). */
  netns?: string;
  /** Bring both ends up (default true). */
  up?: boolean;
  mtu?: number;
  /** Disable IPv6 on both ends so router/neighbour solicitations do not mix with test frames (default true). */
  quiet?: boolean;
}

/** Creates a veth pair a<->b (b optionally inside a namespace). Delete with deleteLink(a). */
export function createVethPair(a: string, b: string, opts: VethOptions = {}): void {
  const { netns, up = true, mtu, quiet = true } = opts;
  ip(['link', 'add', a, 'type', 'veth', 'peer', 'name', b, ...(netns ? ['netns', netns] : [])]);
  try {
    for (const [name, ns] of [[a, undefined], [b, netns]] as const) {
      if (quiet) disableIpv6(name, ns);
      if (mtu !== undefined) setMtu(name, mtu, ns);
      if (up) setLinkUp(name, ns);
    }
  } catch (e) {
    deleteLink(a);
    throw e;
  }
}

/** Deletes a link if it exists (deleting one veth end removes both). Never throws. */
export function deleteLink(name: string, netns?: string): void {
  if (linkExists(name, netns)) ip(['link', 'delete', name], netns, true);
}

export function linkExists(name: string, netns?: string): boolean {
  if (!netns) return existsSync(`/sys/class/net/${name}`);
  const r = spawnSync('ip', ['-n', netns, 'link', 'show', 'dev', name], { encoding: 'utf8' });
  return r.status === 0;
}

export function setLinkUp(name: string, netns?: string): void {
  ip(['link', 'set', 'dev', name, 'up'], netns);
}

export function setMtu(name: string, mtu: number, netns?: string): void {
  ip(['link', 'set', 'dev', name, 'mtu', String(mtu)], netns);
}

export function getMac(name: string, netns?: string): string {
  const info = linkJson(name, netns);
  return String(info.address);
}

export function getMtu(name: string, netns?: string): number {
  return Number(linkJson(name, netns).mtu);
}

/** What the operator sees of a host link: the identity and configuration a restart must keep. */
export interface LinkIdentity {
  ifindex: number;
  mac: string;
  mtu: number;
  /** IPv4 addresses with prefix, sorted, space-separated. */
  addresses: string;
}

export function linkIdentity(name: string, netns?: string): LinkIdentity {
  const info = linkJson(name, netns);
  const addrs = JSON.parse(ip(['-j', '-4', 'addr', 'show', 'dev', name], netns)) as { addr_info?: { local: string; prefixlen: number }[] }[];
  return {
    ifindex: Number(info.ifindex),
    mac: String(info.address),
    mtu: Number(info.mtu),
    addresses: (addrs[0]?.addr_info ?? []).map((a) => `${a.local}/${a.prefixlen}`).sort().join(' '),
  };
}

export function addAddress(name: string, cidr: string, netns?: string): void {
  ip(['addr', 'add', cidr, 'dev', name], netns);
}

/** Stops the kernel from sending IPv6 autoconfiguration traffic on the link. */
export function disableIpv6(name: string, netns?: string): void {
  const argv = ['sysctl', '-qw', `net.ipv6.conf.${name}.disable_ipv6=1`];
  run(netns ? ['ip', 'netns', 'exec', netns, ...argv] : argv, { allowFail: true });
}

function linkJson(name: string, netns?: string, withStats = false): Record<string, unknown> {
  const out = ip(['-j', ...(withStats ? ['-s'] : []), 'link', 'show', 'dev', name], netns);
  const arr = JSON.parse(out) as Record<string, unknown>[];
  if (!arr[0]) throw new Error(`ip link show ${name}: no such link`);
  return arr[0];
}

/**
 * Kernel counters of a link. In the caller's namespace they come from sysfs (cheap enough to
 * poll); inside another namespace from `ip -j -s link`.
 */
export function readLinkStats(ifname: string, netns?: string): LinkStats {
  if (!netns) {
    const dir = `/sys/class/net/${ifname}/statistics`;
    const rd = (f: string): number => Number(readFileSync(`${dir}/${f}`, 'utf8'));
    return {
      rxPackets: rd('rx_packets'),
      txPackets: rd('tx_packets'),
      rxBytes: rd('rx_bytes'),
      txBytes: rd('tx_bytes'),
      rxDropped: rd('rx_dropped'),
      txDropped: rd('tx_dropped'),
    };
  }
  const s = linkJson(ifname, netns, true).stats64 as
    | { rx: Record<string, number>; tx: Record<string, number> }
    | undefined;
  if (!s) throw new Error(`ip -s link ${ifname}: no stats64`);
  return {
    rxPackets: s.rx.packets ?? 0,
    txPackets: s.tx.packets ?? 0,
    rxBytes: s.rx.bytes ?? 0,
    txBytes: s.tx.bytes ?? 0,
    rxDropped: s.rx.dropped ?? 0,
    txDropped: s.tx.dropped ?? 0,
  };
}

/**
 * veth's per-queue XDP counters (ethtool -S rx_queue_N_xdp_packets, _xdp_drops, _xdp_redirect,
 * _xdp_tx, ...) summed over the queues, keyed without the queue prefix (xdp_drops, ...).
 */
export function vethXdpCounters(ifname: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of run(['ethtool', '-S', ifname]).split('\n')) {
    const m = /^\s*rx_queue_\d+_(xdp_\w+|drops):\s*(\d+)/.exec(line);
    if (m) out[m[1]!] = (out[m[1]!] ?? 0) + Number(m[2]);
  }
  return out;
}

/** after − before, field by field. */
export function diffLinkStats(after: LinkStats, before: LinkStats): LinkStats {
  return {
    rxPackets: after.rxPackets - before.rxPackets,
    txPackets: after.txPackets - before.txPackets,
    rxBytes: after.rxBytes - before.rxBytes,
    txBytes: after.txBytes - before.txBytes,
    rxDropped: after.rxDropped - before.rxDropped,
    txDropped: after.txDropped - before.txDropped,
  };
}

/** Creates a Linux bridge (STP off: ports forward at once), IPv6 off, up. Delete with deleteLink. */
export function createBridge(name: string): void {
  ip(['link', 'add', name, 'type', 'bridge', 'stp_state', '0']);
  disableIpv6(name);
  setLinkUp(name);
}

/** Enslaves a link to a bridge and brings it up. */
export function addToBridge(link: string, bridge: string): void {
  disableIpv6(link);
  ip(['link', 'set', 'dev', link, 'master', bridge, 'up']);
}

/** The bridge port the bridge has learned `mac` on (null: not learned). */
export function fdbPort(bridge: string, mac: string): string | null {
  const arr = JSON.parse(run(['bridge', '-j', 'fdb', 'show', 'br', bridge])) as { mac: string; ifname?: string; flags?: string[] }[];
  return arr.find((e) => e.mac === mac.toLowerCase() && e.ifname !== bridge)?.ifname ?? null;
}

/** Names of all links in a namespace (or the caller's), for leak checks. */
export function listLinks(netns?: string): string[] {
  const arr = JSON.parse(ip(['-j', 'link', 'show'], netns)) as { ifname: string }[];
  return arr.map((l) => l.ifname);
}

/**
 * Undo actions collected during setup and run in reverse order. Every action runs even if
 * an earlier one threw; errors are collected, not thrown, so afterAll always completes.
 */
export class CleanupStack {
  private readonly actions: { what: string; fn: () => unknown }[] = [];
  readonly errors: Error[] = [];

  push(what: string, fn: () => unknown): void {
    this.actions.push({ what, fn });
  }

  /** Convenience: registers deletion of a link (and with it, its veth peer). */
  link(name: string, netns?: string): void {
    this.push(`delete link ${name}`, () => deleteLink(name, netns));
  }

  netns(name: string): void {
    this.push(`delete netns ${name}`, () => deleteNetns(name));
  }

  get size(): number {
    return this.actions.length;
  }

  /** Runs all actions newest first; awaits async ones; never throws. Safe to call twice. */
  async run(): Promise<Error[]> {
    const errs: Error[] = [];
    while (this.actions.length > 0) {
      const a = this.actions.pop()!;
      try {
        await a.fn();
      } catch (e) {
        const err = new Error(`cleanup "${a.what}" failed: ${e instanceof Error ? e.message : String(e)}`);
        errs.push(err);
        this.errors.push(err);
      }
    }
    if (errs.length > 0) process.stderr.write(`${errs.map((e) => e.message).join('\n')}\n`);
    return errs;
  }
}

/**
 * A /24 of the benchmark range (198.18.0.0/15) that no host interface uses now, as host .1 and
 * guest .2: other tests and other sessions' guests may be running, and a shared subnet would
 * answer each other's pings.
 */
export function freeTestSubnet(second: 18 | 19): { host: string; guest: string } {
  const used = run(['ip', '-4', '-o', 'addr', 'show']);
  for (let i = 0; i < 200; i++) {
    const net = `198.${second}.${20 + ((process.pid + i) % 200)}`;
    if (!used.includes(` ${net}.`)) return { host: `${net}.1`, guest: `${net}.2` };
  }
  throw new Error(`no free /24 in 198.${second}.0.0/16`);
}
