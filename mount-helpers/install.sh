#!/usr/bin/env bash
# install.sh -- install vbdfs, its mount(8) helper, the systemd unit and the Xen
# examples; or remove exactly what an earlier run installed.
#
# usage: mount-helpers/install.sh [--prefix DIR] [--bin PATH] [--mount-helper-dir DIR|none]
#                                 [--systemd-dir DIR|none] [--no-reload] [--uninstall]
#
#   --prefix DIR        install root (default /usr/local)
#   --bin PATH          install this vbdfs binary instead of building target/release/vbdfs
#   --mount-helper-dir  where mount(8) looks for mount.vbdfs; default: /sbin when the
#                       prefix is /, /usr or /usr/local (mount(8) searches /sbin,
#                       /sbin/fs.d and /sbin/fs only), none otherwise
#   --systemd-dir DIR   where vbdfs@.service goes (default PREFIX/lib/systemd/system;
#                       /lib/systemd/system for prefix /)
#   --no-reload         do not run `systemctl daemon-reload` (default: run it when
#                       systemd is the running init)
#   --uninstall         remove every file listed in PREFIX/share/vbdfs/install-manifest,
#                       then the directories this script created (if empty)
#
# What goes where (PREFIX=/usr/local):
#   PREFIX/bin/vbdfs                          the binary (built first when missing or
#                                             older than src/, Cargo.toml, Cargo.lock)
#   PREFIX/sbin/mount.vbdfs                   the mount helper (the binary's path baked in)
#   /sbin/mount.vbdfs -> PREFIX/sbin/...      symlink where mount(8) finds it
#   PREFIX/lib/systemd/system/vbdfs@.service  the template unit (binary path rewritten)
#   PREFIX/share/doc/vbdfs/                   admin.md, xen/vm1-file.cfg, xen/vm1-tapaio.cfg
#   PREFIX/share/vbdfs/install-manifest       what was installed (used by --uninstall)
#
# Idempotent: running it again replaces the files and keeps one manifest.
set -euo pipefail

prog=install.sh
die() { echo "$prog: $*" >&2; exit 1; }
note() { echo "$prog: $*"; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$HERE/.." && pwd -P)

prefix=/usr/local
bin=""
helper_dir=default
systemd_dir=default
reload=1
uninstall=0
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --bin) [ $# -ge 2 ] || die "--bin needs a path"; bin=$2; shift 2 ;;
    --bin=*) bin=${1#*=}; shift ;;
    --mount-helper-dir) [ $# -ge 2 ] || die "--mount-helper-dir needs a directory"; helper_dir=$2; shift 2 ;;
    --mount-helper-dir=*) helper_dir=${1#*=}; shift ;;
    --systemd-dir) [ $# -ge 2 ] || die "--systemd-dir needs a directory"; systemd_dir=$2; shift 2 ;;
    --systemd-dir=*) systemd_dir=${1#*=}; shift ;;
    --no-reload) reload=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -n "$prefix" ] || die "empty --prefix"
