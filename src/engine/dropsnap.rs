//! Returning the host space of the records only a deleted snapshot held.
//!
//! A record that dies while a snapshot holds it is not reclaimed
//! ([`Inner::punch_dead`] keeps every DATA record born before the newest
//! snapshot). When the snapshot is deleted those records are garbage; a
//! compaction would find them by loading every map at once. Instead, the
//! `vbd-reclaim` thread walks the deleted snapshot's map one leaf at a time
//! (bounded memory; the checkpoint lock is held for the reads of one leaf of
//! it and of each newer map) and hands the records only it held to the held
//! dead space.
//!
//! Which records: an entry `e` of the deleted snapshot S is held by nothing
//! else when `e.birth` is after the newest older snapshot (so no older
//! snapshot has it) and no newer map has that block at `e`: not a newer
//! snapshot, not the committed head, not the head in memory. Every newer
//! map is asked, not only the next one: a rollback makes the head an older
//! map again, so a record that the next snapshot no longer has can be in
//! the head and in snapshots taken after the rollback. This is judged
//! under the checkpoint lock, leaf by leaf.

use super::map::Dead;
use super::mapload::{read_index, read_leaf};
use super::Inner;
use crate::format::{EntryKind, LeafPtr, MapEntry, RecPtr, LEAF_ENTRIES};
use crate::Result;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A deleted snapshot whose records are still to be judged.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeletedSnapshot {
    /// Its INDEX record.
    pub index: RecPtr,
    /// The checkpoint generation that made it.
    pub gen: u64,
    /// Its disk's blocks (its map maps none past them).
    pub nblocks: u64,
    /// Compactions completed when it was deleted: one completed since has
    /// given back everything only it held (and may have punched its map).
    pub compactions: u64,
    /// Leaves below this one have been judged.
    pub next_leaf: u64,
}

/// The reclaim thread judges deleted snapshots for about this long per
/// tick, so that punching the held dead space is not held up for long.
const SLICE: Duration = Duration::from_millis(100);

/// A newer map the deleted snapshot's leaves are compared with.
struct Successor {
    index: RecPtr,
    nblocks: u64,
    leaves: Vec<LeafPtr>,
}

impl Successor {
    /// Its entries for leaf `leaf` (empty when it maps nothing there).
    fn leaf(&self, inner: &Inner, leaf: u64, file_len: u64) -> Result<Vec<MapEntry>> {
        // An index lists its leaves in increasing order.
        match self.leaves.binary_search_by_key(&leaf, |p| p.leaf) {
            Ok(i) => read_leaf(
                inner.store.as_ref(),
                &self.leaves[i],
                inner.block_shift,
                file_len,
                self.nblocks,
            ),
            Err(_) => Ok(Vec::new()),
        }
    }
}

impl Inner {
    /// Queues `gone` for the reclaim thread (or the next checkpoint asked
    /// for, or the close).
    pub(super) fn snapshot_deleted(&self, gone: DeletedSnapshot) {
        if !self.read_only {
            self.deleted_snapshots.lock().push(gone);
        }
    }

    /// Judges every queued deleted snapshot; the records only it held join
    /// the held dead space.
    pub(super) fn reclaim_deleted_snapshots(&self) {
        self.judge_deleted(None);
    }

    /// The reclaim thread's share: about [`SLICE`] of judging.
    pub(super) fn reclaim_deleted_snapshots_slice(&self) {
        self.judge_deleted(Some(Instant::now() + SLICE));
    }

    fn judge_deleted(&self, until: Option<Instant>) {
        // Held while judging: a caller that wants everything reclaimed (an
        // explicit checkpoint, the close) waits for a job the reclaim thread
        // has taken.
        let _judging = self.judging_deleted.lock();
        loop {
            let Some(gone) = self.deleted_snapshots.lock().pop() else {
                return;
            };
            match self.reclaim_deleted(gone, until) {
                Ok(Some(rest)) => {
                    self.deleted_snapshots.lock().push(rest);
                    return;
                }
                Ok(None) => {}
                // Nothing is punched for what could not be read: `compact`
                // still finds it.
                Err(e) => ::log::warn!("space of a deleted snapshot not reclaimed: {e}"),
            }
        }
    }

