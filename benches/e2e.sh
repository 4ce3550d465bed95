#!/usr/bin/env bash
# e2e.sh -- end-to-end I/O benchmark of vbdfs against the other ways of giving a
# VM a disk that is a flat raw file, all in ONE run on the same host filesystem:
#
#   raw         sparse raw file, fio O_DIRECT on it (the physical limit; Xen tap:aio analogue)
#   loop        kernel loop device over a raw file, buffered (default losetup; Xen file:)
#   loop-dio    kernel loop device with --direct-io=on
#   qsd-qcow2   qemu-storage-daemon FUSE export of a qcow2 (the peer)
#   vbdfs-none  vbdfs image, --compress none, mounted with `vbdfs mount`
#   vbdfs-zstd  vbdfs image, --compress zstd (default level)
#   vbdfs-zstd-16k  the same with --block-size 16K (the block size trade-off:
#               4 KiB random I/O is a read-modify-write of one block)
#   vbdfs-zstd-adapt  vbdfs-zstd mounted with -o adapt (faster zstd levels while
#               write-back is behind; docs/admin.md)
#   (optional)  qsd-zstd-cow: qcow2 overlay over a zstd-compressed qcow2 base
#
# Phases: fio (libaio, direct=1, 50 % compressible buffers, time based, NUMJOBS
# jobs: seq write/read 1 MiB QD16, rand read/write 4 KiB QD32) job-major with
# the target order rotated, ROUNDS rounds -> medians; a sustained write (seq 1 MiB
# QD16 for SUSTAIN_RUNTIME s) reporting the longest stall (longest time without
# any completion, and the worst completion latency) and the daemon's peak RSS;
# bonnie++ on ext4 on a loop device over each target.  Every figure is printed
# with its ratio to the raw file, p99/max latency and CPU seconds per GiB (fio +
# daemon).  The report also checks the figures against the targets of issue 9.
#
# Built on /work/shared/bench/peers.sh + peers_report.py (the shared peers
# benchmark, 2026-11-29): setup/cleanup machinery, fio driver, bonnie++ phase and
# report are copied from there (so a clone without ../shared runs it), with the
# s3backer/nbdkit peers dropped and vbdfs, 2-job fio, fio CPU accounting and the
# sustained-write phase added.
#
# Usage:   sudo benches/e2e.sh                # full run (~20 min; needs 60+ GiB free)
#          QUICK=1 sudo benches/e2e.sh        # quick run (~4 min)
# Env overrides (defaults: full / QUICK):
#   TARGETS      space separated subset/order of targets (see above)
#   VSIZE        virtual size of every flat file           (4G / 4G)
#   REGION_MB    fio region (MiB)                          (1024 / 256)
#   RUNTIME,RAMP fio time-based runtime / ramp (s)         (8,2 / 3,1)
#   NUMJOBS      fio jobs per run                          (2)
#   JOBS         fio jobs (seqwrite seqread randread randwrite)
#   ROUNDS       repeat the job-major sweep; report medians (3 / 1)
#   SUSTAIN=0    skip the sustained write; SUSTAIN_RUNTIME (60 / 20 s),
#   SUSTAIN_TARGETS (raw loop-dio qsd-qcow2 vbdfs-none vbdfs-zstd vbdfs-zstd-adapt),
#   SUSTAIN_MIN_FREE_GB (8): stop a sustained write when the fs gets this full
#   (a vbdfs image grows with every write until it is compacted: a full run
#   can need 60+ GiB free)
#   BONNIE=0     skip bonnie++; BONNIE_S,BONNIE_R,BONNIE_N (1024,512,16 / 128,64,2)
#   BONNIE_HOSTFS=1  also bonnie++ directly on the host fs  (1 / 0)
#   BONNIE_TIMEOUT   per bonnie++ run (s)                  (240 / 90)
#   BONNIE_MEMCG=0   do not confine bonnie++ to a memory cgroup of BONNIE_R MiB
#                (default on when a memory cgroup can be made: its page cache
#                is then bounded, so the 2x-RAM file's block read reaches the
#                target instead of the host page cache)
#   SCRATCH      scratch dir on the fs under test, created fresh, removed at end
#                (default: <repo>/target/e2e-scratch)
#   KEEP_SCRATCH=1   do not remove the scratch dir
#   OUT_PREFIX   results file prefix (./results-e2e / ./results-e2e-quick)
#   AUTO_INSTALL=0   do not apt-get install missing tools
#   VBDFS        vbdfs binary (default: <repo>/target/release/vbdfs, else PATH)
#   VBDFS_CACHE  -o cache= of the vbdfs mounts (256M); VBDFS_MOUNT_OPTS extra -o options
#   VBDFS_CREATE_ARGS  extra `vbdfs create` arguments
# shellcheck disable=SC2046,SC2209,SC2178,SC2128
#   (SC2046: fill_args is split on purpose; the others are false positives on
#    FIO_RW=write and on locals named like arrays in other functions)
set -uo pipefail
export LC_ALL=C

# the exact command, with the environment overrides that were given (for the report)
E2E_COMMAND=""
for v in QUICK TARGETS VSIZE REGION_MB RUNTIME RAMP NUMJOBS JOBS ROUNDS SUSTAIN SUSTAIN_RUNTIME SUSTAIN_TARGETS \
  BONNIE BONNIE_S BONNIE_R BONNIE_N VBDFS VBDFS_CACHE VBDFS_MOUNT_OPTS VBDFS_CREATE_ARGS; do
  [ -n "${!v+x}" ] && E2E_COMMAND+="$v=$(printf '%q' "${!v}") "
done
E2E_COMMAND+="$(printf '%q ' "$0" "$@")"

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  : "${REGION_MB:=256}" "${RUNTIME:=3}" "${RAMP:=1}" "${ROUNDS:=1}" "${SUSTAIN_RUNTIME:=20}"
  : "${BONNIE_S:=128}" "${BONNIE_R:=64}" "${BONNIE_N:=2}" "${BONNIE_HOSTFS:=0}" "${BONNIE_TIMEOUT:=90}"
  : "${OUT_PREFIX:=$PWD/results-e2e-quick}"
else
  : "${REGION_MB:=1024}" "${RUNTIME:=8}" "${RAMP:=2}" "${ROUNDS:=3}" "${SUSTAIN_RUNTIME:=60}"
  : "${BONNIE_S:=1024}" "${BONNIE_R:=512}" "${BONNIE_N:=16}" "${BONNIE_HOSTFS:=1}" "${BONNIE_TIMEOUT:=240}"
  : "${OUT_PREFIX:=$PWD/results-e2e}"
