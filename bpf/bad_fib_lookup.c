// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_fib_lookup (helper 69) reads the host's routing tables. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bad_fib_lookup_prog(struct xdp_md *ctx)
{
	struct bpf_fib_lookup params = {};

	params.family = 2; /* AF_INET */
	params.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &params, sizeof(params), 0) == BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_DROP;
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
