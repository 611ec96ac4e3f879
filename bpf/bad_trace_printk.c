// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_trace_printk writes into the host's trace buffer, which a guest
 * must not reach. The broker refuses it by helper id (BPF_FUNC_trace_printk = 6). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bad_trace_printk_prog(struct xdp_md *ctx)
{
	char fmt[] = "frame len %u\n";

	bpf_trace_printk(fmt, sizeof(fmt), ctx->data_end - ctx->data);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
