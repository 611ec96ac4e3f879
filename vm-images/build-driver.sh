#!/usr/bin/env bash
# Builds the guest's offload-aware virtio_net: vm-images/out/virtio_net_offload.ko.
#
# The module is Debian's own drivers/net/virtio_net.c (from linux-source-6.1) with
# vm-images/virtio-net-offload.patch applied, built out of tree against the
# linux-headers of exactly the kernel the guest image boots. Only Debian packages are
# used, fetched with apt-get download into vm-images/cache/debs (shared with build.sh).
# The module keeps the name virtio_net (its driver must bind as "virtio_net"); load it
# with `modprobe net_failover; insmod virtio_net_offload.ko` in place of the stock one.
#
# Which kernel: $VXDP_KERNEL_PKG (as build.sh) with its candidate version, else the one
# recorded in out/release by build.sh, else the newest linux-image-6.1.0-*-amd64.
#
# Idempotent: out/.driver-stamp holds a hash of this script, the patch and the kernel
# version; when it matches, nothing is done. The original virtio_net.c and the
# extracted headers are cached under cache/driver/<version>/ (the source tarball takes
# ~25 s to unpack; the build itself ~5 s).
#
# Usage: vm-images/build-driver.sh [--force]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out="$here/out"
cache="$here/cache"
debs="$cache/debs"
patchfile="$here/virtio-net-offload.patch"
ko_out="$out/virtio_net_offload.ko"
stampfile="$out/.driver-stamp"
force=0
[ "${1:-}" = --force ] && force=1

say() { printf '[build-driver] %s\n' "$*"; }
die() { printf '[build-driver] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb tar xz make patch strip sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "missing host tool '$tool'"
done
[ -f "$patchfile" ] || die "missing $patchfile"

candidate_version() {
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'
}

# --- which kernel -----------------------------------------------------------------------
if [ -n "${VXDP_KERNEL_PKG:-}" ]; then
  kpkg=$VXDP_KERNEL_PKG
  kver=$(candidate_version "$kpkg")
elif [ -s "$out/release" ]; then
  kpkg=$(sed -n 's/^KERNEL_PACKAGE=//p' "$out/release")
  kver=$(sed -n 's/^KERNEL_VERSION=//p' "$out/release")
else
  kpkg=$(apt-cache pkgnames linux-image-6.1.0- 2>/dev/null |
    grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -n 1)
  [ -n "$kpkg" ] || die "no linux-image-6.1.0-*-amd64 in the apt lists (run apt-get update, or vm-images/build.sh first)"
  kver=$(candidate_version "$kpkg")
fi
[ -n "$kpkg" ] && [ -n "$kver" ] && [ "$kver" != "(none)" ] || die "cannot tell the guest kernel's package/version"
krel=${kpkg#linux-image-}          # 6.1.0-56-amd64
abi=${krel%-amd64}                  # 6.1.0-56
case "$krel" in 6.1.*-amd64) ;; *) die "unexpected kernel package $kpkg (want linux-image-6.1.0-NN-amd64)" ;; esac

