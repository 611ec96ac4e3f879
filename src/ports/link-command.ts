import { spawnSync } from 'node:child_process';

/**
 * Runs a link-setup command (`ip`, `ethtool`) and throws with its stderr when it fails. Ports
 * configure links through these tools (iproute2 is clearer than rtnetlink by hand); they inherit
 * serve's CAP_NET_ADMIN as an ambient capability (docs/least-privilege.md).
 */
export function linkCommand(cmd: 'ip' | 'ethtool', args: readonly string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 10_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${(r.stderr || r.error?.message || `exit ${r.status}`).trim()}`);
}
