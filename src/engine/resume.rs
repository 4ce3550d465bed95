//! Leaving the failed state after a full host disk, once there is room again.
//!
//! A failed append leaves a gap in the log run (a room never written, or
//! written in part), and the blocks it held dirty in the cache
//! ([`crate::cache::BlockCache::abandon_writeback`]). Replay stops at such a
//! gap, so the engine cannot simply go on appending after it. Resuming
//! instead starts a **new log run** past the end of the file (a new epoch:
//! nothing the failed run left is ever read as part of it) and commits a
//! checkpoint whose replay starts there: the map it commits holds every
//! record that was written (and is synced by the checkpoint), written anew
//! leaf by leaf (a checkpoint that failed had taken its leaves' dirty
//! marks), the gap is below it, and the abandoned blocks are written back
//! again into the new run. This is what a reopen does after a crash, without
//! losing the cache's unwritten blocks.
//!
//! While it runs, no flush can report success (the sync lock is held from
//! before the failed state is lifted until the checkpoint is durable), and
//! write-back takes no new room until the log is ready.

use super::open::random_u64;
use super::{Image, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{align_up, LOG_UNIT};
use std::sync::atomic::Ordering;

impl Inner {
    /// True if the image failed because the host file system was full, and
    /// every sync so far succeeded (after a failed one, what was written
    /// since the last good one may be lost even if a later sync succeeds:
    /// only a reopen, which replays what is there, is safe then).
    pub(super) fn failed_for_space(&self) -> bool {
        self.failed_flag.load(Ordering::Acquire)
            && self.failed_no_space.load(Ordering::Relaxed)
            && !self.sync_failed.load(Ordering::Acquire)
    }

    /// See the module docs. Err if the image is not failed for lack of
    /// space, or if the resume itself fails (the image is failed again).
    pub(super) fn resume(&self) -> Result<()> {
        // No flush reports success until the new run is committed.
        let sync = self.sync_lock.lock();
        if !self.failed_for_space() {
            return match self.failed_flag.load(Ordering::Acquire) {
                true => self.check_failed(),
                false => Ok(()), // resumed meanwhile
            };
        }
        let file_len = self.file_len()?;
        let rearmed = {
            let _one = self.checkpoint_lock.lock();
            // Write-back takes no room until the new run is ready, and the
            // rooms in flight (failing, as the image is failed) are done.
            self.log.lock().rooms_held = true;
            {
                let mut published = self.publish_turn.lock();
                while self.log.lock().has_rooms_in_flight() {
                    self.publish_cv.wait(&mut published);
                }
            }
            // A sync that failed meanwhile (a room's records in doubt):
            // only a reopen is safe.
            if self.sync_failed.load(Ordering::Acquire) {
                drop(_one);
                self.release_rooms();
                return self.check_failed();
            }
            // Workers that saw the image failed now queue their blocks again
            // instead of abandoning them; those abandoned before are armed
            // again here (a flush waits for them once the image is no
            // longer failed, below).
            self.cache.unfail();
            let rearmed = self.cache.rearm_abandoned();
            // A checkpoint that failed took its leaves' dirty marks with it:
            // the new run's checkpoint writes the whole map anew.
            {
                let mut map = self.map.write();
                let leaves: Vec<u64> = map.leaves.keys().copied().collect();
                for leaf in leaves {
                    map.rewrite_leaf(leaf);
                }
            }
            // A compaction punching meanwhile leaves the new run out (the
            // file may have been cut below what it judged).
            self.claim_region((file_len & !(LOG_UNIT - 1), u64::MAX), &self.dead_space);
            {
                let mut log = self.log.lock();
                let start = align_up(file_len.max(log.off), LOG_UNIT);
                log.restart_run(start, random_u64(), file_len.max(start), u64::MAX);
            }
            *self.failed.lock() = None;
            self.failed_no_space.store(false, Ordering::Relaxed);
            self.failed_flag.store(false, Ordering::Release);
            rearmed
        };
        // Commits the new run (and releases the write-back rooms).
        let committed = self.checkpoint(false);
        self.release_rooms();
        match committed {
            Ok(()) => {
                self.cache.requeue(&rearmed);
                drop(sync);
                ::log::warn!(
                    "resumed after a full host disk: {} block(s) written back again",
                    rearmed.len()
                );
                Ok(())
            }
            Err(e) => {
                // Failed again: nothing will write these back.
                for slot in &rearmed {
                    self.cache.abandon_writeback(slot);
                }
                Err(e)
            }
        }
    }

    /// Lets write-back take rooms again (a checkpoint also does).
    pub(super) fn release_rooms(&self) {
        let mut log = self.log.lock();
        if std::mem::take(&mut log.rooms_held) {
            self.rooms_cv.notify_all();
        }
    }
}

impl Image {
    /// Leaves the failed state the image entered when the host file system
    /// was full, once there is room again: a new log run, committed by a
    /// checkpoint; the blocks whose write-back failed are written back again.
    /// Nothing acknowledged is lost and no flush succeeds before all is
    /// durable. Err (ErrorKind::Invalid) when the image is not failed for
    /// lack of space; the write's error when there is still no room.
    pub fn resume(&self) -> Result<()> {
        if !self.inner.failed_flag.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.inner.failed_for_space() {
            return Err(Error::new(
                ErrorKind::Invalid,
                "the image cannot resume (it failed for another reason than a full disk, or a \
                 sync failed: writes since the last good one may be lost): reopen it",
            ));
        }
        self.inner.resume()
    }

    /// True if the image is failed because the host file system was full
    /// ([`Image::resume`] can bring it back).
    pub fn failed_for_space(&self) -> bool {
        self.inner.failed_for_space()
    }
}
