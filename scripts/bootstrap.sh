#!/usr/bin/env bash
# Idempotent setup for a fresh machine of this kind: system packages, hugepages, npm deps,
# TypeScript and BPF builds, guest image. `npm test`, `npm run demo` and `npm run bench` run it first.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[bootstrap] %s\n' "$*"; }
export DEBIAN_FRONTEND=noninteractive

need_apt=()
for bin in qemu-system-x86_64:qemu-system-x86 clang:clang llc:llvm bpftool:bpftool ip:iproute2 \
           ping:iputils-ping tcpdump:tcpdump iperf3:iperf3 cpio:cpio dpdk-testpmd:dpdk-dev \
           trafgen:netsniff-ng ethtool:ethtool xdp-loader:xdp-tools; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || need_apt+=("${bin#*:}")
done
for lib in /usr/include/bpf/libbpf.h:libbpf-dev /usr/bin/busybox:busybox-static \
           /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_net_vhost.so.23:librte-net-vhost23 \
           /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_net_virtio.so.23:librte-net-virtio23 \
           /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_net_af_xdp.so.23:librte-net-af-xdp23 \
           /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_net_tap.so.23:librte-net-tap23 \
           /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0/librte_mempool_ring.so.23:librte-mempool-ring23 \
           /usr/lib/python3/dist-packages/prometheus_client/parser.py:python3-prometheus-client; do
  [ -e "${lib%%:*}" ] || need_apt+=("${lib#*:}")
done
qemu_ok=1
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  qemu-system-x86_64 --version | grep -qE 'version (1[0-9]|[2-9][0-9])\.' || qemu_ok=0
else
  qemu_ok=0
fi
if [ ${#need_apt[@]} -gt 0 ] || [ $qemu_ok = 0 ]; then
  say "installing system packages: ${need_apt[*]} ${qemu_ok/1/}"
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/backports.list
  fi
  apt-get update -qq
  if [ $qemu_ok = 0 ]; then apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null; fi
  pkgs=(clang llvm libbpf-dev libbpf1 bpftool xdp-tools iproute2 iputils-ping tcpdump iperf3 cpio
        busybox-static netsniff-ng ethtool dpdk-dev librte-net-vhost23 librte-net-virtio23
        librte-net-af-xdp23 librte-net-tap23 librte-mempool-ring23
        python3-prometheus-client)  # the tests parse /metrics with the Prometheus text parser
  apt-get install -y -qq "${pkgs[@]}" >/dev/null
else
  say "system packages present"
fi

# libvirt (test/guest/libvirt.test.ts runs the README's libvirt XML): bookworm's 9.0 drives the
# backports QEMU 10 installed above. --no-install-recommends keeps it from pulling lvm2, xen,
# dnsmasq and friends; it never pulls bookworm's QEMU 7.2 over ours (checked with apt-get -s).
# The test starts virtlogd/libvirtd itself when they are not running (no systemd here).
if ! command -v virsh >/dev/null 2>&1 || ! [ -x /usr/sbin/libvirtd ] || ! [ -x /usr/sbin/virtlogd ]; then
  say "installing libvirt-daemon-system libvirt-clients"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends libvirt-daemon-system libvirt-clients >/dev/null
  qemu-system-x86_64 --version | grep -qE 'version (1[0-9]|[2-9][0-9])\.' ||
    { say "libvirt's install replaced QEMU 10 with $(qemu-system-x86_64 --version | head -1)"; exit 1; }
fi

# DPDK (the independent vhost-user frontend in tests) needs hugepages.
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then
  echo 1024 > /proc/sys/vm/nr_hugepages || say "warning: could not reserve hugepages"
fi
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || true

if [ ! -d node_modules/koffi ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "npm ci"
  # The lock file is complete for every platform (rollup's optional binaries included): a
  # refusal here is a real defect, not something to paper over with `npm install`.
  if ! npm ci --no-audit --no-fund >/tmp/vhost-xdp-npm-ci.log 2>&1; then
    cat /tmp/vhost-xdp-npm-ci.log >&2
    say "npm ci failed (log above); fix package-lock.json"
    exit 1
  fi
fi
say "building TypeScript and BPF objects"
npm run --silent build
if [ -x vm-images/build.sh ]; then
  vm-images/build.sh
fi
say "ready"
