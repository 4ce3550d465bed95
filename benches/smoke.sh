#!/usr/bin/env bash
# smoke.sh -- runs every benchmark in a tiny configuration so that they cannot
# rot (CI runs this from scripts/test.sh). The figures are not judged: a quiet
# machine and the full runs (benches/README.md) are for that. Fails if a
# benchmark fails or the end-to-end run produced no figure for a target.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=1 cargo bench --bench hotpaths
QUICK=1 DATA_MB=32 cargo bench --bench engine

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
(
  cd "$out"
  QUICK=1 ROUNDS=1 RUNTIME=1 RAMP=0 REGION_MB=32 VSIZE=256M \
    TARGETS="raw loop-dio qsd-qcow2 vbdfs-none vbdfs-zstd vbdfs-zstd-adapt" \
    SUSTAIN_RUNTIME=3 SUSTAIN_TARGETS="raw vbdfs-zstd" SUSTAIN_MIN_FREE_GB=2 \
    BONNIE_S=64 BONNIE_R=32 BONNIE_N=1 BONNIE_HOSTFS=0 BONNIE_TIMEOUT=120 \
    SCRATCH="$out/scratch" OUT_PREFIX="$out/smoke" \
    bash "$OLDPWD/benches/e2e.sh" > "$out/e2e.log" 2>&1
) || { tail -40 "$out/e2e.log"; echo "smoke: e2e.sh failed"; exit 1; }
for t in raw vbdfs-none vbdfs-zstd vbdfs-zstd-adapt; do
  for job in seqwrite seqread randread randwrite; do
    grep -q "^fio,$t,$job,mbps,[0-9]" "$out/smoke.csv" ||
      { tail -40 "$out/e2e.log"; echo "smoke: no $job figure for $t"; exit 1; }
  done
done
grep -q "^sustain,vbdfs-zstd," "$out/smoke.csv" ||
  { tail -40 "$out/e2e.log"; echo "smoke: no sustained-write figures for vbdfs-zstd"; exit 1; }
grep -q "^sustain,vbdfs-zstd,sustain,daemon_max_ms,[0-9]" "$out/smoke.csv" ||
  { tail -40 "$out/e2e.log"; echo "smoke: no daemon-measured write latency (control file) for vbdfs-zstd"; exit 1; }
grep -q "^fio,vbdfs-none,randread,daemon_p99_us,[0-9]" "$out/smoke.csv" ||
  { tail -40 "$out/e2e.log"; echo "smoke: no daemon-measured read p99 (control file) for vbdfs-none"; exit 1; }
grep -q "^space,vbdfs-none,total,reclaim_wait_s,[0-9]" "$out/smoke.csv" ||
  { tail -40 "$out/e2e.log"; echo "smoke: no figure for how long vbdfs-none's dead space took to punch"; exit 1; }
echo "benchmark smoke run: ok ($(grep -c . "$out/smoke.csv") figures)"