fi
: "${TARGETS:=raw loop loop-dio qsd-qcow2 vbdfs-none vbdfs-zstd vbdfs-zstd-16k vbdfs-zstd-adapt}"
: "${JOBS=seqwrite seqread randread randwrite}"   # JOBS="" runs no fio sweep
: "${NUMJOBS:=2}"
: "${VSIZE:=4G}"
: "${BONNIE:=1}" "${BONNIE_MEMCG:=1}"
: "${SUSTAIN:=1}"
: "${SUSTAIN_TARGETS:=raw loop-dio qsd-qcow2 vbdfs-none vbdfs-zstd vbdfs-zstd-adapt}"
: "${SCRATCH:=$REPO_DIR/target/e2e-scratch}"
: "${KEEP_SCRATCH:=0}"
: "${AUTO_INSTALL:=1}"
if [ -z "${VBDFS:-}" ]; then
  if [ -x "$REPO_DIR/target/release/vbdfs" ]; then VBDFS=$REPO_DIR/target/release/vbdfs; else VBDFS=vbdfs; fi
fi
: "${VBDFS_CACHE:=256M}"
: "${VBDFS_MOUNT_OPTS:=}"
: "${VBDFS_CREATE_ARGS:=}"
FIO_TIMEOUT=$((RUNTIME + RAMP + 90))

REGION_B=$((REGION_MB * 1024 * 1024))
W_OFF=0                 # write region  [0, REGION)
R_OFF=$REGION_B         # read region   [REGION, 2*REGION): pre-filled, or in the base image for CoW targets
RES=$SCRATCH/results
FACTS=$RES/facts.tsv
META=$RES/meta.tsv
GOLDEN=$SCRATCH/golden/golden.raw
T_START=$SECONDS

declare -A T_PATH T_DIRECT T_PIDS T_DESC T_SKIP T_COW T_SPACE T_BONNIE T_SETTLE T_CACHE_MB T_CONTROL
ACTIVE=()

log() { printf '[%(%H:%M:%S)T +%4ds] %s\n' -1 "$((SECONDS - T_START))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
# fact TARGET SECTION TEST METRIC VALUE UNIT NOTE
fact() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" "${7:-}" >> "$FACTS"; }
meta() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$META"; }
now() { date +%s.%N; }
fdiff() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }

# ---------------------------------------------------------------- cleanup --
# A stack of guarded, idempotent undo actions, tagged by target so that a
# target that fails during setup can be torn down at once.  Run in reverse
# order by the EXIT trap.  Nothing here kills by name: only saved PIDs,
# re-checked against their command line before any signal.
CLEAN_CMD=(); CLEAN_TAG=(); CLEAN_DONE=()
on_cleanup() { CLEAN_TAG+=("$1"); CLEAN_CMD+=("$2"); CLEAN_DONE+=(0); }
run_cleanup() { # [tag]  -- all entries, or only those of one tag
  local i
  for ((i = ${#CLEAN_CMD[@]} - 1; i >= 0; i--)); do
    [ "${CLEAN_DONE[i]}" = 1 ] && continue
    [ -n "${1:-}" ] && [ "${CLEAN_TAG[i]}" != "$1" ] && continue
    CLEAN_DONE[i]=1
    eval "${CLEAN_CMD[i]}" || true
  done
}

is_mounted() { awk -v p="$1" '$5 == p {f = 1} END {exit !f}' /proc/self/mountinfo; }
pid_running() { # pid [expected-comm-substring]
  local st
  [ -n "${1:-}" ] || return 1
  st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $1}') || return 1
  [ -n "$st" ] && [ "$st" != Z ] || return 1
  [ -z "${2:-}" ] || tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"
}
wait_gone() { # pid seconds
  local i n=$(( $2 * 10 ))
  for ((i = 0; i < n; i++)); do pid_running "$1" || return 0; sleep 0.1; done
  return 1
}
reap() { wait "$1" 2>/dev/null || true; }
# Long-running benchmark commands run as a waited-for background child so that
# a signal to this script is handled at once (bash defers traps until a
# foreground child exits); on_exit stops the child by its saved PID.
# run_child STDOUT_FILE STDERR_FILE cmd...   (redirect here, not on the call:
# a trap firing during `wait` inherits the caller's redirections)
CUR_CHILD=""
run_child() {
  local rc out=$1 err=$2; shift 2
  "$@" > "$out" 2> "$err" &
  CUR_CHILD=$!
  wait "$CUR_CHILD"; rc=$?
  CUR_CHILD=""
  return $rc
}
stop_child() {
  [ -n "$CUR_CHILD" ] || return 0
  if pid_running "$CUR_CHILD"; then
    log "  stopping running benchmark child (pid $CUR_CHILD)"
    kill -TERM "$CUR_CHILD" 2>/dev/null
    wait_gone "$CUR_CHILD" 15 || kill -KILL "$CUR_CHILD" 2>/dev/null
  fi
  reap "$CUR_CHILD"; CUR_CHILD=""
}
# stop_daemon PID CMD-MATCH MOUNTPOINT MODE(term|umount) GRACE_S
#   term:   SIGTERM first (qsd, nbdkit unmount/unexport themselves)
#   umount: fusermount -u first (nbdfuse, s3backer flush and exit on unmount)
stop_daemon() {
  local pid=$1 match=$2 mnt=$3 mode=$4 grace=${5:-20}
  if [ "$mode" = umount ] && [ -n "$mnt" ] && is_mounted "$mnt"; then
    fusermount3 -u "$mnt" 2>/dev/null || fusermount -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null
  fi
  if pid_running "$pid" "$match"; then
    [ "$mode" = term ] && kill -TERM "$pid" 2>/dev/null
    if ! wait_gone "$pid" "$grace"; then
      log "  $match (pid $pid) did not exit in ${grace}s: SIGTERM"
      pid_running "$pid" "$match" && kill -TERM "$pid" 2>/dev/null
      if ! wait_gone "$pid" 5; then
        log "  $match (pid $pid) still alive: SIGKILL"
        pid_running "$pid" "$match" && kill -KILL "$pid" 2>/dev/null
        wait_gone "$pid" 5
      fi
    fi
  fi
  reap "$pid"
  if [ -n "$mnt" ] && is_mounted "$mnt"; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
  fi
}
loop_attach() { # file [losetup args...] -> prints /dev/loopN (never a fixed N)
  local f=$1 dev i; shift
  for i in 1 2 3 4 5; do
    dev=$(losetup -f --show "$@" "$f" 2>/dev/null) && { echo "$dev"; return 0; }
    sleep 0.3
  done
  return 1
}
loop_detach() { # dev file -- only if the device still points at our file
  local back
  back=$(losetup -nO BACK-FILE "$1" 2>/dev/null | sed 's/ *(deleted)$//; s/[[:space:]]*$//')
  [ -n "$back" ] && [ "$(readlink -f "$back")" = "$(readlink -f "$2")" ] && losetup -d "$1"
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  log "cleanup: stopping daemons, unmounting, detaching loops"
  stop_child
  run_cleanup
  if [ -d "$SCRATCH" ]; then
    if awk -v p="$SCRATCH/" 'index($5, p) == 1 {f = 1} END {exit !f}' /proc/self/mountinfo; then
      log "WARNING: mounts remain under $SCRATCH; not removing it"
      awk -v p="$SCRATCH/" 'index($5, p) == 1 {print "  " $5}' /proc/self/mountinfo >&2
    elif [ "$KEEP_SCRATCH" = 1 ]; then
      log "scratch kept: $SCRATCH"
    else
      rm -rf --one-file-system "$SCRATCH"
    fi
  fi
  log "done (rc=$rc, total ${SECONDS}s)"
  exit "$rc"
}

# ------------------------------------------------------------ measuring --
CLK_TCK=$(getconf CLK_TCK)
ticks_of() { # sum utime+stime (all threads) of the given pids
  local p t=0 v
  for p in "$@"; do
    v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
cpu_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8, $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }  # busy steal total
host_cpu_facts() { # target section test "before" "after": host busy/steal in % of one core
  awk -v a="$4" -v b="$5" -v n="$(nproc)" 'BEGIN{split(a,x," "); split(b,y," "); d=y[3]-x[3];
    if (d <= 0) d = 1; printf "%.1f %.1f", 100*n*(y[1]-x[1])/d, 100*n*(y[2]-x[2])/d}' | {
    read -r busy steal
    fact "$1" "$2" "$3" host_busy_pct "$busy" "% of 1 core" "all processes incl. kernel workers and other tenants"
    fact "$1" "$2" "$3" host_steal_pct "$steal" "% of 1 core" "hypervisor steal"
  }
}
host_busy_pct() { # system-wide CPU busy % over 1 s (context: other tenants)
  local a b
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat); sleep 1
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," "); split(b,y," "); d=y[2]-x[2]; printf "%.0f", (d > 0 ? 100 * (y[1] - x[1]) / d : 0)}'
}
probe_direct() { dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; }
wait_for() { # seconds cmd... ; polls every 0.1 s
  local n=$(( $1 * 10 )) i; shift
  for ((i = 0; i < n; i++)); do "$@" && return 0; sleep 0.1; done
  return 1
}
file_nonempty() { [ -s "$1" ]; }
space_of() { # prints "apparent_bytes alloc_bytes" of a file, dir or /proc fd link
  if [ -d "$1" ]; then
    echo "$(du -s -B1 --apparent-size "$1" | cut -f1) $(du -s -B1 "$1" | cut -f1)"
  else
    stat -L -c '%s %b %B' "$1" 2>/dev/null | awk '{printf "%.0f %.0f\n", $1, $2 * $3}'
  fi
}

