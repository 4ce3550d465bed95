//! Looking at an image: statistics, the full check, and data/hole search.

use super::Inner;
use crate::error::Result;
use crate::format::{EntryKind, MapEntry, LEAF_ENTRIES};
use serde::Serialize;

/// Sizes, counters and state of an open image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageStats {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Block compression ("zstd:1", "none").
    pub codec: String,
    /// With adaptive compression: the fastest level write-back may use.
    pub adapt_floor: Option<i32>,
    /// Blocks compressed at a faster level than the image's since the open
    /// (adaptive compression).
    pub faster_blocks: u64,
    /// Image identity.
    pub uuid: String,
    /// Bytes of the virtual disk that hold data (mapped blocks x block size).
    pub allocated_bytes: u64,
    /// Bytes the mapped blocks take in the file (compressed records).
    pub stored_bytes: u64,
    /// Length of the image file.
    pub file_bytes: u64,
    /// Host space the image file occupies (it is sparse: dead records are
    /// punched out). `file_allocated_bytes - stored_bytes` is metadata plus
    /// dead space not yet reclaimed.
    pub file_allocated_bytes: u64,
    /// Bytes of the committed map's leaf records.
    pub metadata_bytes: u64,
    /// Host space beyond live records, the map, the superblocks (and
    /// keyslots) and the room allocated ahead of the log: dead records not
    /// yet reclaimed, snapshots' records and partly used pages.
    pub dead_bytes: u64,
    /// Dead bytes known and waiting to be punched (part of `dead_bytes`;
    /// see `docs/admin.md`, host space).
    pub reclaim_pending_bytes: u64,
    /// Where the log's current run started.
    pub log_run_start: u64,
    /// Where it must end, when it is in a hole of the file (None: it grows
    /// at the end of the file).
    pub log_run_limit: Option<u64>,
    /// Moves of the log into holes of the file in this session.
    pub log_moves: u64,
    /// Bytes of dead records those moves overwrote (held for the log
    /// instead of punched) in this session.
    pub log_recycled_bytes: u64,
    /// Bytes of records stored elsewhere to empty mostly dead ranges of
    /// the file for the log, in this session (`engine::evacuate`).
    pub evacuated_bytes: u64,
    /// Such ranges emptied in this session.
    pub evacuated_ranges: u64,
    /// Checkpoint generation.
    pub generation: u64,
    /// True if the image was closed cleanly before this open.
    pub clean: bool,
    /// Opened read-only.
    pub read_only: bool,
    /// Buffer cache budget: the block cache plus what the engine's threads
    /// hold outside it (write-back staging, readahead).
    pub cache_bytes: u64,
    /// Buffer cache bytes in use.
    pub cache_used_bytes: u64,
    /// Cache lookups served from memory.
    pub cache_hits: u64,
    /// Cache lookups that read the file.
    pub cache_misses: u64,
    /// Bytes written but not yet persisted.
    pub dirty_bytes: u64,
    /// Set once a host error latched the image into the failed state.
    pub failed: Option<String>,
}

/// One block that failed verification.
#[derive(Debug, Clone, Serialize)]
pub struct BadBlock {
    /// Block index.
    pub block: u64,
    /// Guest byte offset of the block.
    pub offset: u64,
    /// What was wrong.
    pub reason: String,
    /// The snapshot whose record it is (None: the head's).
    pub snapshot: Option<String>,
}

/// The result of [`Image::check`](super::Image::check).
#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    /// Blocks whose records were read and verified.
    pub blocks_checked: u64,
    /// Blocks that failed.
    pub bad: Vec<BadBlock>,
    /// Snapshots whose maps were read (their blocks are counted above).
    pub snapshots_checked: u64,
    /// Problems that are not one block's (a snapshot's damaged index).
    pub errors: Vec<String>,
    /// Snapshots whose map could not be read (their errors are in `errors`).
    pub unreadable_snapshots: Vec<String>,
    /// Map records with one damaged copy (the other serves: nothing lost).
    pub damaged_copies: Vec<String>,
    /// Map records of the head a read-write check wrote anew because a copy
    /// was damaged.
    pub repaired: Vec<String>,
    /// Map records without a second copy (written before vbdfs wrote
    /// copies; `vbdfs compact` writes the head's anew).
    pub single_copy_records: u64,
}

impl CheckReport {
    /// True if nothing was wrong.
    pub fn is_ok(&self) -> bool {
        self.bad.is_empty() && self.errors.is_empty() && self.damaged_copies.is_empty()
    }

    /// Notes that snapshot `name`'s map could not be read.
    pub(super) fn unreadable(&mut self, name: &str, err: &crate::Error) {
        self.errors.push(format!("snapshot '{name}': {err}"));
        self.unreadable_snapshots.push(name.to_string());
    }
}

