#!/usr/bin/env bash
# The newcomer's first command: build vbdfs, mount the demo image from images/
# and print what to do next.
#
#   ./scripts/demo.sh            build, copy images/demo.vbd to images/demo-work.vbd
#                                (once), mount it at /run/vbd/demo
#   ./scripts/demo.sh --stop     unmount it again
#
# The demo image is a 1 GiB virtual disk holding an ext4 filesystem with a
# README in it, stored in a few hundred KiB thanks to sparse, compressed blocks.
set -euo pipefail
cd "$(dirname "$0")/.."
MNT=${VBDFS_DEMO_DIR:-/run/vbd/demo}
IMG=images/demo-work.vbd
BIN=target/release/vbdfs

if [ "${1:-}" = "--stop" ]; then
  "$BIN" umount "$MNT"
  echo "unmounted $MNT; the image $IMG is closed and clean"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (FUSE mount and loop devices)"; exit 1; }
if ! command -v fusermount3 >/dev/null || ! command -v mkfs.ext4 >/dev/null; then
  echo "installing fuse3 and e2fsprogs ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq fuse3 e2fsprogs >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse

echo "building vbdfs (release) ..."
cargo build --release --quiet

if grep -qs " $MNT " /proc/mounts; then
  echo "$MNT is already mounted; unmounting first"
  "$BIN" umount "$MNT"
fi
[ -f "$IMG" ] || cp --sparse=always images/demo.vbd "$IMG"
mkdir -p "$MNT"
"$BIN" mount "$IMG" "$MNT" -o cache=128M
"$BIN" info "$IMG" | sed 's/^/  /'

cat <<NEXT

vbdfs is serving $IMG at $MNT:
  $MNT/disk       the virtual disk, a flat raw file ($(stat -c %s "$MNT/disk") bytes)
  $MNT/control    status and commands:  cat $MNT/control

Try next:
  dev=\$(losetup -f --show --direct-io=on $MNT/disk)   # a block device over it
  mkdir -p /mnt/demo && mount \$dev /mnt/demo && cat /mnt/demo/README
  echo flush > $MNT/control                            # make everything durable
  echo "snapshot s\$(date +%s)" > $MNT/control; ls $MNT/snapshots  # an online snapshot
  grep latency $MNT/control                            # what the requests took (µs)
  umount /mnt/demo && losetup -d \$dev

  Xen:   disk = ['file:$MNT/disk,xvda,w']   (or 'tap:aio:$MNT/disk,xvda,w')
  QEMU:  qemu-system-x86_64 -drive file=$MNT/disk,format=raw,cache=none,aio=native

  $BIN umount $MNT       (or ./scripts/demo.sh --stop) when done
  ./scripts/test.sh              to run the test suite
NEXT
