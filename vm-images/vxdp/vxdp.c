// SPDX-License-Identifier: GPL-2.0
/*
 * vxdp: the guest side of the vhost-xdp object path (docs/offload-protocol.md §8).
 *
 * Talks to the host's offload broker through the offload-aware virtio_net's character
 * device /dev/vxdp-<ifname>: one write() per request (offload header + payload), one read()
 * per response. The driver owns the wire seq and the timeout; this program checks every
 * length in a response before it uses it (the host is not trusted to be well-formed).
 *
 * Built statically by vm-images/build.sh; no library beyond libc.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define VXO_MAGIC 0x50445856u
#define VXO_VERSION 1
#define VXO_RESPONSE 0x8000
#define VXO_HDR 16
#define VXO_MAX_MESSAGE 61440u
#define VXO_MAX_REASON 512
#define RESP_BUF (64 * 1024)
#define OBJ_NAME 16
#define PROG_NAME 64
#define MAP_ENTRY 40 /* OBJ_SHOW: 6 x u32 + name[16] */
#define MAX_OBJECT_FILE (64u << 20)

enum {
	CMD_CAPS = 0x0102,
	CMD_ELEM_LOOKUP = 0x0130,
	CMD_ELEM_UPDATE = 0x0131,
	CMD_ELEM_DELETE = 0x0132,
	CMD_GET_FIRST_KEY = 0x0133,
	CMD_GET_NEXT_KEY = 0x0134,
	CMD_ELEM_LOOKUP_BATCH = 0x0140,
	CMD_OBJ_BEGIN = 0x0150,
	CMD_OBJ_CHUNK = 0x0151,
	CMD_OBJ_LOAD = 0x0152,
	CMD_OBJ_SHOW = 0x0153,
	CMD_OBJ_UNLOAD = 0x0154,
};

enum {
	ST_OK = 0,
	ST_UNKNOWN_COMMAND = 3,
	ST_VERIFIER_REJECTED = 12,
	ST_RATE_LIMITED = 14,
	ST_NO_SUCH_ELEMENT = 15,
	ST_KERNEL_ERROR = 17,
	ST_BUSY = 23,
	ST_CANCELLED = 24,
};

/* Exit codes (also in --help). */
enum { EX_OK = 0, EX_REFUSED = 1, EX_USAGE = 2, EX_SYSTEM = 3 };

static const char *const status_names[] = {
	"OK", "BAD_REQUEST", "UNSUPPORTED_VERSION", "UNKNOWN_COMMAND", "NOT_CLAIMED",
	"QUOTA_EXCEEDED", "HELPER_NOT_ALLOWED", "KFUNC_REFUSED", "KSYM_REFUSED",
	"TAIL_CALL_REFUSED", "BAD_MAP_HANDLE", "MAP_TYPE_REFUSED", "VERIFIER_REJECTED",
	"TOO_LARGE", "RATE_LIMITED", "NO_SUCH_ELEMENT", "ELEMENT_EXISTS", "KERNEL_ERROR",
	"LICENSE_REFUSED", "INSN_REFUSED", "MAP_IN_USE", "MAP_FULL", "OBJECT_REFUSED",
	"BUSY", "CANCELLED",
};

static const char *status_name(uint32_t s)
{
	return s < sizeof(status_names) / sizeof(status_names[0]) ? status_names[s] : "UNKNOWN_STATUS";
}

struct map_type_name {
	uint32_t id;
	const char *name;
};

static const struct map_type_name map_types[] = {
	{ 1, "hash" }, { 2, "array" }, { 3, "prog_array" }, { 5, "percpu_hash" },
	{ 6, "percpu_array" }, { 9, "lru_hash" }, { 10, "lru_percpu_hash" },
};

static const char *map_type_name(uint32_t t)
{
	for (size_t i = 0; i < sizeof(map_types) / sizeof(map_types[0]); i++)
		if (map_types[i].id == t)
			return map_types[i].name;
	return "unknown";
}

static bool map_is_percpu(uint32_t t)
{
	return t == 5 || t == 6 || t == 10;
}

static const char *prog = "vxdp";
static const char *ifname;
static char devpath[64];
static int devfd = -1;
static uint32_t next_seq = 1;
static bool json;

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = v;
	p[1] = v >> 8;
	p[2] = v >> 16;
	p[3] = v >> 24;
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = v;
	p[1] = v >> 8;
}

