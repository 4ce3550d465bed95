#!/bin/bash
# Sequential overwrites of a full image, A/B between vbdfs builds, with the
# host file system's own overwrite speed measured in the same run
# (benches/RESULTS.md, session 19: the log overwriting dead records).
#
# usage: benches/seq_overwrite.sh [BIN...] -- for each round (ROUNDS, default
# 3) and each binary (default target/release/vbdfs), in turn: a 1 GiB image
# (COMPRESS: none zstd, default both) filled with 1 MiB writes, then fio
# 1 MiB writes QD16 x2 over it for T seconds (default 10); and fio on a raw
# file overwritten the same way. Prints every run (MB/s, p99, max latency,
# the daemon's longest write, the control file's `log-run` line), then the
# medians. DIR=scratch directory on the disk under test (default
# /var/tmp/seq_overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/vbdfs)
D=${DIR:-/var/tmp/seq_overwrite}
M=$D/mnt
mkdir -p "$M"
OUT=$D/runs.txt
: >"$OUT"
cleanup() { umount "$M" 2>/dev/null || umount -l "$M" 2>/dev/null || true; rm -f "$D/raw.img"; }
trap cleanup EXIT
cleanup
FIO=(--rw=write --bs=1M --iodepth=16 --ioengine=libaio --direct=1 --size=1G
    --buffer_compress_percentage=50 --refill_buffers)

# fio's JSON on stdin -> "MB/s p99_ms max_ms"
figures() {
    python3 -c '
import json, sys
w = json.load(sys.stdin)["jobs"][0]["write"]
c = w["clat_ns"]
print("%.0f %.1f %.1f" % (w["bw"] / 1024, c["percentile"]["99.000000"] / 1e6, c["max"] / 1e6))'
}

timed() {
    fio --name=w --filename="$1" "${FIO[@]}" --numjobs=2 --group_reporting \
        --time_based --runtime="${T:-10}" --output-format=json | figures
}

for round in $(seq "${ROUNDS:-3}"); do
    rm -f "$D/raw.img"
    fio --name=fill --filename="$D/raw.img" "${FIO[@]}" --output=/dev/null
    echo "raw - $(timed "$D/raw.img")" | tee -a "$OUT"
    rm -f "$D/raw.img"
    for c in ${COMPRESS:-none zstd}; do
        for bin in "${BINS[@]}"; do
            rm -f "$D/img.vbd"
            "$bin" create "$D/img.vbd" --size 1G --compress "$c" >/dev/null
            "$bin" mount "$D/img.vbd" "$M" -o cache=256M 2>/dev/null
            fio --name=fill --filename="$M/disk" "${FIO[@]}" --output=/dev/null
            echo reset-stats >"$M/control"
            fig=$(timed "$M/disk")
            longest=$(sed -n 's/^write-latency-us: .*max=\([0-9]*\).*/\1/p' "$M/control")
            run=$(sed -n 's/^log-run: //p' "$M/control")
            echo "$bin:$c $fig daemon-max=${longest}us log-run: $run" | tee -a "$OUT"
            "$bin" umount "$M"
        done
    done
done
echo "medians (MB/s, p99 ms, max ms):"
python3 - "$OUT" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    f = line.split()
    key = f[0] if f[0] != "raw" else "raw"
    runs.setdefault(key, []).append([float(x) for x in f[-3 if f[0] == "raw" else 1:][:3]])
raw = statistics.median(r[0] for r in runs["raw"])
for key, rs in runs.items():
    med = [statistics.median(r[i] for r in rs) for i in range(3)]
    print("%-40s %6.0f MB/s (x%.2f raw)  p99 %7.1f  max %7.1f  [%s]"
          % (key, med[0], med[0] / raw, med[1], med[2], ", ".join("%.0f" % r[0] for r in rs)))
PY
