//! [`SnapshotReader`]: a read-only view of one snapshot — of this image (the
//! files under `snapshots/` of a mount) or of a clone's base image.
//!
//! It loads the snapshot's map from its INDEX record once, then reads DATA
//! records straight from the store: records are immutable, so reading needs
//! no lock against writers of the head (in this process or, for a base
//! image, in another daemon). Unmapped blocks fall through to the snapshot's
//! own backing image (a snapshot of a clone), ZERO entries read as zeros. A
//! small LRU of decoded blocks serves reads smaller than a block.

use super::batch::{self, RunBufs};
use super::map::BlockMap;
use super::snapshot::SnapshotInfo;
use super::snaptable::Pin;
use crate::codec;
use crate::error::{Error, Result};
use crate::format::{EntryKind, MapEntry, RecordHeader, RecordKind, SnapEntry};
use crate::io::Store;
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Bytes of decoded blocks a reader keeps (at least 4 blocks).
const READER_CACHE: usize = 4 << 20;

/// A read-only snapshot. `Send + Sync`.
#[derive(Debug)]
pub struct SnapshotReader {
    store: Arc<dyn Store>,
    map: BlockMap,
    block_shift: u8,
    nblocks: u64,
    info: SnapshotInfo,
    backing: Option<Arc<SnapshotReader>>,
    cache: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    /// Buffers for reading runs of records (reused: fresh ones per read
    /// fragment the heap, see [`super::batch`]).
    run_bufs: RunBufs,
    _pin: Option<Pin>,
}

/// Run buffers of a snapshot reader (up to 1 MiB each once used).
const READER_RUN_BUFS: usize = 4;

/// Reads and verifies the DATA record of `block` that `entry` names.
pub(super) fn decode_data(
    store: &dyn Store,
    block: u64,
    entry: MapEntry,
    block_size: u64,
) -> Result<Vec<u8>> {
    if entry == super::map::LOST {
        return Err(super::map::lost_block(block));
    }
    let (h, payload) = super::log::read_record(store, entry.off, entry.len)?;
    check_header(&h, block, entry, block_size)?;
    codec::decode_owned(h.codec, payload, block_size as usize)
        .map_err(|e| e.context(format!("block {block}")))
}

/// Checks that a verified record is the DATA record `entry` names for `block`.
fn check_header(h: &RecordHeader, block: u64, entry: MapEntry, block_size: u64) -> Result<()> {
    if h.kind != RecordKind::Data || h.key != block || h.birth != u64::from(entry.birth) {
        return Err(Error::corrupt(format!(
            "block {block}: record at {} belongs to {:?} {} (birth {})",
            entry.off, h.kind, h.key, h.birth
        )));
    }
    if u64::from(h.raw_len) != block_size {
        return Err(Error::corrupt(format!(
            "block {block}: record has raw length {}",
            h.raw_len
        )));
    }
    Ok(())
}

impl SnapshotReader {
    /// Reads whole DATA blocks straight into `buf` (each `(block, entry, at)`
    /// at `buf[at..]`, in block order): their records in runs, the runs of a
    /// run buffer together ([`Store::read_direct_spans`]). The cache is left
    /// alone: a large read is not read again soon, and the cache is small. A
    /// block whose record fails here is read on its own, which reports why.
    fn read_whole(&self, whole: &[(u64, MapEntry, usize)], buf: &mut [u8]) -> Result<()> {
        let bs = self.block_size() as usize;
        let entries: Vec<MapEntry> = whole.iter().map(|&(_, e, _)| e).collect();
        let runs = batch::runs(&entries);
        let spans: Vec<(u64, usize)> = runs
            .iter()
            .map(|run| batch::run_span(&entries[run.clone()]))
            .collect();
        for group in batch::read_groups(&spans) {
            let mut run_buf = self.run_bufs.take();
            let reads = self
                .store
                .read_direct_spans(&mut run_buf.buf, &spans[group.clone()]);
            for ((run, read), &(base, _)) in
                runs[group.clone()].iter().zip(reads).zip(&spans[group])
            {
                for &(block, entry, at) in &whole[run.clone()] {
                    let out = &mut buf[at..at + bs];
                    let decoded = read.as_ref().ok().and_then(|range| {
                        let start = range.start + (entry.off - base) as usize;
                        let bytes = &run_buf.buf.as_slice()[start..start + entry.len as usize];
                        self.decode_in(block, entry, bytes, out).ok()
                    });
                    if decoded.is_none() {
                        out.copy_from_slice(&self.block(block, entry)?);
                    }
                }
            }
        }
        Ok(())
    }

