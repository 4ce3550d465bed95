//! Shortening the image file offline (`vbdfs compact`): its end emptied
//! into the holes below it, window by window, and cut
//! (`docs/format.md` §5, "Evacuation").
//!
//! With runs in holes capped at twice a window, the log fills the first
//! hole big enough low in the file while the last window's records are
//! stored anew there ([`super::evacuate`]: rewritten with their own
//! content, through the write path), the file cut behind them. Without a
//! hole below, a mostly dead range is emptied first to make one.

use super::evacuate::{less, Quarters};
use super::regions::{outside, Wish};
use crate::error::Result;
use crate::format::LOG_START;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What emptying a range to make room below the end of the file moves, at
/// most, of what it frees (offline: dearer than the mount's quarter, but
/// nothing else waits).
const MOVE_SHARE_OFFLINE: Quarters = Quarters(3);
/// Mostly dead ranges emptied in a row to make a hole below the end of the
/// file for the log, at most.
const MAKE_ROOM_TRIES: u32 = 8;
/// Rounds in a row that neither shortened the file nor moved a record, at
/// most (a round that waits out a pause of moves does not count).
const STALLED_ROUNDS: u32 = 64;

impl super::Image {
    /// Offline (`vbdfs compact`): empties the end of the image file, window
    /// by window, into the holes below it, cutting the file as it goes.
    /// While the log's run is not below the last window (no hole below was
    /// big enough), mostly dead ranges are emptied first to make one. Stops
    /// when a round gains nothing (at a record that cannot move: one a
    /// snapshot holds, the snapshot table), when no room can be made, or
    /// after moving twice the file's length. Returns the bytes of records
    /// moved.
    pub fn evacuate_tail(&self) -> Result<u64> {
        let inner = &self.inner;
        // Runs in holes at most two windows long: the run the log is in
        // then never reaches far above what it fills.
        let longest = &inner.regions.longest_run;
        longest.store(4 * inner.smallest_region(), Ordering::Relaxed);
        let offline = &inner.regions.evacuation.offline;
        offline.store(true, Ordering::Release);
        let moved = self.evacuate_tail_with_short_runs();
        offline.store(false, Ordering::Release);
        longest.store(u64::MAX, Ordering::Relaxed);
        moved
    }

    fn evacuate_tail_with_short_runs(&self) -> Result<u64> {
        let inner = &self.inner;
        // Bounds: what moves is at most twice the file's length, at most
        // MAKE_ROOM_TRIES rounds in a row make room, and at most
        // STALLED_ROUNDS in a row neither shorten the file nor move a byte.
        let budget = 2 * inner.file_len()?;
        let (mut total, mut last_end, mut tries, mut compacted) = (0, u64::MAX, 0, false);
        let (mut shortest, mut moved_before, mut stalled) = (u64::MAX, 0, 0);
        let mut rewritten_at = 0;
        loop {
            // The last round's records dead and punched, the log in the
            // first hole big enough (`Image::checkpoint`).
            self.checkpoint()?;
            inner.cut_trailing_holes(&inner.log.lock());
            let end = inner.file_len()?;
            let Some(in_use) = inner.log_in_use() else {
                // A compaction (the reclaim thread's) holds moves off.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            if end < shortest || total > moved_before {
                (shortest, moved_before, stalled) = (end.min(shortest), total, 0);
            } else {
                stalled += 1;
                if stalled > STALLED_ROUNDS {
                    ::log::info!("shortening stopped at {end}: {stalled} rounds gained nothing");
                    break;
                }
            }
            let width = 2 * inner.smallest_region();
            let window = (end.saturating_sub(width).max(LOG_START), end);
            if window.0 >= window.1 || total > budget {
                ::log::debug!("shortening: done at {end} ({total} bytes moved)");
                break;
            }
            let run = inner.log.lock().run_extent();
            if run.1 > window.0 || outside(window, &in_use) != [window] {
                // The log into the first hole big enough if it lies below
                // the window; without one, a mostly dead range emptied to
                // make one.
                tries += 1;
                last_end = u64::MAX;
                if tries > MAKE_ROOM_TRIES {
                    ::log::info!("shortening stopped at {end}: no room below it for the log");
                    break;
                }
                // Both searches find nothing while a compaction (the
                // reclaim thread's) pauses moves: then they are asked again.
                let mark = inner.pause_mark();
                if inner.find_region().is_some_and(|(_, b)| b <= window.0) {
                    inner.commit_moving(false, None, Wish::OutOf(run))?;
                    continue;
                }
                match inner.evacuate_share(MOVE_SHARE_OFFLINE)? {
                    0 if inner.paused_since(mark) => {
                        tries -= 1;
                        stalled = stalled.saturating_sub(1);
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    0 => {
                        ::log::info!("shortening stopped at {end}: the log in {run:?}, no range to empty below");
                        break;
                    }
                    moved => total += moved,
                }
                self.flush()?;
                continue;
            }
            tries = 0;
            // The superblock's records in the window (rewritten only when
            // asked: on an edit, a change of leaf): written anew by the
            // log's run below it, once for each length of the file.
            let rewrite = inner.superblock_records_in(window);
            if (rewrite.index || rewrite.snap_table || rewrite.config) && rewritten_at != end {
                rewritten_at = end;
                inner.checkpoint_rewriting(rewrite)?;
                continue;
            }
            if end >= last_end {
                // The last round gained nothing: records dead but not
                // judged (those that died above the log's start while it
                // ran at the end of the file) are found by a compaction,
                // once, and the round is tried again; a second round
                // without gain ends it (else nothing more can go).
                if compacted {
                    ::log::debug!("shortening: nothing more moves out of {window:?}");
                    break;
                }
                compacted = true;
                inner.compact()?;
            } else {
                compacted = false;
                last_end = end;
            }
            let occupied = inner.occupied(window, &mut 0)?;
            let movable = inner.movable_in(&[window])?.pop().unwrap_or_default();
            let blockers = less(&occupied, &movable.leaving());
            let stretch = (blockers.last().map_or(window.0, |b| b.1.max(window.0)), end);
            // Above the last record that cannot move (yet: one dead since
            // the last checkpoint is judged at the next).
            let (_, moved) = inner.move_out(stretch, usize::MAX, true)?;
            total += moved;
            self.flush()?;
        }
        Ok(total)
    }
}