static uint32_t get32(const uint8_t *p)
{
	return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t get16(const uint8_t *p)
{
	return p[0] | p[1] << 8;
}

static uint64_t get64(const uint8_t *p)
{
	return get32(p) | (uint64_t)get32(p + 4) << 32;
}

static void __attribute__((format(printf, 2, 3), noreturn)) die(int code, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- transport ----------------------------------------------------------------------- */

struct resp {
	uint32_t status;
	char reason[VXO_MAX_REASON + 1];
	const uint8_t *body; /* OK: the command's data; else the error detail */
	uint32_t body_len;
};

static uint8_t rbuf[RESP_BUF];
static uint8_t wbuf[VXO_HDR + VXO_MAX_MESSAGE];

static void usage_hint(void)
{
	fprintf(stderr, "Try '%s --help'.\n", prog);
}

/* Picks /dev/vxdp-<ifname>: -i, else the only one there is. */
static void open_device(void)
{
	if (!ifname) {
		DIR *d = opendir("/dev");
		struct dirent *e;
		static char found[64];
		int n = 0;

		if (!d)
			die(EX_SYSTEM, "cannot list /dev: %s", strerror(errno));
		while ((e = readdir(d)) != NULL) {
			if (strncmp(e->d_name, "vxdp-", 5) || !e->d_name[5] || strlen(e->d_name) >= sizeof(found))
				continue;
			if (n++ == 0)
				snprintf(found, sizeof(found), "%s", e->d_name + 5);
		}
		closedir(d);
		if (n == 0)
			die(EX_SYSTEM, "no /dev/vxdp-* device: no interface has claimed an offload channel "
				       "(is the offload-aware virtio_net loaded, against `vhost-xdp serve --offload`?)");
		if (n > 1)
			die(EX_USAGE, "several /dev/vxdp-* devices: pick one with -i IFNAME");
		ifname = found;
	}
	if (strlen(ifname) > 15 || strchr(ifname, '/'))
		die(EX_USAGE, "bad interface name '%s'", ifname);
	snprintf(devpath, sizeof(devpath), "/dev/vxdp-%s", ifname);
	devfd = open(devpath, O_RDWR | O_CLOEXEC);
	if (devfd < 0) {
		if (errno == EBUSY)
			die(EX_SYSTEM, "%s is busy: another process has it open (one user at a time)", devpath);
		if (errno == ENOENT)
			die(EX_SYSTEM, "%s does not exist: %s has no claimed offload channel", devpath, ifname);
		die(EX_SYSTEM, "cannot open %s: %s", devpath, strerror(errno));
	}
}

/* One request, one response; a transport failure or a malformed answer exits (status 3). */
static int transact_once(uint16_t cmd, const void *payload, uint32_t len, struct resp *r)
{
	uint32_t seq = next_seq++, plen, rlen;
	ssize_t n;

	if (len > VXO_MAX_MESSAGE - VXO_HDR)
		die(EX_SYSTEM, "internal: request 0x%04x of %u bytes is over the message limit", cmd, len);
	put32(wbuf, VXO_MAGIC);
	put16(wbuf + 4, VXO_VERSION);
	put16(wbuf + 6, cmd);
	put32(wbuf + 8, seq);
	put32(wbuf + 12, len);
	if (len)
		memcpy(wbuf + VXO_HDR, payload, len);
	do
		n = write(devfd, wbuf, VXO_HDR + len);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		if (errno == EMSGSIZE)
			die(EX_SYSTEM, "%s: request 0x%04x (%u bytes) is larger than the channel takes", devpath, cmd, VXO_HDR + len);
		if (errno == EPERM)
			die(EX_SYSTEM, "%s: request 0x%04x is not allowed through the channel (the kernel path owns it)", devpath, cmd);
		die(EX_SYSTEM, "%s: write: %s", devpath, strerror(errno));
	}
	if ((size_t)n != VXO_HDR + len)
		die(EX_SYSTEM, "%s: short write (%zd of %u bytes)", devpath, n, VXO_HDR + len);
	do
		n = read(devfd, rbuf, sizeof(rbuf));
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		if (errno == ETIMEDOUT && cmd == CMD_OBJ_LOAD)
			die(EX_SYSTEM, "%s: the host did not answer the object load in time "
				       "(/sys/module/virtio_net/parameters/obj_load_timeout_ms)", devpath);
		if (errno == ETIMEDOUT)
			die(EX_SYSTEM, "%s: the host did not answer request 0x%04x in time", devpath, cmd);
		if (errno == EBUSY && (cmd == CMD_OBJ_BEGIN || cmd == CMD_OBJ_LOAD))
			die(EX_SYSTEM, "%s: a program is offloaded through the kernel (ip link ... xdpoffload); "
				       "detach it first (ip link set dev %s xdpoffload off)", ifname, ifname);
		if (errno == ENODEV)
			die(EX_SYSTEM, "%s: the offload channel is gone (device removed or claim released)", devpath);
		die(EX_SYSTEM, "%s: read: %s", devpath, strerror(errno));
	}
	if (n < VXO_HDR + 8)
		die(EX_SYSTEM, "malformed response: %zd bytes", n);
	if (get32(rbuf) != VXO_MAGIC || get16(rbuf + 4) != VXO_VERSION ||
	    get16(rbuf + 6) != (cmd | VXO_RESPONSE) || get32(rbuf + 8) != seq)
		die(EX_SYSTEM, "malformed response: header does not answer request 0x%04x seq %u", cmd, seq);
	plen = get32(rbuf + 12);
	if (plen != (uint32_t)n - VXO_HDR || plen < 8)
		die(EX_SYSTEM, "malformed response: length %u, %zd bytes read", plen, n);
	r->status = get32(rbuf + VXO_HDR);
	rlen = get32(rbuf + VXO_HDR + 4);
	if (rlen > VXO_MAX_REASON || rlen > plen - 8)
		die(EX_SYSTEM, "malformed response: reason of %u bytes in a %u-byte payload", rlen, plen);
	for (uint32_t i = 0; i < rlen; i++) {
		uint8_t c = rbuf[VXO_HDR + 8 + i];
		/* printable text only; the reason goes to a terminal */
		r->reason[i] = (c >= 0x20 && c != 0x7f) || c == '\n' || c == '\t' || c >= 0x80 ? c : '?';
	}
	r->reason[rlen] = 0;
	r->body = rbuf + VXO_HDR + 8 + rlen;
	r->body_len = plen - 8 - rlen;
	return 0;
}

/* Retries RATE_LIMITED answers a few times (detail a = ms until a retry can succeed). */
static void transact(uint16_t cmd, const void *payload, uint32_t len, struct resp *r)
{
	for (int tries = 0;; tries++) {
		transact_once(cmd, payload, len, r);
		if (r->status != ST_RATE_LIMITED || tries >= 5)
			return;
		uint32_t ms = r->body_len >= 4 ? get32(r->body) : 10;
		if (ms > 1000)
			ms = 1000;
		usleep((ms + 1) * 1000);
	}
}

