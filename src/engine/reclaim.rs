//! Space reclaim: returning the host space of dead records (hole punching).
//!
//! Records are never overwritten, so an overwrite or discard leaves the old
//! record dead in the log. Two mechanisms give its space back to the host file
//! system, both by punching holes (`FALLOC_FL_PUNCH_HOLE`), never by moving
//! data, so a crash at any point loses nothing:
//!
//! - **After every checkpoint** ([`Inner::punch_dead`]): the records that the
//!   head stopped referencing before the checkpoint's log start are dead in the
//!   durable state too. Data records born after the newest snapshot belong to
//!   no snapshot; leaf and index records are checked against every snapshot's
//!   index. Their ranges join the held dead space ([`super::deadspace`]: it
//!   decides when), whose whole 4 KiB pages the `vbd-reclaim` thread punches.
//! - **Compaction** ([`Image::compact`], `echo compact > control`, `vbdfs
//!   compact`): after a checkpoint, every record referenced by the committed
//!   head map, by any snapshot or by the superblock, and everything after the
//!   committed log start, is live; every whole page between live records is
//!   punched. This also frees what the others missed.
//! - **After a snapshot is deleted** ([`super::dropsnap`]): the records only
//!   it held, judged leaf by leaf in the background.
//!
//! Liveness is always judged against the **durable** state (the committed
//! maps), never the in-memory map: a record that the in-memory map has
//! superseded may still be the last flushed value after a crash.

use super::copies::{self, second_end};
use super::map::{BlockMap, Dead};
use super::mapload::{load_map, read_index};
use super::{Image, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    align_up, RecPtr, RecordHeader, RecordKind, LOG_START, LOG_UNIT, RECORD_ALIGN,
    RECORD_HEADER_LEN,
};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;

/// Most bytes one `fallocate(PUNCH_HOLE)` frees. ext4 holds the inode lock
/// and drains every O_DIRECT write for the whole call, ~0.4 ms per MiB freed
/// here: a checkpoint's 256 MiB run in one call stalled the log's writers
/// for ~120 ms (sustained 1 MiB writes), in 16 MiB pieces for at most ~8 ms
/// each.
const PUNCH_PIECE: u64 = 16 << 20;

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CompactReport {
    /// Bytes of the log referenced by live records.
    pub live_bytes: u64,
    /// Host bytes allocated to the image file before.
    pub file_allocated_before: u64,
    /// Host bytes allocated to the image file after.
    pub file_allocated_after: u64,
}

use super::deadspace::{DeadSpace, Span, HARD_LIMIT, PAGE, SOFT_LIMIT};

/// Runs punched in one go while the log's appends wait
/// ([`Inner::punch_batch_over`]).
const PUNCH_BATCH: usize = 32;
/// How long the log's appends wait for one batch of punches, and then get
/// before the next. Measured (4 KiB random overwrites of 2 GiB, then
/// sequential writes, uncompressed): untimed batches of 32 took the random
/// writes' p99 to 56 ms and left 136 ms gaps in the sequential writes;
/// 4 ms + 4 ms: p99 25-29 ms, gaps ~70-120 ms, for more dead space held
/// (3.3-3.7 GiB instead of 1.3 GiB beyond the data, within the hard limit).
const PAUSE: Duration = Duration::from_millis(4);
use std::time::Duration;

/// How often the reclaim thread looks for dead space that is due.
const RECLAIM_TICK: Duration = Duration::from_millis(250);

fn span(off: u64, len: u32) -> Span {
    (off, align_up(off + u64::from(len), RECORD_ALIGN))
}

/// The bytes a dead record frees: its span, and the zeros that end its
/// append when it was the append's last record.
fn dead_span(d: &Dead) -> Span {
    let end = d.off + u64::from(d.len);
    (
        d.off,
        align_up(
            end,
            if d.ends_append {
                LOG_UNIT
            } else {
                RECORD_ALIGN
            },
        ),
    )
}

/// Bytes the sorted `spans` cover (overlaps counted once).
fn live_total(spans: &[Span]) -> u64 {
    let (mut total, mut cursor) = (0, 0);
    for &(a, b) in spans {
        if b > cursor {
            total += b - a.max(cursor);
            cursor = b;
        }
    }
    total
}

