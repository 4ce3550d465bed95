//! The engine: one open image — its map, log, cache, checkpoints and recovery.
//!
//! [`Image`] is the API every upper layer uses (`docs/engine-api.md`). Data
//! flow: writes land in the [`BlockCache`]; write-back workers compress dirty
//! blocks in parallel and append them to the log as DATA records, updating the
//! in-memory [`map`] under the log lock; `flush` waits for the blocks dirty at
//! its start and issues one `sync`. A background checkpointer writes dirty map
//! leaves and flips the superblock; `open` rolls the log forward from the last
//! checkpoint (see `docs/format.md`, "Commit and recovery").
//!
//! Lock order: checkpoint lock → (publish turn →) log lock → cache shard →
//! slot; the map lock is taken inside the log lock by writers, alone by
//! readers. No lock is held across compression or the write-back's O_DIRECT
//! writes: a worker takes room in the log under the log lock, writes it
//! without, and publishes it into the map in the order rooms were taken
//! (`writeback.rs`), so the map always reflects a prefix of the log. Appends
//! of metadata (checkpoint leaves, snapshot tables, discards) write under the
//! log lock.

mod adapt;
mod backing;
mod batch;
mod checkpoint;
mod clock;
mod clone;
mod copies;
mod copycheck;
mod deadspace;
mod dropsnap;
mod evacuate;
mod inspect;
mod log;
mod logend;
mod map;
mod mapload;
mod open;
mod readahead;
mod reader;
mod reclaim;
mod regions;
mod replay;
mod resize;
mod resume;
mod rw;
mod shrink;
mod snapshot;
mod snaptable;
mod space;
mod writeback;

pub use backing::{BackingInfo, CloneOptions};
pub use clock::UtcTime;
pub use clone::BaseSnapshot;
pub use inspect::{BadBlock, CheckReport, ImageStats};
pub use open::check_disk_size;
pub use reader::{DiskView, SnapshotReader};
pub use reclaim::CompactReport;
pub use snapshot::{SnapshotInfo, SnapshotTiming, SnapshotUsage};

use crate::cache::BlockCache;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{Codec, LeafPtr, RecPtr, Superblock, DEFAULT_BLOCK_SHIFT};
use crate::io::Store;
use log::LogTail;
use map::BlockMap;
use parking_lot::{Mutex, RwLock};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Log bytes after which a checkpoint is started (bounds replay at open).
const CHECKPOINT_BYTES: u64 = 256 << 20;
/// A checkpoint also runs after this long with changes pending.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// How to create an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Block size: a power of two from 4 KiB to 1 MiB.
    pub block_size: u64,
    /// Compression of blocks.
    pub codec: Codec,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            block_size: 1 << DEFAULT_BLOCK_SHIFT,
            codec: Codec::Zstd(1),
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open without writing anything and without taking the lock.
    pub read_only: bool,
    /// Buffer cache budget in bytes.
    pub cache_bytes: u64,
    /// Write-back (compression) worker threads.
    pub workers: usize,
    /// Replay the log past damage that cannot be stepped over safely (a
    /// synced record that no longer says what it held: format.md §5),
    /// dropping the unreadable records; their blocks may then read older
    /// values. Off: such an open fails. For `vbdfs check --repair`.
    pub salvage_log: bool,
    /// Adaptive compression: while write-back falls behind, compress at
    /// zstd levels down to this one instead of holding writers up
    /// ([`adapt`]). `None`: always the image's level. Must be faster than
    /// the image's level; refused for an uncompressed image.
    pub adapt_floor: Option<i32>,
    /// The smallest hole of the image file the log moves into ([`regions`];
    /// None: 256 MiB). Also [`Image::set_log_region_min`].
    pub log_region_min: Option<u64>,
}