    /// Verifies the DATA record `entry` names for `block`, read into
    /// `bytes`, and decodes it into `out`.
    fn decode_in(&self, block: u64, entry: MapEntry, bytes: &[u8], out: &mut [u8]) -> Result<()> {
        super::log::check_len(entry.off, entry.len)?;
        let (h, payload) =
            super::log::parse_record_in(self.store.as_ref(), bytes, entry.off, entry.len)?;
        check_header(&h, block, entry, self.block_size())?;
        codec::decode(h.codec, &payload, out)
    }

    /// Loads the map of `entry` from `store`.
    pub(super) fn load(
        store: Arc<dyn Store>,
        entry: &SnapEntry,
        info: SnapshotInfo,
        block_shift: u8,
        backing: Option<Arc<SnapshotReader>>,
        pin: Option<Pin>,
    ) -> Result<SnapshotReader> {
        let file_len = store.len().map_err(|e| Error::io("size of image", e))?;
        let nblocks = entry.virtual_size.div_ceil(1 << block_shift);
        // A leaf lost in both copies costs its blocks, not the snapshot.
        let map = super::mapload::load_map_losing(
            store.as_ref(),
            entry.index,
            block_shift,
            file_len,
            nblocks,
            true,
        )
        .map_err(|e| e.context(format!("snapshot '{}'", entry.name)))?;
        let blocks = (READER_CACHE >> block_shift).max(4);
        Ok(SnapshotReader {
            store,
            map,
            block_shift,
            nblocks,
            info,
            backing,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(blocks).unwrap_or(NonZeroUsize::MIN),
            )),
            run_bufs: RunBufs::new(READER_RUN_BUFS),
            _pin: pin,
        })
    }

    /// The snapshot's size in bytes (the disk's virtual size at the snapshot).
    pub fn len(&self) -> u64 {
        self.info.virtual_size
    }

    /// True for a zero-length snapshot (never: sizes are positive).
    pub fn is_empty(&self) -> bool {
        self.info.virtual_size == 0
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// One line per map leaf of the snapshot that could be read in neither
    /// copy: its blocks read as errors. Empty for a healthy snapshot.
    pub fn lost_leaves(&self) -> Vec<String> {
        self.map.lost_notes(self.nblocks, self.block_shift)
    }

    /// Name, id, time and sizes of the snapshot.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    fn block(&self, block: u64, entry: MapEntry) -> Result<Arc<Vec<u8>>> {
        if let Some(data) = self.cache.lock().get(&block) {
            return Ok(data.clone());
        }
        let data = Arc::new(decode_data(
            self.store.as_ref(),
            block,
            entry,
            self.block_size(),
        )?);
        self.cache.lock().put(block, data.clone());
        Ok(data)
    }

    /// Reads `buf.len()` bytes at `off` (`Invalid` past the end, `Corrupt` for
    /// a damaged block).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let len = buf.len() as u64;
        if off.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(Error::invalid(format!(
                "range {off}+{len} is outside the snapshot ({} bytes)",
                self.len()
            )));
        }
        let bs = self.block_size();
        // In a read of more than a block, whole DATA blocks not in the cache
        // are read last, together (smaller reads go through the cache); runs
        // of blocks that show the backing image are read from it as one
        // range each (so a chain of clones reads in runs all the way down).
        let mut whole: Vec<(u64, MapEntry, usize)> = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_block = (pos & (bs - 1)) as usize;
            let mut n = (bs as usize - in_block).min(buf.len() - done);
            let block = pos >> self.block_shift;
            let entry = self.map.get(block);
            match entry.kind {
                EntryKind::Data
                    if len > bs
                        && n as u64 == bs
                        && entry != super::map::LOST
                        && !self.cache.lock().contains(&block) =>
                {
                    whole.push((block, entry, done));
                }
                EntryKind::Data => {
                    let data = self.block(block, entry)?;
                    buf[done..done + n].copy_from_slice(&data[in_block..in_block + n]);
                }
                EntryKind::Zero => buf[done..done + n].fill(0),
                EntryKind::Unmapped => {
                    let mut next = block + 1;
                    while done + n < buf.len() && self.map.get(next).kind == EntryKind::Unmapped {
                        n = (n + bs as usize).min(buf.len() - done);
                        next += 1;
                    }
                    read_backing(self.backing.as_deref(), &mut buf[done..done + n], pos)?;
                }
            }
            done += n;
        }
        self.read_whole(&whole, buf)
    }

    /// The first byte at or after `off` in a block that holds data (SEEK_DATA).
    pub fn next_data(&self, off: u64) -> Option<u64> {
        if off >= self.len() {
            return None;
        }
        let first = off >> self.block_shift;
        let own = self.map.next_mapped(first);
        let base = self.backing.as_deref().and_then(|b| {
            super::backing::next_backed(&self.map, b, first, self.nblocks, self.block_shift)
        });
        let block = match (own, base) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some((block << self.block_shift).max(off))
    }

    /// The first byte at or after `off` in a block without data (SEEK_HOLE),
    /// or the size.
    pub fn next_hole(&self, off: u64) -> u64 {
        let mut block = off >> self.block_shift;
        while block < self.nblocks && self.has_data(block) {
            block += 1;
        }
        (block << self.block_shift).clamp(off, self.len())
    }

    fn has_data(&self, block: u64) -> bool {
        match self.map.get(block).kind {
            EntryKind::Data => true,
            EntryKind::Zero => false,
            EntryKind::Unmapped => self
                .backing
                .as_deref()
                .is_some_and(|b| b.range_has_data(block << self.block_shift, self.block_size())),
        }
    }

    /// True if some block overlapping `[off, off+len)` holds data.
    pub(super) fn range_has_data(&self, off: u64, len: u64) -> bool {
        self.next_data(off)
            .is_some_and(|d| d < off.saturating_add(len))
    }
}