/// True if `span` lies outside the replay `window` (log start to the run's
/// limit): a record in it may be needed by roll-forward after a crash.
fn outside(span: Span, (start, limit): Span) -> bool {
    span.1 <= start || span.0 >= limit
}

impl Inner {
    /// After a clean close: gives back the log's preallocated space past its
    /// tail (the next run would start past it): cuts the file there, or,
    /// when the run is in a hole of the file, punches everything past the
    /// tail to the run's limit (the dead records the run did not overwrite
    /// too); then cuts the holes that end the file. Failure only costs
    /// space.
    pub(super) fn trim_preallocated(&self) {
        let mut log = self.log.lock();
        let limit = log.run_extent().1;
        let result = if limit == u64::MAX {
            match self.file_len() {
                Ok(len) if len > log.off => self.store.set_len(log.off),
                _ => Ok(()),
            }
        } else {
            let (tail, _) = log.release_preallocated();
            match limit > tail {
                true => self.store.punch_hole(tail, limit - tail),
                false => Ok(()),
            }
        };
        if let Err(e) = result {
            ::log::warn!("trimming the preallocated log failed: {e}");
        }
        self.cut_trailing_holes(&log);
    }

    /// Cuts the holes that end the file (the log moved away from there),
    /// never below the log's tail or what the superblock replays; `log` is
    /// the log, locked (no append meanwhile).
    pub(super) fn cut_trailing_holes(&self, log: &super::log::LogTail) {
        let floor = align_up(log.off.max(self.sb.lock().log_start_off), LOG_UNIT);
        if let Some(start) = super::regions::trailing_hole(self.store.as_ref(), floor) {
            let cut = align_up(start.max(floor), LOG_UNIT);
            if self.file_len().is_ok_and(|len| len > cut) {
                if let Err(e) = self.store.set_len(cut) {
                    ::log::warn!("cutting the holes at the end of the file failed: {e}");
                }
            }
        }
    }

    /// Leaf and index records referenced by some snapshot. Only the INDEX
    /// records are read (not the leaves), and the set is kept until the
    /// snapshot table changes: checkpoints must not cost O(snapshots).
    pub(super) fn snapshot_meta(&self) -> Result<Arc<HashSet<u64>>> {
        let table = self.snaps.table_ptr();
        if let Some(meta) = self.snaps.cached_meta(table) {
            return Ok(meta);
        }
        let mut out = HashSet::new();
        let file_len = self.file_len()?;
        for snap in self.snapshot_entries() {
            out.insert(snap.index.off);
            let nblocks = self.blocks_of(snap.virtual_size);
            let ptrs = read_index(self.store.as_ref(), snap.index, file_len, nblocks)?;
            out.extend(ptrs.iter().map(|p| p.off));
        }
        let out = Arc::new(out);
        self.snaps.set_cached_meta(table, out.clone());
        Ok(out)
    }

    /// Hands the ranges of `dead` records (dead as of the durable checkpoint
    /// whose replay `window` is given: its log start and its run's limit)
    /// to the held dead space, merged into runs.
    pub(super) fn punch_dead(&self, dead: Vec<Dead>, window: Span) {
        if dead.is_empty() || self.read_only {
            return;
        }
        let newest = self.snapshot_entries().iter().map(|s| s.gen).max();
        let (data, maps): (Vec<Dead>, Vec<Dead>) =
            dead.into_iter().partition(|d| d.birth.is_some());
        self.punch_dead_data(data, window, newest);
        self.punch_dead_maps(maps, window);
    }

    /// The DATA records of `dead`, which died before a checkpoint whose log
    /// starts at `start`, while `newest` was the newest snapshot's
    /// generation: those born after it belong to no snapshot and are given
    /// back; the others wait for their snapshot's deletion ([`super::dropsnap`]
    /// finds them in its map). `newest` must be the one at their death, not
    /// a later one: a snapshot taken after a record died does not hold it,
    /// and its deletion would never find it.
    pub(super) fn punch_dead_data(&self, mut dead: Vec<Dead>, window: Span, newest: Option<u64>) {
        if dead.is_empty() || self.read_only {
            return;
        }
        dead.retain(|d| {
            outside(dead_span(d), window)
                && d.birth
                    .is_some_and(|b| newest.is_none_or(|g| u64::from(b) > g))
                && self.holds_its_block(d)
        });
        self.hold_dead(dead);
    }