/// The part of a cache budget of `open` that the engine holds outside the
/// block cache: each write-back worker's staging buffer (a batch of blocks)
/// and compression context (~1 MiB), the buffers for reading runs of
/// records (readahead's pieces and large reads are read into them), and the
/// reclaim's record of held dead space at its bound. At most half the
/// budget.
fn threads_reserve(open: &OpenOptions, block_size: u64) -> u64 {
    let (workers, reclaim) = if open.read_only {
        (0, 0)
    } else {
        (open.workers as u64, deadspace::BOOKKEEPING_BYTES)
    };
    let writeback = workers * (writeback::WRITEBACK_BATCH as u64 * block_size + (1 << 20));
    (writeback + batch::RUN_BUFS_BYTES + reclaim).min(open.cache_bytes / 2)
}

/// Default write-back threads per core. A worker compresses (CPU) and then
/// waits for its O_DIRECT log write (disk): with more workers than cores the
/// log keeps several writes in flight. Measured on 2 cores (1 MiB writes
/// through FUSE, QD16): 2 → 8 workers, +37 % uncompressed, +20 % zstd, +25 %
/// for 4 KiB random writes; 12 gained nothing more.
const WRITEBACK_PER_CORE: usize = 4;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            cache_bytes: 256 << 20,
            workers: WRITEBACK_PER_CORE
                * std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .min(8),
            salvage_log: false,
            adapt_floor: None,
            log_region_min: None,
        }
    }
}

/// Shared state of an open image.
#[derive(Debug)]
pub(crate) struct Inner {
    /// What the open's roll-forward stepped over or dropped (log damage).
    recovery_notes: Vec<String>,
    /// Superblock-named records whose first copy was found damaged at open:
    /// the recovery checkpoint writes them anew.
    rewrite: copies::Rewrite,
    store: Arc<dyn Store>,
    read_only: bool,
    /// The disk's size in bytes: changes only while the image is used
    /// exclusively ([`Image::resize`], a rollback to a snapshot of another
    /// size); read it with [`Inner::virtual_size`].
    disk_size: AtomicU64,
    block_shift: u8,
    codec: Codec,
    /// Faster levels while write-back falls behind (read-write opens with
    /// [`OpenOptions::adapt_floor`]).
    adapt: Option<adapt::Adapt>,
    /// The superblock last written (or read).
    sb: Mutex<Superblock>,
    /// Whether the image was clean when opened.
    opened_clean: bool,
    /// The first birth generation of this session: map entries born before
    /// it were loaded from the image.
    first_gen: u64,
    log: Mutex<LogTail>,
    /// Write-back rooms published so far (see `writeback::Turn`).
    publish_turn: Mutex<u64>,
    publish_cv: parking_lot::Condvar,
    /// Wakes write-back waiting to take a room (`LogTail::rooms_held`).
    rooms_cv: parking_lot::Condvar,
    map: RwLock<BlockMap>,
    cache: BlockCache,
    checkpoint_lock: Mutex<()>,
    /// The INDEX record the superblock names and the leaf pointers it
    /// lists: a checkpoint with the same pointers names it again. None
    /// asks the next checkpoint for a new one (a damaged or single copy,
    /// an evacuation of the range it lies in).
    index_listed: Mutex<Option<(RecPtr, Vec<LeafPtr>)>>,
    /// Moves of the log into the file's holes ([`regions`]).
    regions: regions::Regions,
    /// Deleted snapshots whose records only they held are still to be
    /// reclaimed ([`dropsnap`]).
    deleted_snapshots: Mutex<Vec<dropsnap::DeletedSnapshot>>,
    /// Compactions completed in this session (deleted snapshots queued
    /// before one need no judging of their own).
    compactions: AtomicU64,
    judging_deleted: Mutex<()>,
    sync_lock: Mutex<()>,
    failed: Mutex<Option<String>>,
    failed_flag: AtomicBool,
    /// The error that failed the image was a full host disk.
    failed_no_space: AtomicBool,
    /// A sync of the image file failed: what was written since the last
    /// good one may be lost whatever the host says later (no resume).
    sync_failed: AtomicBool,
    kick: crossbeam_channel::Sender<()>,
    kick_rx: crossbeam_channel::Receiver<()>,
    /// One message per background thread tells it to exit.
    stop_tx: crossbeam_channel::Sender<()>,
    stop_rx: crossbeam_channel::Receiver<()>,
    /// The snapshot table, pins of open snapshot readers.
    snaps: Arc<snaptable::Snapshots>,
    /// The base snapshot of a clone (None for a plain image).
    backing: Option<backing::Backing>,
    readahead: readahead::Readahead,
    /// Buffers for reading runs of records ([`batch`]).
    run_bufs: batch::RunBufs,
    /// The cache budget asked for (block cache + [`threads_reserve`]).
    cache_budget: u64,
    /// Dead ranges found by checkpoints, not punched yet.
    dead_space: deadspace::DeadSpace,
}

