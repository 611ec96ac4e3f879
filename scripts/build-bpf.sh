#!/usr/bin/env bash
# Builds every bpf/*.c into bpf/out/*.o, and the tests' own programs (test/support/bpf/*.c)
# into bpf/out/support/*.o: apart, so the samples' folder (what the guest image and the sample
# tests take) holds XDP samples only. Skips up-to-date objects.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bpf/out/support
shopt -s nullglob
build() {
  local src=$1 obj=$2
  if [ ! -e "$obj" ] || [ "$src" -nt "$obj" ]; then
    clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c "$src" -o "$obj"
  fi
}
for src in bpf/*.c; do build "$src" "bpf/out/$(basename "${src%.c}").o"; done
for src in test/support/bpf/*.c; do build "$src" "bpf/out/support/$(basename "${src%.c}").o"; done
