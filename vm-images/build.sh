#!/usr/bin/env bash
# Builds the test guest: vm-images/out/vmlinuz + vm-images/out/initrd.img.
#
# Everything comes from Debian's own package registry (apt-get download), so the guest is
# the same on every machine of this kind: the newest linux-image-6.1.0-*-amd64 (resolved
# now, never hard-coded, because the ABI number moves with security updates),
# busybox-static, iproute2's `ip` and `bpftool` plus exactly the shared libraries they
# need (walked through ELF DT_NEEDED, mapped to packages with dpkg -S). The object-path CLI
# vxdp (vm-images/vxdp/vxdp.c) is compiled here with the host's C compiler, statically, into
# /usr/bin/vxdp; every bpf/out/*.o goes to /bpf.
#
# Idempotent: out/.stamp holds a hash of this script, the init, vxdp.c, the guest's BPF objects
# and the resolved package versions; when it matches, nothing is rebuilt.
#
# Usage: vm-images/build.sh [--force]
# Env:   VXDP_KERNEL_PKG=linux-image-6.1.0-NN-amd64  pins a kernel package instead of the newest.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out="$here/out"
cache="$here/cache"
debs="$cache/debs"
force=0
[ "${1:-}" = --force ] && force=1

say() { printf '[vm-images] %s\n' "$*"; }
die() { printf '[vm-images] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'printf "[vm-images] ERROR: command failed at build.sh line %s\n" "$LINENO" >&2' ERR

# Roots of the module closure loaded by the init; their dependencies are added below.
module_roots=(virtio_pci virtio_net)
# Libraries come from these packages' binaries.
user_pkgs=(busybox-static iproute2 bpftool)

for tool in apt-get apt-cache dpkg-deb dpkg readelf cpio gzip sha256sum busybox; do
  command -v "$tool" >/dev/null 2>&1 || die "missing host tool '$tool' (install it, e.g. scripts/bootstrap.sh)"
done

apt_updated=0
apt_update_once() {
  [ $apt_updated = 1 ] && return 0
  say "apt-get update"
  apt-get update -qq || die "apt-get update failed (no access to the Debian mirror?)"
  apt_updated=1
}

newest_kernel_pkg() {
  apt-cache pkgnames linux-image-6.1.0- 2>/dev/null |
    grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -n 1
}

# One apt-cache call for many packages (each call costs ~0.5 s): prints "pkg version" lines.
candidate_versions() {
  apt-cache policy "$@" 2>/dev/null |
    awk '/^[^ ].*:$/ { p = substr($0, 1, length($0) - 1) } /Candidate:/ { print p, $2 }'
}
candidate_version() { candidate_versions "$1" | awk '{ print $2; exit }'; }

# --- resolve package versions -------------------------------------------------------------
kpkg=${VXDP_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
  kpkg=$(newest_kernel_pkg)
  if [ -z "$kpkg" ]; then
    apt_update_once
    kpkg=$(newest_kernel_pkg)
  fi
  [ -n "$kpkg" ] || die "no linux-image-6.1.0-*-amd64 package in the apt lists (is bookworm in /etc/apt/sources.list?)"
fi
krel=${kpkg#linux-image-}

# Library packages: the closure ldd reports for the host's own ip/bpftool, mapped to the
# packages that ship them. The image's binaries come from the registry, not the host, and
# are checked against this list once extracted (DT_NEEDED walk below).
host_ip=$(command -v ip || true); host_bpftool=$(command -v bpftool || true)
[ -n "$host_ip" ] && [ -n "$host_bpftool" ] ||
  die "the host needs iproute2 and bpftool installed (their library closure is read from them)"
sonames=$(ldd "$host_ip" "$host_bpftool" | awk '$1 ~ /\.so/ && $1 !~ /vdso/ { n = split($1, a, "/"); print a[n] }' | sort -u)
patterns=(); for so in $sonames; do patterns+=("*/$so"); done
# dpkg -S matches substrings: keep lines whose path ends in exactly the soname, no -dev.
lib_pkgs=($(dpkg -S "${patterns[@]}" 2>/dev/null | awk -F': ' -v list="$sonames" '
  BEGIN { split(list, l, /[ \n]+/); for (i in l) want[l[i]] = 1 }
  { n = split($2, a, "/"); p = $1; sub(/:.*/, "", p)
    if ((a[n] in want) && p !~ /-dev$/ && !(a[n] in got)) { got[a[n]] = p; pk[p] = 1 } }
  END { for (s in want) if (s != "" && !(s in got)) { print "MISSING:" s }; for (p in pk) print p }' | sort))
for p in "${lib_pkgs[@]}"; do
  case "$p" in MISSING:*) die "cannot tell which package ships ${p#MISSING:}" ;; esac
done

declare -A pkgver=()
while read -r p v; do pkgver[$p]=$v; done < <(candidate_versions "$kpkg" "${user_pkgs[@]}" "${lib_pkgs[@]}")
for p in "$kpkg" "${user_pkgs[@]}" "${lib_pkgs[@]}"; do
  v=${pkgver[$p]:-}
  [ -n "$v" ] && [ "$v" != "(none)" ] || die "package $p has no installable candidate (try: apt-get update)"
done
kver=${pkgver[$kpkg]}
# The offload-aware virtio_net (issue 5), built against this very kernel.
VXDP_KERNEL_PKG=$kpkg "$here/build-driver.sh" || die "building the offload-aware virtio_net failed"

# --- up to date? --------------------------------------------------------------------------
shopt -s nullglob
bpf_objs=("$repo"/bpf/out/*.o)
stamp=$(
  {
    sha256sum "$here/build.sh" "$here/init" "$here/vxdp/vxdp.c"
    sha256sum "$out/virtio_net_offload.ko"
    for o in "${bpf_objs[@]}"; do sha256sum "$o"; done
    echo "$kpkg=$kver"
    for p in "${user_pkgs[@]}" "${lib_pkgs[@]}"; do echo "$p=${pkgver[$p]}"; done
  } | sha256sum | cut -d' ' -f1
)
if [ $force = 0 ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] &&
   [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  say "up to date ($kpkg $kver)"
  exit 0
fi

t0=$(date +%s)
say "building guest image: $kpkg $kver"
mkdir -p "$debs" "$out"
work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- download -----------------------------------------------------------------------------
# deb file name of package $1 at version $2 as apt-get download names it (epoch ':' -> %3a)
deb_path() { echo "$debs/${1}_${2//:/%3a}_amd64.deb"; }

fetch() { # fetch PKG VERSION -> prints the .deb path
  local pkg=$1 ver=$2 f
  f=$(deb_path "$pkg" "$ver")
  if [ ! -s "$f" ]; then
    say "downloading $pkg $ver" >&2
    if ! (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null 2>"$work/apt.err"); then
      # Stale lists point at files the mirror already dropped: refresh once and retry.
      if [ $apt_updated = 0 ]; then
        say "download of $pkg failed, refreshing the package lists" >&2
        apt-get update -qq >&2 2>>"$work/apt.err" || true
        apt_updated=1
      fi
      ver=$(candidate_version "$pkg")
      f=$(deb_path "$pkg" "$ver")
      (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null 2>"$work/apt.err") ||
        die "cannot fetch package $pkg ($ver): $(tr '\n' ' ' <"$work/apt.err")"
    fi
    [ -s "$f" ] || f=$(ls -t "$debs/${pkg}_"*.deb 2>/dev/null | head -n 1)
    [ -s "$f" ] || die "apt-get download of $pkg produced no .deb"
  fi
  echo "$f"
}

extract() { # extract PKG VERSION into $work/x/PKG
  local d="$work/x/$1" deb
  deb=$(fetch "$1" "$2") || exit 1 # fetch already said why
  mkdir -p "$d"
  dpkg-deb -x "$deb" "$d"
}

extract "$kpkg" "$kver"
for p in "${user_pkgs[@]}" "${lib_pkgs[@]}"; do extract "$p" "${pkgver[$p]}"; done

# --- assemble the root --------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,proc,sys,dev,tmp,run,root,etc,bpf,mnt}
chmod 1777 "$root/tmp"

bb="$work/x/busybox-static/bin/busybox"
[ -x "$bb" ] || die "busybox-static package has no bin/busybox"
cp "$bb" "$root/bin/busybox"
# Applet links from the binary's own list, skipping anything real binaries provide.
for applet in $("$bb" --list-full); do
  case "$applet" in */ip|*/bpftool|*/init|*/linuxrc|bin/busybox) continue ;; esac
  mkdir -p "$root/$(dirname "$applet")"
  ln -sf /bin/busybox "$root/$applet"
done

find_bin() { # find_bin PKG NAME -> path inside the extracted package
  local p
  for p in sbin bin usr/sbin usr/bin; do
    # Skip symlinks: theirs are absolute (/sbin/ip -> /bin/ip) and would resolve on the host.
    [ -f "$work/x/$1/$p/$2" ] && [ ! -L "$work/x/$1/$p/$2" ] && { echo "$work/x/$1/$p/$2"; return; }
  done
  die "package $1 has no binary named $2"
}
cp "$(find_bin iproute2 ip)" "$root/sbin/ip"
cp "$(find_bin bpftool bpftool)" "$root/usr/sbin/bpftool"
ln -sf /sbin/ip "$root/bin/ip"
ln -sf /usr/sbin/bpftool "$root/sbin/bpftool"

# Shared libraries: walk DT_NEEDED through the extracted packages and copy each one.
needed() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
interp() { readelf -l "$1" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p'; }
lib_in_tree() { # lib_in_tree SONAME -> the file in any extracted package
  local d sub
  for d in "$work"/x/*; do
    for sub in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 lib usr/lib; do
      [ -e "$d/$sub/$1" ] && { echo "$d/$sub/$1"; return 0; }
    done
  done
  return 1
}
declare -A seen=()
queue=("$root/sbin/ip" "$root/usr/sbin/bpftool")
loader=$(interp "$root/sbin/ip")
[ -n "$loader" ] || die "cannot read the ELF interpreter of ip"
while [ ${#queue[@]} -gt 0 ]; do
  elf=${queue[0]}
  queue=("${queue[@]:1}")
  for so in $(needed "$elf") "${loader##*/}"; do
    [ -n "${seen[$so]:-}" ] && continue
    seen[$so]=1
    src=$(lib_in_tree "$so") || die "$so (needed by ${elf##*/}) is in none of: ${lib_pkgs[*]}"
    cp -L "$src" "$root/lib/x86_64-linux-gnu/$so"
    queue+=("$root/lib/x86_64-linux-gnu/$so")
  done
done
# The loader path is baked into every binary (/lib64/ld-linux-x86-64.so.2).
mkdir -p "$root/$(dirname "$loader")"
[ -e "$root$loader" ] || ln -sf "/lib/x86_64-linux-gnu/$(basename "$loader")" "$root$loader"
say "libraries: ${!seen[*]}"

# Kernel and the module closure.
kx="$work/x/$kpkg"
[ -f "$kx/boot/vmlinuz-$krel" ] || die "$kpkg has no boot/vmlinuz-$krel"
mods_src="$kx/lib/modules/$krel"
mods_dst="$root/lib/modules/$krel"
declare -A modpath=()
while IFS= read -r f; do
  n=${f##*/}; n=${n%%.ko*}; modpath[${n//-/_}]=$f
done < <(find "$mods_src/kernel" -name '*.ko*')
declare -A modseen=()
mq=("${module_roots[@]}")
while [ ${#mq[@]} -gt 0 ]; do
  m=${mq[0]//-/_}
  mq=("${mq[@]:1}")
  [ -n "${modseen[$m]:-}" ] && continue
  modseen[$m]=1
  f=${modpath[$m]:-}
  if [ -z "$f" ]; then
    grep -q "/$m.ko" "$mods_src/modules.builtin" 2>/dev/null && continue
    die "kernel module $m not found in $kpkg"
  fi
  rel=${f#"$mods_src/"}
  mkdir -p "$mods_dst/$(dirname "$rel")"
  cp "$f" "$mods_dst/$rel"
  # .modinfo is a list of NUL-terminated key=value strings; busybox modinfo would insist
  # on the running kernel's modules.dep, so read it directly.
  deps=$(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
  for d in $deps; do mq+=("$d"); done
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
  [ -f "$mods_src/$f" ] && cp "$mods_src/$f" "$mods_dst/$f"
done
# Generated with busybox's depmod: the image's modprobe is busybox too.
busybox depmod -b "$root" "$krel" || die "depmod failed"
say "modules: ${!modseen[*]}"
# Not under lib/modules: it is also named virtio_net; init insmods it by path.
mkdir -p "$root/lib/vxdp"
cp "$out/virtio_net_offload.ko" "$root/lib/vxdp/virtio_net_offload.ko"

# The object-path CLI: static, so it needs nothing from the image's libraries.
vxdp_cc=$(command -v gcc || command -v cc || command -v clang || true)
[ -n "$vxdp_cc" ] || die "no C compiler on the host for vm-images/vxdp/vxdp.c (apt-get install gcc)"
"$vxdp_cc" -static -O2 -Wall -Wextra -o "$root/usr/bin/vxdp" "$here/vxdp/vxdp.c" 2>"$work/vxdp.err" ||
  { cat "$work/vxdp.err" >&2; die "compiling vm-images/vxdp/vxdp.c failed (a static build needs libc6-dev)"; }
strip "$root/usr/bin/vxdp"
say "vxdp: $(du -h "$root/usr/bin/vxdp" | cut -f1) static"

# Guest BPF objects, if the repo has built any.
for o in "${bpf_objs[@]}"; do cp "$o" "$root/bpf/"; done
[ ${#bpf_objs[@]} -gt 0 ] && say "bpf objects: ${#bpf_objs[@]}"

cp "$here/init" "$root/init"
chmod 755 "$root/init"
cat >"$root/etc/vxdp-release" <<EOF
KERNEL_PACKAGE=$kpkg
KERNEL_VERSION=$kver
KERNEL_RELEASE=$krel
EOF
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

# --- pack ---------------------------------------------------------------------------------
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) |
  gzip -6 >"$out/initrd.img.tmp"
cp "$kx/boot/vmlinuz-$krel" "$out/vmlinuz.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$root/etc/vxdp-release" "$out/release"
echo "$stamp" >"$out/.stamp"

# Old kernel debs (70 MB each) would pile up with every security update.
find "$debs" -name 'linux-image-6.1.0-*' ! -name "${kpkg}_${kver//:/%3a}_amd64.deb" -delete

say "done in $(( $(date +%s) - t0 ))s: out/vmlinuz ($(du -h "$out/vmlinuz" | cut -f1)), out/initrd.img ($(du -h "$out/initrd.img" | cut -f1)), kernel $krel"