    /// The map records (leaves, indexes, snapshot tables) of `dead`: given
    /// back unless some snapshot's index still names them.
    fn punch_dead_maps(&self, mut dead: Vec<Dead>, window: Span) {
        if dead.is_empty() {
            return;
        }
        let meta = if self.snapshot_entries().is_empty() {
            Arc::default()
        } else {
            match self.snapshot_meta() {
                Ok(meta) => meta,
                Err(e) => {
                    ::log::warn!("space reclaim skipped: {e}");
                    return;
                }
            }
        };
        // A map record's second copy dies with it (one span: the zeros
        // between them and after the copy are dead too).
        for d in dead.iter_mut() {
            if let Some(end) = second_end(self.store.as_ref(), d.off, d.len) {
                if let Ok(len) = u32::try_from(end - d.off) {
                    d.len = len;
                    d.ends_append = true;
                }
            }
        }
        dead.retain(|d| outside(dead_span(d), window) && !meta.contains(&d.off));
        self.hold_dead(dead);
    }

    /// Adds the ranges of `dead` records to the held dead space, merged into
    /// runs (across the zeros that end an append).
    pub(super) fn hold_dead(&self, dead: Vec<Dead>) {
        let mut spans: Vec<Span> = dead.iter().map(dead_span).collect();
        spans.sort_unstable();
        let mut runs: Vec<Span> = Vec::new();
        for s in spans {
            match runs.last_mut() {
                Some((_, b)) if s.0 <= *b || self.only_padding(*b, s.0) => *b = (*b).max(s.1),
                _ => runs.push(s),
            }
        }
        self.dead_space.add(runs);
    }

    /// The `vbd-reclaim` thread: punches the held dead space as it falls due
    /// ([`super::deadspace`]) until told to stop.
    pub(super) fn reclaimer(&self) {
        loop {
            match self.stop_rx.recv_timeout(RECLAIM_TICK) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            self.between_punches();
            if self.regions.take_compaction_due() {
                match self.compact() {
                    Ok(r) => ::log::info!(
                        "compacted for the log's moves: host space {} -> {} bytes",
                        r.file_allocated_before,
                        r.file_allocated_after
                    ),
                    Err(e) => ::log::warn!("compaction for the log's moves failed: {e}"),
                }
            }
            // Long runs on their own (each 16 MiB piece holds appends up
            // only while it is punched), then short runs beyond the soft
            // limit in batches (fastest), then whatever else is due.
            while self.punch_one(DeadSpace::next_due_long) {
                self.between_punches();
            }
            while self.punch_batch_over(SOFT_LIMIT) && self.stop_rx.is_empty() {
                // The appends' turn: a pause as long as the batch's at the
                // soft limit, none at the hard limit.
                let over = self.dead_space.bytes().saturating_sub(SOFT_LIMIT);
                let room = 1.0 - over as f64 / (HARD_LIMIT - SOFT_LIMIT) as f64;
                std::thread::sleep(PAUSE.mul_f64(room.clamp(0.0, 1.0)));
                self.between_punches();
            }
            // A stop is received at the top of the loop.
            while self.stop_rx.is_empty() && self.punch_one(DeadSpace::next_due) {
                self.between_punches();
            }
        }
    }

    /// What the reclaim thread does between punches too (under a steady
    /// load the punching never ends): judging deleted snapshots, whose
    /// space must join the held dead space (and its brake on writes), not
    /// pile up unseen; a step of evacuation, which makes the holes the log
    /// needs ([`super::evacuate`]).
    fn between_punches(&self) {
        self.reclaim_deleted_snapshots_slice();
        self.evacuate_step();
    }

    /// Takes one run with `take` and punches it; false if none was due.
    fn punch_one(&self, take: fn(&DeadSpace) -> Option<Span>) -> bool {
        let _punching = self.dead_space.punching.lock();
        let _no_move = self.regions.reuse.read();
        match take(&self.dead_space) {
            Some(run) => {
                self.punch_run(run);
                true
            }
            None => false,
        }
    }

    /// Punches all the held dead space now, and waits for runs the reclaim
    /// thread has taken to be punched.
    pub(super) fn punch_held(&self) {
        let _punching = self.dead_space.punching.lock();
        let _no_move = self.regions.reuse.read();
        while let Some(run) = self.dead_space.take_longest_over(0) {
            self.punch_run(run);
        }
    }

