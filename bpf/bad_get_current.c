// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_get_current_pid_tgid (helper 14) reveals which host task is
 * running. Old kernels' verifiers reject it for XDP, but recent ones (6.18 here) accept it,
 * so only the broker's allow-list stops it. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bad_get_current_prog(struct xdp_md *ctx)
{
	return (bpf_get_current_pid_tgid() & 1) ? XDP_DROP : XDP_PASS;
}

char _license[] SEC("license") = "GPL";
