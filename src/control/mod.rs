//! The control file `MOUNTPOINT/control`: command parsing, execution and the
//! status text.
//!
//! Writing: one command per `write` (a trailing newline is fine):
//!
//! | command | effect |
//! |---|---|
//! | `flush` | everything written to `disk` before is durable when the write returns |
//! | `snapshot NAME` | a crash-consistent snapshot of `disk` (the writes completed before the command), durable when the write returns; `snapshots/NAME` appears at once. `EEXIST` if the name is taken, `EROFS` on a read-only mount |
//! | `delete-snapshot NAME` | deletes it; `ENOENT` if there is none, `EBUSY` while `snapshots/NAME` is open or clones are based on it |
//! | `hold-snapshot NAME`, `release-snapshot NAME` | one more / one less clone based on it (what `vbdfs clone` does on a mounted base); `ENOENT`, `EINVAL` when not held |
//! | `checkpoint` | write a checkpoint now (the next mount replays less) and give back the space of what died before it; moves the image's log into a hole of the file if one is big enough (`engine::regions`) |
//! | `compact` | return the host space of dead records (see `engine::reclaim`) |
//! | `reset-stats` | start the request statistics (below) again from zero |
//! | `resume` | after a full host disk, once there is room: leave the failed state now (tried on its own, at most once a second, before writes and fsyncs of `disk`); `ENOSPC` while there is none, `EINVAL` if the image failed otherwise |
//!
//! Snapshot names: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter,
//! digit or `_` ([`crate::format::check_snapshot_name`]). An unknown or
//! malformed command or a bad name fails with `EINVAL`; a command that fails
//! in the engine fails with the engine error's errno ([`Error::errno`]). The text of
//! the last failure (of a command or of I/O on `disk`) is kept and shown as
//! `last-error`.
//!
//! Reading gives `key: value` lines, one per key, always in this order:
//!
//! | key | value |
//! |---|---|
//! | `state` | `mounted`, or `failed` once a host write/sync failed (remount to recover) |
//! | `image`, `mountpoint`, `pid` | the image file, the mount point, the daemon's pid |
//! | `read-only` | `yes` or `no` |
//! | `size`, `block-size` | virtual size and block size in bytes |
//! | `codec` | block compression (`zstd:1`, `none`) |
//! | `codec-adapt` | `off`, or with the mount option `adapt`, the fastest level write-back may use and how many blocks it compressed faster than `codec` since the mount: `to zstd:-3 (1234 blocks at faster levels)` |
//! | `uuid` | image identity |
//! | `allocated-bytes`, `stored-bytes`, `file-bytes`, `file-allocated-bytes`, `dead-bytes`, `reclaim-pending-bytes` | data held, its compressed size, the image file length, the host space it occupies, the part of it not used by live records, the map, the superblocks or the room allocated ahead of the log, and of that the dead records waiting to be punched |
//! | `log-run` | where the log appends: `end of file`, or `hole A..B` (byte offsets of the image file it reuses: `engine::regions`), then `(N moves into holes, D bytes of dead records overwritten; B bytes moved out of R mostly dead ranges)` since the mount (`engine::regions`, `engine::evacuate`) |
//! | `cache-size`, `cache-used`, `cache-hits`, `cache-misses` | the engine's buffer cache |
//! | `dirty-bytes` | written but not yet durable |
//! | `generation` | checkpoint generation |
//! | `snapshots` | the snapshot names, oldest first, separated by spaces; `none` without any |
//! | `log-damage` | map leaves a read-only mount could read in neither copy (their blocks read as errors), damaged log records the open stepped over (their blocks read as errors; `check` names them) and map records it read from their second copy (written anew), `none` normally |
//! | `last-error` | the last failed command or I/O error, `none` if nothing failed |
//! | `stats-seconds` | the time the request statistics below cover: since the mount or the last `reset-stats` |
//! | `read`, `write`, `flush`, `discard` | requests on `disk` of each kind (`fsync`/`fdatasync` are flushes; `fallocate` PUNCH_HOLE and ZERO_RANGE discards): `requests=N bytes=N errors=N` (no bytes for flushes; bytes of failed requests are not counted) |
//! | `read-latency-us`, `write-latency-us`, `flush-latency-us`, `discard-latency-us` | how long they took, in µs: `p50=… p90=… p99=… p99.9=… max=…` (percentiles exact to 12.5 %, rounded up), or `none` |
//! | `slow-requests` | requests that took a second or longer (each also logged, at most one line per 10 s) |
//!
//! The statistics are in [`stats`].

pub mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::printable;
use crate::{Error, ErrorKind, Image, Result};
pub use stats::{Op, RequestStats};