    /// Write-back's brake: while more than [`HARD_LIMIT`] dead bytes are held,
    /// punches the longest runs itself before appending more (without
    /// holding appends off: several workers may brake at once).
    pub(super) fn punch_over_hard_limit(&self) {
        let _no_move = self.regions.reuse.read();
        while let Some(run) = self.dead_space.take_longest_over(HARD_LIMIT) {
            self.punch_run(run);
        }
    }

    /// Punches the longest short runs while more than `limit` dead bytes are
    /// held, with the log's appends held off for up to [`PAUSE`] (at most
    /// [`PUNCH_BATCH`] runs): the first punch waits for the O_DIRECT writes
    /// in flight, the others find none (~0.1 ms each instead of 1–2 ms).
    /// False if nothing was due (appends were not held off).
    fn punch_batch_over(&self, limit: u64) -> bool {
        let _punching = self.dead_space.punching.lock();
        let _no_move = self.regions.reuse.read();
        let Some(first) = self.dead_space.take_short_over(limit) else {
            return false;
        };
        let _appends = self.log.lock();
        let t = std::time::Instant::now();
        self.punch_run(first);
        for _ in 1..PUNCH_BATCH {
            if t.elapsed() >= PAUSE {
                break;
            }
            match self.dead_space.take_short_over(limit) {
                Some(run) => self.punch_run(run),
                None => break,
            }
        }
        true
    }

    /// Punches a held dead run's whole pages and keeps its edges.
    fn punch_run(&self, run: Span) {
        self.punch_interior(run);
        self.dead_space.punched(run);
    }

    /// True unless `d`, a dead DATA entry loaded from the image (born before
    /// this session), names a record that is not the block's: a damaged or
    /// hostile map can name one record for two blocks, and punching it for
    /// one would destroy the other. Entries this session made name the
    /// records it wrote for them. Encrypted images keep key and birth inside
    /// the sealed payload, and their maps cannot be forged without the key:
    /// they are not checked.
    pub(super) fn holds_its_block(&self, d: &Dead) -> bool {
        if d.birth.is_some_and(|b| u64::from(b) >= self.first_gen) || self.store.sealer().is_some()
        {
            return true;
        }
        let mut head = [0u8; RECORD_HEADER_LEN];
        if self.store.read_at(&mut head, d.off).is_err() {
            return false;
        }
        RecordHeader::decode(&head, d.off).is_ok_and(|h| {
            h.kind == RecordKind::Data
                && h.key == d.block
                && Some(h.birth) == d.birth.map(u64::from)
                && h.total_len() == u64::from(d.len)
        })
    }

    /// True if `[from, to)` holds no record, only the zeros that end an
    /// append (format.md §4, log units): `to` is at most the next unit
    /// boundary and no record starts at `from` (records of one append lie
    /// back to back, so none starts later in the unit either). Dead runs are
    /// then punched across it: one punch per run instead of one per append
    /// (each punch waits for every O_DIRECT write in flight).
    fn only_padding(&self, from: u64, to: u64) -> bool {
        if from.is_multiple_of(LOG_UNIT) || to > align_up(from, LOG_UNIT) {
            return false;
        }
        let mut magic = [0u8; 4];
        self.store.read_at(&mut magic, from).is_ok() && magic == [0; 4]
    }