# ------------------------------------------------------- common fixtures --
ensure_pkgs() { # required tools; installed with apt-get when missing (AUTO_INSTALL=1)
  local need=()
  command -v fio >/dev/null || need+=(fio)
  command -v bonnie++ >/dev/null || need+=(bonnie++)
  command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
  command -v fusermount3 >/dev/null || need+=(fuse3)
  command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
  command -v python3 >/dev/null || need+=(python3)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$AUTO_INSTALL" = 1 ] || die "missing tools: ${need[*]} (AUTO_INSTALL=0)"
  log "installing: ${need[*]}"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; }; } \
    > "${TMPDIR:-/tmp}/e2e-apt.log" 2>&1 || die "apt-get install ${need[*]} failed (see ${TMPDIR:-/tmp}/e2e-apt.log)"
}

fill_args() { echo --buffer_compress_percentage=50 --refill_buffers --randrepeat=0; }

# The "golden image": a sparse raw file whose READ region holds the same kind
# of half-compressible data the other targets get via pre-fill.  It is the
# base of both CoW targets.
make_golden() {
  [ -f "$GOLDEN" ] && return 0
  mkdir -p "$(dirname "$GOLDEN")"
  truncate -s "$VSIZE" "$GOLDEN"
  fio --name=golden --filename="$GOLDEN" --ioengine=libaio --direct=1 --rw=write --bs=1M --iodepth=16 \
      --offset="$R_OFF" --size="${REGION_MB}M" $(fill_args) --output-format=json \
      --output="$RES/golden.fill.json" > "$RES/golden.fill.err" 2>&1 || return 1
  dd if="$GOLDEN" iflag=nocache count=0 status=none 2>/dev/null   # drop only this file's page cache
  return 0
}

# ===================================================================== targets
# Each setup_<name> sets, on success:
#   T_PATH  file/device fio and bonnie use     T_PIDS   daemon pids (CPU accounting)
#   T_DESC  description                        T_COW    1 = read region comes from a base image
#   T_SPACE "label=path ..." host storage      T_BONNIE file to put loop+ext4 on ("" = none)
#   T_SETTLE optional extra drain command (beyond fsync of T_PATH)
# and registers its undo actions with on_cleanup <name> "...".
# On failure it sets T_SKIP[<name>]="reason" and returns 1.

setup_raw() {
  local d=$SCRATCH/raw; mkdir -p "$d"
  truncate -s "$VSIZE" "$d/disk.raw"
  T_PATH[raw]=$d/disk.raw
  T_DESC[raw]="sparse raw file on host ext4, accessed directly (physical limit; Xen tap:aio analogue)"
  T_SPACE[raw]="file=$d/disk.raw"
  T_BONNIE[raw]=$d/disk.raw
}

setup_loop() { # classic Xen `file:` path: buffered loop device over the raw file
  local d=$SCRATCH/loop dev; mkdir -p "$d"
  truncate -s "$VSIZE" "$d/disk.raw"
  dev=$(loop_attach "$d/disk.raw") || { T_SKIP[loop]="losetup -f --show failed"; return 1; }
  on_cleanup loop "loop_detach '$dev' '$d/disk.raw'"
  T_PATH[loop]=$dev
  T_DESC[loop]="kernel loop device ($dev, buffered, default losetup) over a raw file; fio on the block device"
  T_SPACE[loop]="file=$d/disk.raw"
  T_BONNIE[loop]=""   # ext4-on-loop-over-raw-file is exactly the raw row of the bonnie table
  T_SETTLE[loop]="sync '$d/disk.raw'"
}

