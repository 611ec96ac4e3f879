// SPDX-License-Identifier: GPL-2.0
/* Object-path sample (docs/offload-protocol.md §8): what the kernel path cannot carry.
 * - a `const volatile` config in .rodata (the loader may patch it before upload: the verifier
 *   then sees constants and prunes the branches the config turns off),
 * - a .bss counter (global data),
 * - an LRU_HASH of UDP flows,
 * - a PERCPU_ARRAY of verdict counters,
 * - a tail call from the entry program into a second program through a PROG_ARRAY that the
 *   object initialises itself (libbpf fills it at load).
 * xdp_filter (entry): counts every frame, passes what is not IPv4/UDP, tail-calls udp_filter.
 * udp_filter: records the flow, drops UDP from cfg.drop_sport (host order), passes the rest. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* 'VXCF' marks the config in the object's .rodata so a loader can find and patch it. */
const volatile struct {
	__u32 magic;
	__u16 drop_sport;
	__u16 enabled;
} cfg = { 0x46435856, 4003, 1 };

__u64 tail_calls_failed;

struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct flow_key);
	__type(value, __u64);
} flows SEC(".maps");

enum { C_SEEN, C_PASSED, C_DROPPED, C_NOT_UDP, C_MAX };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

int udp_filter(struct xdp_md *ctx);

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__array(values, int (void *));
} jump SEC(".maps") = {
	.values = { [0] = (void *)&udp_filter },
};

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);

	if (c)
		*c += 1;
}

SEC("xdp")
int xdp_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);

	count(C_SEEN);
	if ((void *)(iph + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || iph->protocol != IPPROTO_UDP) {
		count(C_NOT_UDP);
		return XDP_PASS;
	}
	bpf_tail_call(ctx, &jump, 0);
	__sync_fetch_and_add(&tail_calls_failed, 1);
	return XDP_ABORTED;
}

SEC("xdp")
int udp_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct udphdr *udp = (void *)(iph + 1);
	struct flow_key k = {};
	__u64 one = 1, *n;

	if ((void *)(udp + 1) > data_end || iph->ihl != 5)
		return XDP_PASS;
	k.saddr = iph->saddr;
	k.daddr = iph->daddr;
	k.sport = bpf_ntohs(udp->source);
	k.dport = bpf_ntohs(udp->dest);
	n = bpf_map_lookup_elem(&flows, &k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&flows, &k, &one, BPF_NOEXIST);
	if (cfg.enabled && k.sport == cfg.drop_sport) {
		count(C_DROPPED);
		return XDP_DROP;
	}
	count(C_PASSED);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