/* Prints a refusal (status name, reason, verifier log) and exits 1. */
static void __attribute__((noreturn)) refused(const char *what, const struct resp *r)
{
	fprintf(stderr, "%s: %s: host refused: %s (%u)%s%s\n", prog, what, status_name(r->status),
		r->status, r->reason[0] ? ": " : "", r->reason);
	if (r->status == ST_VERIFIER_REJECTED && r->body_len >= 20) {
		uint32_t loglen = get32(r->body + 16);

		if (loglen > r->body_len - 20)
			loglen = r->body_len - 20;
		fprintf(stderr, "verifier log:\n");
		for (uint32_t i = 0; i < loglen; i++) {
			uint8_t c = r->body[20 + i];
			if (c == 0)
				break;
			fputc((c >= 0x20 && c != 0x7f) || c == '\n' || c == '\t' || c >= 0x80 ? c : '?', stderr);
		}
		if (loglen && r->body[20 + loglen - 1] != '\n')
			fputc('\n', stderr);
	} else if (r->status != ST_OK && r->body_len >= 16 && r->status != ST_UNKNOWN_COMMAND &&
		   r->status != ST_NO_SUCH_ELEMENT) {
		uint32_t a = get32(r->body), b = get32(r->body + 4);
		uint64_t c = get64(r->body + 8);
		if (a || b || c)
			fprintf(stderr, "detail: a=%u b=%u c=%llu\n", a, b, (unsigned long long)c);
	}
	/* BUSY: nothing was judged, the host only had no room to queue it; a retry can succeed. */
	if (r->status == ST_BUSY) {
		fprintf(stderr, "%s: the host is busy with an earlier request (an object load); try again when it is answered\n", prog);
		exit(EX_SYSTEM);
	}
	if (r->status == ST_CANCELLED)
		fprintf(stderr, "%s: the host's operator cancelled the load; nothing was loaded\n", prog);
	exit(EX_REFUSED);
}

static void expect_ok(const char *what, const struct resp *r)
{
	if (r->status != ST_OK)
		refused(what, r);
}

/* ---- OBJ_SHOW ------------------------------------------------------------------------ */

struct map_info {
	uint32_t handle, type, key_size, value_size, max_entries, flags;
	char name[OBJ_NAME + 1];
};

struct obj_info {
	bool loaded;
	char obj_name[OBJ_NAME + 1];
	char prog_name[PROG_NAME + 1];
	uint8_t tag[8];
	uint32_t prog_count, possible_cpus, map_count;
	struct map_info *maps;
};

/* Copies a NUL-padded name; anything outside [A-Za-z0-9_.-] becomes '?'. */
static void copy_name(char *dst, const uint8_t *src, size_t n)
{
	size_t i;

	for (i = 0; i < n && src[i]; i++)
		dst[i] = isalnum(src[i]) || src[i] == '_' || src[i] == '.' || src[i] == '-' ? src[i] : '?';
	dst[i] = 0;
}

static void obj_show(struct obj_info *oi)
{
	struct resp r;
	const uint8_t *b;
	uint32_t fixed = OBJ_NAME + PROG_NAME + 8 + 12;

	memset(oi, 0, sizeof(*oi));
	transact(CMD_OBJ_SHOW, NULL, 0, &r);
	if (r.status == ST_NO_SUCH_ELEMENT)
		return;
	expect_ok("show", &r);
	if (r.body_len < fixed)
		die(EX_SYSTEM, "malformed OBJ_SHOW answer: %u bytes", r.body_len);
	b = r.body;
	copy_name(oi->obj_name, b, OBJ_NAME);
	copy_name(oi->prog_name, b + OBJ_NAME, PROG_NAME);
	memcpy(oi->tag, b + OBJ_NAME + PROG_NAME, 8);
	oi->prog_count = get32(b + OBJ_NAME + PROG_NAME + 8);
	oi->possible_cpus = get32(b + OBJ_NAME + PROG_NAME + 12);
	oi->map_count = get32(b + OBJ_NAME + PROG_NAME + 16);
	if (oi->map_count > (r.body_len - fixed) / MAP_ENTRY)
		die(EX_SYSTEM, "malformed OBJ_SHOW answer: %u maps in %u bytes", oi->map_count, r.body_len);
	if (oi->possible_cpus == 0 || oi->possible_cpus > 8192)
		die(EX_SYSTEM, "malformed OBJ_SHOW answer: possible_cpus %u", oi->possible_cpus);
	oi->maps = calloc(oi->map_count ? oi->map_count : 1, sizeof(*oi->maps));
	if (!oi->maps)
		die(EX_SYSTEM, "out of memory");
	for (uint32_t i = 0; i < oi->map_count; i++) {
		const uint8_t *m = b + fixed + i * MAP_ENTRY;
		struct map_info *mi = &oi->maps[i];

		mi->handle = get32(m);
		mi->type = get32(m + 4);
		mi->key_size = get32(m + 8);
		mi->value_size = get32(m + 12);
		mi->max_entries = get32(m + 16);
		mi->flags = get32(m + 20);
		copy_name(mi->name, m + 24, OBJ_NAME);
	}
	oi->loaded = true;
}

static void tag_hex(char *out, const uint8_t tag[8])
{
	for (int i = 0; i < 8; i++)
		sprintf(out + 2 * i, "%02x", tag[i]);
}

/* ---- the interface alias ------------------------------------------------------------- */