/// Fills `out` with the bytes at `pos` of `backing` (zeros past its end or
/// without one).
pub(super) fn read_backing(
    backing: Option<&SnapshotReader>,
    out: &mut [u8],
    pos: u64,
) -> Result<()> {
    out.fill(0);
    if let Some(b) = backing {
        let end = (pos + out.len() as u64).min(b.len());
        if pos < end {
            b.read_at(&mut out[..(end - pos) as usize], pos)?;
        }
    }
    Ok(())
}

/// A readable disk: the head of an [`Image`](super::Image) or a snapshot.
/// Exporters and other readers take `&dyn DiskView` to handle both.
pub trait DiskView: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True for an empty disk (never: sizes are positive).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Block size in bytes.
    fn block_size(&self) -> u64;
    /// Reads `buf.len()` bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    /// SEEK_DATA: the first byte at or after `off` in a block holding data.
    fn next_data(&self, off: u64) -> Option<u64>;
    /// SEEK_HOLE: the first byte at or after `off` in a block without data.
    fn next_hole(&self, off: u64) -> u64;
}

impl DiskView for SnapshotReader {
    fn len(&self) -> u64 {
        SnapshotReader::len(self)
    }
    fn block_size(&self) -> u64 {
        SnapshotReader::block_size(self)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        SnapshotReader::read_at(self, buf, off)
    }
    fn next_data(&self, off: u64) -> Option<u64> {
        SnapshotReader::next_data(self, off)
    }
    fn next_hole(&self, off: u64) -> u64 {
        SnapshotReader::next_hole(self, off)
    }
}

impl DiskView for super::Image {
    fn len(&self) -> u64 {
        super::Image::len(self)
    }
    fn block_size(&self) -> u64 {
        super::Image::block_size(self)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        super::Image::read_at(self, buf, off)
    }
    fn next_data(&self, off: u64) -> Option<u64> {
        super::Image::next_data(self, off)
    }
    fn next_hole(&self, off: u64) -> u64 {
        super::Image::next_hole(self, off)
    }
}
