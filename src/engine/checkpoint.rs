//! Checkpoints: write the dirty map leaves and an index, then flip the superblock.
//!
//! Protocol (see `docs/format.md`): under the log and map locks, take the dirty
//! leaves and note the log position `start` — the map now reflects exactly the
//! records before `start`. Then, without those locks, append LEAF records and
//! one INDEX record, `sync`, write the superblock (seq+1, into the other slot)
//! naming the index and `start`, and `sync` again. A crash anywhere before the
//! second sync leaves the previous superblock in charge; its roll-forward simply
//! skips the new LEAF/INDEX records.
//!
//! A snapshot operation rides on a checkpoint ([`Inner::commit`] with an
//! edit): after the INDEX record, the edit computes the new snapshot table
//! (a new snapshot names this very INDEX), which is appended as a SNAP_TABLE
//! record before the first sync and named by the same superblock. The table
//! and the map therefore commit atomically, with the same crash guarantees.

use super::log::NewRecord;
use super::map::Dead;
use super::regions::{Move, Wish};
use super::snaptable::SnapEdit;
use super::Inner;
use crate::codec;
use crate::error::{Error, Result};
use crate::format::{
    align_up, encode_index, encode_leaf, Codec, LeafPtr, MapEntry, RecPtr, RecordKind, LOG_UNIT,
    SB_FLAG_DIRTY, SB_SLOT_SIZE,
};

/// Dirty leaves appended (with their second copies) by one write: at most
/// ~2.5 MiB of staging (a leaf record is at most 16 KiB and a header).
const LEAVES_PER_APPEND: usize = 64;

/// What a log run left past its tail when a checkpoint moved the log.
#[derive(Debug, Clone, Copy)]
struct LeftRun {
    tail: u64,
    /// The store was preallocated up to here.
    allocated: u64,
    /// The run's limit: it was in a hole (or dead space the log
    /// overwrites) up to there; `u64::MAX` at the end of the file.
    limit: u64,
    /// Where the next run starts if at the end of the file (else
    /// `u64::MAX`): below `limit` when the file was cut short of it.
    next: u64,
}

/// Write-back takes no room while this lives (a move's new run is not
/// committed yet).
struct RoomsHeld<'a>(&'a Inner);

impl Drop for RoomsHeld<'_> {
    fn drop(&mut self) {
        self.0.release_rooms();
    }
}

/// What a checkpoint committed, as seen by a snapshot edit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Committed {
    /// The INDEX record of the map at the checkpoint.
    pub index: RecPtr,
    /// The checkpoint generation.
    pub gen: u64,
    /// Blocks mapped to data in that map.
    pub data_blocks: u64,
    /// Bytes of their records.
    pub stored_bytes: u64,
}

impl Inner {
    /// Writes a checkpoint; `clean` marks the image cleanly closed.
    pub(super) fn checkpoint(&self, clean: bool) -> Result<()> {
        self.commit(clean, None)
    }

    /// Holds off new write-back rooms and waits until those in flight are
    /// published (the caller releases the hold once it has taken the map).
    /// A snapshot's map then has every record born in its generation: a
    /// record published after the map was taken would carry the snapshot's
    /// birth without being in it, so it would be kept as the snapshot's when
    /// it dies, and the snapshot's deletion would never find it (space held
    /// until `compact`).
    fn drain_rooms(&self) {
        self.log.lock().rooms_held = true;
        let mut published = self.publish_turn.lock();
        while self.log.lock().has_rooms_in_flight() {
            self.publish_cv.wait(&mut published);
        }
    }

    /// Writes a checkpoint that also commits the snapshot table `edit` returns.
    /// An error from `edit` (a duplicate name, a busy snapshot) aborts before
    /// the superblock is written: nothing is committed.
    pub(super) fn commit(&self, clean: bool, edit: Option<SnapEdit<'_>>) -> Result<()> {
        self.commit_moving(clean, edit, Wish::Stay)
    }

