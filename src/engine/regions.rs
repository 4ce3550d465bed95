//! Reusing the file's holes for the log, so that its length stops growing.
//!
//! Records are never overwritten; dead ones are punched out of the file
//! (`reclaim`). A log that only appended at the end of the file would make
//! the file ever longer (ext4 stops at 16 TiB) while its holes pile up
//! below. Instead, a checkpoint can start the next **log run** in a hole of
//! the file (`docs/format.md` §5, "Log runs"): the run is bounded by the
//! hole's end (the superblock's `log_limit`, which also bounds roll-forward
//! and the search for later records of the run), and the next checkpoint
//! that finds too little room left moves the log again — into another hole,
//! or back to the end of the file.
//!
//! What keeps it safe:
//! - The range holds nothing live: it is made of holes (every punched range
//!   was dead in the durable state) and of dead space the reclaim still
//!   holds, outside what the durable superblock replays and what the current
//!   run may still write. The move is a checkpoint with the write-back rooms
//!   drained and held until its superblock is durable, so no record of the
//!   new run can be synced (a flush reported) before the run is the one
//!   replayed.
//! - Nothing punches the range once a run is in it: dead space held there is
//!   forgotten ([`DeadSpace::forget`]) under the `reuse` lock, which every
//!   take-and-punch of held dead space holds for reading; a compaction
//!   punching ranges it judged before leaves out the ranges moves took since
//!   ([`Inner::punch_judged`]).
//! - The run cannot overflow its range: write-back rooms leave room for the
//!   largest checkpoint ([`Inner::checkpoint_room`]); a checkpoint that would
//!   not fit moves the log first; metadata appends outside checkpoints
//!   (compaction, `check --repair`) run with moves into holes paused and make
//!   room first ([`Inner::make_room`]).
//! - Stale records in the hole (a punch a crash undid) carry other epochs.

use super::deadspace::{DeadSpace, BIG_RUN};
use super::map::BlockMap;
use super::Inner;
use crate::crypto::SEAL_OVERHEAD;
use crate::error::Result;
use crate::format::{align_up, LEAF_ENTRIES, LOG_START, LOG_UNIT, RECORD_HEADER_LEN};
use crate::io::Store;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The smallest hole a run moves into, by default (also at least twice
/// the room of a checkpoint and of a write-back batch). A move drains the
/// write-back rooms for the length of a checkpoint: under the heaviest
/// writes, a run this long lasts about as long as the log between two
/// checkpoints ([`super::CHECKPOINT_BYTES`]).
pub(super) const REGION_MIN: u64 = 256 << 20;
/// While the log grows at the end of the file, holes are looked for at
/// most this often (at background checkpoints: every 256 MiB of log under
/// load). A search asks the file system about at most 65,536 holes (well
/// under 100 ms); the log can append hundreds of MB a second (4 KiB random
/// writes into 64 KiB blocks: ~300 MB/s measured).
const SEARCH_EVERY: Duration = Duration::from_secs(2);

/// Where a checkpoint moves the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Move {
    /// Into the hole `[start, end)`.
    Hole(u64, u64),
    /// Past the end of the file, where it may grow.
    End,
}

/// What a checkpoint is asked to do with the log's run (besides moving it
/// when the checkpoint would not fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wish {
    /// Nothing.
    Stay,
    /// What [`Inner::planned_move`] says (the background checkpoints: a
    /// hole is looked for at most every [`SEARCH_EVERY`]).
    Planned,
    /// The same, looking for a hole now.
    Seek,
    /// What [`Inner::planned_move`] says; no checkpoint at all if nowhere
    /// (the background probe while the log grows at the end of the file).
    Probe,
    /// Leave a run in a hole for the end of the file.
    End,
    /// Leave this run (write-back found it full); no checkpoint at all if
    /// the log is in another run already.
    OutOf((u64, u64)),
}

/// Compactions the log's moves start, at most one per this long.
const AUTO_COMPACT_EVERY: Duration = Duration::from_secs(600);

/// The number of the last move into a hole, and the newest moves: their
/// numbers and the ranges they took.
type Claims = (u64, std::collections::VecDeque<(u64, (u64, u64))>);