case $prefix in /*) ;; *) prefix=$(pwd -P)/$prefix ;; esac
prefix=${prefix%/}
[ -n "$prefix" ] || prefix=/        # "/" stripped to ""
P=${prefix%/}                       # "" for /, so "$P/bin" is /bin

manifest_dir=$P/share/vbdfs
manifest=$manifest_dir/install-manifest

systemd_running() { [ -d /run/systemd/system ]; }
daemon_reload() {
  if [ "$reload" = 1 ] && systemd_running && command -v systemctl > /dev/null; then
    systemctl daemon-reload || note "warning: systemctl daemon-reload failed"
  fi
}

# ------------------------------------------------------------ uninstall --
if [ "$uninstall" = 1 ]; then
  [ -f "$manifest" ] || die "no manifest at $manifest: nothing installed with --prefix $prefix"
  # files and symlinks first, then directories deepest first
  while IFS=' ' read -r kind path; do
    case $kind in
      f) if [ -f "$path" ]; then rm -f -- "$path" && note "removed $path"; fi ;;
      l) if [ -L "$path" ]; then rm -f -- "$path" && note "removed $path"; fi ;;
    esac
  done < "$manifest"
  rm -f -- "$manifest"
  dirs=$(awk '$1 == "d" { print substr($0, 3) }' "$manifest.dirs" 2> /dev/null | sort -r)
  rm -f -- "$manifest.dirs"
  rmdir -- "$manifest_dir" 2> /dev/null || true
  while IFS= read -r d; do
    if [ -n "$d" ] && [ -d "$d" ] && rmdir -- "$d" 2> /dev/null; then note "removed directory $d"; fi
  done <<< "$dirs"
  daemon_reload
  note "uninstalled (prefix $prefix)"
  exit 0
fi

# -------------------------------------------------------------- install --
# Where mount(8) looks: only /sbin, /sbin/fs.d, /sbin/fs (util-linux FS_SEARCH_PATH).
if [ "$helper_dir" = default ]; then
  case $P in
    "" | /usr | /usr/local) helper_dir=/sbin ;;
    *) helper_dir=none ;;
  esac
fi
if [ "$systemd_dir" = default ]; then
  systemd_dir=$P/lib/systemd/system
fi

# The binary: given, or target/release/vbdfs (built when missing or stale).
if [ -z "$bin" ]; then
  tdir=${CARGO_TARGET_DIR:-$ROOT/target}
  bin=$tdir/release/vbdfs
  stale=""
  if [ ! -x "$bin" ]; then
    stale="missing"
  elif [ -n "$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$bin" -print -quit 2> /dev/null)" ]; then
    stale="older than the sources"
  fi
  if [ -n "$stale" ]; then
    note "$bin is $stale: running cargo build --release"
    cargo=$(command -v cargo || true)
    [ -n "$cargo" ] || [ ! -x "${HOME:-/root}/.cargo/bin/cargo" ] || cargo=${HOME:-/root}/.cargo/bin/cargo
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && [ "$(stat -c %U "$ROOT")" = "$SUDO_USER" ]; then
      # build as the owner of the checkout, not as root
      sudo -u "$SUDO_USER" -H bash -lc "cd '$ROOT' && cargo build --release" || die "cargo build --release failed"
    else
      [ -n "$cargo" ] || die "cargo not found (install Rust, or build first and pass --bin PATH)"
      (cd "$ROOT" && "$cargo" build --release) || die "cargo build --release failed"
    fi
  fi
fi
if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then die "no executable vbdfs binary at $bin"; fi
bin=$(cd "$(dirname "$bin")" && pwd -P)/$(basename "$bin")

new_manifest=$(mktemp)
new_dirs=$(mktemp)
trap 'rm -f "$new_manifest" "$new_dirs"' EXIT
# keep directories created by earlier runs (they exist now, but are still ours)
[ -f "$manifest.dirs" ] && cat "$manifest.dirs" > "$new_dirs"

mkdirs() { # create a directory and record each level we create
  local d=$1 missing=()
  while [ -n "$d" ] && [ "$d" != / ] && [ ! -e "$d" ]; do missing+=("$d"); d=$(dirname "$d"); done
  mkdir -p -- "$1"
  local i
  for ((i = ${#missing[@]} - 1; i >= 0; i--)); do echo "d ${missing[i]}" >> "$new_dirs"; done
}
put() { # MODE SRC DEST [sed-expression]
  local mode=$1 src=$2 dest=$3 expr=${4:-} tmp
  mkdirs "$(dirname "$dest")"
  tmp=$(mktemp "$(dirname "$dest")/.vbdfs-install.XXXXXX")
  if [ -n "$expr" ]; then sed -e "$expr" "$src" > "$tmp"; else cat "$src" > "$tmp"; fi
  chmod "$mode" "$tmp"
  mv -f -- "$tmp" "$dest"
  echo "f $dest" >> "$new_manifest"
  note "installed $dest"
}
sed_quote() { printf '%s' "$1" | sed 's/[\\&#]/\\&/g'; }
owned_by_us() { # path: listed in our current manifest?
  [ -f "$manifest" ] && grep -qxF -e "f $1" -e "l $1" "$manifest"
}

qbin=$(sed_quote "$P/bin/vbdfs")
put 0755 "$bin" "$P/bin/vbdfs"
put 0755 "$HERE/mount.vbdfs" "$P/sbin/mount.vbdfs" "s#^VBDFS_INSTALLED_BIN=\"\"#VBDFS_INSTALLED_BIN=\"$qbin\"#"

if [ "$helper_dir" != none ]; then
  link=${helper_dir%/}/mount.vbdfs
  target=$P/sbin/mount.vbdfs
  if [ "$(readlink -f "$(dirname "$link")" 2> /dev/null)" = "$(readlink -f "$P/sbin")" ]; then
    note "$target is already where mount(8) looks ($helper_dir)"
  else
    if [ -e "$link" ] || [ -L "$link" ]; then
      if [ "$(readlink "$link" 2> /dev/null)" != "$target" ] && ! owned_by_us "$link"; then
        die "$link exists and was not installed by this prefix; remove it or pass --mount-helper-dir"
      fi
    fi
    mkdirs "$(dirname "$link")"
    ln -sfn -- "$target" "$link"
    echo "l $link" >> "$new_manifest"
    note "installed $link -> $target"
  fi
fi

if [ "$systemd_dir" != none ]; then
  put 0644 "$HERE/vbdfs@.service" "$systemd_dir/vbdfs@.service" \
    "/^Exec/s#/usr/local/bin/vbdfs#$qbin#g; /^Documentation=/s#/usr/local/share/doc/vbdfs#$(sed_quote "$P/share/doc/vbdfs")#g"
fi

doc=$P/share/doc/vbdfs
put 0644 "$HERE/xen/vm1-file.cfg" "$doc/xen/vm1-file.cfg"
put 0644 "$HERE/xen/vm1-tapaio.cfg" "$doc/xen/vm1-tapaio.cfg"
[ -f "$ROOT/docs/admin.md" ] && put 0644 "$ROOT/docs/admin.md" "$doc/admin.md"

# Files an earlier run installed that this run did not (e.g. another helper dir)
# stay listed, so --uninstall still removes them.
mkdirs "$manifest_dir"
echo "f $manifest" >> "$new_manifest"
if [ -f "$manifest" ]; then cat "$manifest" >> "$new_manifest"; fi
sort -u "$new_manifest" > "$manifest"
sort -u "$new_dirs" > "$manifest.dirs"
chmod 0644 "$manifest" "$manifest.dirs"
daemon_reload

note "done: $(grep -c '' "$manifest") entries in $manifest"
case ":$PATH:" in *":$P/bin:"*) ;; *) note "note: $P/bin is not on PATH" ;; esac
if [ "$helper_dir" = none ]; then
  note "note: mount(8) looks for helpers in /sbin only; for 'mount -t vbdfs' run:"
  note "      ln -s $P/sbin/mount.vbdfs /sbin/mount.vbdfs"
fi
if [ "$systemd_dir" != none ] && ! systemd-analyze unit-paths 2> /dev/null | grep -qxF "$systemd_dir"; then
  note "note: systemd does not read $systemd_dir; link the unit into /etc/systemd/system to use it"
fi
