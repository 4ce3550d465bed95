//! The block map: virtual block index -> where its content lives.
//!
//! Held fully in memory as leaves of 1024 entries (a leaf covers 1024 blocks),
//! kept in a `BTreeMap` so only touched regions cost memory: 24 KiB of RAM per
//! touched leaf, i.e. 384 KiB per GiB of written virtual space at 64 KiB blocks.
//! Leaves changed since the last checkpoint are marked dirty; the checkpoint
//! writes them as LEAF records and remembers where (`ptrs`).

use crate::error::Error;
use crate::format::{EntryKind, LeafPtr, MapEntry, LEAF_ENTRIES};
use std::collections::BTreeMap;

/// The entry each block of a leaf whose LEAF record could be read in neither
/// copy gets ([`BlockMap::lose_leaf`]; only in maps that are only read: a
/// read-only session's head, snapshot readers). It is a DATA entry, so every
/// path that reads stored content reads it (nothing takes the block for a
/// hole), and it names offset 0, the superblock, where no record can be: a
/// read of it fails even where nothing checks for it by name. The readers
/// check for it and fail with [`lost_block`].
pub(crate) const LOST: MapEntry = MapEntry {
    kind: EntryKind::Data,
    off: 0,
    len: 1,
    birth: 0,
};

#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub entries: Box<[MapEntry]>,
    /// One bit per entry: its record is the last of an append, so the zeros
    /// up to the next log unit belong to it (known only for records written
    /// in this session; reclaim then needs no read to merge across them).
    ends_append: Box<[u64]>,
    pub dirty: bool,
}

impl Leaf {
    fn unmapped() -> Leaf {
        Leaf {
            entries: vec![MapEntry::default(); LEAF_ENTRIES as usize].into_boxed_slice(),
            ends_append: vec![0; LEAF_ENTRIES.div_ceil(64) as usize].into_boxed_slice(),
            dirty: true,
        }
    }
}

/// The error of a read of a block whose entry is [`LOST`].
pub(crate) fn lost_block(block: u64) -> Error {
    Error::corrupt(format!(
        "block {block}: its map leaf {} could not be read in either copy",
        block / LEAF_ENTRIES
    ))
}

/// The map of one image's head.
#[derive(Debug, Default)]
pub(crate) struct BlockMap {
    pub leaves: BTreeMap<u64, Leaf>,
    /// Where each leaf was last written (by a checkpoint).
    pub ptrs: BTreeMap<u64, LeafPtr>,
    /// Blocks mapped to DATA records.
    pub data_blocks: u64,
    /// Sum of DATA record lengths.
    pub stored_bytes: u64,
    /// DATA records this map stopped referencing since the last checkpoint
    /// took the list (overwritten or discarded blocks): candidates for
    /// reclaim once a checkpoint without them is durable.
    pub freed: Vec<Dead>,
    /// Leaves whose LEAF record was damaged and read from its second copy
    /// when the map was loaded (a read-write open writes them anew).
    pub from_second_copy: Vec<u64>,
    /// Leaves whose LEAF record could be read in neither copy, with why
    /// (only a read-only session keeps a map with lost leaves).
    pub lost: BTreeMap<u64, String>,
}

/// A record no longer referenced by the head: where it is, and its birth
/// (`None` for map metadata: leaf and index records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dead {
    pub off: u64,
    pub len: u32,
    /// A DATA record's birth (None: a LEAF, INDEX or SNAP_TABLE record).
    pub birth: Option<u32>,
    /// The block a DATA record held when it died.
    pub block: u64,
    /// The record was the last of its append (written this session): the
    /// zeros after it, up to the next log unit, are dead with it.
    pub ends_append: bool,
}

fn split(block: u64) -> (u64, usize) {
    (block / LEAF_ENTRIES, (block % LEAF_ENTRIES) as usize)
}

impl BlockMap {
    pub fn get(&self, block: u64) -> MapEntry {
        let (leaf, i) = split(block);
        self.leaves
            .get(&leaf)
            .map(|l| l.entries[i])
            .unwrap_or_default()
    }

    /// Sets the entry for `block`; returns the previous one.
    /// Marks `leaf` for the next checkpoint to write anew (an all-unmapped
    /// leaf is then dropped from the index, its record freed).
    pub fn rewrite_leaf(&mut self, leaf: u64) {
        self.leaves.entry(leaf).or_insert_with(Leaf::unmapped).dirty = true;
    }

