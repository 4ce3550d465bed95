//! Emptying the mostly dead ranges of the image file, so that the log finds
//! holes to move into ([`super::regions`]).
//!
//! A range of the file becomes a hole only once every record in it has
//! died. Under random overwrites a run of the log dies quickly but not
//! wholly: a few of its blocks may go unwritten for a long time, and each
//! keeps the range from joining a hole long enough for a run (4 KiB random
//! writes to a 512 MiB zstd disk: after two minutes the file was 5.4 GB
//! long, ten times the disk, in ~4,500 holes none of them 256 MiB long).
//!
//! When the log takes its last hole big enough but one, or finds none, the
//! reclaim thread **evacuates** a range: among windows of twice the smallest run's length it picks one
//! whose every occupied byte (allocated in the file and not held as dead
//! space) belongs to a record it can store elsewhere, with the fewest such
//! bytes (at most a quarter of what it frees), and stores them elsewhere:
//! - a head DATA record born after the newest snapshot (no snapshot holds
//!   it): its block is marked dirty in the cache with its own content, and
//!   write-back appends it to the log's current run, outside the window;
//! - a head LEAF record no snapshot's index names: its leaf is marked for
//!   the next checkpoint to write anew.
//!
//! The old records then die like any overwritten record (judged at the
//! next checkpoint against the durable state, held, punched:
//! [`super::reclaim`]), and the window joins one hole the log can move into.
//!
//! Nothing here writes what the write path would not: rewriting a block
//! with its own content is a write. A crash at any point loses nothing; it
//! leaves at worst both records of a block, the old one dead (a compaction
//! returns it).
//!
//! A step moves at most [`STEP_BLOCKS`] blocks, beside the guest's writes
//! (under a steady load write-back never catches up) but never past the
//! dirty level where the last writers wait: what it moves is at most a
//! quarter of what it frees. Offline, [`super::shrink`] empties the end of
//! the file the same way.

use super::copies::second_off;
use super::deadspace::{Span, PAGE};
use super::regions::outside;
use super::Inner;
use crate::error::Result;
use crate::format::{align_up, LeafPtr, MapEntry, LOG_START, LOG_UNIT, RECORD_ALIGN};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// After a look for a window that found none, the next waits this long.
const PICK_AGAIN_AFTER: Duration = Duration::from_secs(2);
/// What a window's evacuation moves is at most this share of the hole it
/// makes (in quarters).
const MOVE_SHARE: Quarters = Quarters(1);

/// A share, in quarters.
#[derive(Debug, Clone, Copy)]
pub(super) struct Quarters(pub u64);

impl Quarters {
    /// True if `part` is at most this share of `whole`.
    fn allows(self, part: u64, whole: u64) -> bool {
        part.saturating_mul(4) <= whole.saturating_mul(self.0)
    }
}
/// Blocks one step moves at most (a step runs between two punches of the
/// reclaim thread: each block is read and decoded).
const STEP_BLOCKS: usize = 64;
/// Windows whose records a pick lists, at most (the memory it takes: up
/// to a quarter of a window's length in records each).
const WINDOWS_WEIGHED: usize = 4;
/// After a failure (a block that cannot be read), the next pick waits this
/// long.
const AFTER_FAILURE: Duration = Duration::from_secs(60);
/// Holes one pick looks at, at most (two `lseek` calls each on a file).
const HOLES_LOOKED_AT: usize = 1 << 16;

/// The evacuation state of one open image.
#[derive(Debug, Default)]
pub(super) struct Evacuation {
    /// The log found no hole big enough since the last pick.
    wanted: AtomicBool,
    /// `evacuate_tail` runs: no step of the reclaim thread's.
    pub offline: AtomicBool,
    /// No look for a window before this (the last found none, or failed).
    not_before: Mutex<Option<Instant>>,
    /// The range being emptied, and the bytes moved out of it so far.
    target: Mutex<Option<(Span, u64)>>,
    /// Bytes of records stored elsewhere (statistics).
    pub moved: AtomicU64,
    /// Ranges emptied (statistics).
    pub ranges: AtomicU64,
}