/// An open image. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct Image {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    closed: bool,
}

impl Inner {
    fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// The disk's size in bytes.
    fn virtual_size(&self) -> u64 {
        self.disk_size.load(Ordering::Acquire)
    }

    /// Blocks of the disk (the last one may be partly past its end).
    fn nblocks(&self) -> u64 {
        self.blocks_of(self.virtual_size())
    }

    /// Blocks of a disk of `size` bytes: a map of that size maps no block
    /// from this one on.
    fn blocks_of(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size())
    }

    /// Latches the image into the failed state and returns the error.
    fn fail(&self, err: Error) -> Error {
        if err.kind() != ErrorKind::Failed {
            let mut failed = self.failed.lock();
            if failed.is_none() {
                ::log::error!("image failed, refusing further writes: {err}");
                *failed = Some(err.to_string());
                self.failed_no_space
                    .store(err.kind() == ErrorKind::NoSpace, Ordering::Relaxed);
            }
            self.failed_flag.store(true, Ordering::Release);
            self.cache.fail();
        }
        err
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed_flag.load(Ordering::Acquire) {
            let msg = self.failed.lock().clone().unwrap_or_default();
            let cause = if self.failed_no_space.load(Ordering::Relaxed) {
                ErrorKind::NoSpace
            } else {
                ErrorKind::Io
            };
            let until = if self.failed_for_space() {
                "there is room again (or it is opened again)"
            } else {
                "it is opened again"
            };
            return Err(Error::failed(
                format!(
                    "image is in a failed state after an earlier error ({msg}): nothing more is \
                     written until {until}"
                ),
                cause,
            ));
        }
        Ok(())
    }
}

impl Image {
    /// Creates a new image file at `path` (which must not exist) and opens it.
    pub fn create(path: &Path, create: &CreateOptions, open: &OpenOptions) -> Result<Image> {
        open::create_file(path, create, open, None)
    }

    /// Creates a new encrypted image at `path`, its data key wrapped under
    /// `key` (see `crate::crypto`), and opens it.
    pub fn create_encrypted(
        path: &Path,
        create: &CreateOptions,
        open: &OpenOptions,
        key: &crate::crypto::KeyMaterial,
    ) -> Result<Image> {
        open::create_file(path, create, open, Some(key))
    }

    /// Opens the image file at `path`; `key` is required for an encrypted
    /// image and refused for a plain one. A missing or wrong key fails before
    /// anything is written.
    pub fn open_with_key(
        path: &Path,
        open: &OpenOptions,
        key: Option<&crate::crypto::KeyMaterial>,
    ) -> Result<Image> {
        open::open_file(path, open, key)
    }

    /// [`Image::create_on`] for an encrypted image.
    pub fn create_on_encrypted(
        store: Arc<dyn Store>,
        create: &CreateOptions,
        open: &OpenOptions,
        key: &crate::crypto::KeyMaterial,
    ) -> Result<Image> {
        open::format_store(store.as_ref(), create, Some(key))?;
        Self::open_keyed(store, open, None, Some(key))
    }

