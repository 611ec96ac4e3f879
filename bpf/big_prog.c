// SPDX-License-Identifier: GPL-2.0
/* Oversized sample: an unrolled checksum over the frame's first bytes, well over 4096
 * instructions. It is a valid program for the verifier; only the broker's instruction
 * limit refuses it. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define ROUNDS 1200

SEC("xdp")
int big_prog(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	volatile __u32 acc = 0;
	unsigned char *p = data;

	if ((void *)(p + 64) > data_end)
		return XDP_PASS;
	/* volatile keeps every round as separate loads/stores, so the unroll is not folded. */
#pragma clang loop unroll(full)
	for (int i = 0; i < ROUNDS; i++)
		acc = (acc * 31) ^ p[i & 63];
	return acc == 0xdeadbeef ? XDP_DROP : XDP_PASS;
}

char _license[] SEC("license") = "GPL";