setup_loop-dio() { # extra reference: loop with --direct-io=on (not the Xen `file:` default): no page cache
  local d=$SCRATCH/loop-dio dev; mkdir -p "$d"
  truncate -s "$VSIZE" "$d/disk.raw"
  dev=$(loop_attach "$d/disk.raw" --direct-io=on) || { T_SKIP[loop-dio]="losetup --direct-io=on failed"; return 1; }
  on_cleanup loop-dio "loop_detach '$dev' '$d/disk.raw'"
  T_PATH[loop-dio]=$dev
  T_DESC[loop-dio]="kernel loop device ($dev) with --direct-io=on over a raw file"
  T_SPACE[loop-dio]="file=$d/disk.raw"
  T_BONNIE[loop-dio]=""
}

start_qsd() { # name dir -- blockdev args...; exports node "q" on $dir/disk
  local name=$1 d=$2 pid; shift 2
  : > "$d/disk"
  qemu-storage-daemon "$@" \
    --export type=fuse,id=e,node-name=q,mountpoint="$d/disk",writable=on \
    --pidfile "$d/qsd.pid" > "$d/qsd.log" 2>&1 &
  pid=$!
  on_cleanup "$name" "stop_daemon $pid qemu-storage-daemon '$d/disk' term 30"
  if ! wait_for 20 is_mounted "$d/disk"; then
    T_SKIP[$name]="qemu-storage-daemon FUSE export did not come up: $(tail -c 300 "$d/qsd.log" | tr '\n' ' ')"
    return 1
  fi
  T_PIDS[$name]=$pid
  T_PATH[$name]=$d/disk
  T_BONNIE[$name]=$d/disk
}

setup_qsd-qcow2() {
  local d=$SCRATCH/qsd-qcow2; mkdir -p "$d"
  qemu-img create -q -f qcow2 "$d/img.qcow2" "$VSIZE" || { T_SKIP[qsd-qcow2]="qemu-img create failed"; return 1; }
  start_qsd qsd-qcow2 "$d" \
    --blockdev driver=file,node-name=f,filename="$d/img.qcow2",cache.direct=on \
    --blockdev driver=qcow2,node-name=q,file=f || return 1
  T_DESC[qsd-qcow2]="qemu-storage-daemon FUSE export of a plain qcow2 (file node cache.direct=on)"
  T_SPACE[qsd-qcow2]="qcow2=$d/img.qcow2"
}

setup_qsd-zstd-cow() {
  local d=$SCRATCH/qsd-zstd-cow t0 t1; mkdir -p "$d"
  make_golden || { T_SKIP[qsd-zstd-cow]="golden image fill failed"; return 1; }
  t0=$(now)
  qemu-img convert -T none -c -O qcow2 -o compression_type=zstd "$GOLDEN" "$d/base.qcow2" > "$d/convert.log" 2>&1 ||
    { T_SKIP[qsd-zstd-cow]="qemu-img convert -c zstd failed: $(tail -c 200 "$d/convert.log")"; return 1; }
  t1=$(now)
  fact qsd-zstd-cow setup base_build seconds "$(fdiff "$t0" "$t1")" s "qemu-img convert -c zstd of ${REGION_MB} MiB of data"
  qemu-img create -q -f qcow2 -b "$d/base.qcow2" -F qcow2 "$d/overlay.qcow2" ||
    { T_SKIP[qsd-zstd-cow]="overlay create failed"; return 1; }
  # explicit backing chain so the base also gets cache.direct=on (it would not inherit it from the file node)
  start_qsd qsd-zstd-cow "$d" \
    --blockdev driver=file,node-name=bf,filename="$d/base.qcow2",cache.direct=on,read-only=on \
    --blockdev driver=qcow2,node-name=b,file=bf,read-only=on \
    --blockdev driver=file,node-name=of,filename="$d/overlay.qcow2",cache.direct=on \
    --blockdev driver=qcow2,node-name=q,file=of,backing=b || return 1
  T_DESC[qsd-zstd-cow]="qsd FUSE export of a qcow2 overlay over a zstd-compressed qcow2 base (reads hit the base; 4k rand writes do 64k CoW)"
  T_COW[qsd-zstd-cow]=1
  T_SPACE[qsd-zstd-cow]="overlay=$d/overlay.qcow2 base=$d/base.qcow2"
}

# ----------------------------------------------------------------- vbdfs --
# `vbdfs mount` daemonizes and returns once MOUNTDIR/disk is served; the daemon
# is found by scanning /proc for a `vbdfs ... mount ... MOUNTDIR` command line.
vbdfs_daemon_pid() { # mountdir -> pid of the daemon serving it
  local p cmd
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
    case $cmd in *vbdfs*" mount "*" $1 "* | *vbdfs*" mount "*" $1") echo "${p#/proc/}"; return 0 ;; esac
  done
  return 1
}
vbdfs_stop() { # pid mountdir: vbdfs umount (flush + clean), then wait for the daemon
  local pid=$1 mnt=$2
  if is_mounted "$mnt"; then
    timeout 300 "$VBDFS" umount "$mnt" > /dev/null 2>&1 || log "  vbdfs umount $mnt failed; falling back to umount"
  fi
  stop_daemon "$pid" vbdfs "$mnt" umount 120
}
setup_vbdfs_common() { # name compress [extra create args] [extra mount options]
  local name=$1 comp=$2 extra=${3:-} more=${4:-} d img mnt pid opts
  command -v "$VBDFS" >/dev/null 2>&1 || { T_SKIP[$name]="'$VBDFS' not found (cargo build --release, or set VBDFS=path)"; return 1; }
  d=$SCRATCH/$name; img=$d/image.vbd; mnt=$d/mnt; mkdir -p "$mnt"
  # shellcheck disable=SC2086
  "$VBDFS" create "$img" --size "$VSIZE" --compress "$comp" $extra $VBDFS_CREATE_ARGS > "$d/create.log" 2>&1 ||
    { T_SKIP[$name]="vbdfs create failed: $(tail -c 300 "$d/create.log" | tr '\n' ' ')"; return 1; }
  opts="cache=$VBDFS_CACHE${VBDFS_MOUNT_OPTS:+,$VBDFS_MOUNT_OPTS}${more:+,$more}"
  on_cleanup "$name" "is_mounted '$mnt' && { timeout 300 '$VBDFS' umount '$mnt' || umount '$mnt' || umount -l '$mnt'; }"
  if ! timeout 60 "$VBDFS" mount "$img" "$mnt" -o "$opts" > "$d/mount.log" 2>&1; then
    T_SKIP[$name]="vbdfs mount failed: $(tail -c 300 "$d/mount.log" | tr '\n' ' ')"; return 1
  fi
  wait_for 10 test -e "$mnt/disk" || { T_SKIP[$name]="vbdfs mount did not expose $mnt/disk"; return 1; }
  pid=$(vbdfs_daemon_pid "$mnt") || { T_SKIP[$name]="vbdfs daemon for $mnt not found in /proc"; return 1; }
  on_cleanup "$name" "vbdfs_stop $pid '$mnt'"
  T_PIDS[$name]=$pid
  T_PATH[$name]=$mnt/disk
  T_DESC[$name]="vbdfs image (--compress $comp${extra:+ $extra}), \`vbdfs mount -o $opts\` (daemon pid $pid)"
  T_SPACE[$name]="image=$img"
  T_CONTROL[$name]=$mnt/control
  T_BONNIE[$name]=$mnt/disk
  T_CACHE_MB[$name]=$(numfmt --from=iec "$VBDFS_CACHE" | awk '{print int($1/1048576)}')
}
setup_vbdfs-none() { setup_vbdfs_common vbdfs-none none; }
setup_vbdfs-zstd() { setup_vbdfs_common vbdfs-zstd zstd; }
setup_vbdfs-zstd-16k() { setup_vbdfs_common vbdfs-zstd-16k zstd "--block-size 16K"; }
setup_vbdfs-zstd-adapt() { setup_vbdfs_common vbdfs-zstd-adapt zstd "" adapt; }

