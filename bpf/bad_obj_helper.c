// SPDX-License-Identifier: GPL-2.0
/* Object-path refusal sample: a well-formed object whose program calls a helper no device
 * may allow (bpf_get_current_pid_tgid reads the current host task). The broker refuses it
 * after relocation, naming the helper, before the kernel verifier sees it. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

__u64 last_pid;

SEC("xdp")
int bad_obj_helper(struct xdp_md *ctx)
{
	last_pid = bpf_get_current_pid_tgid();
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
