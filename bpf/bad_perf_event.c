// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_perf_event_output (helper 25) streams data to a host perf ring. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	/* Explicit, unlike libbpf's "0 = one per CPU", so the map can be created as declared. */
	__uint(max_entries, 64);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} events SEC(".maps");

SEC("xdp")
int bad_perf_event_prog(struct xdp_md *ctx)
{
	__u32 len = ctx->data_end - ctx->data;

	bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, &len, sizeof(len));
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