    /// Judges `gone`'s leaves from `gone.next_leaf` on; returns what is left
    /// when `until` passes first. A leaf that cannot be judged (a record
    /// unreadable) is skipped with a warning: nothing of it is punched, and
    /// `compact` still finds what it held.
    fn reclaim_deleted(
        &self,
        gone: DeletedSnapshot,
        until: Option<Instant>,
    ) -> Result<Option<DeletedSnapshot>> {
        // A compaction since gave back what it held (and may have punched
        // its map records: reading them would fail).
        if gone.compactions < self.compactions.load(Ordering::Acquire) {
            return Ok(None);
        }
        let leaves = read_index(
            self.store.as_ref(),
            gone.index,
            self.file_len()?,
            gone.nblocks,
        )?;
        let mut successors: Vec<Successor> = Vec::new();
        for (i, ptr) in leaves
            .iter()
            .filter(|p| p.leaf >= gone.next_leaf)
            .enumerate()
        {
            // At least one leaf per call: a job always moves on.
            if i > 0 && until.is_some_and(|t| Instant::now() >= t) {
                return Ok(Some(DeletedSnapshot {
                    next_leaf: ptr.leaf,
                    ..gone
                }));
            }
            match self.judge_leaf(&gone, ptr, &mut successors) {
                Ok(Some(mut dead)) => {
                    dead.retain(|d| self.holds_its_block(d));
                    self.hold_dead(dead);
                }
                Ok(None) => return Ok(None), // not deleted after all, or compacted
                Err(e) => ::log::warn!(
                    "space of leaf {} of a deleted snapshot not reclaimed: {e}",
                    ptr.leaf
                ),
            }
        }
        Ok(None)
    }

    /// The records of leaf `ptr` of `gone` that no other map holds, judged
    /// under the checkpoint lock; None if `gone` is a snapshot again (a
    /// stale job) or a compaction has run since it was deleted.
    /// `successors` caches the newer maps' indexes.
    fn judge_leaf(
        &self,
        gone: &DeletedSnapshot,
        ptr: &LeafPtr,
        successors: &mut Vec<Successor>,
    ) -> Result<Option<Vec<Dead>>> {
        let store = self.store.as_ref();
        let _one = self.checkpoint_lock.lock();
        // Read now: the newer maps name records appended since the job began.
        let file_len = self.file_len()?;
        let snaps = self.snapshot_entries();
        // A snapshot again (a stale job), or a compaction since gave back
        // what it held (and may have punched its map records).
        if snaps.iter().any(|s| s.index == gone.index)
            || gone.compactions < self.compactions.load(Ordering::Acquire)
        {
            return Ok(None);
        }
        let older = snaps.iter().map(|s| s.gen).filter(|&g| g < gone.gen).max();
        let committed = {
            let sb = self.sb.lock();
            (sb.index, sb.virtual_size)
        };
        let newer: Vec<(RecPtr, u64)> = snaps
            .iter()
            .filter(|s| s.gen > gone.gen)
            .map(|s| (s.index, s.virtual_size))
            .chain([committed])
            .collect();
        if successors.len() != newer.len()
            || successors.iter().zip(&newer).any(|(s, n)| s.index != n.0)
        {
            *successors = newer
                .iter()
                .map(|&(index, size)| {
                    let nblocks = self.blocks_of(size);
                    Ok(Successor {
                        index,
                        nblocks,
                        leaves: read_index(store, index, file_len, nblocks)?,
                    })
                })
                .collect::<Result<_>>()?;
        }
        let Ok(mine) = read_leaf(store, ptr, self.block_shift, file_len, gone.nblocks) else {
            return Ok(Some(Vec::new())); // reclaimed meanwhile (compact): nothing to judge
        };
        let mut dead = only_here(ptr.leaf, &mine, &[], older.unwrap_or(0));
        for successor in successors.iter() {
            let theirs = successor.leaf(self, ptr.leaf, file_len)?;
            dead.retain(|d| still_dead(d, ptr.leaf, &theirs));
        }
        // The head in memory too: a rollback sets it before the checkpoint
        // that commits it.
        let map = self.map.read();
        dead.retain(|d| {
            let e = map.get(d.block);
            e.kind != EntryKind::Data || e.off != d.off
        });
        Ok(Some(dead))
    }
}

/// True if `d` (an entry of leaf `leaf`) is not in `theirs`, a newer map's
/// entries for that leaf.
fn still_dead(d: &Dead, leaf: u64, theirs: &[MapEntry]) -> bool {
    let i = (d.block - leaf * LEAF_ENTRIES) as usize;
    theirs
        .get(i)
        .is_none_or(|t| t.kind != EntryKind::Data || t.off != d.off)
}