# ================================================================== phases
# settle TARGET PHASE: flush the target's write-back so it does not bleed into
# the next measurement.  Records fsync_s (fsync of the flat file/device) and
# drain_s (extra wait until the backend is clean, e.g. s3backer's dirty cache:
# non-zero drain after a fast fsync means fsync did not make the data durable).
settle() {
  local t=$1 job=$2 t0 t1 t2
  t0=$(now)
  timeout 120 sync "${T_PATH[$t]}" 2>/dev/null || log "  $t: fsync failed or timed out"
  t1=$(now)
  if [ -n "${T_SETTLE[$t]:-}" ]; then eval "${T_SETTLE[$t]}" || log "  $t: drain incomplete"; fi
  t2=$(now)
  fact "$t" fio "$job" fsync_s "$(fdiff "$t0" "$t1")" s
  fact "$t" fio "$job" drain_s "$(fdiff "$t1" "$t2")" s
}

# CHILD_CPU = CPU seconds (user+sys) of all waited-for children of this shell
# so far (fio and its job threads are reaped through `timeout`, so they count).
# `times` must run in this shell (in a $(...) subshell it would report zero).
CHILD_CPU=0
child_cpu() {
  times > "$RES/.times"
  CHILD_CPU=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
                             printf "%.3f", t }' "$RES/.times")
}

# fio_args JOB -> sets FIO_RW FIO_BS FIO_QD FIO_OFF and FIO_SPLIT (per-job args)
fio_job_args() {
  local job=$1 nj=$NUMJOBS part
  part=$((REGION_MB / nj))
  case $job in
    seqwrite)  FIO_RW=write;     FIO_BS=1M; FIO_QD=16; FIO_OFF=$W_OFF ;;
    seqread)   FIO_RW=read;      FIO_BS=1M; FIO_QD=16; FIO_OFF=$R_OFF ;;
    randread)  FIO_RW=randread;  FIO_BS=4k; FIO_QD=32; FIO_OFF=$R_OFF ;;
    randwrite) FIO_RW=randwrite; FIO_BS=4k; FIO_QD=32; FIO_OFF=$R_OFF ;;
    prefill)   FIO_RW=write;     FIO_BS=1M; FIO_QD=16; FIO_OFF=$R_OFF; nj=1 ;;
    *) die "unknown job $job" ;;
  esac
  FIO_NJ=$nj
  if [ "$nj" -gt 1 ] && [[ $job == seq* ]]; then
    # sequential jobs: each job streams through its own slice of the region
    FIO_SPLIT=(--size="${part}M" --offset_increment="${part}M")
  else
    FIO_SPLIT=(--size="${REGION_MB}M")
  fi
}

# daemon_latency_facts TARGET PHASE ID CONTROL OP: the vbdfs daemon's own view
# of the requests since the last reset-stats (control file: OP-latency-us,
# slow-requests), as facts daemon_p99_us, daemon_max_us, slow_requests.
daemon_latency_facts() {
  local t=$1 phase=$2 id=$3 ctl=$4 op=$5 lat
  lat=$(awk -F': ' -v k="$op-latency-us" '$1 == k {print $2}' "$ctl" | tr ' ' '\n')
  fact "$t" "$phase" "$id" daemon_p99_us "$(awk -F= '$1 == "p99" {print $2}' <<< "$lat")" us
  fact "$t" "$phase" "$id" daemon_max_us "$(awk -F= '$1 == "max" {print $2}' <<< "$lat")" us
  fact "$t" "$phase" "$id" slow_requests "$(awk -F': ' '$1 == "slow-requests" {print $2}' "$ctl")"
}