    pub fn set(&mut self, block: u64, entry: MapEntry) -> MapEntry {
        self.set_record(block, entry, false)
    }

    /// [`BlockMap::set`], noting whether the entry's record is the last of
    /// the append that wrote it.
    pub fn set_record(&mut self, block: u64, entry: MapEntry, ends_append: bool) -> MapEntry {
        let (leaf, i) = split(block);
        if entry.kind == EntryKind::Unmapped && !self.leaves.contains_key(&leaf) {
            return MapEntry::default();
        }
        let leaf = self.leaves.entry(leaf).or_insert_with(Leaf::unmapped);
        let old = std::mem::replace(&mut leaf.entries[i], entry);
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let old_ended_append = leaf.ends_append[word] & bit != 0;
        if ends_append && entry.kind == EntryKind::Data {
            leaf.ends_append[word] |= bit;
        } else {
            leaf.ends_append[word] &= !bit;
        }
        leaf.dirty = true;
        if old.kind == EntryKind::Data {
            self.data_blocks -= 1;
            self.stored_bytes -= u64::from(old.len);
            self.freed.push(Dead {
                off: old.off,
                len: old.len,
                birth: Some(old.birth),
                block,
                ends_append: old_ended_append,
            });
        }
        if entry.kind == EntryKind::Data {
            self.data_blocks += 1;
            self.stored_bytes += u64::from(entry.len);
        }
        old
    }

    /// Sets every block in `[first, first+count)` to `entry` (no DATA entries).
    pub fn set_range(&mut self, first: u64, count: u64, entry: MapEntry) {
        debug_assert_ne!(entry.kind, EntryKind::Data);
        let end = first + count;
        let leaves: Vec<u64> = if entry.kind == EntryKind::Unmapped {
            self.leaves
                .range(first / LEAF_ENTRIES..=(end - 1) / LEAF_ENTRIES)
                .map(|(k, _)| *k)
                .collect()
        } else {
            (first / LEAF_ENTRIES..=(end - 1) / LEAF_ENTRIES).collect()
        };
        for leaf in leaves {
            let lo = (leaf * LEAF_ENTRIES).max(first);
            let hi = ((leaf + 1) * LEAF_ENTRIES).min(end);
            for block in lo..hi {
                self.set(block, entry);
            }
        }
    }

    /// The first block >= `from` with a DATA or ZERO entry, if any.
    pub fn next_mapped(&self, from: u64) -> Option<u64> {
        let (first_leaf, _) = split(from);
        for (&leaf, l) in self.leaves.range(first_leaf..) {
            let start = if leaf == first_leaf {
                (from % LEAF_ENTRIES) as usize
            } else {
                0
            };
            if let Some(i) = l.entries[start..]
                .iter()
                .position(|e| e.kind == EntryKind::Data)
            {
                return Some(leaf * LEAF_ENTRIES + (start + i) as u64);
            }
        }
        None
    }

    /// Gives every block of `leaf` below `nblocks` the [`LOST`] entry: its
    /// LEAF record could not be read (`why`), so none of its blocks can be.
    /// The log's roll-forward may then map some of them again.
    pub fn lose_leaf(&mut self, leaf: u64, nblocks: u64, why: String) {
        let first = leaf * LEAF_ENTRIES;
        for block in first..(first + LEAF_ENTRIES).min(nblocks) {
            self.set(block, LOST);
        }
        self.lost.insert(leaf, why);
    }

    /// One line per lost leaf: which blocks read as errors, and why.
    pub fn lost_notes(&self, nblocks: u64, block_shift: u8) -> Vec<String> {
        self.lost
            .iter()
            .map(|(&leaf, why)| {
                let first = leaf * LEAF_ENTRIES;
                let last = (first + LEAF_ENTRIES)
                    .min(nblocks)
                    .saturating_sub(1)
                    .max(first);
                format!(
                    "{why}: blocks {first}..={last} (offsets {}..={}) read as I/O errors",
                    first << block_shift,
                    last << block_shift
                )
            })
            .collect()
    }