impl Evacuation {
    /// The log is short of holes: the reclaim thread looks for a window.
    pub fn want(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    /// True (once) when wanted, unless a look found no window in the last
    /// [`PICK_AGAIN_AFTER`] or failed in the last [`AFTER_FAILURE`].
    fn take_due(&self) -> bool {
        let not_before = self.not_before.lock();
        !not_before.is_some_and(|t| Instant::now() < t) && self.wanted.swap(false, Ordering::AcqRel)
    }

    /// No look for a window in the next `pause`.
    fn pause(&self, pause: Duration) {
        *self.not_before.lock() = Some(Instant::now() + pause);
    }
}

/// What lies in a window that can be stored elsewhere.
#[derive(Debug, Default)]
pub(super) struct Movable {
    blocks: Vec<(u64, MapEntry)>,
    leaves: Vec<(u64, LeafPtr)>,
    /// Records the head stopped referencing since the last checkpoint:
    /// held as dead space after the next one.
    dying: Vec<Span>,
}

impl Movable {
    /// The byte ranges of what moves, sorted.
    fn spans(&self) -> Vec<Span> {
        let mut spans: Vec<Span> = self
            .blocks
            .iter()
            .map(|(_, e)| record_span(e.off, e.len))
            .chain(self.leaves.iter().map(|(_, p)| meta_span(p.off, p.len)))
            .collect();
        spans.sort_unstable();
        spans
    }

