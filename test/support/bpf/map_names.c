// SPDX-License-Identifier: GPL-2.0
/*
 * Test support: one record {u32 id; char name[16]} per BPF map in the kernel, through a
 * bpf_map iterator. Tests find maps by name this way instead of opening every map by id: an
 * fd from BPF_MAP_GET_FD_BY_ID holds a user reference, and closing it can be the last one,
 * which clears a PROG_ARRAY (from a work item that holds the map meanwhile) or cancels a map's
 * timers: a look that changes what it looks at. The iterator takes plain references.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Only the members read here; CO-RE finds their offsets in this kernel's BTF. */
struct seq_file;
struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));
struct bpf_map {
	__u32 id;
	char name[16];
} __attribute__((preserve_access_index));
struct bpf_iter__bpf_map {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
} __attribute__((preserve_access_index));

SEC("iter/bpf_map")
int map_names(struct bpf_iter__bpf_map *ctx)
{
	struct bpf_map *map = ctx->map;
	struct {
		__u32 id;
		char name[16];
	} rec;

	if (!map)
		return 0;
	rec.id = map->id;
	bpf_probe_read_kernel(rec.name, sizeof(rec.name), map->name);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