static void set_alias(const char *text)
{
	char path[96], cur[256] = "";
	FILE *f;

	snprintf(path, sizeof(path), "/sys/class/net/%s/ifalias", ifname);
	if (!text) {
		/* clear only an alias this tool set */
		f = fopen(path, "r");
		if (f) {
			if (!fgets(cur, sizeof(cur), f))
				cur[0] = 0;
			fclose(f);
		}
		if (strncmp(cur, "vxdp:", 5))
			return;
	}
	f = fopen(path, "w");
	if (!f || fprintf(f, "%s\n", text ? text : "") < 0 || fclose(f) != 0)
		fprintf(stderr, "%s: warning: cannot %s the alias of %s (%s): %s\n", prog,
			text ? "set" : "clear", ifname, path, strerror(errno));
}

/* ---- load ---------------------------------------------------------------------------- */

static void object_name_from_path(char *dst, const char *path)
{
	const char *base = strrchr(path, '/');
	size_t n = 0;

	base = base ? base + 1 : path;
	for (; *base && n < OBJ_NAME - 1; base++) {
		if (!strcmp(base, ".o") || !strcmp(base, ".bpf.o"))
			break;
		dst[n++] = isalnum((unsigned char)*base) || *base == '_' || *base == '.' ? *base : '_';
	}
	dst[n] = 0;
}

static uint8_t *read_file(const char *path, uint32_t *len)
{
	struct stat st;
	uint8_t *buf;
	size_t got = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		die(EX_USAGE, "cannot open %s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		die(EX_USAGE, "%s is not a regular file", path);
	if (st.st_size == 0)
		die(EX_USAGE, "%s is empty", path);
	if ((uint64_t)st.st_size > MAX_OBJECT_FILE)
		die(EX_USAGE, "%s is %lld bytes; vxdp sends at most %u", path, (long long)st.st_size, MAX_OBJECT_FILE);
	buf = malloc(st.st_size);
	if (!buf)
		die(EX_SYSTEM, "out of memory");
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, st.st_size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die(EX_SYSTEM, "reading %s: %s", path, n < 0 ? strerror(errno) : "file shrank");
		got += n;
	}
	close(fd);
	*len = got;
	return buf;
}

static int cmd_load(int argc, char **argv)
{
	const char *path = NULL, *want = NULL;
	uint8_t begin[8 + OBJ_NAME] = { 0 }, load[4 + PROG_NAME] = { 0 }, *chunk;
	uint32_t len, max_obj, max_chunk, max_req = VXO_MAX_MESSAGE, off = 0;
	char objname[OBJ_NAME] = "", tag[17], alias[128];
	struct obj_info oi;
	struct resp r;
	double t0;

	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--prog") && i + 1 < argc)
			want = argv[++i];
		else if (!strncmp(argv[i], "--prog=", 7))
			want = argv[i] + 7;
		else if (argv[i][0] == '-' || path) {
			fprintf(stderr, "%s: load: unexpected argument '%s'\n", prog, argv[i]);
			usage_hint();
			return EX_USAGE;
		} else
			path = argv[i];
	}
	if (!path) {
		fprintf(stderr, "%s: load: which object? (vxdp load OBJ.o [--prog NAME])\n", prog);
		return EX_USAGE;
	}
	if (want && (strlen(want) == 0 || strlen(want) >= PROG_NAME))
		die(EX_USAGE, "program name '%s' must be 1..%d characters", want, PROG_NAME - 1);
	chunk = read_file(path, &len);
	object_name_from_path(objname, path);
	open_device();
	t0 = now_ms();

	/* The channel takes requests up to the host's max_request_bytes. */
	transact(CMD_CAPS, NULL, 0, &r);
	if (r.status == ST_OK && r.body_len >= 8) {
		uint32_t m = get32(r.body + 4);
		if (m >= 1024 && m < max_req)
			max_req = m;
	}

	put32(begin, len);
	put32(begin + 4, 0);
	memcpy(begin + 8, objname, strlen(objname));
	transact(CMD_OBJ_BEGIN, begin, sizeof(begin), &r);
	expect_ok("load: OBJ_BEGIN", &r);
	if (r.body_len < 8)
		die(EX_SYSTEM, "malformed OBJ_BEGIN answer: %u bytes", r.body_len);
	max_obj = get32(r.body);
	max_chunk = get32(r.body + 4);
	if (len > max_obj)
		die(EX_REFUSED, "load: %s is %u bytes; the host takes objects up to %u", path, len, max_obj);
	if (max_chunk == 0)
		die(EX_SYSTEM, "malformed OBJ_BEGIN answer: max_chunk_bytes 0");
	if (max_chunk > max_req - VXO_HDR - 4)
		max_chunk = max_req - VXO_HDR - 4;

	static uint8_t cbuf[VXO_MAX_MESSAGE];
	while (off < len) {
		uint32_t n = len - off < max_chunk ? len - off : max_chunk;

		put32(cbuf, off);
		memcpy(cbuf + 4, chunk + off, n);
		transact(CMD_OBJ_CHUNK, cbuf, 4 + n, &r);
		expect_ok("load: OBJ_CHUNK", &r);
		if (r.body_len < 4)
			die(EX_SYSTEM, "malformed OBJ_CHUNK answer: %u bytes", r.body_len);
		off += n;
		if (get32(r.body) != off)
			die(EX_SYSTEM, "load: the host says it has %u bytes, %u were sent", get32(r.body), off);
	}

	put32(load, 0);
	if (want)
		memcpy(load + 4, want, strlen(want));
	transact(CMD_OBJ_LOAD, load, sizeof(load), &r);
	if (r.status != ST_OK) {
		char what[300];
		snprintf(what, sizeof(what), "load %s", path);
		refused(what, &r);
	}
	if (r.body_len < 16)
		die(EX_SYSTEM, "malformed OBJ_LOAD answer: %u bytes", r.body_len);
	uint32_t progs = get32(r.body), maps = get32(r.body + 4);
	tag_hex(tag, r.body + 8);
	double ms = now_ms() - t0;

	/* The entry program's name, for the alias (the answer to OBJ_LOAD has only its tag). */
	obj_show(&oi);
	const char *pname = oi.loaded && oi.prog_name[0] ? oi.prog_name : want ? want : "?";
	snprintf(alias, sizeof(alias), "vxdp: %s %s", pname, tag);
	set_alias(alias);
	if (json)
		printf("{\"interface\":\"%s\",\"object\":\"%s\",\"program\":\"%s\",\"tag\":\"%s\","
		       "\"prog_count\":%u,\"map_count\":%u,\"bytes\":%u,\"ms\":%.1f}\n",
		       ifname, objname, pname, tag, progs, maps, len, ms);
	else
		printf("loaded %s on %s: program %s tag %s (%u programs, %u maps; %u bytes in %.1f ms)\n",
		       path, ifname, pname, tag, progs, maps, len, ms);
	free(oi.maps);
	free(chunk);
	return EX_OK;
}

