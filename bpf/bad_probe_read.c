// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_probe_read_kernel (helper 113) reads arbitrary host kernel memory. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bad_probe_read_prog(struct xdp_md *ctx)
{
	__u64 word = 0;

	bpf_probe_read_kernel(&word, sizeof(word), (void *)0xffffffff81000000UL);
	return word ? XDP_DROP : XDP_PASS;
}

char _license[] SEC("license") = "GPL";
