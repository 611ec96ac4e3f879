// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_redirect (helper 23) would send guest-bound frames to any host
 * interface by ifindex. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bad_redirect_prog(struct xdp_md *ctx)
{
	return bpf_redirect(1, 0);
}

char _license[] SEC("license") = "GPL";
