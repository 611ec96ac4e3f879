// SPDX-License-Identifier: GPL-2.0
/* Guest sample: bounce every Ethernet frame back where it came from by swapping the
 * source and destination MACs (like samples/bpf xdp2); counts bounced frames. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tx_count SEC(".maps");

SEC("xdp")
int xdp_tx_prog(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	unsigned char tmp[ETH_ALEN];
	__u32 key = 0;
	__u64 *count;

	/* Runt frames cannot be swapped; let the stack see (and drop) them. */
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;

	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);

	count = bpf_map_lookup_elem(&tx_count, &key);
	if (count)
		__sync_fetch_and_add(count, 1);
	return XDP_TX;
}

char _license[] SEC("license") = "GPL";
