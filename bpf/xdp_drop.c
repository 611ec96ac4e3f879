// SPDX-License-Identifier: GPL-2.0
/* Guest sample: drop every frame and count the drops (like samples/bpf xdp1, but the
 * counter lives in a plain ARRAY because the offload broker refuses per-CPU maps). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drop_count SEC(".maps");

SEC("xdp")
int xdp_drop_prog(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u64 *count = bpf_map_lookup_elem(&drop_count, &key);

	/* Atomic add: the host may run the program on several queues at once. */
	if (count)
		__sync_fetch_and_add(count, 1);
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