    /// The byte ranges that will not stay: what moves, and what is dying.
    pub(super) fn leaving(&self) -> Vec<Span> {
        let mut spans = self.spans();
        spans.extend(&self.dying);
        spans.sort_unstable();
        spans
    }
}

fn record_span(off: u64, len: u32) -> Span {
    (off, align_up(off + u64::from(len), RECORD_ALIGN))
}

/// A map record (LEAF, INDEX) and the place of its second copy (written
/// right after it, one log unit on, as long again).
pub(super) fn meta_span(off: u64, len: u32) -> Span {
    let copy = second_off(off, len);
    (off, align_up(copy + u64::from(len), RECORD_ALIGN))
}

pub(super) fn overlaps((a, b): Span, (c, d): Span) -> bool {
    a < d && c < b
}

/// `spans` (sorted, disjoint) less `minus` (sorted, disjoint), each of
/// `minus` widened to whole pages (holes are whole pages: a page a record
/// ends in is allocated for it).
pub(super) fn less(spans: &[Span], minus: &[Span]) -> Vec<Span> {
    let widen = |&(c, d): &Span| (c & !(PAGE - 1), align_up(d, PAGE));
    let (mut out, mut first) = (Vec::new(), 0);
    for &(a, b) in spans {
        while first < minus.len() && widen(&minus[first]).1 <= a {
            first += 1;
        }
        let mut pos = a;
        for (c, d) in minus[first..].iter().map(widen) {
            if c >= b {
                break;
            }
            if c > pos {
                out.push((pos, c));
            }
            pos = pos.max(d);
        }
        if pos < b {
            out.push((pos, b));
        }
    }
    out
}

/// The longest part of `window` that none of `blockers` (sorted) touches.
fn longest_free(window: Span, blockers: &[Span]) -> Span {
    let mut best = (window.0, window.0);
    let mut pos = window.0;
    for &(a, b) in blockers.iter().chain([&(window.1, window.1)]) {
        let a = a.clamp(pos, window.1);
        if a - pos > best.1 - best.0 {
            best = (pos, a);
        }
        pos = pos.max(b.min(window.1));
    }
    best
}

impl Inner {
    /// One step of the reclaim thread: goes on emptying the range being
    /// emptied, or picks one when the log found no hole big enough.
    pub(super) fn evacuate_step(&self) {
        let ev = &self.regions.evacuation;
        if self.read_only || self.check_failed().is_err() || ev.offline.load(Ordering::Acquire) {
            return;
        }
        let current = *ev.target.lock();
        let (target, moved_before) = match current {
            Some(t) => t,
            None if ev.take_due() => match self.pick_window(MOVE_SHARE) {
                Ok(Some(t)) => {
                    ::log::debug!("emptying {}..{} of the image file for the log", t.0, t.1);
                    *ev.target.lock() = Some((t, 0));
                    (t, 0)
                }
                Ok(None) => {
                    ev.pause(PICK_AGAIN_AFTER);
                    return;
                }
                Err(e) => {
                    ev.pause(AFTER_FAILURE);
                    ::log::warn!("looking for a range of the file to empty failed: {e}");
                    return;
                }
            },
            None => return,
        };
        // Beside the guest's writes (under a steady load write-back never
        // catches up), but not past the level where the last writers wait.
        let (dirty, limit) = self.cache.backlog();
        if dirty >= limit + limit / 2 {
            return;
        }
        match self.move_out(target, STEP_BLOCKS, false) {
            Ok((false, moved)) => *ev.target.lock() = Some((target, moved_before + moved)),
            Ok((true, moved)) => {
                *ev.target.lock() = None;
                if moved_before + moved > 0 {
                    ev.ranges.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                *ev.target.lock() = None;
                ev.pause(AFTER_FAILURE);
                ::log::warn!("emptying a range of the file for the log failed: {e}");
            }
        }
    }

    /// Picks a window and empties it at once, whatever the cache's backlog
    /// (waiting for write-back as writes do); the bytes moved (0: no window
    /// qualifies). For tests and offline tools.
    pub(super) fn evacuate_now(&self) -> Result<u64> {
        self.evacuate_share(MOVE_SHARE)
    }

    /// [`Inner::evacuate_now`], moving at most `share` of what it frees.
    pub(super) fn evacuate_share(&self, share: Quarters) -> Result<u64> {
        let Some(target) = self.pick_window(share)? else {
            return Ok(0);
        };
        let (_, moved) = self.move_out(target, usize::MAX, true)?;
        if moved > 0 {
            self.regions
                .evacuation
                .ranges
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(moved)
    }

    /// The window to empty: see the module docs. None if none qualifies.
    fn pick_window(&self, share: Quarters) -> Result<Option<Span>> {
        let Some(in_use) = self.log_in_use() else {
            return Ok(None);
        };
        let min = self.smallest_region();
        let width = 2 * min;
        let file_len = self.file_len()?;
        // Windows outside what the log uses, with few occupied bytes.
        let mut windows: Vec<(Span, Vec<Span>)> = Vec::new();
        let mut looked = 0;
        let mut start = LOG_START;
        while start + min < file_len && looked < HOLES_LOOKED_AT {
            let window = (start, (start + width).min(file_len));
            start += width;
            if outside(window, &in_use) != [window] {
                continue;
            }
            let occupied = self.occupied(window, &mut looked)?;
            let bytes: u64 = occupied.iter().map(|(a, b)| b - a).sum();
            if bytes > 0 && share.allows(bytes, window.1 - window.0) {
                windows.push((window, occupied));
            }
        }
        // The few with the fewest (what must move is at most what is
        // occupied): their records are listed next.
        windows.sort_by_key(|(_, occupied)| occupied.iter().map(|(a, b)| b - a).sum::<u64>());
        windows.truncate(WINDOWS_WEIGHED);
        windows.sort_unstable_by_key(|(w, _)| *w);
        if windows.is_empty() {
            return Ok(None);
        }
        let spans: Vec<Span> = windows.iter().map(|(w, _)| *w).collect();
        let movable = self.movable_in(&spans)?;
        let mut best: Option<(u64, Span)> = None;
        for ((window, occupied), movable) in windows.iter().zip(&movable) {
            let stretch = longest_free(*window, &less(occupied, &movable.leaving()));
            let cost: u64 = movable
                .spans()
                .into_iter()
                .filter(|&s| overlaps(s, stretch))
                .map(|(a, b)| b - a)
                .sum();
            if stretch.1 - stretch.0 >= min + 2 * LOG_UNIT
                && cost > 0
                && share.allows(cost, stretch.1 - stretch.0)
                && best.is_none_or(|(c, _)| cost < c)
            {
                best = Some((cost, stretch));
            }
        }
        Ok(best.map(|(_, s)| s))
    }

    /// The parts of `window` allocated in the file and not held as dead
    /// space. Counts the holes looked at in `looked`; past the limit the
    /// rest counts as occupied.
    pub(super) fn occupied(&self, (start, end): Span, looked: &mut usize) -> Result<Vec<Span>> {
        let mut data = Vec::new();
        let mut at = start;
        while at < end {
            *looked += 1;
            if *looked > HOLES_LOOKED_AT {
                data.push((at, end));
                break;
            }
            let hole = self.store.find_hole(at, end, 1);
            match hole.map_err(|e| crate::error::Error::io("looking for holes", e))? {
                Some((h0, h1)) => {
                    if h0 > at {
                        data.push((at, h0));
                    }
                    at = h1;
                }
                None => {
                    data.push((at, end));
                    break;
                }
            }
        }
        Ok(data
            .into_iter()
            .flat_map(|d| self.dead_space.uncovered(d))
            .collect())
    }

    /// What the head keeps in each of `windows` (sorted, disjoint) that can
    /// be stored elsewhere: DATA records no snapshot holds, LEAF records no
    /// snapshot's index names.
    pub(super) fn movable_in(&self, windows: &[Span]) -> Result<Vec<Movable>> {
        let newest = self.snapshot_entries().iter().map(|s| s.gen).max();
        let meta = match newest {
            Some(_) => self.snapshot_meta()?,
            None => Default::default(),
        };
        let mut out: Vec<Movable> = windows.iter().map(|_| Movable::default()).collect();
        // The window `span` overlaps, if any (a record crossing a window's
        // end counts for the window it starts in, or the one it ends in).
        let find = |span: Span| {
            let i = windows.partition_point(|w| w.1 <= span.0);
            (i < windows.len() && overlaps(windows[i], span)).then_some(i)
        };
        let map = self.map.read();
        for (block, e) in map.data_entries() {
            if newest.is_some_and(|g| u64::from(e.birth) <= g) {
                continue;
            }
            if let Some(i) = find(record_span(e.off, e.len)) {
                out[i].blocks.push((block, e));
            }
        }
        for (&leaf, p) in &map.ptrs {
            if meta.contains(&p.off) {
                continue;
            }
            if let Some(i) = find(meta_span(p.off, p.len)) {
                out[i].leaves.push((leaf, *p));
            }
        }
        let stays = |d: &super::map::Dead| match d.birth {
            Some(b) => newest.is_some_and(|g| u64::from(b) <= g),
            None => meta.contains(&d.off),
        };
        for d in map.freed.iter().filter(|d| !stays(d)) {
            let span = record_span(d.off, d.len);
            if let Some(i) = find(span) {
                out[i].dying.push(span);
            }
        }
        Ok(out)
    }

    /// Stores elsewhere at most `budget` blocks of what the head keeps in
    /// `stretch` (blocks written since are on their way already), waiting
    /// for write-back after each as writes do if `wait`. Returns whether
    /// nothing is left there (or the log itself moved in: a hole formed
    /// there meanwhile), and the bytes of records moved.
    pub(super) fn move_out(&self, stretch: Span, budget: usize, wait: bool) -> Result<(bool, u64)> {
        let Some(in_use) = self.log_in_use() else {
            return Ok((false, 0)); // a compaction or repair: later
        };
        if outside(stretch, &in_use) != [stretch] {
            return Ok((true, 0));
        }
        let Some(mut movable) = self.movable_in(&[stretch])?.pop() else {
            return Ok((true, 0));
        };
        // The head's index there: the next checkpoint writes a new one (it
        // would name the one it has were no leaf to change).
        if self.superblock_records_in(stretch).index {
            *self.index_listed.lock() = None;
        }
        if !movable.leaves.is_empty() {
            let mut map = self.map.write();
            for (leaf, p) in &movable.leaves {
                if map.ptrs.get(leaf) == Some(p) {
                    map.rewrite_leaf(*leaf);
                }
            }
        }
        movable
            .blocks
            .retain(|(block, _)| !self.cache.is_unwritten(*block));
        let (mut blocks, mut bytes) = (0, 0);
        for (block, entry) in &movable.blocks {
            if blocks == budget {
                break;
            }
            self.rewrite_block(*block, *entry)?;
            if wait {
                self.cache.throttle();
            }
            blocks += 1;
            bytes += u64::from(entry.len);
        }
        self.regions
            .evacuation
            .moved
            .fetch_add(bytes, Ordering::Relaxed);
        Ok((blocks < budget, bytes))
    }
}

impl super::Image {
    /// Empties one mostly dead range of the image file for the log to move
    /// into, if one qualifies ([`super::evacuate`]); returns the bytes of
    /// records stored elsewhere. The reclaim thread does this on its own
    /// when the log finds no hole big enough; for tests and tools.
    pub fn evacuate(&self) -> Result<u64> {
        self.inner.evacuate_now()
    }

    /// Bytes of records stored elsewhere by evacuations in this session,
    /// and the ranges emptied.
    pub fn evacuated(&self) -> (u64, u64) {
        let ev = &self.inner.regions.evacuation;
        (
            ev.moved.load(Ordering::Relaxed),
            ev.ranges.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_blocks_a_window_is_what_cannot_move() {
        // Occupied: two runs; the records that can move cover the first
        // (their last page partly) and part of the second.
        let occupied = [(4096, 12288), (20480, 28672)];
        let movable = [(4096, 8000), (8000, 12000), (20480, 24000)];
        assert_eq!(less(&occupied, &movable), vec![(24576, 28672)]);
        assert_eq!(less(&occupied, &[]), occupied.to_vec());
    }

    #[test]
    fn the_longest_stretch_free_of_blockers() {
        let w = (0, 100);
        assert_eq!(longest_free(w, &[]), (0, 100));
        assert_eq!(longest_free(w, &[(10, 20), (60, 65)]), (20, 60));
        assert_eq!(longest_free(w, &[(0, 30), (90, 120)]), (30, 90));
        assert_eq!(longest_free(w, &[(0, 100)]), (0, 0));
    }
}
