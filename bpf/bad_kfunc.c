// SPDX-License-Identifier: GPL-2.0
/* Forbidden sample: a kfunc call. Kfuncs are kernel functions resolved by BTF id at load
 * time (src_reg = BPF_PSEUDO_KFUNC_CALL); the broker refuses all of them. This one is an
 * XDP metadata kfunc that exists since Linux 6.3. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

extern int bpf_xdp_metadata_rx_timestamp(const struct xdp_md *ctx, __u64 *timestamp) __ksym;

SEC("xdp")
int bad_kfunc_prog(struct xdp_md *ctx)
{
	__u64 ts = 0;

	if (bpf_xdp_metadata_rx_timestamp(ctx, &ts))
		return XDP_PASS;
	return ts ? XDP_DROP : XDP_PASS;
}

char _license[] SEC("license") = "GPL";