# --- up to date? --------------------------------------------------------------------------
stamp=$(
  { sha256sum "$here/build-driver.sh" "$patchfile"; echo "$kpkg=$kver"; } | sha256sum | cut -d' ' -f1
)
if [ $force = 0 ] && [ -s "$ko_out" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$stamp" ]; then
  say "up to date ($krel, $kver)"
  exit 0
fi

t0=$(date +%s)
command -v gcc-12 >/dev/null 2>&1 ||
  die "gcc-12 is missing (the $krel headers build with gcc-12): apt-get install gcc-12"

mkdir -p "$debs" "$out"
kcache="$cache/driver/$kver"
mkdir -p "$kcache"
work=$(mktemp -d "$cache/driver-work.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetch() { # fetch PKG VERSION -> prints the .deb path
  local pkg=$1 ver=$2 f
  f=$(ls "$debs/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n 1 || true)
  if [ -z "$f" ]; then
    say "downloading $pkg $ver" >&2
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null 2>"$work/apt.err") ||
      die "cannot download $pkg=$ver (try apt-get update): $(tr '\n' ' ' <"$work/apt.err")"
    f=$(ls "$debs/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n 1 || true)
    [ -n "$f" ] || die "apt-get download of $pkg produced no .deb"
  fi
  echo "$f"
}

# --- the original source file -------------------------------------------------------------
orig="$kcache/virtio_net.c.orig"
if [ ! -s "$orig" ]; then
  deb=$(fetch linux-source-6.1 "$kver")
  say "extracting drivers/net/virtio_net.c from linux-source-6.1 $kver"
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/linux-source-6.1.tar.xz |
    tar -xJO linux-source-6.1/drivers/net/virtio_net.c >"$work/virtio_net.c.orig" ||
    die "linux-source-6.1 $kver has no linux-source-6.1/drivers/net/virtio_net.c"
  [ -s "$work/virtio_net.c.orig" ] || die "extracted virtio_net.c is empty"
  mv "$work/virtio_net.c.orig" "$orig"
fi

# --- headers (extracted privately; their Makefile points at /usr/src, so it is rewritten) --
hdr="$kcache/headers"
if [ ! -f "$hdr/.complete" ]; then
  rm -rf "$hdr"
  mkdir -p "$hdr"
  for p in "linux-headers-$krel" "linux-headers-$abi-common" linux-kbuild-6.1; do
    deb=$(fetch "$p" "$kver")
    dpkg-deb -x "$deb" "$hdr"
  done
  mk="$hdr/usr/src/linux-headers-$krel/Makefile"
  [ -f "$mk" ] || die "linux-headers-$krel has no Makefile"
  sed -i "s|^include /usr/src/linux-headers-$abi-common/Makefile|include $hdr/usr/src/linux-headers-$abi-common/Makefile|" "$mk"
  grep -q "^include $hdr/" "$mk" || die "unexpected layout of $mk (cannot redirect it to the extracted headers)"
  touch "$hdr/.complete"
fi

# --- patch --------------------------------------------------------------------------------
src="$work/src"
mkdir -p "$src/drivers/net"
cp "$orig" "$src/drivers/net/virtio_net.c"
if ! (cd "$src" && patch -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch -r - <"$patchfile" >"$work/patch.log" 2>&1); then
  cat "$work/patch.log" >&2
  die "vm-images/virtio-net-offload.patch does not apply to drivers/net/virtio_net.c of linux-source-6.1 $kver; rebase the patch on that file"
fi

# --- build --------------------------------------------------------------------------------
mkdir -p "$work/build"
cp "$src/drivers/net/virtio_net.c" "$work/build/virtio_net.c"
echo 'obj-m := virtio_net.o' >"$work/build/Kbuild"
say "building virtio_net.ko against $krel"
if ! make -C "$hdr/usr/src/linux-headers-$krel" M="$work/build" modules >"$work/make.log" 2>&1; then
  grep -E 'error|Error|ERROR' "$work/make.log" | head -n 30 >&2 || tail -n 30 "$work/make.log" >&2
  die "building the patched virtio_net.ko failed (full log above)"
fi
[ -s "$work/build/virtio_net.ko" ] || die "the build produced no virtio_net.ko"
grep -aq "vermagic=$krel " "$work/build/virtio_net.ko" || die "built module does not carry vermagic $krel"

# Debug info is 95% of the file; the guest has no use for it (as INSTALL_MOD_STRIP=1).
strip --strip-debug -o "$ko_out.tmp" "$work/build/virtio_net.ko"
mv "$ko_out.tmp" "$ko_out"
echo "$stamp" >"$stampfile"
say "done in $(( $(date +%s) - t0 ))s: out/virtio_net_offload.ko ($(du -h "$ko_out" | cut -f1)) for $krel"
