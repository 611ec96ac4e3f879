// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: bpf_redirect_map (helper 51) through a DEVMAP of host interfaces. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

SEC("xdp")
int bad_redirect_map_prog(struct xdp_md *ctx)
{
	return bpf_redirect_map(&tx_ports, 0, XDP_PASS);
}

char _license[] SEC("license") = "GPL";