    /// Every DATA entry, in block order.
    pub fn data_entries(&self) -> impl Iterator<Item = (u64, MapEntry)> + '_ {
        self.leaves.iter().flat_map(|(&leaf, l)| {
            l.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.kind == EntryKind::Data)
                .map(move |(i, e)| (leaf * LEAF_ENTRIES + i as u64, *e))
        })
    }

    /// Takes the dirty leaves (cloned) and clears their dirty flags; leaves that
    /// became entirely unmapped are dropped from the map and the index.
    pub fn take_dirty(&mut self) -> Vec<(u64, Box<[MapEntry]>)> {
        let mut out = Vec::new();
        let mut empty = Vec::new();
        for (&leaf, l) in self.leaves.iter_mut().filter(|(_, l)| l.dirty) {
            l.dirty = false;
            if l.entries.iter().all(|e| e.kind == EntryKind::Unmapped) {
                empty.push(leaf);
            } else {
                out.push((leaf, l.entries.clone()));
            }
        }
        for leaf in empty {
            self.leaves.remove(&leaf);
            if let Some(old) = self.ptrs.remove(&leaf) {
                self.freed.push(Dead {
                    off: old.off,
                    len: old.len,
                    birth: None,
                    block: 0,
                    ends_append: false,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(off: u64, len: u32) -> MapEntry {
        MapEntry::data(off, len, 1)
    }

    #[test]
    fn set_get_and_counters() {
        let mut m = BlockMap::default();
        assert_eq!(m.get(5000).kind, EntryKind::Unmapped);
        m.set(5000, data(65536, 100));
        m.set(7, data(70000, 50));
        assert_eq!(m.get(5000), data(65536, 100));
        assert_eq!((m.data_blocks, m.stored_bytes), (2, 150));
        let old = m.set(5000, data(80000, 10));
        assert_eq!(old.off, 65536);
        assert_eq!((m.data_blocks, m.stored_bytes), (2, 60));
        m.set_range(0, 10_000, MapEntry::default());
        assert_eq!((m.data_blocks, m.stored_bytes), (0, 0));
        assert!(m.next_mapped(0).is_none());
    }

    #[test]
    fn a_dead_record_remembers_whether_it_ended_its_append() {
        let mut m = BlockMap::default();
        m.set_record(9, data(65536, 100), true);
        m.set_record(10, data(65636, 100), false);
        m.set(9, data(90000, 10));
        m.set_record(10, data(90010, 10), true);
        m.set(10, MapEntry::default());
        let ends: Vec<(u64, bool)> = m.freed.iter().map(|d| (d.off, d.ends_append)).collect();
        assert_eq!(ends, [(65536, true), (65636, false), (90010, true)]);
        // The mark goes with the entry: block 9's new record did not end one.
        m.set(9, MapEntry::default());
        assert!(!m.freed[3].ends_append);
    }

    #[test]
    fn a_lost_leaf_reads_as_data_until_a_block_is_written_again() {
        let mut m = BlockMap::default();
        m.lose_leaf(1, LEAF_ENTRIES + 10, "damaged".into());
        assert_eq!(m.get(LEAF_ENTRIES + 3), LOST);
        assert_eq!(m.get(LEAF_ENTRIES + 10).kind, EntryKind::Unmapped);
        assert_eq!(m.next_mapped(0), Some(LEAF_ENTRIES));
        assert_eq!(m.data_blocks, 10);
        m.set(LEAF_ENTRIES + 3, data(65536, 100));
        assert_eq!(m.get(LEAF_ENTRIES + 3), data(65536, 100));
        assert_eq!(m.get(LEAF_ENTRIES + 4), LOST);
        assert_eq!(m.lost.keys().collect::<Vec<_>>(), [&1]);
    }

    #[test]
    fn next_mapped_skips_holes() {
        let mut m = BlockMap::default();
        m.set(3, data(65536, 100));
        m.set(4000, data(65536, 100));
        assert_eq!(m.next_mapped(0), Some(3));
        assert_eq!(m.next_mapped(4), Some(4000));
        assert_eq!(m.next_mapped(4001), None);
    }

    #[test]
    fn dirty_leaves_are_taken_once_and_empty_ones_dropped() {
        let mut m = BlockMap::default();
        m.set(1, data(65536, 100));
        m.set(2048, data(65536, 100));
        assert_eq!(m.take_dirty().len(), 2);
        assert!(m.take_dirty().is_empty());
        m.set(2048, MapEntry::default());
        assert!(m.take_dirty().is_empty());
        assert!(!m.leaves.contains_key(&2));
    }
}
