// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_tail_call (helper 12) jumps into another program through a
 * PROG_ARRAY, escaping the checks done on the offloaded program. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} jump_table SEC(".maps");

SEC("xdp")
int bad_tail_call_prog(struct xdp_md *ctx)
{
	bpf_tail_call(ctx, &jump_table, 0);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
