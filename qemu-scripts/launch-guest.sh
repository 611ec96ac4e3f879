#!/usr/bin/env bash
# Boots the vhost-xdp test guest (vm-images/out) in QEMU 10 with its virtio-net device
# backed by a vhost-user backend (vhost-xdp serve) or, for comparison, by QEMU's own tap.
# The guest console is this terminal (ttyS0 on stdio); Ctrl-a x quits QEMU, as does
# `poweroff -f` in the guest. Run with --help for the options.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
images="$here/../vm-images/out"

SOCKET=/tmp/vhost-xdp.sock
QUEUES=1
MAC=52:54:00:12:34:56
MTU=1500
MEM=512
SMP=1
ACCEL=tcg
APPEND=
TAP=
NONET=0
RECONNECT=1000
KERNEL="$images/vmlinuz"
INITRD="$images/initrd.img"
NAME=vhost-xdp-guest
KVM_PROBE_SECS=8
EXTRA=()

usage() {
  cat <<EOF
Usage: $(basename "$0") [options] [-- extra QEMU arguments]

Network (one of):
  --socket PATH      vhost-user socket of the backend (default $SOCKET); QEMU is the
                     client and reconnects if the backend restarts
  --tap IFNAME       QEMU's own tap networking instead (-netdev tap, vhost=off)
  --no-net           no network device at all
Device:
  --queues N         queue pairs (default $QUEUES); MSI-X vectors = 2*N+2
  --mac MAC          guest MAC (default $MAC)
  --mtu N            MTU offered to the guest via host_mtu (default $MTU)
  --reconnect-ms N   vhost-user reconnect interval (default $RECONNECT)
Machine:
  --mem MIB          guest RAM in MiB, a shared memfd (default $MEM)
  --smp N            vCPUs (default $SMP)
  --accel tcg|kvm|auto
                     default tcg. auto boots once with KVM without networking and uses it
                     only if the guest prints its ready marker within ${KVM_PROBE_SECS}s (KVM
                     guests hang on some nested hosts), else TCG
  --append STR       extra kernel command line (e.g. vxdp.nonet=1 to skip virtio_net)
  --kernel F --initrd F   default vm-images/out/{vmlinuz,initrd.img}
  --name NAME        QEMU process name (default $NAME)
  --print-cmd        print the QEMU command line and exit
EOF
}

PRINT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --socket) SOCKET=$2; shift 2 ;;
    --tap) TAP=$2; shift 2 ;;
    --no-net) NONET=1; shift ;;
    --queues) QUEUES=$2; shift 2 ;;
    --mac) MAC=$2; shift 2 ;;
    --mtu) MTU=$2; shift 2 ;;
    --reconnect-ms) RECONNECT=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --accel) ACCEL=$2; shift 2 ;;
    --append) APPEND=$2; shift 2 ;;
    --kernel) KERNEL=$2; shift 2 ;;
    --initrd) INITRD=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --print-cmd) PRINT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch-guest: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

for f in "$KERNEL" "$INITRD"; do
  [ -s "$f" ] || { echo "launch-guest: $f missing; run vm-images/build.sh" >&2; exit 1; }
done
case "$QUEUES" in ''|*[!0-9]*|0) echo "launch-guest: --queues must be >= 1" >&2; exit 2 ;; esac

# Guest RAM must be a shared memfd: the vhost-user backend maps it to reach the vrings.
machine=(
  -name "$NAME"
  -machine q35,memory-backend=mem
  -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on"
  -m "${MEM}M" -smp "$SMP"
  -nodefaults -no-user-config -display none
  -kernel "$KERNEL" -initrd "$INITRD"
  # signal=off: Ctrl-C reaches the guest shell; the mux gives Ctrl-a x to quit.
  -chardev stdio,id=con0,mux=on,signal=off -serial chardev:con0
)
# No panic=: a panicking guest stays up with its oops on the console instead of rebooting.
cmdline="console=ttyS0 $APPEND"

net=()
if [ "$NONET" = 0 ]; then
  if [ -n "$TAP" ]; then
    net=(-netdev "tap,id=net0,ifname=$TAP,script=no,downscript=no,vhost=off,queues=$QUEUES")
  else
    net=(-chardev "socket,id=vhu0,path=$SOCKET,reconnect-ms=$RECONNECT"
         -netdev "vhost-user,id=net0,chardev=vhu0,queues=$QUEUES")
  fi
  # romfile=: no PXE option ROM, the guest boots from -kernel.
  net+=(-device "virtio-net-pci,netdev=net0,mac=$MAC,host_mtu=$MTU,mq=on,vectors=$((2 * QUEUES + 2)),romfile=")
fi

accel_args() {
  case "$1" in
    kvm) echo "-accel kvm -cpu host" ;;
    tcg) echo "-accel tcg -cpu max" ;;
  esac
}

# Boots a throwaway KVM guest without networking (so a backend never sees a probe
# connection) and waits for the init's ready marker.
kvm_works() {
  [ -w /dev/kvm ] || return 1
  local log pid deadline ok=1
  log=$(mktemp)
  qemu-system-x86_64 -name "$NAME-kvm-probe" -machine q35 -m 256M -nodefaults -no-user-config \
    -display none -accel kvm -cpu host -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 vxdp.nonet=1" -serial "file:$log" </dev/null >/dev/null 2>&1 &
  pid=$!
  deadline=$((SECONDS + KVM_PROBE_SECS))
  while [ $SECONDS -lt $deadline ] && kill -0 $pid 2>/dev/null; do
    if grep -q VHOST-XDP-GUEST-READY "$log"; then ok=0; break; fi
    sleep 0.2
  done
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  rm -f "$log"
  return $ok
}

case "$ACCEL" in
  tcg|kvm) ;;
  auto)
    # 2>/dev/null: bash would report the probe's abort/kill as a job message.
    if kvm_works 2>/dev/null; then ACCEL=kvm; else ACCEL=tcg; fi
    echo "launch-guest: --accel auto chose $ACCEL" >&2 ;;
  *) echo "launch-guest: --accel must be tcg, kvm or auto" >&2; exit 2 ;;
esac

# shellcheck disable=SC2207
cmd=(qemu-system-x86_64 "${machine[@]}" $(accel_args "$ACCEL") -append "$cmdline" "${net[@]}" "${EXTRA[@]}")
if [ "$PRINT" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# exec: the launcher's pid is QEMU's, so callers can signal it directly.
exec "${cmd[@]}"
