#!/bin/bash
# The log moving into the image file's holes under sustained 4 KiB random
# writes (benches/RESULTS.md, session 17).
#
# usage: benches/log_moves.sh [REGION] -- fills a 512 MiB zstd image with
# 1 MiB writes, then runs fio 4 KiB random writes QD32 x2 for T seconds
# (default 60) with -o log-region=REGION (default: the mount's default).
# Prints IOPS, p99 and max latency, the moves, the file's length and its
# holes. VBDFS=path/to/vbdfs, DIR=scratch directory (default /var/tmp/log_moves).
set -euo pipefail
V=${VBDFS:-$(dirname "$0")/../target/release/vbdfs}
REGION=${1:-}
D=${DIR:-/var/tmp/log_moves}
M=$D/mnt
mkdir -p "$M"
cleanup() { "$V" umount "$M" 2>/dev/null || umount -l "$M" 2>/dev/null || true; }
trap cleanup EXIT
cleanup
rm -f "$D/img.vbd"
"$V" create "$D/img.vbd" --size 512M --compress zstd >/dev/null
"$V" mount "$D/img.vbd" "$M" -o "cache=256M${REGION:+,log-region=$REGION}"
fio --name=fill --filename="$M/disk" --rw=write --bs=1M --iodepth=16 --ioengine=libaio \
    --direct=1 --size=512M --buffer_compress_percentage=50 --refill_buffers --output=/dev/null
fio --name=w --filename="$M/disk" --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 \
    --group_reporting --ioengine=libaio --direct=1 --buffer_compress_percentage=50 \
    --refill_buffers --time_based --runtime="${T:-60}" --output-format=json --output="$D/out.json"
python3 - "$D/out.json" "$D/img.vbd" <<'PY'
import json, os, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p = j["clat_ns"]["percentile"]
print("IOPS %.0f p99 %.1f ms max %.1f ms" % (j["iops"], p["99.000000"] / 1e6, j["clat_ns"]["max"] / 1e6))
f = os.open(sys.argv[2], os.O_RDONLY)
n, off, big, tot, cnt = os.fstat(f).st_size, 65536, 0, 0, 0
while off < n:
    try:
        h = os.lseek(f, off, os.SEEK_HOLE)
    except OSError:
        break
    if h >= n:
        break
    try:
        d = os.lseek(f, h, os.SEEK_DATA)
    except OSError:
        d = n
    big, tot, cnt, off = max(big, d - h), tot + d - h, cnt + 1, d
print("file length %d, %d holes, %d bytes, biggest %d" % (n, cnt, tot, big))
PY
grep -E "^(log-run|file-allocated-bytes|reclaim-pending-bytes):" "$M/control"