    /// [`Inner::commit`], starting a new log run first where `wish` says
    /// (`super::regions`), and whenever the checkpoint would not fit in the
    /// current run.
    pub(super) fn commit_moving(
        &self,
        clean: bool,
        edit: Option<SnapEdit<'_>>,
        wish: Wish,
    ) -> Result<()> {
        let _one = self.checkpoint_lock.lock();
        self.check_failed()?;
        let Some(mut to) = self.wished_move(wish) else {
            return Ok(()); // moved meanwhile
        };
        let editing = edit.is_some();
        // The newest snapshot before this commit: the records that died
        // before it took the map were not held by a snapshot it creates.
        let newest_before = self.snapshot_entries().iter().map(|s| s.gen).max();
        if editing || to.is_some() {
            self.drain_rooms();
        }
        if editing && to.is_none() && !self.checkpoint_fits() {
            // Rooms published while draining (nothing changes now).
            to = Some(self.leaving_move());
        }
        // A move holds the rooms until its superblock is durable (released
        // when this drops, also on an error).
        let held = to.map(|_| RoomsHeld(self));
        let mut left = None;
        let limit;
        let file_len = match to {
            Some(Move::End) => self.file_len().map_err(|e| self.fail(e))?,
            _ => 0,
        };
        // A compaction punching what it judged before leaves out where the
        // new run writes: a hole, or the end of the file, which may have
        // been cut below what it judged since (its new records would lie
        // in a range judged dead).
        match to {
            Some(Move::Hole(a, b)) => self.claim_region((a, b), &self.dead_space),
            Some(Move::End) => {
                self.claim_region((file_len & !(LOG_UNIT - 1), u64::MAX), &self.dead_space)
            }
            None => {}
        }
        let (dirty, freed, start_off, start_lsn, epoch, gen, data_blocks, stored_bytes) = {
            let mut log = self.log.lock();
            if to.is_none() && std::mem::take(&mut log.rooms_held) {
                self.rooms_cv.notify_all();
            }
            if let Some(to) = to {
                // No room is in flight (drained) and none is taken until
                // the superblock naming the new run is durable.
                let old = (log.run_extent(), log.off);
                let (tail, allocated) = log.release_preallocated();
                debug_assert_eq!(tail, old.1);
                let epoch = super::open::random_u64();
                let next = match to {
                    Move::Hole(a, b) => {
                        log.restart_run(a, epoch, a, b);
                        u64::MAX
                    }
                    Move::End => {
                        let start = align_up(file_len.max(log.off), LOG_UNIT);
                        log.restart_run(start, epoch, file_len.max(start), u64::MAX);
                        start
                    }
                };
                left = Some(LeftRun {
                    tail,
                    allocated,
                    limit: old.0 .1,
                    next,
                });
            }
            let mut map = self.map.write();
            let dirty = map.take_dirty();
            let freed = std::mem::take(&mut map.freed);
            let gen = log.gen;
            log.gen += 1;
            log.since_checkpoint = 0;
            let counts = (map.data_blocks, map.stored_bytes);
            // Records of write-back batches still in flight are not in the
            // map yet: replay starts at the oldest of them.
            let (off, lsn) = log.replay_start();
            limit = log.run_extent().1;
            (dirty, freed, off, lsn, log.epoch, gen, counts.0, counts.1)
        };
        let mut dead = freed;
        let leaves: Vec<(u64, &[MapEntry])> = dirty.iter().map(|(l, e)| (*l, &e[..])).collect();
        let written = self.append_leaves(&leaves)?;
        let ptrs: Vec<LeafPtr> = {
            let mut map = self.map.write();
            for p in written {
                if let Some(old) = map.ptrs.insert(p.leaf, p) {
                    dead.push(Dead {
                        off: old.off,
                        len: old.len,
                        birth: None,
                        block: 0,
                        ends_append: false,
                    });
                }
            }
            map.ptrs.values().copied().collect()
        };
        // A checkpoint that moves nothing and edits no snapshot, with the
        // leaf pointers the superblock's index lists, names that index: an
        // idle session, a `compact` that moves nothing, do not lengthen the
        // file. Asked for (a damaged or single copy, an evacuation of its
        // range: `index_listed` forgotten), a new one is written anyway, and
        // when the log starts past the end of the file (a file cut short of
        // a unit): its records keep the log start inside the file.
        let named = self.sb.lock().index;
        let fresh_index = editing
            || to.is_some()
            || !self.file_len().is_ok_and(|len| start_off <= len)
            || self
                .index_listed
                .lock()
                .as_ref()
                .is_none_or(|(at, listed)| *at != named || *listed != ptrs);
        let index = match fresh_index {
            true => self.append_index(&ptrs)?,
            false => named,
        };
        let snap_table = match edit {
            None => None,
            Some(edit) => {
                let committed = Committed {
                    index,
                    gen,
                    data_blocks,
                    stored_bytes,
                };
                Some(self.append_snap_table(edit, &committed)?)
            }
        };
        let tail = self.log.lock().off;
        let replaced = {
            let sb = self.sb.lock();
            let table = if snap_table.is_some() {
                Some(sb.snap_table)
            } else {
                None
            };
            [fresh_index.then_some(named), table]
        };
        let run = (start_off, start_lsn, epoch, limit);
        let published = self.publish(clean, gen, run, index, tail, {
            snap_table.as_ref().map(|(_, ptr)| *ptr)
        });
        if published.is_ok() && fresh_index {
            *self.index_listed.lock() = Some((index, ptrs));
        }
        match (published, snap_table) {
            (Ok(()), Some((table, ptr))) => self.snaps.install(table, ptr),
            (Err(e), Some(_)) => {
                self.snaps.abort();
                return Err(e);
            }
            (result, None) => result?,
        }
        if let Some(left) = left {
            self.trim_left_run(left, to);
        }
        drop(held);
        // The previous index (and snapshot table) died with this commit.
        dead.extend(
            replaced
                .into_iter()
                .flatten()
                .filter(|p| p.off != 0)
                .map(|p| Dead {
                    off: p.off,
                    len: p.len,
                    birth: None,
                    block: 0,
                    ends_append: false,
                }),
        );
        if editing {
            // Snapshot operations must stay O(1): their dead map records are
            // judged by the next plain checkpoint, whose snapshot set is
            // cached. Dead data is judged now, against the snapshots it died
            // under (by the next checkpoint a new snapshot would claim it).
            let (data, maps): (Vec<Dead>, Vec<Dead>) =
                dead.into_iter().partition(|d| d.birth.is_some());
            self.punch_dead_data(data, (start_off, limit), newest_before);
            self.map.write().freed.extend(maps);
        } else {
            let (t, n) = (std::time::Instant::now(), dead.len());
            self.punch_dead(dead, (start_off, limit));
            ::log::debug!(
                "checkpoint {gen}: {n} dead records reclaimed in {:?}",
                t.elapsed()
            );
        }
        Ok(())
    }