/* ---- show / unload ------------------------------------------------------------------- */

static int cmd_show(void)
{
	struct obj_info oi;
	char tag[17];

	open_device();
	obj_show(&oi);
	if (!oi.loaded) {
		if (json)
			printf("{\"interface\":\"%s\",\"loaded\":false}\n", ifname);
		else
			printf("%s: no object offloaded\n", ifname);
		return EX_OK;
	}
	tag_hex(tag, oi.tag);
	if (json) {
		printf("{\"interface\":\"%s\",\"loaded\":true,\"object\":\"%s\",\"program\":\"%s\",\"tag\":\"%s\","
		       "\"prog_count\":%u,\"possible_cpus\":%u,\"maps\":[",
		       ifname, oi.obj_name, oi.prog_name, tag, oi.prog_count, oi.possible_cpus);
		for (uint32_t i = 0; i < oi.map_count; i++) {
			struct map_info *m = &oi.maps[i];
			printf("%s{\"handle\":%u,\"name\":\"%s\",\"type\":\"%s\",\"type_id\":%u,\"key_size\":%u,"
			       "\"value_size\":%u,\"max_entries\":%u,\"flags\":%u}",
			       i ? "," : "", m->handle, m->name, map_type_name(m->type), m->type, m->key_size,
			       m->value_size, m->max_entries, m->flags);
		}
		printf("]}\n");
	} else {
		printf("%s: object %s, program %s tag %s, %u programs, %u possible CPUs on the host\n",
		       ifname, oi.obj_name, oi.prog_name, tag, oi.prog_count, oi.possible_cpus);
		for (uint32_t i = 0; i < oi.map_count; i++) {
			struct map_info *m = &oi.maps[i];
			printf("  map %u: %s  %s  key %uB  value %uB  max_entries %u  flags 0x%x\n", m->handle,
			       m->name, map_type_name(m->type), m->key_size, m->value_size, m->max_entries, m->flags);
		}
	}
	free(oi.maps);
	return EX_OK;
}

static int cmd_unload(void)
{
	struct resp r;
	uint32_t was;

	open_device();
	transact(CMD_OBJ_UNLOAD, NULL, 0, &r);
	expect_ok("unload", &r);
	if (r.body_len < 4)
		die(EX_SYSTEM, "malformed OBJ_UNLOAD answer: %u bytes", r.body_len);
	was = get32(r.body);
	set_alias(NULL);
	if (json)
		printf("{\"interface\":\"%s\",\"was_loaded\":%s}\n", ifname, was ? "true" : "false");
	else
		printf("%s: %s\n", ifname, was ? "object unloaded" : "no object was loaded");
	return EX_OK;
}

/* ---- maps ---------------------------------------------------------------------------- */

/* bpftool's byte syntax: numbers in C notation (0x01, 1, 01), or after `hex` two-digit hex. */
static uint32_t parse_bytes(char **argv, int argc, int *i, uint8_t *out, uint32_t want, const char *what)
{
	bool hex = false;
	uint32_t n = 0;

	if (*i < argc && !strcmp(argv[*i], "hex")) {
		hex = true;
		(*i)++;
	}
	while (*i < argc && n < want + 1) {
		const char *s = argv[*i];
		char *end;
		unsigned long v;

		if (!strcmp(s, "key") || !strcmp(s, "value") || !strcmp(s, "any") || !strcmp(s, "noexist") ||
		    !strcmp(s, "exist") || !strncmp(s, "--", 2))
			break;
		errno = 0;
		v = strtoul(s, &end, hex ? 16 : 0);
		if (errno || *end || end == s || v > 255 || s[0] == '-')
			die(EX_USAGE, "%s: '%s' is not a byte", what, s);
		if (n == want)
			die(EX_USAGE, "%s: expected %u bytes, got more", what, want);
		out[n++] = v;
		(*i)++;
	}
	if (n != want)
		die(EX_USAGE, "%s: expected %u bytes, got %u", what, want, n);
	return n;
}

