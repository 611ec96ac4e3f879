import { libbpf, fail, scratch, optsStruct, SCRATCH_IDS } from './libbpf.js';

// tcx: BPF programs at a device's traffic-control ingress/egress attached through bpf links
// (kernel 6.6+, enum bpf_attach_type BPF_TCX_INGRESS 46 / BPF_TCX_EGRESS 47; Debian's
// libbpf 1.1 headers predate them, the kernel here has them). A tcx link is the attachment:
// it lives exactly as long as a reference to it — its fd, or a bpffs pin — so a process that
// dies without pinning it takes its program off the device with it.

const fn = {
  link_create: libbpf.func('bpf_link_create', 'int', ['int', 'int', 'uint32', 'intptr_t']),
  link_update: libbpf.func('bpf_link_update', 'int', ['int', 'int', 'intptr_t']),
  prog_query_opts: libbpf.func('bpf_prog_query_opts', 'int', ['int', 'uint32', 'intptr_t']),
};

export const BPF_TCX_INGRESS = 46;
export const BPF_TCX_EGRESS = 47;

/**
 * tcx verdicts (uapi linux/bpf.h enum tcx_action_base, the TC_ACT_* values): NEXT (-1,
 * TC_ACT_UNSPEC) hands the frame to the next program of the device's chain and on to the
 * device; PASS (0) ends the chain and accepts it; DROP (2, TC_ACT_SHOT); REDIRECT (7,
 * what bpf_redirect returns).
 */
export const TCX_NEXT = -1;
export const TCX_PASS = 0;
export const TCX_DROP = 2;
export const TCX_REDIRECT = 7;

/** bpf_redirect flag: deliver to the target's receive path instead of its transmit path. */
export const BPF_F_INGRESS = 1;

/**
 * Attaches a SCHED_CLS program at ifindex's tc egress (or ingress) behind the programs already
 * there (link_create with no relative program and no flags appends) and returns the link fd:
 * closing it, with no pin, detaches the program.
 */
export function tcxAttach(ifindex: number, progFd: number, direction: 'ingress' | 'egress'): number {
  // libbpf 1.1's bpf_link_create passes target_fd (the ifindex for tcx) and attach_type
  // through unchanged for types it does not know; NULL opts leave relative_fd and
  // expected_revision zero.
  const fd = fn.link_create(progFd, ifindex, direction === 'egress' ? BPF_TCX_EGRESS : BPF_TCX_INGRESS, 0) as number;
  if (fd < 0) fail('bpf_link_create(tcx)', fd, `ifindex ${ifindex} ${direction}`);
  return fd;
}

/** Puts progFd in the link's place at once: no frame meets neither program (NULL opts: no expected old program). */
export function tcxReplace(linkFd: number, progFd: number, what = ''): void {
  const r = fn.link_update(linkFd, progFd, 0) as number;
  if (r < 0) fail('bpf_link_update(tcx)', r, what);
}

/** Ids of the programs attached through tcx at ifindex's egress (or ingress), in run order. */
export function tcxQuery(ifindex: number, direction: 'ingress' | 'egress'): number[] {
  // struct bpf_prog_query_opts (libbpf 1.1): sz@0 query_flags@8 attach_flags@12 prog_ids@16
  // prog_cnt@24 prog_attach_flags@32; 40 bytes. The ids land in the scratch id area.
  const max = 512;
  const address = optsStruct(40);
  const v = scratch.view;
  v.setBigUint64(16, BigInt(scratch.address + SCRATCH_IDS), true);
  v.setUint32(24, max, true);
  const r = fn.prog_query_opts(ifindex, direction === 'egress' ? BPF_TCX_EGRESS : BPF_TCX_INGRESS, address) as number;
  if (r < 0) fail('bpf_prog_query(tcx)', r, `ifindex ${ifindex} ${direction}`);
  const n = Math.min(v.getUint32(24, true), max);
  return Array.from({ length: n }, (_, i) => v.getUint32(SCRATCH_IDS + 4 * i, true));
}
