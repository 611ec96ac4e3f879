// Running serve the way a host runs it: as an unprivileged system user holding only a few
// capabilities (ambient, so `ip`/`ethtool` children inherit them), through util-linux setpriv —
// systemd's User= + AmbientCapabilities= + CapabilityBoundingSet= without systemd as PID 1.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** What serve needs on every port kind (docs/least-privilege.md). */
export const BASE_CAPS = ['net_admin', 'bpf', 'perfmon', 'ipc_lock'] as const;
/** xsk ports open AF_XDP and AF_PACKET sockets: both check CAP_NET_RAW. */
export const XSK_CAPS = [...BASE_CAPS, 'net_raw'] as const;

/** The test user; a system user (no home, no login shell) that stays after the run. */
export const TEST_USER = 'vxtest';

export interface RunAs {
  user: string;
  /** Capability names as setpriv spells them (net_admin, bpf, ...), without CAP_. */
  caps: readonly string[];
}

export function capsFor(port: 'tap' | 'xsk'): string[] {
  return [...(port === 'xsk' ? XSK_CAPS : BASE_CAPS)];
}

/** uid and gid of a user, creating it as a system user when absent (idempotent, race-safe). */
export function ensureUser(user = TEST_USER): { uid: number; gid: number } {
  const look = () => {
    const r = spawnSync('id', ['-u', user], { encoding: 'utf8' });
    if (r.status !== 0) return null;
    return { uid: Number(r.stdout.trim()), gid: Number(execFileSync('id', ['-g', user], { encoding: 'utf8' }).trim()) };
  };
  for (let attempt = 0; attempt < 5; attempt++) {
    const found = look();
    if (found) return found;
    // Another test file may be creating it at the same moment (useradd then fails on the lock).
    spawnSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', '--user-group', user], { encoding: 'utf8' });
  }
  const found = look();
  if (!found) throw new Error(`could not create the test user ${user}`);
  return found;
}

/**
 * The command line that runs `argv` as `who`: real/effective uid and gid switched, no
 * supplementary groups, the given capabilities inheritable, ambient and the whole bounding set.
 */
export function setprivArgs(who: RunAs, argv: readonly string[]): string[] {
  const { uid, gid } = ensureUser(who.user);
  const caps = who.caps.map((c) => `+${c}`).join(',');
  return [
    `--reuid=${uid}`, `--regid=${gid}`, '--clear-groups',
    `--inh-caps=-all${caps ? ',' + caps : ''}`, `--ambient-caps=-all${caps ? ',' + caps : ''}`,
    `--bounding-set=-all${caps ? ',' + caps : ''}`,
    '--', ...argv,
  ];
}

/** Gives `paths` to the user, after checking it can reach them (every parent searchable). */
export function handOver(who: RunAs, ...paths: string[]): void {
  const { uid, gid } = ensureUser(who.user);
  for (const p of paths) {
    for (let d = path.dirname(p); d !== path.dirname(d); d = path.dirname(d)) {
      const st = fs.statSync(d);
      if ((st.mode & 0o001) === 0 && st.uid !== uid) throw new Error(`${who.user} cannot reach ${p}: ${d} is not searchable by others (mode ${(st.mode & 0o777).toString(8)})`);
    }
    fs.chownSync(p, uid, gid);
  }
}

/** The effective capability set and uid of a running process, from /proc. */
export function processCredentials(pid: number): { uid: number; effective: bigint; ambient: bigint; bounding: bigint } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string) => /^(\S+):\s+(.*)$/m.exec(status.split('\n').find((l) => l.startsWith(`${name}:`)) ?? '')?.[2] ?? '';
  return {
    uid: Number(field('Uid').split(/\s+/)[1]),
    effective: BigInt('0x' + field('CapEff')),
    ambient: BigInt('0x' + field('CapAmb')),
    bounding: BigInt('0x' + field('CapBnd')),
  };
}

/** Capability numbers (linux/capability.h). */
export const CAP_NUMBERS: Record<string, number> = {
  chown: 0, dac_override: 1, net_raw: 13, net_admin: 12, ipc_lock: 14, sys_admin: 21, sys_resource: 24, perfmon: 38, bpf: 39,
};

export function capMask(caps: readonly string[]): bigint {
  let m = 0n;
  for (const c of caps) {
    const n = CAP_NUMBERS[c];
    if (n === undefined) throw new Error(`unknown capability ${c}`);
    m |= 1n << BigInt(n);
  }
  return m;
}