static const struct map_info *find_map(const struct obj_info *oi, const char *name)
{
	char *end;
	unsigned long h;

	for (uint32_t i = 0; i < oi->map_count; i++)
		if (!strcmp(oi->maps[i].name, name))
			return &oi->maps[i];
	/* libbpf names internal maps "<object prefix>.rodata": a bare ".rodata" finds it */
	if (name[0] == '.')
		for (uint32_t i = 0; i < oi->map_count; i++) {
			size_t a = strlen(oi->maps[i].name), b = strlen(name);
			if (a > b && !strcmp(oi->maps[i].name + a - b, name))
				return &oi->maps[i];
		}
	h = strtoul(name, &end, 10);
	if (*name && !*end)
		for (uint32_t i = 0; i < oi->map_count; i++)
			if (oi->maps[i].handle == h)
				return &oi->maps[i];
	return NULL;
}

struct mapctx {
	const struct map_info *m;
	uint32_t cpus, stride, vlen; /* vlen: bytes of a value on the wire */
	bool percpu;
	int printed;
};

static void print_bytes_text(const uint8_t *p, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		printf("%s%02x", i ? " " : "", p[i]);
}

static void print_bytes_json(const uint8_t *p, uint32_t n)
{
	putchar('[');
	for (uint32_t i = 0; i < n; i++)
		printf("%s\"0x%02x\"", i ? "," : "", p[i]);
	putchar(']');
}

/* One element, bpftool's layout: text `key: .. value: ..` or per-CPU `value (CPU NN): ..`;
 * JSON {"key":[..],"value":[..]} or {"key":[..],"values":[{"cpu":N,"value":[..]},..]}.
 */
static void print_elem(struct mapctx *c, const uint8_t *key, const uint8_t *val)
{
	uint32_t ks = c->m->key_size, vs = c->m->value_size;

	if (json) {
		printf("%s{\"key\":", c->printed ? "," : "");
		print_bytes_json(key, ks);
		if (c->percpu) {
			printf(",\"values\":[");
			for (uint32_t cpu = 0; cpu < c->cpus; cpu++) {
				printf("%s{\"cpu\":%u,\"value\":", cpu ? "," : "", cpu);
				print_bytes_json(val + cpu * c->stride, vs);
				putchar('}');
			}
			putchar(']');
		} else {
			printf(",\"value\":");
			print_bytes_json(val, vs);
		}
		putchar('}');
	} else if (c->percpu) {
		printf("key:\n");
		print_bytes_text(key, ks);
		putchar('\n');
		for (uint32_t cpu = 0; cpu < c->cpus; cpu++) {
			printf("value (CPU %02u): ", cpu);
			print_bytes_text(val + cpu * c->stride, vs);
			putchar('\n');
		}
	} else {
		printf("key: ");
		print_bytes_text(key, ks);
		printf("  value: ");
		print_bytes_text(val, vs);
		putchar('\n');
	}
	c->printed++;
}

static uint8_t *elem_req(const struct mapctx *c, uint32_t flags, const uint8_t *key, uint32_t klen,
			 const uint8_t *val, uint32_t vlen, uint32_t *len)
{
	static uint8_t buf[VXO_MAX_MESSAGE];

	*len = 8 + klen + vlen;
	if (*len > VXO_MAX_MESSAGE - VXO_HDR)
		die(EX_USAGE, "map %s: key and value do not fit in one request", c->m->name);
	put32(buf, c->m->handle);
	put32(buf + 4, flags);
	if (klen)
		memcpy(buf + 8, key, klen);
	if (vlen)
		memcpy(buf + 8 + klen, val, vlen);
	return buf;
}

/* Dump by GET_FIRST_KEY/GET_NEXT_KEY + ELEM_LOOKUP (the fallback when batches fail). */
static void dump_iterate(struct mapctx *c)
{
	uint32_t ks = c->m->key_size, len;
	uint8_t *key = malloc(ks), *val = malloc(c->vlen);
	struct resp r;
	uint8_t *req;
	bool first = true;
	uint32_t guard = 0;

	if (!key || !val)
		die(EX_SYSTEM, "out of memory");
	for (;;) {
		req = elem_req(c, 0, key, first ? 0 : ks, NULL, 0, &len);
		transact(first ? CMD_GET_FIRST_KEY : CMD_GET_NEXT_KEY, req, len, &r);
		if (r.status == ST_NO_SUCH_ELEMENT)
			break;
		expect_ok("map dump: next key", &r);
		if (r.body_len != ks)
			die(EX_SYSTEM, "malformed key: %u bytes, the map's keys are %u", r.body_len, ks);
		memcpy(key, r.body, ks);
		first = false;
		req = elem_req(c, 0, key, ks, NULL, 0, &len);
		transact(CMD_ELEM_LOOKUP, req, len, &r);
		if (r.status == ST_NO_SUCH_ELEMENT)
			continue; /* deleted meanwhile */
		expect_ok("map dump: lookup", &r);
		if (r.body_len != c->vlen)
			die(EX_SYSTEM, "malformed value: %u bytes, expected %u", r.body_len, c->vlen);
		memcpy(val, r.body, c->vlen);
		print_elem(c, key, val);
		/* a host that never ends the iteration */
		if (++guard > c->m->max_entries + 1024u)
			die(EX_SYSTEM, "map dump: the host keeps returning keys past max_entries");
	}
	free(key);
	free(val);
}

