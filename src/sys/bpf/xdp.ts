import { ArgumentError } from '../../errors.js';
import { libbpf, fail, scratch, optsStruct } from './libbpf.js';

// XDP on a network interface: attach, detach, query (uapi linux/if_link.h), and the verdicts
// an XDP program returns.

const fn = {
  xdp_attach: libbpf.func('bpf_xdp_attach', 'int', ['int', 'int', 'uint32', 'intptr_t']),
  xdp_detach: libbpf.func('bpf_xdp_detach', 'int', ['int', 'uint32', 'intptr_t']),
  xdp_query: libbpf.func('bpf_xdp_query', 'int', ['int', 'int', 'intptr_t']),
};

export const XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0;
export const XDP_FLAGS_SKB_MODE = 1 << 1;
export const XDP_FLAGS_DRV_MODE = 1 << 2;
export const XDP_FLAGS_HW_MODE = 1 << 3;
export const XDP_FLAGS_REPLACE = 1 << 4;

/** bpf_xdp_query attach_mode values. */
export const XDP_ATTACHED_NONE = 0;
export const XDP_ATTACHED_DRV = 1;
export const XDP_ATTACHED_SKB = 2;
export const XDP_ATTACHED_HW = 3;
export const XDP_ATTACHED_MULTI = 4;

export const XDP_ABORTED = 0;
export const XDP_DROP = 1;
export const XDP_PASS = 2;
export const XDP_TX = 3;
export const XDP_REDIRECT = 4;

function xdpOptsAddress(oldProgFd: number | undefined): number {
  // struct bpf_xdp_attach_opts: sz@0 old_prog_fd@8; 16 bytes.
  const address = optsStruct(16);
  scratch.view.setInt32(8, oldProgFd ?? 0, true);
  return address;
}

/**
 * Attaches progFd as the XDP program of ifindex. flags: XDP_FLAGS_SKB_MODE / DRV_MODE,
 * XDP_FLAGS_UPDATE_IF_NOEXIST (EBUSY if one is attached), or XDP_FLAGS_REPLACE with
 * oldProgFd (EEXIST if the attached one is not that program).
 */
export function xdpAttach(ifindex: number, progFd: number, flags = 0, oldProgFd?: number): void {
  if ((flags & XDP_FLAGS_REPLACE) !== 0 && oldProgFd === undefined) {
    throw new ArgumentError('bpf_xdp_attach: XDP_FLAGS_REPLACE needs oldProgFd');
  }
  const r = fn.xdp_attach(ifindex, progFd, flags, xdpOptsAddress(oldProgFd)) as number;
  if (r < 0) fail('bpf_xdp_attach', r, `ifindex ${ifindex}`);
}

/** Detaches the XDP program of ifindex in the mode given by flags (same flags as attach). */
export function xdpDetach(ifindex: number, flags = 0, oldProgFd?: number): void {
  const r = fn.xdp_detach(ifindex, flags, xdpOptsAddress(oldProgFd)) as number;
  if (r < 0) fail('bpf_xdp_detach', r, `ifindex ${ifindex}`);
}

export interface XdpQueryResult {
  /** The attached program's id when exactly one mode is in use, else 0. */
  progId: number;
  drvProgId: number;
  hwProgId: number;
  skbProgId: number;
  /** XDP_ATTACHED_* */
  attachMode: number;
}

export function xdpQuery(ifindex: number, flags = 0): XdpQueryResult {
  // struct bpf_xdp_query_opts: sz@0 prog_id@8 drv@12 hw@16 skb@20 attach_mode(u8)@24; 32 bytes.
  const address = optsStruct(32);
  const v = scratch.view;
  const r = fn.xdp_query(ifindex, flags, address) as number;
  if (r < 0) fail('bpf_xdp_query', r, `ifindex ${ifindex}`);
  return {
    progId: v.getUint32(8, true), drvProgId: v.getUint32(12, true), hwProgId: v.getUint32(16, true),
    skbProgId: v.getUint32(20, true), attachMode: v.getUint8(24),
  };
}