    /// [`Image::open_on`] with the key of an encrypted image.
    pub fn open_on_with_key(
        store: Arc<dyn Store>,
        open: &OpenOptions,
        key: Option<&crate::crypto::KeyMaterial>,
    ) -> Result<Image> {
        Self::open_keyed(store, open, None, key)
    }

    /// Unlocks an encrypted image's keys (if any) and opens it. Reads only
    /// until the key is accepted.
    fn open_keyed(
        store: Arc<dyn Store>,
        open: &OpenOptions,
        origin: Option<&Path>,
        key: Option<&crate::crypto::KeyMaterial>,
    ) -> Result<Image> {
        let file_len = store.len().map_err(|e| Error::io("size of image", e))?;
        let sb = open::read_superblock(store.as_ref(), file_len)?;
        let store = crate::crypto::attach(store, &sb, key)?;
        Self::open_at(store, open, origin)
    }

    /// Opens the image file at `path`.
    pub fn open(path: &Path, open: &OpenOptions) -> Result<Image> {
        open::open_file(path, open, None)
    }

    /// Creates a new image on an empty store and opens it.
    pub fn create_on(
        store: Arc<dyn Store>,
        create: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Image> {
        open::format_store(store.as_ref(), create, None)?;
        Self::open_on(store, open)
    }

    /// Opens the image held by `store`. The backing image of a clone is looked
    /// for at its absolute path, then relative to the current directory.
    pub fn open_on(store: Arc<dyn Store>, open: &OpenOptions) -> Result<Image> {
        Self::open_keyed(store, open, None, None)
    }

    /// Opens the image held by `store`, read from the file `origin` (the
    /// directory a clone's relative backing path starts from).
    fn open_at(store: Arc<dyn Store>, open: &OpenOptions, origin: Option<&Path>) -> Result<Image> {
        let inner = Arc::new(open::load(store, open, origin)?);
        let mut image = Image {
            inner,
            threads: Vec::new(),
            closed: false,
        };
        if !open.read_only {
            image
                .inner
                .recovery_checkpoint()
                .map_err(|e| e.context("writing a checkpoint on open"))?;
            image.threads = writeback::spawn(&image.inner, open.workers.max(1))?;
        }
        for _ in 0..readahead::THREADS {
            image.threads.push(readahead::spawn(&image.inner)?);
        }
        Ok(image)
    }

    /// Virtual size in bytes.
    pub fn len(&self) -> u64 {
        self.inner.virtual_size()
    }

    /// True for a zero-length image (never: sizes are positive).
    pub fn is_empty(&self) -> bool {
        self.inner.virtual_size() == 0
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.inner.block_size()
    }

    /// What opening this image found wrong in its log and stepped over (a
    /// damaged synced record: its block reads as an error) or, salvaging,
    /// dropped. Empty for a healthy image.
    pub fn recovery_notes(&self) -> &[String] {
        &self.inner.recovery_notes
    }

    /// One line per map leaf this read-only session could read in neither
    /// copy: its blocks read as I/O errors (a read-write open refuses such
    /// an image). Empty for a healthy image.
    pub fn lost_leaves(&self) -> Vec<String> {
        let map = self.inner.map.read();
        let notes = map.lost_notes(self.inner.nblocks(), self.inner.block_shift);
        // The log replayed over the lost leaf maps what it wrote again.
        let since = ", except those written after the last checkpoint";
        notes.into_iter().map(|n| n + since).collect()
    }

    /// Why this read-only session could read the snapshot table in neither
    /// copy, if so: it lists no snapshot, and opening one names this (a
    /// read-write open refuses such an image).
    pub fn lost_snapshot_table(&self) -> Option<String> {
        self.inner.snaps.lost().map(str::to_string)
    }

    /// Every part of the image this read-only session could not read in
    /// either copy, one line each: [`Image::lost_leaves`], then
    /// [`Image::lost_snapshot_table`]. Empty for a healthy image.
    pub fn damage(&self) -> Vec<String> {
        let mut notes = self.lost_leaves();
        notes.extend(self.lost_snapshot_table());
        notes
    }

    /// Block compression.
    pub fn codec(&self) -> Codec {
        self.inner.codec
    }

    /// True for an encrypted image (opened with its key).
    pub fn is_encrypted(&self) -> bool {
        self.inner.store.sealer().is_some()
    }

    /// True if opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.inner.read_at(buf, off)
    }