/// A parsed control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Make everything written so far durable.
    Flush,
    /// Take a snapshot with this name.
    Snapshot(String),
    /// Delete the named snapshot.
    DeleteSnapshot(String),
    /// Record one more clone based on the named snapshot (used by `vbdfs clone`
    /// when the base is mounted).
    HoldSnapshot(String),
    /// Drop one such hold (a failed clone, or a clone that was removed).
    ReleaseSnapshot(String),
    /// A checkpoint now (and the space of what died before it).
    Checkpoint,
    /// Reclaim space.
    Compact,
    /// Start the request statistics again from zero.
    ResetStats,
    /// Leave the failed state a full host disk caused, now that there is
    /// room (also tried on its own before writes and fsyncs).
    Resume,
}

/// Longest accepted command write.
pub const MAX_COMMAND_LEN: usize = 4096;

/// Parses one command write. Errors are [`ErrorKind::Invalid`] (EINVAL).
pub fn parse(data: &[u8]) -> Result<Command> {
    if data.len() > MAX_COMMAND_LEN {
        return Err(Error::invalid("command too long"));
    }
    let text = std::str::from_utf8(data)
        .map_err(|_| Error::invalid("command is not UTF-8 text"))?
        .trim();
    if text.contains('\n') {
        return Err(Error::invalid("one command per write"));
    }
    let mut words = text.split_whitespace();
    let verb = words
        .next()
        .ok_or_else(|| Error::invalid("empty command"))?;
    let args: Vec<&str> = words.collect();
    let no_args = |cmd: Command| {
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(Error::invalid(format!("'{verb}' takes no argument")))
        }
    };
    let one_name = || match args.as_slice() {
        [name] => check_name(name).map(|()| name.to_string()),
        _ => Err(Error::invalid(format!("usage: {verb} NAME"))),
    };
    match verb {
        "flush" => no_args(Command::Flush),
        "compact" => no_args(Command::Compact),
        "checkpoint" => no_args(Command::Checkpoint),
        "reset-stats" => no_args(Command::ResetStats),
        "resume" => no_args(Command::Resume),
        "snapshot" => Ok(Command::Snapshot(one_name()?)),
        "delete-snapshot" => Ok(Command::DeleteSnapshot(one_name()?)),
        "hold-snapshot" => Ok(Command::HoldSnapshot(one_name()?)),
        "release-snapshot" => Ok(Command::ReleaseSnapshot(one_name()?)),
        _ => Err(Error::invalid(format!(
            "unknown command '{verb}' (expected flush, snapshot NAME, \
             delete-snapshot NAME, checkpoint, compact, reset-stats, resume, hold-snapshot NAME \
             or release-snapshot NAME)"
        ))),
    }
}

/// A snapshot name (see the module docs).
fn check_name(name: &str) -> Result<()> {
    crate::format::check_snapshot_name(name)
}

/// The state behind the control file of one mount.
#[derive(Debug)]
pub struct Control {
    image: Arc<Image>,
    image_path: PathBuf,
    /// The image file, to name it where it is now (moved or deleted while
    /// mounted: `vbdfs umount` checks it there).
    image_file: Option<std::fs::File>,
    mountpoint: PathBuf,
    last_error: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Bytes of the mount's `cache=` budget kept as request buffers.
    buffer_bytes: u64,
    stats: RequestStats,
    /// When [`Control::resume_if_room`] last tried.
    last_resume: Mutex<Option<std::time::Instant>>,
}

