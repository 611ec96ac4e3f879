// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: a PERCPU_ARRAY map. Per-CPU values are host-CPU-count sized, which
 * the guest cannot know or size; the broker refuses per-CPU map types. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} percpu_count SEC(".maps");

SEC("xdp")
int bad_percpu_map_prog(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u64 *count = bpf_map_lookup_elem(&percpu_count, &key);

	if (count)
		*count += 1;
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
