// QEMU's vhost-user "Backend program conventions" (docs/interop/vhost-user.rst) and systemd's
// socket activation, as serve applies them: --print-capabilities, --fd N / LISTEN_FDS, and the
// ownership of the socket files serve binds (--socket-group, --socket-mode).
import fs from 'node:fs';
import { SpecError } from '../service/device-spec.js';

/**
 * The options a management layer may rely on, reported by --print-capabilities (named like the
 * features of QEMU's other backend types: the command-line options beyond the mandatory ones).
 */
export const BACKEND_FEATURES = [
  'port', 'queues', 'mtu', 'offload', 'pin-dir', 'pin-limit', 'client', 'control',
  'socket-group', 'socket-mode', 'workers', 'busy-poll', 'worker-cpus', 'worker-nice', 'worker-fifo', 'worker-slice', 'reply-poll', 'systemd-socket-activation',
] as const;

/** `{"type":"net","features":[...]}` (the vhost-user.json schema's VHostUserBackendCapabilities). */
export function backendCapabilities(): { type: 'net'; features: string[] } {
  return { type: 'net', features: [...BACKEND_FEATURES] };
}

/** The conventions say: print, exit 0, and ignore every other option. */
export function wantsCapabilities(argv: readonly string[]): boolean {
  return argv.includes('--print-capabilities');
}

/** systemd's first passed fd (sd_listen_fds(3): SD_LISTEN_FDS_START). */
export const SD_LISTEN_FDS_START = 3;

/**
 * The listening socket systemd passed (sd_listen_fds(3)): fd 3 when LISTEN_PID names this
 * process and LISTEN_FDS is at least 1, else null. The variables are removed afterwards, as
 * sd_listen_fds(1) does, so no child process (ip, ethtool) takes them for its own.
 */
export function socketFromSystemd(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number | null {
  const fds = env.LISTEN_FDS;
  const forPid = env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  if (fds === undefined || forPid === undefined) return null;
  if (Number(forPid) !== pid) return null;
  const n = Number(fds);
  if (!Number.isInteger(n) || n < 1) return null;
  // One device per activated service: more sockets than one would go unserved.
  if (n > 1) throw new SpecError('fd-with-socket', `systemd passed ${n} sockets (LISTEN_FDS); serve takes exactly one per service (use one socket unit per device)`);
  return SD_LISTEN_FDS_START;
}

/** `--socket-mode 0660` (octal, like chmod). */
export function parseSocketMode(text: string): number {
  if (!/^0?[0-7]{3}$/.test(text)) throw new SpecError('bad-socket-mode', `--socket-mode '${text}': an octal mode such as 0660`);
  return Number.parseInt(text, 8);
}

/** `--socket-group NAME|GID`: a group name from /etc/group or a number. */
export function resolveGroup(text: string, groupFile = '/etc/group'): number {
  if (/^\d+$/.test(text)) return Number(text);
  let lines: string[] = [];
  try { lines = fs.readFileSync(groupFile, 'utf8').split('\n'); } catch { /* no group file */ }
  for (const l of lines) {
    const [name, , gid] = l.split(':');
    if (name === text && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new SpecError('bad-socket-group', `--socket-group '${text}': no such group in ${groupFile}`);
}
