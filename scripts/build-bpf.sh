#!/usr/bin/env bash
# Builds every bpf/*.c (and the tests' own programs, test/support/bpf/*.c) into
# bpf/out/*.o (skips up-to-date objects).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bpf/out
shopt -s nullglob
for src in bpf/*.c test/support/bpf/*.c; do
  obj="bpf/out/$(basename "${src%.c}").o"
  if [ ! -e "$obj" ] || [ "$src" -nt "$obj" ]; then
    clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c "$src" -o "$obj"
  fi
done
