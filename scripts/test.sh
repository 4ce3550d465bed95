#!/usr/bin/env bash
# Runs every check CI runs: installs what the tests need when missing, then
# cargo fmt --check, cargo clippy -D warnings, the whole test suite, and a
# smoke run of every benchmark (benches/smoke.sh; e2e.sh installs fio and
# bonnie++ when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(mount)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --release -- --test-threads=4
# The benchmarks must keep running (figures not judged here): a smoke run.
benches/smoke.sh