    /// After a move is durable: gives back what the run left held past its
    /// tail: in a hole, its preallocated range now, and the dead records
    /// of the range it did not overwrite as held dead space (punched by the
    /// reclaim, or overwritten by a later run: a punch of gigabytes here
    /// would hold the writes up for seconds); at the end of the file, by
    /// cutting the file there. Failure only costs space.
    fn trim_left_run(&self, left: LeftRun, to: Option<Move>) {
        let bounded = left.limit != u64::MAX;
        // A run in a hole whose end the file was cut short of (its holes
        // at the end), left for the end of the file: the new run starts
        // below its limit, and what lies from there on is the new run's.
        let (limit, allocated) = (left.limit.min(left.next), left.allocated.min(left.next));
        if bounded && allocated.max(left.tail) < limit {
            let rest = (allocated.max(left.tail), limit);
            self.dead_space
                .add(super::regions::data_in(self.store.as_ref(), rest));
        }
        let result = match (bounded, to) {
            (true, _) if allocated > left.tail => {
                self.store.punch_hole(left.tail, allocated - left.tail)
            }
            // From the end of the file into a hole below: nothing lies past
            // the old tail but its preallocation.
            (false, Some(Move::Hole(..))) => match self.file_len() {
                Ok(len) if len > left.tail => self.store.set_len(left.tail),
                _ => Ok(()),
            },
            _ => Ok(()),
        };
        if let Err(e) = result {
            ::log::warn!("giving back the log's preallocated space failed: {e}");
        }
        if let Some(Move::Hole(a, b)) = to {
            self.regions
                .moves
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ::log::info!("the log moved into a hole of the file at {a}..{b}");
        }
    }

    /// Writes `leaves` (leaf number, entries) as LEAF records with their
    /// second copies, [`LEAVES_PER_APPEND`] to a write (compressed without
    /// the log lock); returns where they are.
    pub(super) fn append_leaves(&self, leaves: &[(u64, &[MapEntry])]) -> Result<Vec<LeafPtr>> {
        let mut out = Vec::with_capacity(leaves.len());
        for chunk in leaves.chunks(LEAVES_PER_APPEND) {
            let encoded: Vec<(u32, u8, Vec<u8>)> = chunk
                .iter()
                .map(|(_, entries)| {
                    let raw = encode_leaf(entries);
                    let (stored, payload) = codec::encode(&raw, Codec::Zstd(1));
                    (raw.len() as u32, stored, payload.into_owned())
                })
                .collect();
            let records: Vec<NewRecord<'_>> = chunk
                .iter()
                .zip(&encoded)
                .map(|((leaf, _), (raw_len, stored, payload))| {
                    NewRecord::new(RecordKind::Leaf, *leaf, *stored, *raw_len, payload)
                })
                .collect();
            let appended = self.log.lock().append_twice(self.store.as_ref(), &records);
            let written = appended.map_err(|e| self.fail(e))?;
            out.extend(chunk.iter().zip(written).map(|((leaf, _), w)| LeafPtr {
                leaf: *leaf,
                off: w.off,
                len: w.len,
                crc: w.crc,
            }));
        }
        Ok(out)
    }