/// Free space the host file system must have before a mount failed by a full
/// disk tries to resume (its checkpoint writes the whole map anew: ~40 KiB
/// per 64 MiB of written disk at 64 KiB blocks; a resume that finds too
/// little room fails again, safely, and is tried again later).
const RESUME_ROOM: u64 = 8 << 20;
/// How often at most a mount failed by a full disk looks for room again.
const RESUME_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Control {
    /// Control state for `image` (opened from `image_path`) mounted at `mountpoint`.
    pub fn new(image: Arc<Image>, image_path: PathBuf, mountpoint: PathBuf) -> Control {
        Control {
            image,
            image_file: std::fs::File::open(&image_path).ok(),
            image_path,
            mountpoint,
            last_error: Mutex::new(None),
            failed: false.into(),
            buffer_bytes: 0,
            stats: RequestStats::default(),
            last_resume: Mutex::new(None),
        }
    }

    /// Counts `bytes` of request buffers in the reported `cache-size` (the
    /// mount's whole `cache=` budget).
    pub fn with_request_buffers(mut self, bytes: u64) -> Control {
        self.buffer_bytes = bytes;
        self
    }

    /// The image this control file acts on.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The request statistics of `disk`, kept by the FUSE front end.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// Parses and runs one command write; a failure is also recorded as the last error.
    pub fn execute(&self, data: &[u8]) -> Result<()> {
        let result = parse(data).and_then(|cmd| self.run(&cmd));
        if let Err(e) = &result {
            self.record_error("control", e);
        }
        result
    }

    fn run(&self, cmd: &Command) -> Result<()> {
        match cmd {
            Command::Flush => self.image.flush(),
            Command::Checkpoint => self.image.checkpoint(),
            Command::Resume => self.resume(),
            Command::Snapshot(name) => self.image.snapshot_create(name).map(|_| ()),
            Command::DeleteSnapshot(name) => self.image.snapshot_delete(name).map(|()| {
                log::info!("{}: snapshot '{name}' deleted", self.image_path.display());
            }),
            Command::HoldSnapshot(name) => self.image.snapshot_hold(name).map(|_| ()),
            Command::ReleaseSnapshot(name) => self.image.snapshot_release(name).map(|_| ()),
            Command::ResetStats => {
                self.stats.reset();
                Ok(())
            }
            Command::Compact => self.image.compact().map(|r| {
                log::info!(
                    "{}: compacted: live {} bytes, host space {} -> {} bytes",
                    self.image_path.display(),
                    r.live_bytes,
                    r.file_allocated_before,
                    r.file_allocated_after
                );
            }),
        }
    }

    /// Where the image file is now: its path as mounted, or where it was
    /// moved since, or that path with ` (deleted)`.
    fn current_image_path(&self) -> PathBuf {
        self.image_file
            .as_ref()
            .and_then(|f| {
                use std::os::fd::AsRawFd;
                std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()
            })
            .unwrap_or_else(|| self.image_path.clone())
    }

    /// The image file's path as mounted.
    pub fn image_path(&self) -> &std::path::Path {
        &self.image_path
    }

    /// Remembers `err` (seen while doing `what`) as the last error and logs it.
    pub fn record_error(&self, what: &str, err: &Error) {
        if err.kind() == ErrorKind::Failed {
            self.failed.store(true, Ordering::Relaxed);
        }
        let line = printable(&format!("{what}: {err}"));
        log::warn!("{}: {line}", self.image_path.display());
        *self.last_error.lock() = Some(line);
    }

    /// While the image is failed by a full host disk: once the host file
    /// system has room again, resumes it ([`Image::resume`]), at most once a
    /// second. Called before each write and fsync of `disk`, so a guest
    /// paused on ENOSPC goes on when it retries (QEMU's `cont`), as on a raw
    /// file.
    pub fn resume_if_room(&self) {
        if !self.image.failed_for_space() {
            return;
        }
        {
            let mut last = self.last_resume.lock();
            if last.is_some_and(|t| t.elapsed() < RESUME_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        // All free space, the root reserve included: the daemon runs as root
        // and writes into it (ext4's 5 %); a resume that finds too little
        // room fails again, safely.
        let room = self
            .image_file
            .as_ref()
            .and_then(|f| crate::sys::fs_space(f).ok())
            .map(|s| s.free.saturating_mul(s.unit));
        if room.is_none_or(|r| r < RESUME_ROOM) {
            return;
        }
        self.resume().unwrap_or_else(|e| {
            log::warn!("{}: not resumed: {e}", self.image_path.display());
        });
    }

    /// [`Image::resume`], and the mount's state with it.
    fn resume(&self) -> Result<()> {
        let was_failed = self.image.failed_for_space();
        self.image.resume()?;
        self.failed.store(false, Ordering::Relaxed);
        if !was_failed {
            return Ok(());
        }
        let mut last = self.last_error.lock();
        if let Some(old) = last.take() {
            *last = Some(format!("resumed after: {old}"));
        }
        drop(last);
        log::warn!(
            "{}: resumed after a full host disk (a new log run; what write-back could not \
             store is written again)",
            self.image_path.display()
        );
        Ok(())
    }

    /// True once the engine reported a failed host write or sync: the image
    /// refuses writes until it is remounted (or resumed after a full disk).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// The status text: `key: value` lines (see the module docs).
    pub fn status(&self) -> String {
        let st = self.image.stats();
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let failed = self.has_failed() || st.failed.is_some();
        let last = self.last_error.lock().clone().or_else(|| st.failed.clone());
        let mut damage = self.image.damage();
        damage.extend(self.image.recovery_notes().iter().cloned());
        let damage = damage.join("; ");
        let adapt = match st.adapt_floor {
            Some(floor) => format!(
                "to zstd:{floor} ({} blocks at faster levels)",
                st.faster_blocks
            ),
            None => "off".into(),
        };
        let log_run = match st.log_run_limit {
            Some(limit) => format!("hole {}..{limit}", st.log_run_start),
            None => "end of file".to_string(),
        };
        let log_run = format!(
            "{log_run} ({} moves into holes, {} bytes of dead records overwritten; \
             {} bytes moved out of {} mostly dead ranges)",
            st.log_moves, st.log_recycled_bytes, st.evacuated_bytes, st.evacuated_ranges
        );
        let lines: [(&str, String); 26] = [
            ("state", if failed { "failed" } else { "mounted" }.into()),
            ("image", self.current_image_path().display().to_string()),
            ("mountpoint", self.mountpoint.display().to_string()),
            ("pid", std::process::id().to_string()),
            ("read-only", yes_no(st.read_only).into()),
            ("size", st.virtual_size.to_string()),
            ("block-size", st.block_size.to_string()),
            ("codec", st.codec),
            ("codec-adapt", adapt),
            ("uuid", st.uuid),
            ("allocated-bytes", st.allocated_bytes.to_string()),
            ("stored-bytes", st.stored_bytes.to_string()),
            ("file-bytes", st.file_bytes.to_string()),
            ("file-allocated-bytes", st.file_allocated_bytes.to_string()),
            ("dead-bytes", st.dead_bytes.to_string()),
            (
                "reclaim-pending-bytes",
                st.reclaim_pending_bytes.to_string(),
            ),
            ("log-run", log_run),
            (
                "cache-size",
                (st.cache_bytes + self.buffer_bytes).to_string(),
            ),
            ("cache-used", st.cache_used_bytes.to_string()),
            ("cache-hits", st.cache_hits.to_string()),
            ("cache-misses", st.cache_misses.to_string()),
            ("dirty-bytes", st.dirty_bytes.to_string()),
            ("generation", st.generation.to_string()),
            ("snapshots", snapshot_names(&self.image)),
            (
                "log-damage",
                if damage.is_empty() {
                    "none".into()
                } else {
                    damage
                },
            ),
            ("last-error", last.unwrap_or_else(|| "none".into())),
        ];
        let stats = self.stats.lines();
        let stats = stats.iter().map(|(k, v)| (k.as_str(), v.clone()));
        lines
            .into_iter()
            .chain(stats)
            .map(|(k, v)| format!("{k}: {}\n", printable(&v)))
            .collect()
    }
}

/// The snapshot names separated by spaces, `none`, or `unknown` when the
/// snapshot table is lost (`log-damage` says why).
fn snapshot_names(image: &Image) -> String {
    if image.lost_snapshot_table().is_some() {
        return "unknown".into();
    }
    let names: Vec<String> = image.snapshot_list().into_iter().map(|s| s.name).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse(b"flush\n").ok(), Some(Command::Flush));
        assert_eq!(parse(b"  flush  ").ok(), Some(Command::Flush));
        assert_eq!(parse(b"compact").ok(), Some(Command::Compact));
        assert_eq!(parse(b"checkpoint\n").ok(), Some(Command::Checkpoint));
        assert_eq!(parse(b"reset-stats\n").ok(), Some(Command::ResetStats));
        assert_eq!(
            parse(b"snapshot pre-upgrade\n").ok(),
            Some(Command::Snapshot("pre-upgrade".into()))
        );
        assert_eq!(
            parse(b"delete-snapshot v1.2_x").ok(),
            Some(Command::DeleteSnapshot("v1.2_x".into()))
        );
        assert_eq!(
            parse(b"hold-snapshot gold").ok(),
            Some(Command::HoldSnapshot("gold".into()))
        );
        assert_eq!(
            parse(b"release-snapshot gold").ok(),
            Some(Command::ReleaseSnapshot("gold".into()))
        );
    }

    #[test]
    fn rejects_bad_commands_with_einval() {
        for bad in [
            &b""[..],
            b"\n",
            b"bogus",
            b"flush now",
            b"reset-stats all",
            b"flush\nflush\n",
            b"snapshot",
            b"snapshot a b",
            b"snapshot ../x",
            b"snapshot .hidden",
            b"snapshot a/b",
            b"\xff\xfe",
        ] {
            let err = parse(bad).err();
            assert_eq!(
                err.as_ref().map(Error::errno),
                Some(libc::EINVAL),
                "{bad:?}"
            );
        }
        let long = vec![b'a'; MAX_COMMAND_LEN + 1];
        assert!(parse(&long).is_err());
    }
}
