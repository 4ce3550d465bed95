//! The FUSE front end: a thin layer that exposes one open [`Image`] as a
//! directory with `disk` (the flat raw file), `control` and `snapshots/`.
//!
//! It knows nothing of the image format. Requests on `disk` are checked and
//! clamped here (reads at or past the end return short/empty, writes past the
//! end fail with `ENOSPC`, the size cannot change), then served on the FUSE
//! thread if the engine can do it from memory ([`Image::reads_disk`]), else
//! handed to the worker [`pool::Pool`], which calls the engine and replies.
//! Engine errors become errno values only through [`crate::Error::errno`].
//!
//! Kernel settings (see `research/fuse-ceiling.md` section 7): `FUSE_ASYNC_DIO`,
//! 1 MiB `max_write`, `max_background` 128 (congestion threshold 3/4), no
//! writeback cache; `disk` and `control` open with `FOPEN_DIRECT_IO` (plus
//! `FOPEN_PARALLEL_DIRECT_WRITES` for `disk`), so the engine's cache is the only
//! cache. `fsync`/`fdatasync` = [`Image::flush`]; FUSE `flush` (close) is cheap
//! and only reports a failed image; `fallocate` PUNCH_HOLE → `discard`,
//! ZERO_RANGE → `write_zeroes`; `lseek` SEEK_DATA/SEEK_HOLE → `next_data`/`next_hole`.

mod inodes;
mod ops;
mod pool;
pub mod session;
mod snapfiles;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use fuser::{Errno, INodeNo, InitFlags, KernelConfig};
use parking_lot::Mutex;

use crate::control::Control;
use crate::{Error, Image};
pub use inodes::{CONTROL, DISK, ROOT, SNAPSHOTS};
pub use pool::BufPool;
pub use snapfiles::SNAP_INO_BASE;

/// Largest request the kernel is asked to send (`max_write`; reads follow `max_pages`).
pub const MAX_REQUEST: u32 = 1 << 20;
/// Asynchronous requests the kernel may keep in flight (`max_background`).
pub const MAX_BACKGROUND: u16 = 128;

/// Settings of the mounted files.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Owner of `disk`, `control` and the directories.
    pub uid: u32,
    /// Group of `disk`, `control` and the directories.
    pub gid: u32,
    /// Permission bits of `disk`.
    pub disk_mode: u32,
    /// I/O worker threads.
    pub workers: usize,
    /// Request buffers kept for reuse ([`pool::BufPool::budget`]).
    pub request_buffers: usize,
}

/// The mounted file system of one image.
#[derive(Debug)]
pub struct VbdFs {
    image: Arc<Image>,
    control: Arc<Control>,
    pool: pool::Pool,
    bufs: Arc<pool::BufPool>,
    inodes: inodes::Inodes,
    /// Status text per open `control` handle, taken when it is read at offset 0.
    status: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    /// The reader behind each open `snapshots/NAME` handle (it pins the snapshot).
    snap_handles: Arc<snapfiles::SnapHandles>,
    next_fh: AtomicU64,
    /// The image file, opened for `statfs`: the mount reports the room of the
    /// host file system the image grows in.
    host_file: std::fs::File,
    /// FUSE threads serving requests, and how many of them are in a write
    /// that waits for write-back ([`VbdFs::hold_inline`]).
    fuse_threads: usize,
    held_inline: AtomicUsize,
    /// FUSE threads inside an inline write of `disk`.
    inline_writes: AtomicUsize,
    /// Held-back writes handed to the workers and not yet done.
    held_handed_off: Arc<AtomicUsize>,
}

/// At most this many held-back writes (each at most [`MAX_REQUEST`]) wait
/// in workers: past it, FUSE threads wait with them.
const HELD_HANDOFF_MAX: usize = 8;

impl VbdFs {
    /// A file system for `control`'s image; starts the worker threads.
    pub fn new(control: Arc<Control>, config: &FsConfig) -> io::Result<VbdFs> {
        let image = control.image().clone();
        let blksize = image.block_size().clamp(4096, u64::from(MAX_REQUEST)) as u32;
        let host_file = std::fs::File::open(control.image_path())?;
        let modified = host_file.metadata()?.modified()?;
        let inodes = inodes::Inodes::new(
            image.len(),
            blksize,
            config.uid,
            config.gid,
            config.disk_mode,
            modified,
        );
        Ok(VbdFs {
            fuse_threads: session::fuse_threads(),
            held_inline: AtomicUsize::new(0),
            inline_writes: AtomicUsize::new(0),
            held_handed_off: Arc::new(AtomicUsize::new(0)),
            host_file,
            image,
            control,
            pool: pool::Pool::new(config.workers, "vbdfs-io")?,
            bufs: Arc::new(pool::BufPool::with_keep(config.request_buffers)),
            inodes,
            status: Mutex::new(HashMap::new()),
            snap_handles: Arc::default(),
            next_fh: AtomicU64::new(1),
        })
    }

    /// Negotiates the kernel settings listed in the module docs.
    fn configure(config: &mut KernelConfig) {
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            log::warn!("kernel lacks {missing:?}: O_DIRECT AIO will be serialised");
        }
        if let Err(max) = config.set_max_write(MAX_REQUEST) {
            log::warn!("max_write {MAX_REQUEST} refused, using {max}");
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
    }

    /// Where a write that waits for write-back runs. On this FUSE thread
    /// (true; the caller counts it in `held_inline` until done) while
    /// another FUSE thread stays free, else on a worker while fewer than
    /// [`HELD_HANDOFF_MAX`] wait there (false; counted in `held_handed_off`),
    /// else here after all. A FUSE thread left free answers `stat` and
    /// `control` while the host disk is slow or stalled.
    fn hold_inline(&self) -> bool {
        let free = self.fuse_threads.saturating_sub(1);
        if self.held_inline.fetch_add(1, Ordering::AcqRel) < free {
            return true;
        }
        if self.held_handed_off.fetch_add(1, Ordering::AcqRel) < HELD_HANDOFF_MAX {
            self.held_inline.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.held_handed_off.fetch_sub(1, Ordering::AcqRel);
        true
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Stops the workers after the queued requests are done.
    fn stop(&mut self) {
        self.pool.shutdown();
        self.status.lock().clear();
        self.snap_handles.lock().clear();
    }
}

/// The errno of an engine error (the one mapping, [`Error::errno`]).
fn errno(err: &Error) -> Errno {
    Errno::from_i32(err.errno())
}

/// Records an engine failure in the control state and converts it.
fn failed(control: &Control, what: &str, err: &Error) -> Errno {
    control.record_error(what, err);
    errno(err)
}

/// `INodeNo` of a request as a plain number, for logs.
fn ino_name(ino: INodeNo) -> &'static str {
    match ino {
        ROOT => "/",
        DISK => "disk",
        CONTROL => "control",
        SNAPSHOTS => "snapshots",
        _ if snapfiles::is_snapshot(ino) => "snapshots/*",
        _ => "?",
    }
}