/// Moves into holes remembered for compactions punching meanwhile.
const CLAIMS_KEPT: usize = 4096;

/// Holes one search looks at, at most (two `lseek` calls each on a file).
const HOLES_LOOKED_AT: usize = 1 << 16;

/// The state of log moves of one open image.
#[derive(Debug)]
pub(super) struct Regions {
    /// The smallest hole a run moves into.
    min: AtomicU64,
    /// Compactions and repairs in progress: no move into a hole.
    paused: AtomicU32,
    /// +1 whenever a pause starts or ends ([`Inner::pause_mark`]).
    pause_changes: AtomicU64,
    /// The longest run a move into a hole takes (the hole's start to its
    /// end by default; shorter while `evacuate_tail` fills the holes low
    /// in the file, so that a run does not keep the file from being cut).
    pub longest_run: AtomicU64,
    last_search: Mutex<Option<Instant>>,
    /// Read by whoever takes held dead space and punches it; written by a
    /// move while it forgets what is held in its hole.
    pub reuse: RwLock<()>,
    /// Moves into holes so far (statistics).
    pub moves: AtomicU64,
    /// Bytes of held dead space the moves took, overwritten by the log
    /// instead of punched (statistics).
    pub recycled: AtomicU64,
    /// A compaction would make holes: the reclaim thread runs one
    /// ([`Regions::take_compaction_due`]).
    compaction_wanted: std::sync::atomic::AtomicBool,
    /// The ranges moves took, numbered (the newest [`CLAIMS_KEPT`]): a
    /// compaction punching ranges it judged before leaves these out.
    claims: Mutex<Claims>,
    last_compaction: Mutex<Option<Instant>>,
    /// Emptying mostly dead ranges of the file ([`super::evacuate`]).
    pub evacuation: super::evacuate::Evacuation,
}