# run_fio TARGET JOB ROUND   (facts go under test "JOB#ROUND")
run_fio() {
  local t=$1 job=$2 rnd=${3:-1} tb json c0 c1 w0 w1 h0 h1 f0 f1 rc id ctl
  fio_job_args "$job"
  tb=(--time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
  [ "$job" = prefill ] && tb=()
  id="$job#$rnd"
  json=$RES/$t.$job.r$rnd.json
  ctl=${T_CONTROL[$t]:-}
  [ -n "$ctl" ] && { echo reset-stats > "$ctl" || log "  $t: reset-stats failed"; }
  # shellcheck disable=SC2086
  c0=$(ticks_of ${T_PIDS[$t]:-}); h0=$(cpu_jiffies); child_cpu; f0=$CHILD_CPU; w0=$(now)
  # shellcheck disable=SC2046
  run_child "$RES/$t.$job.r$rnd.out" "$RES/$t.$job.r$rnd.err" \
    timeout -k 10 "$FIO_TIMEOUT" fio --name="$job" --filename="${T_PATH[$t]}" --ioengine=libaio \
    --direct="${T_DIRECT[$t]}" --rw="$FIO_RW" --bs="$FIO_BS" --iodepth="$FIO_QD" \
    --numjobs="$FIO_NJ" --thread --group_reporting \
    --offset="$FIO_OFF" "${FIO_SPLIT[@]}" "${tb[@]}" --norandommap $(fill_args) \
    --output-format=json --output="$json"
  rc=$?
  # shellcheck disable=SC2086
  w1=$(now); child_cpu; f1=$CHILD_CPU; h1=$(cpu_jiffies); c1=$(ticks_of ${T_PIDS[$t]:-})
  host_cpu_facts "$t" fio "$id" "$h0" "$h1"
  fact "$t" fio "$id" rc "$rc" "" "$([ $rc = 124 ] || [ $rc = 137 ] && echo "fio timed out after ${FIO_TIMEOUT}s (stall)")"
  fact "$t" fio "$id" wall_s "$(fdiff "$w0" "$w1")" s
  fact "$t" fio "$id" fio_cpu_s "$(fdiff "$f0" "$f1")" s
  if [ -n "${T_PIDS[$t]:-}" ]; then
    fact "$t" fio "$id" daemon_cpu_s "$(awk -v d=$((c1 - c0)) -v h="$CLK_TCK" 'BEGIN{printf "%.2f", d/h}')" s
  fi
  [ -n "$ctl" ] && daemon_latency_facts "$t" fio "$id" "$ctl" "${FIO_RW#rand}"
  [ $rc = 0 ] || log "  $t $job: fio rc=$rc ($(tail -c 200 "$RES/$t.$job.r$rnd.err" | tr '\n' ' '))"
  return $rc
}

# ------------------------------------------------------- sustained write --
# rss_sampler OUT PID...: every 0.2 s append "elapsed_s rss_kib" (sum over pids)
rss_sampler() {
  local out=$1 p r sum t0; shift
  t0=$(now)
  while :; do
    sum=0
    for p in "$@"; do
      r=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null)
      sum=$((sum + ${r:-0}))
    done
    echo "$(fdiff "$t0" "$(now)") $sum" >> "$out"
    sleep 0.2
  done
}
# low_space_watch PATH MIN_GB FIOPID: stop fio if the filesystem gets too full
# (a log-structured image grows with every overwrite until it is compacted)
: "${SUSTAIN_MIN_FREE_GB:=8}"
low_space_watch() {
  local path=$1 min=$2 pid=$3 avail
  while pid_running "$pid"; do
    avail=$(df -P -B1G "$path" | awk 'NR == 2 {print $4}')
    if [ "${avail:-0}" -lt "$min" ]; then
      echo "stopped early: only ${avail} GiB free on $(df -P "$path" | awk 'NR == 2 {print $6}')" > "$RES/lowspace.$pid"
      kill -TERM "$pid" 2>/dev/null
      return 0
    fi
    sleep 1
  done
}
# run_sustain TARGET: seq write 1M QD16 (1 job) for SUSTAIN_RUNTIME s over the
# whole 2*REGION area with a per-I/O completion-latency log; the report derives
# the longest time without any completion (= stall) and the worst latency.
run_sustain() {
  local t=$1 json sp wp rc c0 c1 f0 f1 w0 w1 p hwm=0 h fpid ctl
  json=$RES/$t.sustain.json
  rm -f "$RES/$t.rss.tsv"
  sp=""
  if [ -n "${T_PIDS[$t]:-}" ]; then
    # shellcheck disable=SC2086
    rss_sampler "$RES/$t.rss.tsv" ${T_PIDS[$t]} &
    sp=$!
    on_cleanup sustain "kill $sp 2>/dev/null; wait $sp 2>/dev/null"
  fi
  ctl=${T_CONTROL[$t]:-}
  [ -n "$ctl" ] && { echo reset-stats > "$ctl" || log "  $t: reset-stats failed"; }
  # shellcheck disable=SC2086
  c0=$(ticks_of ${T_PIDS[$t]:-}); child_cpu; f0=$CHILD_CPU; w0=$(now)
  # shellcheck disable=SC2046
  timeout -k 10 $((SUSTAIN_RUNTIME + 120)) fio --name=sustain --filename="${T_PATH[$t]}" --ioengine=libaio \
    --direct="${T_DIRECT[$t]}" --rw=write --bs=1M --iodepth=16 --numjobs=1 \
    --offset=0 --size="$((2 * REGION_MB))M" --time_based --runtime="$SUSTAIN_RUNTIME" $(fill_args) \
    --write_lat_log="$RES/$t.sustain" --log_avg_msec=0 \
    --output-format=json --output="$json" > "$RES/$t.sustain.out" 2> "$RES/$t.sustain.err" &
  fpid=$!
  CUR_CHILD=$fpid
  low_space_watch "$(dirname "${T_SPACE[$t]#*=}")" "$SUSTAIN_MIN_FREE_GB" "$fpid" &
  wp=$!
  wait "$fpid"; rc=$?
  w1=$(now); child_cpu; f1=$CHILD_CPU
  CUR_CHILD=""
  kill "$wp" 2>/dev/null; wait "$wp" 2>/dev/null
  # shellcheck disable=SC2086
  c1=$(ticks_of ${T_PIDS[$t]:-})
  [ -n "$ctl" ] && daemon_latency_facts "$t" sustain sustain "$ctl" write
  settle "$t" "sustain#1"
  if [ -n "$sp" ]; then
    kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null
    for p in ${T_PIDS[$t]}; do
      h=$(awk '/^VmHWM:/{print $2}' "/proc/$p/status" 2>/dev/null); hwm=$((hwm + ${h:-0}))
    done
    fact "$t" sustain sustain rss_peak_kib "$(awk 'BEGIN{m=0} $2 > m {m = $2} END{print m}' "$RES/$t.rss.tsv")" KiB "sampled every 0.2 s"
    fact "$t" sustain sustain rss_hwm_kib "$hwm" KiB "VmHWM: peak RSS over the daemon's whole life"
    fact "$t" sustain sustain rss_end_kib "$(tail -1 "$RES/$t.rss.tsv" | awk '{print $2}')" KiB
    [ -n "${T_CACHE_MB[$t]:-}" ] && fact "$t" sustain sustain cache_mib "${T_CACHE_MB[$t]}" MiB
  fi
  fact "$t" sustain sustain rc "$rc" "" "$(cat "$RES/lowspace.$fpid" 2>/dev/null)"
  fact "$t" sustain sustain wall_s "$(fdiff "$w0" "$w1")" s
  fact "$t" sustain sustain fio_cpu_s "$(fdiff "$f0" "$f1")" s
  [ -n "${T_PIDS[$t]:-}" ] && fact "$t" sustain sustain daemon_cpu_s "$(awk -v d=$((c1 - c0)) -v h="$CLK_TCK" 'BEGIN{printf "%.2f", d/h}')" s
  [ "$rc" = 0 ] || log "  $t sustain: fio rc=$rc ($(tail -c 200 "$RES/$t.sustain.err" | tr '\n' ' '))"
  return 0
}

# reclaim_settle TARGET: a vbdfs target holds dead space for a moment after
# writes stop and then punches it (admin.md, host space). Records what the
# image took right after the writes, then waits (at most 60 s) until the
# control file shows none pending and records how long that took, so the
# space measured next is what the image keeps.
reclaim_settle() {
  local t=$1 ctl=${T_CONTROL[$1]:-} t0 a b
  [ -n "$ctl" ] || return 0
  read -r a b < <(space_of "${T_SPACE[$t]#*=}")
  [[ $b =~ ^[0-9]+$ ]] && fact "$t" space total alloc_bytes_unsettled "$b" B
  t0=$(now)
  wait_for 60 grep -qx 'reclaim-pending-bytes: 0' "$ctl" || log "  $t: dead space still pending after 60 s"
  fact "$t" space total reclaim_wait_s "$(fdiff "$t0" "$(now)")" s
}

measure_space() {
  local t=$1 item label path a b c ta=0 tb=0 tc=0 pid dir fd
  reclaim_settle "$t"
  for item in ${T_SPACE[$t]:-}; do
    label=${item%%=*}; path=${item#*=}
    if [[ $path == @fd:* ]]; then      # unlinked temp file held by a daemon: @fd:PID:DIR
      pid=$(cut -d: -f2 <<< "$path"); dir=$(cut -d: -f3- <<< "$path"); path=""
      for fd in /proc/"$pid"/fd/*; do
        readlink "$fd" 2>/dev/null | grep -q "^$dir/" && { path=$fd; break; }
      done
      [ -n "$path" ] || { fact "$t" space "$label" apparent_bytes 0 B "no overlay file found (nothing written yet?)"; continue; }
    fi
    read -r a b < <(space_of "$path")
    [[ $a =~ ^[0-9]+$ ]] || a=0
    [[ $b =~ ^[0-9]+$ ]] || b=0
    fact "$t" space "$label" apparent_bytes "${a:-0}" B
    fact "$t" space "$label" alloc_bytes "${b:-0}" B
    # What of the file the host page cache holds: reads served from it did
    # not reach the disk (fio's direct=1 does not cover a daemon's own reads).
    c=$(fincore -b -n -o RES "$path" 2>/dev/null | head -1)
    [[ $c =~ ^[0-9]+$ ]] || c=0
    ta=$((ta + ${a:-0})); tb=$((tb + ${b:-0})); tc=$((tc + c))
  done
  fact "$t" space total apparent_bytes "$ta" B
  fact "$t" space total alloc_bytes "$tb" B
  # Without fincore the column says n/a, not a misleading 0.
  command -v fincore >/dev/null && fact "$t" space total pagecache_bytes "$tc" B
  return 0
}

# memcg_make MIB: makes a memory cgroup limited to MIB MiB (cgroup v2 if its
# memory controller is on, else v1) and prints its directory; prints nothing
# if none can be made. A process moved into it keeps the page cache it fills
# within the limit. Remove it with rmdir once its processes are gone.
memcg_make() {
  local cg
  if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    cg=/sys/fs/cgroup/vbdfs-e2e-$$
    mkdir -p "$cg" 2>/dev/null && echo $(($1 << 20)) > "$cg/memory.max" 2>/dev/null && echo "$cg"
  elif [ -d /sys/fs/cgroup/memory ]; then
    cg=/sys/fs/cgroup/memory/vbdfs-e2e-$$
    mkdir -p "$cg" 2>/dev/null && echo $(($1 << 20)) > "$cg/memory.limit_in_bytes" 2>/dev/null && echo "$cg"
  fi
}

# bonnie_on LABEL FILE [T]: ext4 on a loop device over FILE, then bonnie++
bonnie_on() {
  local label=$1 file=$2 t=${3:-} dev mnt rc c0 c1 w0 w1 pids=""
  [ -n "$t" ] && pids=${T_PIDS[$t]:-}
  mnt=$SCRATCH/bonnie-mnt/$label; mkdir -p "$mnt"
  if [ "$label" = hostfs ]; then
    dev=""
  else
    dev=$(loop_attach "$file") || { fact "$label" bonnie bonnie status skipped "" "losetup over $file failed"; return 1; }
    on_cleanup "bonnie-$label" "loop_detach '$dev' '$file'"
    if ! mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$dev" > "$RES/$label.mkfs.log" 2>&1; then
      fact "$label" bonnie bonnie status skipped "" "mkfs.ext4 on loop failed: $(tail -c 200 "$RES/$label.mkfs.log" | tr '\n' ' ')"
      run_cleanup "bonnie-$label"; return 1
    fi
    if ! mount -t ext4 "$dev" "$mnt"; then
      fact "$label" bonnie bonnie status skipped "" "mount ext4 failed"; run_cleanup "bonnie-$label"; return 1
    fi
    on_cleanup "bonnie-$label" "is_mounted '$mnt' && { umount '$mnt' || umount -l '$mnt'; }"
  fi
  # shellcheck disable=SC2086
  c0=$(ticks_of $pids); w0=$(now)
  local cg="" enter=()
  [ "$BONNIE_MEMCG" = 1 ] && cg=$(memcg_make "$BONNIE_R")
  # shellcheck disable=SC2016
  [ -n "$cg" ] && enter=(sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' _ "$cg")
  run_child "$RES/$label.bonnie.csv" "$RES/$label.bonnie.txt" \
    "${enter[@]}" timeout -k 10 "$BONNIE_TIMEOUT" bonnie++ -d "$mnt" -u root -r "$BONNIE_R" -s "$BONNIE_S" -n "$BONNIE_N" \
    -m "$label" -q
  rc=$?
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null
  # shellcheck disable=SC2086
  w1=$(now); c1=$(ticks_of $pids)
  if [ $rc = 0 ]; then
    fact "$label" bonnie bonnie status ok "" "${dev:+loop $dev over $file}${cg:+, page cache limited to ${BONNIE_R} MiB (memory cgroup)}"
  else
    fact "$label" bonnie bonnie status failed "" "bonnie++ rc=$rc$([ $rc = 124 ] && echo " (timeout ${BONNIE_TIMEOUT}s)")"
  fi
  fact "$label" bonnie bonnie wall_s "$(fdiff "$w0" "$w1")" s
  [ -n "$pids" ] && fact "$label" bonnie bonnie daemon_cpu_s "$(awk -v d=$((c1 - c0)) -v h="$CLK_TCK" 'BEGIN{printf "%.2f", d/h}')" s
  if [ "$label" = hostfs ]; then rm -rf --one-file-system "$mnt"; else run_cleanup "bonnie-$label"; fi
  return $rc
}

# ==================================================================== main
main() {
  [ "$(id -u)" = 0 ] || die "must run as root (FUSE mounts, loop devices)"
  ensure_pkgs
  for c in fio bonnie++ qemu-img qemu-storage-daemon losetup mkfs.ext4 fusermount3 python3; do
    command -v "$c" >/dev/null || die "missing $c"
  done
  [ $((2 * REGION_MB)) -le $(numfmt --from=iec "$VSIZE" | awk '{print int($1/1048576)}') ] ||
    die "2*REGION_MB must fit in VSIZE"
  if [ -e "$SCRATCH" ]; then
    awk -v p="$SCRATCH/" 'index($5, p) == 1 {f = 1} END {exit !f}' /proc/self/mountinfo &&
      die "$SCRATCH has active mounts (another run?)"
    rm -rf --one-file-system "$SCRATCH"
  fi
  mkdir -p "$RES"
  OUT_PREFIX=$(realpath -m "$OUT_PREFIX")
  cd / || die "cd /"     # never leave stray files in the caller's cwd
  trap on_exit EXIT
  trap 'log "interrupted by signal"; exit 130' INT TERM HUP
  : > "$FACTS"; : > "$META"

  meta _run mode "$([ "$QUICK" = 1 ] && echo QUICK || echo full)"
  meta _run started "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  meta _run host "$(uname -r), $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), host fs $(findmnt -no FSTYPE -T "$(dirname "$SCRATCH")")"
  meta _run params "VSIZE=$VSIZE REGION_MB=$REGION_MB RUNTIME=${RUNTIME}s RAMP=${RAMP}s ROUNDS=$ROUNDS NUMJOBS=$NUMJOBS; write region [0,${REGION_MB}M), read/randwrite region [${REGION_MB}M,$((2 * REGION_MB))M); sustained write ${SUSTAIN_RUNTIME}s over [0,$((2 * REGION_MB))M); vbdfs cache=$VBDFS_CACHE; bonnie++ -s $BONNIE_S -r $BONNIE_R -n $BONNIE_N"
  meta _run versions "$(fio --version); $(qemu-img --version | head -1 | awk '{print "qemu " $3}'); bonnie++ $(bonnie++ 2>&1 | awk '/^Version/{print $2}'); vbdfs $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?') ($VBDFS)"
  meta _run command "$E2E_COMMAND"
  meta _run machine "$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo); $(nproc) vCPU; $(awk '/MemTotal/{printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo); scratch on $(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$(dirname "$SCRATCH")" | tr -s ' ')"
  meta _run busy_before "$(host_busy_pct)"
  meta _run ncores "$(nproc)"

  # ---- setup all targets
  local t
  for t in $TARGETS; do
    declare -F "setup_$t" > /dev/null || { T_SKIP[$t]="unknown target (no setup_$t)"; meta "$t" status "skipped: ${T_SKIP[$t]}"; continue; }
    log "setup $t"
    T_COW[$t]=0
    if "setup_$t" && [ -z "${T_SKIP[$t]:-}" ]; then
      if probe_direct "${T_PATH[$t]}"; then T_DIRECT[$t]=1; else T_DIRECT[$t]=0; fi
      ACTIVE+=("$t")
      meta "$t" status ok
      meta "$t" path "${T_PATH[$t]}"
      meta "$t" direct "${T_DIRECT[$t]}"
      meta "$t" cow "${T_COW[$t]}"
      meta "$t" desc "${T_DESC[$t]}"
      meta "$t" daemons "${T_PIDS[$t]:-}"
    else
      : "${T_SKIP[$t]:=setup failed}"
      log "  skipped: ${T_SKIP[$t]}"
      meta "$t" status "skipped: ${T_SKIP[$t]}"
      meta "$t" desc "${T_DESC[$t]:-}"
      run_cleanup "$t"
    fi
  done
  [ ${#ACTIVE[@]} -gt 0 ] || die "no target could be set up"
  [[ " ${ACTIVE[*]} " == *" raw "* ]] || log "WARNING: no raw baseline; ratios will be n/a"

  # ---- pre-fill the read region (CoW targets: it lives in the base image)
  for t in "${ACTIVE[@]}"; do
    [ "${T_COW[$t]}" = 1 ] && continue
    log "prefill $t (${REGION_MB} MiB)"
    run_fio "$t" prefill 1
    settle "$t" "prefill#1"
  done

  # ---- fio, job-major, rotating target order (per job and round)
  local j=0 job n=${#ACTIVE[@]} k i rnd
  for ((rnd = 1; rnd <= ROUNDS; rnd++)); do
    for job in $JOBS; do
      for ((k = 0; k < n; k++)); do
        i=$(((k + j) % n)); t=${ACTIVE[i]}
        log "fio $job on $t$([ "$ROUNDS" -gt 1 ] && echo " (round $rnd/$ROUNDS)")"
        run_fio "$t" "$job" "$rnd"
        [[ $job == *write ]] && settle "$t" "$job#$rnd"
      done
      j=$((j + 1))
    done
  done

  # ---- host space after the write phases
  for t in "${ACTIVE[@]}"; do measure_space "$t"; done

  # ---- sustained write: longest stall, daemon peak RSS
  if [ "$SUSTAIN" = 1 ]; then
    for t in $SUSTAIN_TARGETS; do
      [[ " ${ACTIVE[*]} " == *" $t "* ]] || continue
      log "sustained write on $t (${SUSTAIN_RUNTIME}s)"
      run_sustain "$t"
    done
    run_cleanup sustain
  fi

  # ---- bonnie++ on ext4 over a loop device over each flat file
  if [ "$BONNIE" = 1 ]; then
    if [ "$BONNIE_HOSTFS" = 1 ]; then
      log "bonnie++ on hostfs (reference, no loop)"
      bonnie_on hostfs "" ""
    fi
    for t in "${ACTIVE[@]}"; do
      if [ -z "${T_BONNIE[$t]:-}" ]; then
        fact "$t" bonnie bonnie status not-run "" "loop variant: the raw row already is ext4 on a (buffered) loop over a raw file"
        continue
      fi
      log "bonnie++ on $t (ext4 on loop over ${T_BONNIE[$t]})"
      bonnie_on "$t" "${T_BONNIE[$t]}" "$t"
    done
  fi

  meta _run busy_after "$(host_busy_pct)"
  log "teardown of all targets"
  local t0=$SECONDS
  run_cleanup
  meta _run teardown_s "$((SECONDS - t0))"
  meta _run runtime_s "$((SECONDS - T_START))"
  log "writing report"
  local raw_dir="${OUT_PREFIX}-raw"
  rm -rf "$raw_dir"; mkdir -p "$raw_dir"
  cp "$RES"/*.json "$RES"/*.tsv "$RES"/*.csv "$RES"/*.txt "$RES"/*_clat.*log "$raw_dir"/ 2>/dev/null
  python3 "$BENCH_DIR/e2e_report.py" "$RES" "$OUT_PREFIX.md" "$OUT_PREFIX.csv" || log "report generation failed"
  cat "$OUT_PREFIX.md"
  log "results: $OUT_PREFIX.md  $OUT_PREFIX.csv  (raw: $raw_dir/)"
}

main "$@"