impl Inner {
    pub(super) fn stats(&self) -> ImageStats {
        let (allocated, stored, metadata) = {
            let map = self.map.read();
            let leaves: u64 = map.ptrs.values().map(|p| u64::from(p.len)).sum();
            (
                map.data_blocks * self.block_size(),
                map.stored_bytes,
                leaves,
            )
        };
        let file_allocated = self.store.allocated().unwrap_or(0);
        let file_bytes = self.store.len().unwrap_or(0);
        let sb = self.sb.lock().clone();
        // Neither live nor dead: the superblocks (and keyslots), and the
        // room allocated ahead of the log for its next appends.
        let header = crate::format::SB_SLOT_SIZE * crate::format::SB_SLOTS
            + if sb.crypto != 0 {
                2 * crate::crypto::KEYSLOT_SIZE
            } else {
                0
            };
        // Never waits for the log lock (held across some appends and
        // punches: `control` must answer while the disk is slow); when it
        // is busy, what the last checkpoint recorded.
        let (ahead, (run_start, run_limit)) = match self.log.try_lock() {
            Some(log) => (log.preallocated_ahead(), log.run_extent()),
            None => (
                0,
                (
                    sb.log_start_off,
                    Some(sb.log_limit).filter(|&l| l != 0).unwrap_or(u64::MAX),
                ),
            ),
        };
        let cache = self.cache.stats();
        ImageStats {
            virtual_size: self.virtual_size(),
            block_size: self.block_size(),
            codec: self.codec.to_string(),
            adapt_floor: self.adapt.as_ref().map(|a| a.floor()),
            faster_blocks: self.adapt.as_ref().map_or(0, |a| a.faster_blocks()),
            uuid: sb.image_uuid.iter().map(|b| format!("{b:02x}")).collect(),
            allocated_bytes: allocated,
            stored_bytes: stored,
            file_bytes,
            file_allocated_bytes: file_allocated,
            metadata_bytes: metadata,
            dead_bytes: file_allocated.saturating_sub(stored + metadata + header + ahead),
            reclaim_pending_bytes: self.dead_space.bytes(),
            log_run_start: run_start,
            log_run_limit: (run_limit != u64::MAX).then_some(run_limit),
            log_moves: self
                .regions
                .moves
                .load(std::sync::atomic::Ordering::Relaxed),
            log_recycled_bytes: self
                .regions
                .recycled
                .load(std::sync::atomic::Ordering::Relaxed),
            evacuated_bytes: self
                .regions
                .evacuation
                .moved
                .load(std::sync::atomic::Ordering::Relaxed),
            evacuated_ranges: self
                .regions
                .evacuation
                .ranges
                .load(std::sync::atomic::Ordering::Relaxed),
            generation: sb.gen,
            clean: self.opened_clean,
            read_only: self.read_only,
            cache_bytes: self.cache_budget,
            cache_used_bytes: cache.used,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            dirty_bytes: cache.dirty,
            failed: self.failed.lock().clone(),
        }
    }

    pub(super) fn check(&self) -> Result<CheckReport> {
        let entries: Vec<_> = self.map.read().data_entries().collect();
        let mut report = CheckReport::default();
        for (block, entry) in entries {
            report.blocks_checked += 1;
            report.bad.extend(self.bad_block(block, entry));
        }
        Ok(report)
    }

    /// What is wrong with the head's `block`, whose map entry was `entry`,
    /// if anything. On a live image the block may have been rewritten since
    /// the entry was taken, and its old record reclaimed (punched) after a
    /// checkpoint: decode_current judges the entry the map holds now. A
    /// lost block is named without a read.
    pub(super) fn bad_block(&self, block: u64, entry: MapEntry) -> Option<BadBlock> {
        let reason = if entry == super::map::LOST {
            format!(
                "its map leaf {} could not be read in either copy",
                block / LEAF_ENTRIES
            )
        } else {
            self.decode_current(block, entry).err()?.to_string()
        };
        Some(BadBlock {
            block,
            offset: block << self.block_shift,
            reason,
            snapshot: None,
        })
    }

    fn is_data(&self, block: u64) -> bool {
        // The cache first: write-back maps a block before the cache lets go
        // of it, so a block written back in between is found in the map.
        if self.cache.is_unwritten(block) {
            return true;
        }
        let kind = self.map.read().get(block).kind;
        kind == EntryKind::Data || (kind == EntryKind::Unmapped && self.base_has_data(block))
    }

    pub(super) fn next_data(&self, off: u64) -> Option<u64> {
        if off >= self.virtual_size() {
            return None;
        }
        let first = off >> self.block_shift;
        // Changes not yet written back are only in the cache; written blocks
        // are in the map. The cache first (see `is_data`).
        let cached = self.cache.first_unwritten(first);
        let (mapped, backed) = {
            let map = self.map.read();
            (map.next_mapped(first), self.next_backed(first, &map))
        };
        let mapped = match (mapped, backed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let block = match (mapped, cached) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some((block << self.block_shift).max(off))
    }

    pub(super) fn next_hole(&self, off: u64) -> u64 {
        let mut block = off >> self.block_shift;
        let nblocks = self.nblocks();
        while block < nblocks && self.is_data(block) {
            block += 1;
        }
        (block << self.block_shift).clamp(off, self.virtual_size())
    }
}
