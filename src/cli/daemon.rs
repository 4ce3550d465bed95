//! The serving side of a mount (the daemon, or `mount -f`): open the image,
//! mount, report readiness, serve until unmounted, then close the image.
//!
//! SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken by one
//! signal thread, which unmounts the mount point (lazily if it is busy, e.g.
//! under a loop device: the image is then closed when the last user lets go).
//! However the mount ends (signal, `vbdfs umount`, plain `umount`), the FUSE
//! session returns, the worker threads finish the queued requests and
//! [`Image::close`] flushes, checkpoints and marks the image clean.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mountinfo;
use super::options::{MountOptions, DEFAULT_THREADS, USEFUL_CACHE};
use crate::control::Control;
use crate::fuse::session::{self, MountParams};
use crate::fuse::{BufPool, FsConfig, VbdFs};
use crate::{sys, Error, ErrorKind, Image, OpenOptions, Result};

/// Signals that unmount.
const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// How long a mount waits for an image that is locked but not mounted (its
/// previous daemon is still closing it after a plain `umount`).
const CLOSING_WAIT: Duration = Duration::from_secs(10);

/// What to serve.
#[derive(Debug, Clone)]
pub struct Job {
    /// Canonical image path.
    pub image: PathBuf,
    /// Canonical mount point.
    pub mountpoint: PathBuf,
    /// Parsed `-o` options.
    pub options: MountOptions,
}

/// The readiness report to a waiting parent (daemon mode) or nothing (`-f`),
/// and in the foreground the mount point's lock ([`super::mount`]), let go
/// once the mount is ready or has failed.
#[derive(Debug)]
pub struct Ready {
    pipe: Option<UnixStream>,
    lock: Option<File>,
}

impl Ready {
    /// Nobody waits (foreground); `lock` is held until the verdict.
    pub fn foreground(lock: Option<File>) -> Ready {
        Ready { pipe: None, lock }
    }

    /// The parent waits on `pipe` (and holds the lock).
    pub fn pipe(pipe: UnixStream) -> Ready {
        Ready {
            pipe: Some(pipe),
            lock: None,
        }
    }

    /// Reports the mount ready, with `warnings` about the image for the
    /// parent to print (one `WARN` line each; a foreground mount logs them).
    fn ok(&mut self, warnings: &[String]) {
        self.lock = None;
        let Some(mut pipe) = self.pipe.take() else {
            warnings.iter().for_each(|w| log::warn!("{w}"));
            return;
        };
        let mut msg = String::from("OK\n");
        for warning in warnings {
            msg.push_str(&format!("WARN {}\n", warning.replace('\n', " ")));
        }
        let _ = pipe.write_all(msg.as_bytes());
    }

    /// Reports `err` if readiness was not reported yet.
    pub fn fail(&mut self, err: &Error) {
        self.lock = None;
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(format!("ERR {err}\n").as_bytes());
        }
    }
}

/// The mount's memory budget for data (`cache=`): the FUSE request buffers
/// kept for reuse and the engine's block cache share it.
fn cache_budget(job: &Job) -> u64 {
    job.options
        .cache_bytes
        .unwrap_or(OpenOptions::default().cache_bytes)
}