/* Dump with ELEM_LOOKUP_BATCH; false when the host cannot batch this map (then iterate). */
static bool dump_batch(struct mapctx *c)
{
	uint32_t ks = c->m->key_size, per = ks + c->vlen, cursor_len = 0, len, max_count, total = 0;
	static uint8_t cursor[4096];
	static uint8_t req[16 + sizeof(cursor)];
	struct resp r;

	if (per == 0)
		return false;
	max_count = (RESP_BUF / 2) / per;
	if (max_count == 0)
		max_count = 1;
	for (;;) {
		put32(req, c->m->handle);
		put32(req + 4, 0);
		put32(req + 8, max_count);
		put32(req + 12, cursor_len);
		memcpy(req + 16, cursor, cursor_len);
		len = 16 + cursor_len;
		transact(CMD_ELEM_LOOKUP_BATCH, req, len, &r);
		if (r.status == ST_NO_SUCH_ELEMENT)
			return true; /* empty */
		if (r.status != ST_OK)
			return c->printed ? (refused("map dump", &r), true) : false;
		if (r.body_len < 12)
			die(EX_SYSTEM, "malformed batch answer: %u bytes", r.body_len);
		uint32_t count = get32(r.body), done = get32(r.body + 4), cl = get32(r.body + 8);
		if (cl > sizeof(cursor) || cl > r.body_len - 12)
			die(EX_SYSTEM, "malformed batch answer: cursor of %u bytes", cl);
		uint64_t need = 12 + (uint64_t)cl + (uint64_t)count * per;
		if (need > r.body_len)
			die(EX_SYSTEM, "malformed batch answer: %u elements of %u bytes in %u bytes", count, per, r.body_len);
		const uint8_t *keys = r.body + 12 + cl, *vals = keys + (size_t)count * ks;
		for (uint32_t i = 0; i < count; i++)
			print_elem(c, keys + (size_t)i * ks, vals + (size_t)i * c->vlen);
		total += count;
		if (done || cl == 0)
			return true;
		if (count == 0 || total > c->m->max_entries + 1024u)
			die(EX_SYSTEM, "map dump: the host's batches do not progress");
		memcpy(cursor, r.body + 12, cl);
		cursor_len = cl;
	}
}

static int cmd_map(int argc, char **argv)
{
	const char *op, *name;
	struct obj_info oi;
	struct mapctx c = { 0 };
	struct resp r;
	uint32_t len;
	int i = 2;

	if (argc < 2) {
		fprintf(stderr, "%s: map: usage: vxdp map dump|lookup|update|delete NAME [key BYTES] [value BYTES]\n", prog);
		return EX_USAGE;
	}
	op = argv[0];
	name = argv[1];
	if (!strcmp(name, "name") && argc >= 3) {
		name = argv[2];
		i = 3;
	}
	if (strcmp(op, "dump") && strcmp(op, "lookup") && strcmp(op, "update") && strcmp(op, "delete")) {
		fprintf(stderr, "%s: map: unknown operation '%s'\n", prog, op);
		usage_hint();
		return EX_USAGE;
	}
	open_device();
	obj_show(&oi);
	if (!oi.loaded)
		die(EX_REFUSED, "%s: no object offloaded, so no map %s", ifname, name);
	c.m = find_map(&oi, name);
	if (!c.m)
		die(EX_REFUSED, "%s: the offloaded object has no map named %s", ifname, name);
	c.percpu = map_is_percpu(c.m->type);
	c.cpus = c.percpu ? oi.possible_cpus : 1;
	c.stride = c.percpu ? (c.m->value_size + 7) & ~7u : c.m->value_size;
	if ((uint64_t)c.cpus * c.stride > VXO_MAX_MESSAGE)
		die(EX_SYSTEM, "map %s: a value (%u CPUs x %u bytes) does not fit in a message", name, c.cpus, c.stride);
	c.vlen = c.percpu ? c.cpus * c.stride : c.m->value_size;
	if (c.m->key_size > VXO_MAX_MESSAGE)
		die(EX_SYSTEM, "map %s: malformed key size %u", name, c.m->key_size);

	uint8_t *key = calloc(1, c.m->key_size + 1), *val = calloc(1, c.vlen + 1);
	if (!key || !val)
		die(EX_SYSTEM, "out of memory");

	if (!strcmp(op, "dump")) {
		if (i < argc)
			die(EX_USAGE, "map dump: unexpected argument '%s'", argv[i]);
		if (json)
			putchar('[');
		if (!dump_batch(&c))
			dump_iterate(&c);
		if (json)
			printf("]\n");
		else
			printf("Found %d element%s\n", c.printed, c.printed == 1 ? "" : "s");
		return EX_OK;
	}

	if (i >= argc || strcmp(argv[i], "key"))
		die(EX_USAGE, "map %s: expected 'key BYTES'", op);
	i++;
	parse_bytes(argv, argc, &i, key, c.m->key_size, "key");

	if (!strcmp(op, "lookup")) {
		uint8_t *req = elem_req(&c, 0, key, c.m->key_size, NULL, 0, &len);
		if (i < argc)
			die(EX_USAGE, "map lookup: unexpected argument '%s'", argv[i]);
		transact(CMD_ELEM_LOOKUP, req, len, &r);
		if (r.status == ST_NO_SUCH_ELEMENT) {
			if (json)
				printf("{\"error\":\"key not found\"}\n");
			fprintf(stderr, "%s: map lookup: key not found in %s\n", prog, c.m->name);
			return EX_REFUSED;
		}
		expect_ok("map lookup", &r);
		if (r.body_len != c.vlen)
			die(EX_SYSTEM, "malformed value: %u bytes, expected %u", r.body_len, c.vlen);
		print_elem(&c, key, r.body);
		if (json)
			putchar('\n');
		return EX_OK;
	}
	if (!strcmp(op, "delete")) {
		uint8_t *req = elem_req(&c, 0, key, c.m->key_size, NULL, 0, &len);
		if (i < argc)
			die(EX_USAGE, "map delete: unexpected argument '%s'", argv[i]);
		transact(CMD_ELEM_DELETE, req, len, &r);
		if (r.status == ST_NO_SUCH_ELEMENT) {
			fprintf(stderr, "%s: map delete: key not found in %s\n", prog, c.m->name);
			return EX_REFUSED;
		}
		expect_ok("map delete", &r);
		return EX_OK;
	}

	/* update */
	uint32_t flags = 0;
	if (i >= argc || strcmp(argv[i], "value"))
		die(EX_USAGE, "map update: expected 'value BYTES'");
	i++;
	{
		/* bpftool: one value for a per-CPU map is written to every CPU */
		int save = i;
		uint8_t *one = calloc(1, c.stride + 1);
		uint32_t n = 0;

		if (!one)
			die(EX_SYSTEM, "out of memory");
		if (c.percpu) {
			/* count the bytes given to tell one value from all of them */
			int j = i + (i < argc && !strcmp(argv[i], "hex"));
			for (; j < argc && strcmp(argv[j], "any") && strcmp(argv[j], "noexist") &&
			       strcmp(argv[j], "exist") && strncmp(argv[j], "--", 2); j++)
				n++;
		}
		if (c.percpu && n == c.m->value_size) {
			parse_bytes(argv, argc, &i, one, c.m->value_size, "value");
			for (uint32_t cpu = 0; cpu < c.cpus; cpu++)
				memcpy(val + cpu * c.stride, one, c.m->value_size);
		} else {
			i = save;
			parse_bytes(argv, argc, &i, val, c.vlen, c.percpu ? "value (all CPUs)" : "value");
		}
		free(one);
	}
	if (i < argc) {
		if (!strcmp(argv[i], "any"))
			flags = 0;
		else if (!strcmp(argv[i], "noexist"))
			flags = 1;
		else if (!strcmp(argv[i], "exist"))
			flags = 2;
		else
			die(EX_USAGE, "map update: unexpected argument '%s'", argv[i]);
		i++;
	}
	if (i < argc)
		die(EX_USAGE, "map update: unexpected argument '%s'", argv[i]);
	uint8_t *req = elem_req(&c, flags, key, c.m->key_size, val, c.vlen, &len);
	transact(CMD_ELEM_UPDATE, req, len, &r);
	expect_ok("map update", &r);
	return EX_OK;
}

