// SPDX-License-Identifier: GPL-2.0
/* Object-path refusal sample: reads the IPv4 header without checking it is inside the
 * packet, so the host verifier refuses it; with BTF line info its log names this line. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

SEC("xdp")
int bad_obj_verifier(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	struct iphdr *iph = data + sizeof(struct ethhdr);
	__u32 unchecked_saddr = iph->saddr; /* no bounds check against data_end */
	__u64 one = 1;

	bpf_map_update_elem(&seen, &unchecked_saddr, &one, BPF_ANY);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