    /// Punches the whole pages inside `[start, end)`.
    pub(super) fn punch_interior(&self, (start, end): Span) {
        let (mut a, b) = (align_up(start, PAGE), end & !(PAGE - 1));
        while a < b {
            let n = (b - a).min(PUNCH_PIECE);
            match self.store.punch_hole(a, n) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        ::log::warn!(
                            "the host file system cannot punch holes: space of overwritten \
                             data and deleted snapshots is not given back"
                        )
                    });
                    return;
                }
                Err(e) => ::log::warn!("punching {a}+{n} failed (space not reclaimed): {e}"),
            }
            a += n;
        }
    }

    /// Every byte range below the committed log start that a live record uses.
    fn live_spans(
        &self,
        committed_index: RecPtr,
        committed_size: u64,
        sb_ptrs: &[RecPtr],
    ) -> Result<Vec<Span>> {
        let file_len = self.file_len()?;
        let mut spans = Vec::new();
        let store = self.store.as_ref();
        // A map record and its second copy, if it has one.
        let add_meta = |off: u64, len: u32, spans: &mut Vec<Span>| {
            spans.push(span(off, len));
            if let Some(end) = second_end(store, off, len) {
                spans.push((copies::second_off(off, len), align_up(end, RECORD_ALIGN)));
            }
        };
        let add_map = |map: &BlockMap, index: RecPtr, spans: &mut Vec<Span>| {
            if index.off != 0 {
                add_meta(index.off, index.len, spans);
            }
            for p in map.ptrs.values() {
                add_meta(p.off, p.len, spans);
            }
            spans.extend(map.data_entries().map(|(_, e)| span(e.off, e.len)));
        };
        let head = load_map(
            self.store.as_ref(),
            committed_index,
            self.block_shift,
            file_len,
            self.blocks_of(committed_size),
        )?;
        add_map(&head, committed_index, &mut spans);
        for snap in self.snapshot_entries() {
            let map = load_map(
                self.store.as_ref(),
                snap.index,
                self.block_shift,
                file_len,
                self.blocks_of(snap.virtual_size),
            )?;
            add_map(&map, snap.index, &mut spans);
        }
        for p in sb_ptrs.iter().filter(|p| p.off != 0) {
            add_meta(p.off, p.len, &mut spans);
        }
        spans.sort_unstable();
        Ok(spans)
    }

    pub(super) fn compact(&self) -> Result<CompactReport> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "image is open read-only"));
        }
        {
            // No move into a hole while it rewrites map records (appends
            // outside a checkpoint's bound: they make room first).
            let _paused = self.pause_moves();
            self.checkpoint_rewriting(self.missing_copies())?;
            self.copy_snapshot_maps()?;
        }
        // Held while judging: no checkpoint or snapshot change can move the
        // committed state underneath. Not while punching (seconds on a
        // fragmented file): what is written meanwhile lies in the replay
        // window judged, past the file's end as judged, or in a hole a
        // move took since (left out: `punch_judged`); nothing else writes.
        let before = self.store.allocated().unwrap_or(0);
        let (gaps, live_bytes, seen) = {
            let _one = self.checkpoint_lock.lock();
            let sb = self.sb.lock().clone();
            let mut spans =
                self.live_spans(sb.index, sb.virtual_size, &[sb.snap_table, sb.config])?;
            // The replay window (rule 4): the log start to the run's limit.
            let window = (
                sb.log_start_off,
                Some(sb.log_limit).filter(|&l| l != 0).unwrap_or(u64::MAX),
            );
            let live_bytes = live_total(&spans);
            spans.push(window);
            spans.sort_unstable();
            let file_len = self.file_len()?;
            let seen = self.claims_seen();
            let mut gaps = Vec::new();
            let mut cursor = LOG_START;
            for (a, b) in spans.into_iter().chain([(file_len, file_len)]) {
                if a > cursor {
                    gaps.push((cursor, a.min(file_len)));
                }
                cursor = cursor.max(b);
                if cursor >= file_len {
                    break;
                }
            }
            // A deleted snapshot queued before ends its judging: its space
            // is in the gaps, and its map records are punched now.
            self.compactions
                .fetch_add(1, std::sync::atomic::Ordering::Release);
            (gaps, live_bytes, seen)
        };
        for gap in gaps {
            if !self.punch_judged(gap, seen) {
                ::log::info!("compaction stopped early: the log moved too often meanwhile");
                break;
            }
        }
        {
            // Under the log lock: no room can be taken in the range while it
            // is punched (every room in flight lies below the tail).
            let mut log = self.log.lock();
            let (tail, allocated) = log.release_preallocated();
            if allocated > tail {
                self.punch_interior((tail, allocated));
            }
        }
        let after = self.store.allocated().unwrap_or(0);
        Ok(CompactReport {
            live_bytes,
            file_allocated_before: before,
            file_allocated_after: after,
        })
    }
}

impl Image {
    /// Returns the host space of every dead record (see the module docs).
    pub fn compact(&self) -> Result<CompactReport> {
        self.inner.compact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_record_of_an_append_frees_the_zeros_after_it() {
        let d = |ends_append| Dead {
            off: 8192 + 100,
            len: 1000,
            birth: Some(1),
            block: 3,
            ends_append,
        };
        assert_eq!(dead_span(&d(false)), (8292, align_up(9292, RECORD_ALIGN)));
        assert_eq!(dead_span(&d(true)), (8292, 3 * LOG_UNIT));
    }
}