impl Regions {
    /// A compaction is wanted (the reclaim thread runs it; the close does,
    /// if the session ends first).
    pub fn want_compaction(&self) {
        self.compaction_wanted
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The log found no hole big enough: the partly dead pages the
    /// sessions before this one left (their reclaim kept them in memory
    /// only, waiting for their neighbours to die) and the dead space a
    /// crash left split the holes; a compaction returns them. An
    /// evacuation is wanted too: the last live records of mostly dead
    /// ranges keep those from ever joining a hole ([`super::evacuate`]).
    fn short_of_holes(&self) {
        self.compaction_wanted
            .store(true, std::sync::atomic::Ordering::Release);
        self.evacuation.want();
    }

    /// True (once) when a compaction is wanted and none ran in the last
    /// [`AUTO_COMPACT_EVERY`].
    pub fn take_compaction_due(&self) -> bool {
        let mut last = self.last_compaction.lock();
        if last.is_some_and(|t| t.elapsed() < AUTO_COMPACT_EVERY)
            || !self
                .compaction_wanted
                .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

impl Regions {
    /// With `min` as the smallest hole (None: [`REGION_MIN`]).
    pub fn with_min(min: Option<u64>) -> Self {
        Regions {
            min: AtomicU64::new(min.unwrap_or(REGION_MIN).max(LOG_UNIT)),
            paused: AtomicU32::new(0),
            pause_changes: AtomicU64::new(0),
            longest_run: AtomicU64::new(u64::MAX),
            last_search: Mutex::new(None),
            reuse: RwLock::new(()),
            moves: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            compaction_wanted: Default::default(),
            claims: Mutex::new((0, Default::default())),
            last_compaction: Mutex::new(None),
            evacuation: Default::default(),
        }
    }
}

/// Log bytes of one record with a payload of `payload` bytes at most,
/// starting at a unit boundary (as metadata records and their copies do).
pub(super) fn record_bytes(payload: u64) -> u64 {
    align_up(
        RECORD_HEADER_LEN as u64 + payload + u64::from(SEAL_OVERHEAD),
        LOG_UNIT,
    )
}

/// The most log a checkpoint appends when it writes `leaves` leaves, an
/// index of `indexed` leaves and a snapshot table of `snapshots` entries,
/// each with its second copy. (Payloads are stored when zstd does not make
/// them smaller, so these are bounds.)
fn checkpoint_bytes(leaves: u64, indexed: u64, snapshots: u64) -> u64 {
    2 * (leaves * record_bytes(LEAF_ENTRIES * 16)
        + record_bytes(indexed * 24)
        + record_bytes(32 + snapshots * 144))
        + LOG_UNIT
}

impl Inner {
    /// The room a write-back append leaves at the end of a run: the most
    /// log one checkpoint of the disk appends (every leaf dirty, a snapshot
    /// added). Read under the log lock: a checkpoint changes the snapshot
    /// count only after its records are appended.
    pub(super) fn checkpoint_room(&self) -> u64 {
        let leaves = self.nblocks().div_ceil(LEAF_ENTRIES);
        checkpoint_bytes(leaves, leaves, self.snaps.count() as u64 + 1)
    }

    /// The most log a checkpoint of `map` appends now.
    fn checkpoint_need(&self, map: &BlockMap) -> u64 {
        let dirty = map.leaves.values().filter(|l| l.dirty).count() as u64;
        let indexed = map.ptrs.len().max(map.leaves.len()) as u64;
        checkpoint_bytes(dirty, indexed, self.snaps.count() as u64 + 1)
    }

    /// True if a checkpoint starting now fits in the current run: its
    /// records end before the run's limit even if write-back takes all the
    /// room it may meanwhile (it leaves [`Inner::checkpoint_room`]).
    pub(super) fn checkpoint_fits(&self) -> bool {
        let log = self.log.lock();
        let (_, limit) = log.run_extent();
        if limit == u64::MAX {
            return true;
        }
        let need = self.checkpoint_need(&self.map.read());
        need <= self.checkpoint_room() && log.off + need <= limit
    }

    /// Under the checkpoint lock: where the checkpoint moves the log for
    /// `wish` (`Some(None)`: nowhere), or `None` when the checkpoint is not
    /// needed at all.
    pub(super) fn wished_move(&self, wish: Wish) -> Option<Option<Move>> {
        let run = self.log.lock().run_extent();
        Some(
            match wish {
                Wish::Stay => None,
                Wish::Planned => self.planned_move(true),
                Wish::Seek => self.planned_move(false),
                Wish::Probe => match self.planned_move(true) {
                    None if self.checkpoint_fits() => return None,
                    planned => planned,
                },
                Wish::End => (run.1 != u64::MAX).then_some(Move::End),
                Wish::OutOf(full) if full != run => return None,
                Wish::OutOf(_) => Some(self.leaving_move()),
            }
            .or_else(|| (!self.checkpoint_fits()).then(|| self.leaving_move())),
        )
    }

    /// Out of the current run: into the first hole big enough, else to the
    /// end of the file (and a compaction is wanted).
    pub(super) fn leaving_move(&self) -> Move {
        match self.find_region() {
            Some((a, b)) => Move::Hole(a, b),
            None => {
                self.regions.short_of_holes();
                Move::End
            }
        }
    }

    /// Where a checkpoint should move the log, if anywhere: out of a run
    /// with less than two checkpoints' room left, into the first hole big enough, else to the end of the file;
    /// from the end of the file into a hole when one has appeared.
    pub(super) fn planned_move(&self, rate_limited: bool) -> Option<Move> {
        let room = self.checkpoint_room();
        let ((_, limit), tail) = {
            let log = self.log.lock();
            (log.run_extent(), log.off)
        };
        let must = limit != u64::MAX && tail.saturating_add(2 * room) > limit;
        if must {
            return Some(self.leaving_move());
        }
        {
            let mut last = self.regions.last_search.lock();
            // Dead space held for the log is looked at in memory: a run
            // of it long enough is taken at once.
            let waited = last.is_none_or(|t| t.elapsed() >= SEARCH_EVERY)
                || self.dead_space.longest_run() >= self.smallest_region();
            if limit != u64::MAX
                || self.regions.paused.load(Ordering::Acquire) > 0
                || (rate_limited && !waited)
            {
                return None;
            }
            *last = Some(Instant::now());
        }
        let found = self.find_region().map(|(a, b)| Move::Hole(a, b));
        if found.is_none() && self.mostly_holes() {
            self.regions.short_of_holes();
        }
        found
    }

    /// True if the file is more than twice as long as the host space it
    /// takes (and that is more than [`REGION_MIN`]): its holes could hold
    /// the log, were they not split.
    fn mostly_holes(&self) -> bool {
        let (Ok(len), Some(allocated)) = (self.store.len(), self.store.allocated()) else {
            return false;
        };
        len > 2 * allocated && len - allocated > self.regions.min.load(Ordering::Relaxed)
    }

    /// The first hole of the file long enough for a run ([`Regions::min`],
    /// and two checkpoints' and write-back batches' room), unit-aligned,
    /// outside what the durable superblock replays (from its log start to
    /// its run's limit, or the end of the file: the records since the last
    /// checkpoint and the run's preallocated range) and outside what the
    /// current run may still write. None while moves are paused.
    pub(super) fn find_region(&self) -> Option<(u64, u64)> {
        let in_use = self.log_in_use()?;
        let min = self.smallest_region();
        let search = |from: u64| {
            let mut found = None;
            for (a, b) in outside((from, u64::MAX), &in_use) {
                match dead_range(self.store.as_ref(), &self.dead_space, (a, b), min) {
                    Ok(Some(range)) => {
                        found = Some(range);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        ::log::warn!("looking for holes to reuse failed: {e}");
                        break;
                    }
                }
            }
            found
        };
        let found = search(LOG_START)?;
        // The last hole big enough: a compaction now, while the log has it,
        // joins more before the log must go back to the end of the file.
        // The last but one: an evacuation makes more (it takes a
        // checkpoint or two before its range is dead).
        match search(found.1) {
            None => self.regions.short_of_holes(),
            Some(next) if search(next.1).is_none() => self.regions.evacuation.want(),
            Some(_) => {}
        }
        let longest = self.regions.longest_run.load(Ordering::Relaxed) & !(LOG_UNIT - 1);
        Some((found.0, found.1.min(found.0.saturating_add(longest))))
    }

    /// What the log may still need, as two ranges of the file: what the
    /// durable superblock replays (its log start to its run's limit, or the
    /// end of the file), and where the current run may still write (from
    /// its oldest room in flight: at an open, before the first checkpoint,
    /// the two differ). None while moves are paused.
    pub(super) fn log_in_use(&self) -> Option<[(u64, u64); 2]> {
        let replayed = {
            let sb = self.sb.lock();
            let end = Some(sb.log_limit).filter(|&l| l != 0);
            (sb.log_start_off, end.unwrap_or(u64::MAX))
        };
        let running = {
            let log = self.log.lock();
            (log.replay_start().0, log.run_extent().1)
        };
        (self.regions.paused.load(Ordering::Acquire) == 0).then_some([replayed, running])
    }

    /// The smallest hole a run moves into: [`Regions::min`], and room for
    /// two checkpoints and two write-back batches (a batch must fit with
    /// room to spare, or the run would be left at once).
    pub(super) fn smallest_region(&self) -> u64 {
        let batch = super::log::batch_staging_bytes(self.block_size()) as u64;
        self.regions
            .min
            .load(Ordering::Relaxed)
            .max(2 * self.checkpoint_room() + 2 * batch)
    }

    /// Forgets the dead space held in `[start, end)` (the log moves into
    /// it: what is held there is overwritten, or was punched already by a
    /// compaction) with no punch of held dead space in progress. The caller holds the
    /// checkpoint lock (compaction cannot punch meanwhile).
    pub(super) fn claim_region(&self, (start, end): (u64, u64), dead: &DeadSpace) {
        let _no_punch = self.regions.reuse.write();
        let recycled = dead.forget((start, end));
        self.regions.recycled.fetch_add(recycled, Ordering::Relaxed);
        let mut claims = self.regions.claims.lock();
        claims.0 += 1;
        let seq = claims.0;
        claims.1.push_back((seq, (start, end)));
        if claims.1.len() > CLAIMS_KEPT {
            claims.1.pop_front();
        }
    }

    /// The number of the last move into a hole (see [`Inner::punch_judged`]).
    pub(super) fn claims_seen(&self) -> u64 {
        self.regions.claims.lock().0
    }

    /// Punches the whole pages of `gap`, judged dead when moves up to
    /// `seen` had been made, leaving out the ranges moves took since
    /// (with no move in progress); forgets what the reclaim held there.
    /// False if too many moves were made since to know.
    pub(super) fn punch_judged(&self, gap: (u64, u64), seen: u64) -> bool {
        let _no_move = self.regions.reuse.read();
        let taken: Vec<(u64, u64)> = {
            let claims = self.regions.claims.lock();
            if claims.0 > seen && claims.1.front().is_none_or(|(s, _)| *s > seen + 1) {
                return false;
            }
            claims
                .1
                .iter()
                .filter(|(s, _)| *s > seen)
                .map(|(_, r)| *r)
                .collect()
        };
        for part in outside(gap, &taken) {
            self.punch_interior(part);
            // What was held there is punched now, but for the partly dead
            // pages at the two ends: kept (crumbs), they join the
            // neighbours' ranges when those die (forgotten, each such page
            // stayed allocated for good and split the holes the log needs).
            self.dead_space.forget(part);
            self.dead_space.punched(part);
        }
        true
    }

    /// While the returned guard lives, the log does not move into holes:
    /// for metadata appends outside checkpoints, whose size is unbounded
    /// (compaction and repair rewrite snapshot maps); they make room first
    /// ([`Inner::make_room`]).
    pub(super) fn pause_moves(&self) -> MovesPaused<'_> {
        self.regions.paused.fetch_add(1, Ordering::AcqRel);
        self.regions.pause_changes.fetch_add(1, Ordering::AcqRel);
        MovesPaused(self)
    }

    /// A mark to tell, with [`Inner::paused_since`], whether moves were
    /// paused at any moment from now on (None: they are paused now). A
    /// search that found no hole then says nothing about the file.
    pub(super) fn pause_mark(&self) -> Option<u64> {
        let mark = self.regions.pause_changes.load(Ordering::Acquire);
        (self.regions.paused.load(Ordering::Acquire) == 0).then_some(mark)
    }

    /// True if moves were paused at some moment since `mark` was taken.
    pub(super) fn paused_since(&self, mark: Option<u64>) -> bool {
        mark.is_none_or(|m| self.regions.pause_changes.load(Ordering::Acquire) != m)
    }

    /// Before an append of up to `bytes` outside a checkpoint: moves the
    /// log to the end of the file if the run in a hole has not room for it
    /// and a checkpoint after it.
    pub(super) fn make_room(&self, bytes: u64) -> Result<()> {
        let fits = {
            let log = self.log.lock();
            let (_, limit) = log.run_extent();
            log.off
                .saturating_add(bytes)
                .saturating_add(self.checkpoint_room())
                <= limit
        };
        match fits {
            true => Ok(()),
            false => self.commit_moving(false, None, Wish::End),
        }
    }

    /// Sets the smallest hole the log moves into ([`REGION_MIN`] by default).
    pub(super) fn set_region_min(&self, bytes: u64) {
        self.regions
            .min
            .store(bytes.max(LOG_UNIT), Ordering::Relaxed);
        *self.regions.last_search.lock() = None;
    }
}

/// The first range of `[from, to)` at least `min` long (unit-aligned)
/// that holds only holes and dead space the reclaim still holds: the long
/// dead runs it keeps for the log ([`super::deadspace::KEEP_FOR_LOG`]),
/// and, between those and holes, runs of records too short to punch on
/// their own, which wait for a long time under a steady load (1 GiB of
/// them measured, the holes between them ~2 MB). Looks at most at
/// [`HOLES_LOOKED_AT`] holes and long runs (of [`BIG_RUN`], or `min`
/// if less: the short ones, up to ~100k of them, only join those).
fn dead_range(
    store: &dyn Store,
    dead: &DeadSpace,
    (from, to): (u64, u64),
    min: u64,
) -> std::io::Result<Option<(u64, u64)>> {
    // The range unit-aligned, if it is long enough.
    let fit = |(a, b): (u64, u64)| {
        let (a, b) = (align_up(a, LOG_UNIT), b & !(LOG_UNIT - 1));
        (b > a && b - a >= min).then_some((a, b))
    };
    let mut at = from;
    let mut range: Option<(u64, u64)> = None;
    // The next hole and long held run found (None inside: no more), asked
    // for again once passed.
    type Next = Option<Option<(u64, u64)>>;
    let (mut hole, mut held): (Next, Next) = (None, None);
    let passed = |next: &Next, at: u64| match next {
        None => true,
        Some(None) => false,
        Some(Some((_, end))) => *end <= at,
    };
    let clip = |next: Next, at: u64| next.flatten().map(|(start, end)| (start.max(at), end));
    for _ in 0..HOLES_LOOKED_AT {
        if passed(&hole, at) {
            hole = Some(store.find_hole(at, to, 1)?);
        }
        if passed(&held, at) {
            held = Some(dead.first_long_run_in((at, to), BIG_RUN.min(min)));
        }
        // The nearer of the two (a part of the other one that overlaps it
        // is found again from its end, touching it).
        let (s0, s1) = match (clip(hole, at), clip(held, at)) {
            (None, None) => break,
            (Some(h), None) | (None, Some(h)) => h,
            (Some(h), Some(r)) => h.min(r),
        };
        range = match range {
            Some((a, b)) if s0 <= b || dead.covers((b, s0)) => Some((a, b.max(s1))),
            // Live bytes end the range: the first long enough is taken
            // whole (the longer the run, the fewer moves).
            Some(done) if fit(done).is_some() => return Ok(fit(done)),
            _ => Some((s0, s1)),
        };
        at = s1.max(at + 1);
    }
    Ok(range.and_then(fit))
}

/// The parts of `[from, to)` that are not holes of `store`, in order (the
/// rest whole after [`HOLES_LOOKED_AT`] holes).
pub(super) fn data_in(store: &dyn Store, (from, to): (u64, u64)) -> Vec<(u64, u64)> {
    let (mut out, mut at) = (Vec::new(), from);
    for _ in 0..HOLES_LOOKED_AT {
        match store.find_hole(at, to, 1) {
            Ok(Some((h0, h1))) => {
                if h0 > at {
                    out.push((at, h0));
                }
                at = h1;
            }
            Ok(None) | Err(_) => break,
        }
        if at >= to {
            return out;
        }
    }
    if at < to {
        out.push((at, to));
    }
    out
}

/// The parts of `range` outside every one of `taken`, in order.
pub(super) fn outside(range: (u64, u64), taken: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut parts = vec![range];
    for &(a, b) in taken {
        parts = parts
            .into_iter()
            .flat_map(|(s, e)| [(s, e.min(a)), (s.max(b), e)])
            .filter(|(s, e)| s < e)
            .collect();
    }
    parts.sort_unstable();
    parts
}

/// Where the hole that ends the file starts, if one does and starts at or
/// after `from` (at most [`HOLES_LOOKED_AT`] holes looked at).
pub(super) fn trailing_hole(store: &dyn Store, from: u64) -> Option<u64> {
    let len = store.len().ok()?;
    let mut at = from;
    for _ in 0..HOLES_LOOKED_AT {
        let (start, end) = store.find_hole(at, u64::MAX, 1).ok()??;
        if end >= len {
            return Some(start);
        }
        at = end;
    }
    None
}

impl super::Image {
    /// Sets the smallest hole of the image file the log moves into
    /// (default [`REGION_MIN`]; at least twice the log a checkpoint of the
    /// disk may append and two write-back batches, in any case). For tests
    /// and tuning.
    pub fn set_log_region_min(&self, bytes: u64) {
        self.inner.set_region_min(bytes);
    }

    /// Where the log's current run started, and where it must end (`None`:
    /// it grows at the end of the file).
    pub fn log_run(&self) -> (u64, Option<u64>) {
        let (start, limit) = self.inner.log.lock().run_extent();
        (start, (limit != u64::MAX).then_some(limit))
    }

    /// How many times the log moved into a hole of the file in this session.
    pub fn log_moves(&self) -> u64 {
        self.inner.regions.moves.load(Ordering::Relaxed)
    }

    /// Bytes of dead records the log's moves overwrote in this session
    /// (held for it, never punched: `deadspace::KEEP_FOR_LOG`).
    pub fn log_recycled(&self) -> u64 {
        self.inner.regions.recycled.load(Ordering::Relaxed)
    }
}

/// See [`Inner::pause_moves`].
pub(super) struct MovesPaused<'a>(&'a Inner);

impl Drop for MovesPaused<'_> {
    fn drop(&mut self) {
        self.0.regions.paused.fetch_sub(1, Ordering::AcqRel);
        self.0.regions.pause_changes.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStore;

    #[test]
    fn searched_ranges_leave_out_the_replay_window_and_the_run() {
        let max = u64::MAX;
        assert_eq!(
            outside((10, max), &[(50, 60), (100, max)]),
            vec![(10, 50), (60, 100)]
        );
        assert_eq!(outside((10, max), &[(50, max), (30, 70)]), vec![(10, 30)]);
        assert_eq!(
            outside((10, max), &[(50, 60), (55, 80)]),
            vec![(10, 50), (80, max)]
        );
        assert!(outside((10, 20), &[(0, max)]).is_empty());
    }

    #[test]
    fn a_region_joins_holes_across_held_dead_space_only() {
        let store = MemStore::new();
        store.write_at(&vec![1u8; 64 << 10], 0).unwrap();
        for (a, b) in [(4096, 12288), (16384, 24576), (32768, 40960)] {
            store.punch_hole(a, b - a).unwrap();
        }
        let dead = DeadSpace::default();
        let find = |min| dead_range(&store, &dead, (0, 64 << 10), min).unwrap();
        assert_eq!(find(8192), Some((4096, 12288)));
        assert_eq!(find(12288), None, "live bytes between the holes");
        // The data between the first two holes is dead, held unpunched.
        dead.add([(12288, 16384)]);
        assert_eq!(find(12288), Some((4096, 24576)));
        // Between the second and third, only in part.
        dead.add([(24576, 30000)]);
        assert_eq!(find(24576), None);
        dead.add([(30000, 32768)]);
        assert_eq!(find(24576), Some((4096, 40960)));
        // Never outside the range asked about.
        assert_eq!(
            dead_range(&store, &dead, (0, 20000), 1).unwrap(),
            Some((4096, 16384))
        );
    }

    #[test]
    fn dead_space_held_for_the_log_is_a_region_without_a_hole() {
        const M: u64 = 1 << 20;
        let store = MemStore::new();
        store.write_at(&vec![1u8; 4 << 20], 0).unwrap();
        let dead = DeadSpace::default();
        let find = |min| dead_range(&store, &dead, (0, 4 * M), min).unwrap();
        assert_eq!(find(4096), None, "all live");
        // A dead run shorter than the range asked for is no piece of one
        // on its own (it joins pieces).
        dead.add([(5000, 70000)]);
        assert_eq!(find(65536), None);
        // A long one is, from a record starting inside a page: whole
        // pages only.
        let long = (M + 5000, 2 * M + 5000);
        dead.add([long]);
        assert_eq!(find(M - 4096), Some((M + 8192, 2 * M + 4096)));
        assert_eq!(find(M), None);
        // A hole after it joins it across dead bytes held (the page
        // between them), not across live ones.
        store.punch_hole(2 * M + 8192, 8192).unwrap();
        assert_eq!(find(M), None);
        dead.add([(2 * M + 5000, 2 * M + 8192)]);
        assert_eq!(find(M), Some((M + 8192, 2 * M + 16384)));
        // A hole before it, with live bytes between: apart; the first range
        // long enough is taken, whole.
        store.punch_hole(0, 4096).unwrap();
        assert_eq!(find(M + 16384), None);
        assert_eq!(find(4096), Some((0, 4096)));
        assert_eq!(find(8192), Some((8192, 69632)));
        assert_eq!(find(65536), Some((M + 8192, 2 * M + 16384)));
    }
}