    /// Writes `buf` at `off` (durable after the next `flush`).
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner.write_at(buf, off)
    }

    /// True if reading (or, with `writing`, writing) `len` bytes at `off`
    /// would wait for a disk read; false if the request is served from
    /// memory (a write may still wait for write-back when too much is dirty).
    /// The answer can be stale by the time the request runs (a block may be
    /// evicted meanwhile): it only chooses where to run a request.
    pub fn reads_disk(&self, off: u64, len: u64, writing: bool) -> bool {
        self.inner.reads_disk(off, len, writing)
    }

    /// [`Image::write_at`] for a FUSE thread that must stay free: it waits
    /// for write-back only once the cache's unwritten data is well past its
    /// limit (half as much again), not at the limit.
    pub fn write_at_late_throttle(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner.write_unthrottled(buf, off)?;
        self.inner.cache.throttle_late();
        Ok(())
    }

    /// The first half of [`Image::write_at`] for a caller that replies from
    /// another thread: `buf` goes into the cache now, without waiting for
    /// write-back; [`Image::throttle`] is the wait.
    pub fn write_unthrottled(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner.write_unthrottled(buf, off)
    }

    /// The second half of [`Image::write_at`]: waits, in line behind the
    /// writers already waiting, while the cache's unwritten data is over its
    /// limit.
    pub fn throttle(&self) {
        self.inner.cache.throttle();
    }

    /// True if a write of `len` bytes would wait for write-back (its blocks
    /// would take the cache's unwritten data past its limit): where to run
    /// it. Can be stale like [`Image::reads_disk`].
    pub fn write_waits(&self, len: u64) -> bool {
        let (dirty, limit) = self.inner.cache.backlog();
        let blocks = (len >> self.inner.block_shift) as usize + 2;
        dirty + blocks > limit
    }

    /// Discards `[off, off+len)`: it reads as zeros and whole blocks are freed.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.inner.discard(off, len)
    }

    /// Writes zeros over `[off, off+len)` (same effect as discard: zero blocks
    /// cost no data space).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.inner.discard(off, len)
    }

    /// At least the bytes of the disk that hold data, cheap enough for every
    /// `stat` (`st_blocks`): blocks with a record plus blocks not yet written
    /// back; a clone's whole size (its base's blocks are not counted here).
    /// Never 0 while anything was written: tools such as `tar --sparse` take
    /// a file without blocks for all holes.
    pub fn allocated_bytes(&self) -> u64 {
        let inner = &self.inner;
        if inner.backing.is_some() {
            return inner.virtual_size();
        }
        let blocks = inner.map.read().data_blocks + inner.cache.unwritten_count() as u64;
        (blocks * inner.block_size()).min(inner.virtual_size())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Makes what was written to `len` bytes at `off` durable, like
    /// [`Image::flush`] but waiting only for those blocks' write-back (the
    /// second half of an `O_DSYNC` write).
    pub fn flush_range(&self, off: u64, len: u64) -> Result<()> {
        self.inner.flush_range(off, len)
    }

    /// Flushes, writes a final checkpoint marked clean and closes.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let flushed = if self.inner.read_only {
            Ok(())
        } else {
            self.inner.flush()
        };
        // The background threads stop before the final checkpoint: a
        // background checkpoint queued behind it would mark the image dirty.
        self.inner.cache.stop_write_behind();
        for _ in &self.threads {
            let _ = self.inner.stop_tx.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if self.inner.read_only {
            return flushed;
        }
        // A compaction the log's moves wanted and the reclaim thread had no
        // time for: the next session finds the holes it makes.
        if flushed.is_ok() && self.inner.regions.take_compaction_due() {
            if let Err(e) = self.inner.compact() {
                ::log::warn!("compaction for the log's moves failed: {e}");
            }
        }
        let result = flushed.and_then(|()| self.inner.checkpoint(true));
        if result.is_ok() {
            self.inner.reclaim_deleted_snapshots();
            self.inner.punch_held();
            self.inner.trim_preallocated();
        }
        result
    }

    /// Sizes, counters and state.
    pub fn stats(&self) -> ImageStats {
        self.inner.stats()
    }

    /// Reads and verifies every mapped block of the head and of every snapshot.
    pub fn check(&self) -> Result<CheckReport> {
        let mut copies = CheckReport::default();
        self.inner.check_copies(&mut copies)?;
        let mut report = self.inner.check()?;
        self.inner.check_snapshots(&mut report)?;
        report.damaged_copies = copies.damaged_copies;
        report.repaired = copies.repaired;
        report.single_copy_records = copies.single_copy_records;
        Ok(report)
    }

    /// Checks again, against this open's (newer) state, only what `earlier`
    /// found bad (see `vbdfs check` of a mounted image).
    pub fn recheck(&self, earlier: &CheckReport) -> Result<CheckReport> {
        self.inner.recheck(earlier)
    }

    /// The first byte at or after `off` in a block that holds data (SEEK_DATA).
    pub fn next_data(&self, off: u64) -> Option<u64> {
        self.inner.next_data(off)
    }

    /// The first byte at or after `off` in a block without data (SEEK_HOLE), or
    /// the virtual size.
    pub fn next_hole(&self, off: u64) -> u64 {
        self.inner.next_hole(off)
    }

    /// Runs a checkpoint as the background thread does: it may move the log
    /// (into a hole, or dead space held for it), and the dead space it
    /// finds is held as the reclaim's policy says (`deadspace`), not
    /// punched now. For tests and tuning; [`Image::checkpoint`] punches.
    pub fn background_checkpoint(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "image is open read-only"));
        }
        self.inner.commit_moving(false, None, regions::Wish::Seek)
    }

    /// Runs a checkpoint now (bounds the log replayed by the next open) and
    /// gives back the host space of every record dead by then. It also moves
    /// the log into a hole of the file if one is big enough ([`regions`]).
    pub fn checkpoint(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "image is open read-only"));
        }
        self.inner.commit_moving(false, None, regions::Wish::Seek)?;
        self.inner.reclaim_deleted_snapshots();
        self.inner.punch_held();
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            ::log::error!("closing image: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threads_reserve_comes_out_of_the_cache_budget() {
        let open = OpenOptions {
            cache_bytes: 256 << 20,
            workers: 8,
            read_only: false,
            salvage_log: false,
            adapt_floor: None,
            log_region_min: None,
        };
        // 8 workers x (8 blocks + 1 MiB) + 16 run buffers + reclaim.
        let run_bufs = 16 * ((1 << 20) + (128 << 10) + (8 << 10));
        assert_eq!(
            threads_reserve(&open, 65536),
            8 * (3 << 19) + run_bufs + deadspace::BOOKKEEPING_BYTES
        );
        let ro = OpenOptions {
            read_only: true,
            ..open.clone()
        };
        assert_eq!(threads_reserve(&ro, 65536), run_bufs);
        let tiny = OpenOptions {
            cache_bytes: 1 << 20,
            ..open
        };
        assert_eq!(threads_reserve(&tiny, 65536), 1 << 19, "at most half");
    }
}