/// The DATA entries of leaf `leaf` of the deleted snapshot (`mine`) held by
/// nothing else: born after generation `older` and not in its successor's
/// leaf (`theirs`, empty when the successor maps nothing there).
fn only_here(leaf: u64, mine: &[MapEntry], theirs: &[MapEntry], older: u64) -> Vec<Dead> {
    mine.iter()
        .enumerate()
        .filter(|&(i, e)| {
            e.kind == EntryKind::Data
                && u64::from(e.birth) > older
                && theirs
                    .get(i)
                    .is_none_or(|t| t.kind != EntryKind::Data || t.off != e.off)
        })
        .map(|(i, e)| Dead {
            off: e.off,
            len: e.len,
            birth: Some(e.birth),
            block: leaf * LEAF_ENTRIES + i as u64,
            ends_append: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStore;
    use crate::{Codec, CreateOptions, Image, OpenOptions};
    use std::sync::Arc;

    #[test]
    fn a_sliced_walk_judges_one_leaf_at_least_and_resumes_where_it_stopped() {
        // 4 KiB blocks: a leaf maps 4 MiB; 12 MiB written spans leaves 0..3.
        let create = CreateOptions {
            size: 64 << 20,
            block_size: 4096,
            codec: Codec::None,
        };
        let img =
            Image::create_on(Arc::new(MemStore::new()), &create, &OpenOptions::default()).unwrap();
        img.write_at(&vec![1u8; 12 << 20], 0).unwrap();
        img.snapshot_create("s").unwrap();
        img.write_at(&vec![2u8; 12 << 20], 0).unwrap();
        img.checkpoint().unwrap();
        let entry = img.inner.snapshot_entries().pop().unwrap();
        img.snapshot_delete("s").unwrap();
        let job = DeletedSnapshot {
            index: entry.index,
            gen: entry.gen,
            nblocks: img.inner.blocks_of(entry.virtual_size),
            compactions: 0,
            next_leaf: 0,
        };
        // A deadline already past still judges one leaf.
        let past = Some(Instant::now());
        let rest = img.inner.reclaim_deleted(job, past).unwrap().unwrap();
        assert_eq!(rest.next_leaf, 1);
        let rest = img.inner.reclaim_deleted(rest, past).unwrap().unwrap();
        assert_eq!(rest.next_leaf, 2);
        assert!(img.inner.reclaim_deleted(rest, past).unwrap().is_none());
        assert!(img.inner.reclaim_deleted(job, None).unwrap().is_none());
        img.checkpoint().unwrap();
        let mut got = vec![0u8; 12 << 20];
        img.read_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|&b| b == 2));
        img.close().unwrap();
    }

    #[test]
    fn a_deleted_snapshot_compacted_since_is_not_judged_again() {
        let create = CreateOptions {
            size: 16 << 20,
            block_size: 4096,
            codec: Codec::None,
        };
        let img =
            Image::create_on(Arc::new(MemStore::new()), &create, &OpenOptions::default()).unwrap();
        img.write_at(&vec![1u8; 8 << 20], 0).unwrap();
        img.snapshot_create("s").unwrap();
        img.write_at(&vec![2u8; 8 << 20], 0).unwrap();
        let entry = img.inner.snapshot_entries().pop().unwrap();
        img.snapshot_delete("s").unwrap();
        let job = DeletedSnapshot {
            index: entry.index,
            gen: entry.gen,
            nblocks: img.inner.blocks_of(entry.virtual_size),
            compactions: img.inner.compactions.load(Ordering::Acquire),
            next_leaf: 0,
        };
        // The compaction punches the deleted snapshot's map records: a
        // judging afterwards would fail to read them ("no record at …").
        img.compact().unwrap();
        assert!(img.inner.reclaim_deleted(job, None).unwrap().is_none());
        img.close().unwrap();
    }

    fn data(off: u64, birth: u32) -> MapEntry {
        MapEntry::data(off, 1000, birth)
    }

    #[test]
    fn only_records_no_other_map_can_hold_are_dead() {
        let mine = [
            data(65536, 3), // born before the older snapshot (gen 4): shared with it
            data(70000, 5), // the successor maps the block elsewhere: only here
            data(80000, 6), // the successor has the same record: shared
            MapEntry::default(),
            data(90000, 7), // beyond the successor's leaf: only here
        ];
        let theirs = [data(65536, 3), data(99000, 9), data(80000, 6), data(1, 1)];
        let dead = only_here(2, &mine, &theirs, 4);
        let offs: Vec<(u64, u64)> = dead.iter().map(|d| (d.off, d.block)).collect();
        assert_eq!(offs, [(70000, 2049), (90000, 2052)]);
        assert!(only_here(2, &mine, &mine, 0).is_empty());
        assert_eq!(only_here(2, &mine, &[], 0).len(), 4);
    }
}