/* ---- main ---------------------------------------------------------------------------- */

static void help(void)
{
	printf(
"Usage: vxdp [-i IFNAME] [--json] COMMAND ...\n"
"Offload whole BPF objects to the vhost-xdp host through /dev/vxdp-IFNAME.\n"
"\n"
"  vxdp load OBJ.o [--prog NAME]   upload the object (in chunks) and load it on the host;\n"
"                                  NAME picks the entry XDP program (default: the first)\n"
"  vxdp show                       the loaded object: program, tag, maps\n"
"  vxdp map dump NAME              every element (per-CPU maps: each CPU's value)\n"
"  vxdp map lookup NAME key BYTES\n"
"  vxdp map update NAME key BYTES value BYTES [any|noexist|exist]\n"
"  vxdp map delete NAME key BYTES\n"
"  vxdp unload                     remove the object's programs and maps from the host\n"
"\n"
"BYTES as bpftool takes them: `0x01 0x00 0x00 0x00`, `1 0 0 0`, or `hex 01 00 00 00`.\n"
"A per-CPU update takes one value (written to every CPU) or all of them, CPU 0 first.\n"
"NAME is the map's name, its handle, or `.rodata`/`.bss`/`.data` for the object's own.\n"
"\n"
"Options:\n"
"  -i, --interface IFNAME  the interface (default: the only one with a /dev/vxdp-*)\n"
"  -j, --json              JSON output (bpftool's layout for map elements)\n"
"  -h, --help              this text\n"
"\n"
"After a load the interface alias reads `vxdp: <prog> <tag>` (ip link show); unload clears it.\n"
"Exit status: 0 success; 1 the host refused (status name and reason printed; a verifier\n"
"refusal prints the verifier log) or the key/map/object is not there; 2 usage error;\n"
"3 system or transport error (no device, busy, the host's BUSY, no answer in time, malformed\n"
"answer). A load waits for the host up to the driver's obj_load_timeout_ms (default 30 s).\n");
}

int main(int argc, char **argv)
{
	char **rest = calloc(argc + 1, sizeof(char *));
	int n = 0;

	if (!rest)
		return EX_SYSTEM;
	/* Options may come anywhere (vxdp show --json, vxdp map dump x --json). */
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			help();
			return EX_OK;
		} else if (!strcmp(argv[i], "-j") || !strcmp(argv[i], "--json")) {
			json = true;
		} else if (!strcmp(argv[i], "-i") || !strcmp(argv[i], "--interface")) {
			if (i + 1 >= argc) {
				fprintf(stderr, "%s: %s needs an interface name\n", prog, argv[i]);
				return EX_USAGE;
			}
			ifname = argv[++i];
		} else {
			rest[n++] = argv[i];
		}
	}
	if (n == 0) {
		help();
		return EX_USAGE;
	}
	if (!strcmp(rest[0], "load"))
		return cmd_load(n - 1, rest + 1);
	if (!strcmp(rest[0], "show") && n == 1)
		return cmd_show();
	if (!strcmp(rest[0], "unload") && n == 1)
		return cmd_unload();
	if (!strcmp(rest[0], "map"))
		return cmd_map(n - 1, rest + 1);
	fprintf(stderr, "%s: unknown command or arguments: %s\n", prog, rest[0]);
	usage_hint();
	return EX_USAGE;
}
