// Names of the BPF objects a device's offload puts in the host kernel, so `bpftool prog show`
// and `bpftool map show` say which device (which VM) each belongs to. A kernel object name is
// at most 15 characters of [A-Za-z0-9_.] (BPF_OBJ_NAME_LEN 16 with the NUL), so a name is
//
//     <prefix>_<role>          cut to 15 characters
//
// prefix: the device name when it is 1..6 characters of [A-Za-z0-9_] (vm1, dev0), otherwise
//         its first 4 such characters and 2 hex digits of a hash of the whole name (tapd3f)
// role:   the guest's own name for its program or map, or what the backend made the object for
//         (xsk_guest, aborted, xskmap, xsk_redir, hostpass; pinned blobs: src, obj_code, obj_elf).
//         On the object path (OBJ_LOAD) too: every map and program of the object, its global
//         data maps included (`vm1_flows`, `vm1_vx_obj.roda`, `vm1_xdp_filter`); the loader
//         child gives libbpf these names before it loads (object-loader/child.ts)
//
// The mapping is shown by `offload show` (bpfPrefix, hostName) and the metrics
// (vhost_xdp_offload_bpf_prefix_info). docs/metrics.md, "Host BPF object names".

import { createHash } from 'node:crypto';

/** BPF_OBJ_NAME_LEN - 1. */
export const BPF_NAME_MAX = 15;

const clean = (s: string) => s.replace(/[^A-Za-z0-9_]/g, '_');

/** The short prefix of a device's host objects (1..6 characters). */
export function bpfPrefix(device: string): string {
  const c = clean(device);
  if (c.length >= 1 && c.length <= 6 && c === device) return c;
  const h = createHash('sha256').update(device).digest('hex').slice(0, 2);
  return `${c.replace(/_/g, '').slice(0, 4) || 'vx'}${h}`;
}

/** `<prefix>_<role>` as the kernel will keep it: at most 15 characters of [A-Za-z0-9_.]. */
export function hostObjectName(prefix: string, role: string): string {
  return `${prefix}_${role.replace(/[^A-Za-z0-9_.]/g, '_')}`.slice(0, BPF_NAME_MAX);
}

/** The role part of a host object name (what the guest called it, cut as the kernel keeps it). */
export function roleOf(prefix: string, hostName: string): string {
  return hostName.startsWith(`${prefix}_`) ? hostName.slice(prefix.length + 1) : hostName;
}