    /// Writes an INDEX record listing `ptrs`, with its second copy.
    pub(super) fn append_index(&self, ptrs: &[LeafPtr]) -> Result<RecPtr> {
        let raw = encode_index(ptrs);
        let (stored, payload) = codec::encode(&raw, Codec::Zstd(1));
        let record = NewRecord::new(
            RecordKind::Index,
            ptrs.len() as u64,
            stored,
            raw.len() as u32,
            &payload,
        );
        let appended = self.log.lock().append_twice(self.store.as_ref(), &[record]);
        let w = appended.map_err(|e| self.fail(e))?[0];
        Ok(RecPtr {
            off: w.off,
            len: w.len,
            crc: w.crc,
        })
    }

    /// Syncs the records, then writes and syncs the next superblock.
    fn publish(
        &self,
        clean: bool,
        gen: u64,
        (start_off, start_lsn, epoch, limit): (u64, u64, u64, u64),
        index: RecPtr,
        tail: u64,
        snap_table: Option<RecPtr>,
    ) -> Result<()> {
        let store = self.store.as_ref();
        let t = std::time::Instant::now();
        self.sync_log("sync checkpoint")?;
        let records_synced = t.elapsed();
        // Not held across the write and sync (commits are serialised by the
        // checkpoint lock): a slow disk must not stall readers of the
        // committed superblock (`control`'s status, `stat`).
        let mut next = self.sb.lock().clone();
        next.seq += 1;
        next.gen = gen;
        next.flags = if clean { 0 } else { SB_FLAG_DIRTY };
        next.log_start_off = start_off;
        next.log_start_lsn = start_lsn;
        next.log_epoch = epoch;
        next.log_limit = if limit == u64::MAX { 0 } else { limit };
        next.log_tail = tail;
        next.index = index;
        next.virtual_size = self.virtual_size();
        if let Some(ptr) = snap_table {
            next.snap_table = ptr;
        }
        let slot = next.seq % 2;
        store
            .write_at(
                &crate::crypto::encode_superblock(&next, slot as u8, self.store.as_ref()),
                slot * SB_SLOT_SIZE,
            )
            .map_err(|e| self.fail(Error::io("write superblock", e)))?;
        store.sync().map_err(|e| {
            self.sync_failed
                .store(true, std::sync::atomic::Ordering::Release);
            self.fail(Error::io("sync superblock", e))
        })?;
        ::log::debug!(
            "checkpoint {gen}: records synced in {records_synced:?}, superblock in {:?}",
            t.elapsed() - records_synced
        );
        *self.sb.lock() = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{MemStore, Store};
    use crate::{CreateOptions, Image, OpenOptions};
    use std::sync::Arc;

    /// The log in a run whose limit lies past the end of the file (the
    /// file's trailing holes cut short of it), then left for the end of the
    /// file: the new run starts below the old one's limit, and what the old
    /// run gives back (its preallocation, the rest of its range) must stop
    /// there. It used to take the new run's index with it: "no record at …"
    /// at the next open (seen after `vbdfs compact`).
    #[test]
    fn a_run_left_for_a_file_cut_short_of_its_limit_keeps_the_next_runs_records() {
        let store = Arc::new(MemStore::new());
        let create = CreateOptions {
            size: 16 << 20,
            block_size: 4096,
            codec: Codec::None,
        };
        let data = |seed: u8| vec![seed; 256 << 10];
        let img = Image::create_on(store.clone(), &create, &OpenOptions::default()).unwrap();
        img.write_at(&data(1), 0).unwrap();
        // Written back before the run is restarted by hand below (a
        // checkpoint alone leaves dirty blocks in the cache: one written
        // back during the restart went into the old run at the new one's
        // start, and the test then lost block 0, 1 run in ~1,000).
        img.flush().unwrap();
        img.checkpoint().unwrap();
        let inner = &img.inner;
        let len = align_up(inner.file_len().unwrap(), LOG_UNIT);
        {
            let mut log = inner.log.lock();
            log.restart_run(len, 7, len, len + (4 << 20));
        }
        inner.checkpoint(false).unwrap();
        img.write_at(&data(2), 1 << 20).unwrap();
        img.flush().unwrap();
        inner.checkpoint(false).unwrap();
        // Its preallocation (if any) and the holes after its tail cut.
        let tail = inner.log.lock().off;
        assert!(inner.log.lock().run_extent().1 > tail + (1 << 20));
        store.set_len(tail).unwrap();
        inner.commit_moving(false, None, Wish::End).unwrap();
        assert_eq!(inner.log.lock().run_extent().1, u64::MAX);
        img.close().unwrap();
        let img = Image::open_on(store, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf == data(1));
        img.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf == data(2));
        assert!(img.check().unwrap().is_ok());
    }
}