/// Opens the image read-write (or read-only with `ro`, then also returns the
/// file that holds its shared lock), waiting a little if a previous daemon is
/// still closing it.
fn open_image(job: &Job) -> Result<(Image, Option<std::fs::File>)> {
    let mut opts = OpenOptions {
        read_only: job.options.read_only,
        adapt_floor: job.options.adapt_floor,
        log_region_min: job.options.log_region,
        ..OpenOptions::default()
    };
    opts.cache_bytes = BufPool::budget(cache_budget(job)).1;
    let start = Instant::now();
    let mut shared = match opts.read_only {
        true => Some(lock_shared(job, start)?),
        false => None,
    };
    loop {
        match super::keys::open(&job.image, &opts).map(|image| (image, shared.take())) {
            Err(e) if e.kind() == ErrorKind::Locked => {
                let mounted = !mountinfo::mount_points_of(&job.image).is_empty();
                if mounted || start.elapsed() > CLOSING_WAIT {
                    return Err(mountinfo::explain_locked(&job.image, e, false));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// A read-only open takes no lock (`info`, `check` and `export` read a
/// mounted image), so a read-only mount takes a shared one of its own and
/// holds it while it serves: a writer (a read-write mount, an offline
/// `snapshot`, `compact`, `resize`, `check --repair`) is then refused
/// instead of changing the image under it. Waits while another process
/// holds the image's lock (a previous daemon still closing it), and refuses
/// if that lasts (a writer is using it).
fn lock_shared(job: &Job, start: Instant) -> Result<std::fs::File> {
    let file = std::fs::File::open(&job.image)
        .map_err(|e| Error::io(format!("cannot open {}", job.image.display()), e))?;
    loop {
        match file.try_lock_shared() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < CLOSING_WAIT => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let locked = Error::new(ErrorKind::Locked, "locked");
                return Err(mountinfo::explain_locked(&job.image, locked, false));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("{}: lock", job.image.display()), e))
            }
        }
    }
}

/// Serves `job` until it is unmounted; reports readiness through `ready`.
pub fn serve(job: &Job, ready: &mut Ready) -> Result<()> {
    sys::limit_malloc_retention();
    if let Err(e) = sys::set_io_flusher() {
        log::info!(
            "PR_SET_IO_FLUSHER not set ({e}): without CAP_SYS_RESOURCE, memory reclaim may \
             wait on this daemon (docs/admin.md §7)"
        );
    }
    // Before any thread exists, so that every thread inherits the mask.
    sys::block_signals(&SIGNALS).map_err(|e| Error::io("blocking signals", e))?;
    let (image, _shared_lock) = open_image(job)?;
    let image = Arc::new(image);
    let (uid, gid) = sys::effective_ids();
    let (request_buffers, _) = BufPool::budget(cache_budget(job));
    let config = FsConfig {
        uid: job.options.uid.unwrap_or(uid),
        gid: job.options.gid.unwrap_or(gid),
        disk_mode: job.options.mode.unwrap_or(0o600),
        workers: job.options.threads.unwrap_or(DEFAULT_THREADS),
        request_buffers,
    };
    let control = Control::new(image.clone(), job.image.clone(), job.mountpoint.clone())
        .with_request_buffers((request_buffers as u64) << 20);
    let control = Arc::new(control);
    let fs = VbdFs::new(control, &config).map_err(|e| Error::io("starting I/O threads", e))?;
    let fs_name = mountinfo::fs_name(&job.image);
    let params = MountParams {
        mountpoint: &job.mountpoint,
        fs_name: &fs_name,
        read_only: job.options.read_only,
        allow_other: job.options.allow_other,
    };
    let mut session = session::mount(fs, &params)?;
    let unmounter = session.unmount_callable();
    let (dir, name) = (job.mountpoint.clone(), fs_name.clone());
    std::thread::Builder::new()
        .name("vbdfs-signals".into())
        .spawn(move || signal_loop(&dir, &name, unmounter))
        .map_err(|e| Error::io("starting the signal thread", e))?;
    log::info!(
        "mounted {} at {}",
        job.image.display(),
        job.mountpoint.display()
    );
    // A read-only mount of an image with lost map leaves (or a lost
    // snapshot table) serves the rest.
    ready.ok(&image.damage());
    for warning in warnings(job) {
        log::warn!("{warning}");
    }

    let served = session.run();
    log::info!(
        "{} unmounted; closing {}",
        job.mountpoint.display(),
        job.image.display()
    );
    let closed = match Arc::try_unwrap(image) {
        Ok(image) => image.close(),
        Err(image) => {
            log::error!("image still in use after the session ended; flushing only");
            image.flush()
        }
    };
    match &closed {
        Ok(()) => log::info!("{} closed clean", job.image.display()),
        Err(e) => log::error!("closing {}: {e}", job.image.display()),
    }
    served.map_err(|e| Error::io("FUSE session", e))?;
    closed
}

/// What to tell the admin about a mount that works but is set up to
/// disappoint: an image on ext4 mounted with `discard`, and a `cache=` too
/// small to hold blocks or larger than the host's memory.
pub fn warnings(job: &Job) -> Vec<String> {
    let mut warnings: Vec<String> = discard_warning(job).into_iter().collect();
    let memory = sys::memory_bytes();
    if let Some(cache) = job.options.cache_bytes.filter(|&c| c < USEFUL_CACHE) {
        warnings.push(format!(
            "cache= of {} leaves no room for cached blocks (the FUSE request buffers alone \
             keep 4 MiB): it works, but every read goes to the disk; {} is the least that \
             caches",
            super::options::format_size(cache),
            super::options::format_size(USEFUL_CACHE)
        ));
    }
    if let (Some(cache), Some(memory)) = (job.options.cache_bytes, memory) {
        if cache > memory {
            warnings.push(format!(
                "cache= of {} is more than this host's memory ({}); it grows only as \
                 blocks are used, but a large working set would push the host into swap",
                super::options::format_size(cache),
                super::options::format_size(memory)
            ));
        }
    }
    warnings
}

/// What to tell the admin when a writable mount's image lies on ext4 mounted
/// with `discard` ([`mountinfo::synchronous_discard`]), None otherwise.
fn discard_warning(job: &Job) -> Option<String> {
    if job.options.read_only {
        return None;
    }
    let fs = mountinfo::synchronous_discard(&job.image)?;
    Some(format!(
        "{} is ext4 mounted with `discard`: each hole punched to give overwritten data's \
         space back is discarded while {}'s writes wait; for faster writes mount it \
         `nodiscard` and run fstrim instead (docs/admin.md)",
        fs.display(),
        job.image.display()
    ))
}

/// Waits for SIGTERM/SIGINT/SIGHUP and unmounts each time one arrives.
fn signal_loop(dir: &std::path::Path, fs_name: &str, mut unmounter: fuser::SessionUnmounter) {
    loop {
        let sig = match sys::wait_signal(&SIGNALS) {
            Ok(sig) => sig,
            Err(e) => return log::error!("waiting for signals: {e}"),
        };
        log::info!("signal {sig}: unmounting {}", dir.display());
        if sys::effective_ids().0 != 0 {
            if let Err(e) = unmounter.unmount() {
                log::warn!("unmounting {}: {e}", dir.display());
            }
            continue;
        }
        // Only unmount what is ours: the top mount at `dir` must be this image.
        let ours = mountinfo::vbdfs_mount_at(dir).is_some_and(|m| m.source == fs_name);
        if !ours {
            log::warn!(
                "{} is no longer this image's mount; nothing to unmount",
                dir.display()
            );
            continue;
        }
        match sys::unmount(dir, false) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                log::warn!(
                    "{} is busy (open files or a loop device): detaching it now; the image \
                     is closed when the last user lets go",
                    dir.display()
                );
                if let Err(e) = sys::unmount(dir, true) {
                    log::error!("lazy unmount of {}: {e}", dir.display());
                }
            }
            Err(e) => log::error!("unmounting {}: {e}", dir.display()),
        }
    }
}
