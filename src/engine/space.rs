//! Whole-image walks over snapshots: the space only each snapshot holds, and
//! the check of every snapshot's records.
//!
//! Both work leaf by leaf: snapshots that share a LEAF record (the leaf did not
//! change between them) share all its entries, so each distinct LEAF record is
//! read once, and only one leaf's worth of entries is in memory at a time.

use super::map::BlockMap;
use super::mapload::{load_map, read_index, read_leaf};
use super::reader::decode_data;
use super::snapshot::SnapshotUsage;
use super::{BadBlock, CheckReport, Image, Inner};
use crate::error::{Error, Result};
use crate::format::{EntryKind, MapEntry, SnapEntry, LEAF_ENTRIES};
use std::collections::{BTreeMap, HashSet};

/// The distinct LEAF records of one leaf number: (record offset, owners, entries).
type Distinct = Vec<(u64, Vec<usize>, Vec<MapEntry>)>;

impl Inner {
    pub(super) fn file_len(&self) -> Result<u64> {
        self.store.len().map_err(|e| Error::io("size of image", e))
    }

    pub(super) fn snapshot_entries(&self) -> Vec<SnapEntry> {
        self.snaps.entries()
    }

    /// Verifies every DATA record of every snapshot not already checked as
    /// part of the head (records shared by several snapshots are read once).
    pub(super) fn check_snapshots(&self, report: &mut CheckReport) -> Result<()> {
        self.report_lost_table(report);
        let mut seen: HashSet<u64> = self.map.read().data_entries().map(|(_, e)| e.off).collect();
        // The list first: a snapshot taken after the file length was read
        // would point past it.
        let snaps = self.snapshot_entries();
        let file_len = self.file_len()?;
        for snap in snaps {
            report.snapshots_checked += 1;
            // A snapshot deleted while this runs may have had its records
            // reclaimed already: only one that still exists is judged.
            let gone = || !self.snapshot_entries().iter().any(|s| s.id == snap.id);
            let map = match self.snapshot_map(&snap, file_len) {
                Ok(map) => map,
                Err(e) => {
                    if !gone() {
                        report.unreadable(&snap.name, &e);
                    }
                    continue;
                }
            };
            for (block, entry) in map.data_entries() {
                if !seen.insert(entry.off) {
                    continue;
                }
                report.blocks_checked += 1;
                if let Err(bad) = self.verify_snapshot_block(&snap.name, block, entry) {
                    if gone() {
                        break;
                    }
                    report.bad.push(bad);
                }
            }
        }
        Ok(())
    }

    /// Checks again, against this open's state, only what `earlier` found
    /// bad: the head's blocks, and the snapshots still there (a whole
    /// snapshot if its map could not be read, else its bad blocks). For an
    /// image checked from outside its mount, whose daemon may have reclaimed
    /// records (of overwritten blocks, of deleted snapshots) while the check
    /// read them: what is bad again in a newer state is damage.
    pub(super) fn recheck(&self, earlier: &CheckReport) -> Result<CheckReport> {
        let mut report = CheckReport {
            blocks_checked: earlier.blocks_checked,
            snapshots_checked: earlier.snapshots_checked,
            single_copy_records: earlier.single_copy_records,
            ..CheckReport::default()
        };
        self.report_lost_table(&mut report);
        if !earlier.damaged_copies.is_empty() {
            self.check_copies(&mut report)?;
        }
        for bad in earlier.bad.iter().filter(|b| b.snapshot.is_none()) {
            let entry = self.map.read().get(bad.block);
            if entry.kind == EntryKind::Data {
                report.bad.extend(self.bad_block(bad.block, entry));
            }
        }
        let file_len = self.file_len()?;
        for snap in self.snapshot_entries() {
            let whole = earlier.unreadable_snapshots.contains(&snap.name);
            let blocks: Vec<u64> = earlier
                .bad
                .iter()
                .filter(|b| b.snapshot.as_deref() == Some(snap.name.as_str()))
                .map(|b| b.block)
                .collect();
            if !whole && blocks.is_empty() {
                continue;
            }
            let map = match self.snapshot_map(&snap, file_len) {
                Ok(map) => map,
                Err(e) => {
                    report.unreadable(&snap.name, &e);
                    continue;
                }
            };
            let entries: Vec<(u64, MapEntry)> = if whole {
                map.data_entries().collect()
            } else {
                blocks
                    .iter()
                    .map(|&b| (b, map.get(b)))
                    .filter(|(_, e)| e.kind == EntryKind::Data)
                    .collect()
            };
            for (block, entry) in entries {
                if let Err(bad) = self.verify_snapshot_block(&snap.name, block, entry) {
                    report.bad.push(bad);
                }
            }
        }
        Ok(report)
    }

    /// A snapshot table lost in both copies is damage: no snapshot in it
    /// could be checked.
    fn report_lost_table(&self, report: &mut CheckReport) {
        if self.snaps.lost().is_some() {
            // The open's damage notes say why ([`Image::damage`]).
            report
                .errors
                .push("the snapshot table is lost: no snapshot was checked".into());
        }
    }

    fn snapshot_map(&self, snap: &SnapEntry, file_len: u64) -> Result<BlockMap> {
        load_map(
            self.store.as_ref(),
            snap.index,
            self.block_shift,
            file_len,
            self.blocks_of(snap.virtual_size),
        )
    }

    /// Reads and verifies snapshot `name`'s record of `block`.
    fn verify_snapshot_block(
        &self,
        name: &str,
        block: u64,
        entry: MapEntry,
    ) -> std::result::Result<(), BadBlock> {
        decode_data(self.store.as_ref(), block, entry, self.block_size())
            .map(drop)
            .map_err(|e| BadBlock {
                block,
                offset: block << self.block_shift,
                reason: format!("snapshot '{name}': {e}"),
                snapshot: Some(name.to_string()),
            })
    }
}

impl Image {
    /// Every snapshot with the bytes of DATA records that it alone references
    /// (neither the head nor another snapshot does). Reads every snapshot's
    /// index and each distinct leaf record once.
    pub fn snapshot_usage(&self) -> Result<Vec<SnapshotUsage>> {
        let inner = &self.inner;
        // Without a leaf of the head, what it shares with the snapshots
        // there is unknown.
        if let Some(leaf) = inner.map.read().lost.keys().next() {
            return Err(Error::corrupt(format!(
                "the head's map leaf {leaf} could not be read in either copy"
            )));
        }
        let snaps = inner.snapshot_entries();
        let file_len = inner.file_len()?;
        let store = inner.store.as_ref();
        let mut by_leaf: BTreeMap<u64, Vec<(usize, crate::format::LeafPtr)>> = BTreeMap::new();
        for (i, s) in snaps.iter().enumerate() {
            let ptrs = read_index(store, s.index, file_len, inner.blocks_of(s.virtual_size))
                .map_err(|e| e.context(format!("snapshot '{}'", s.name)))?;
            for p in ptrs {
                by_leaf.entry(p.leaf).or_default().push((i, p));
            }
        }
        let mut exclusive = vec![0u64; snaps.len()];
        for (leaf, owners) in by_leaf {
            let mut distinct: Distinct = Vec::new();
            for (i, p) in owners {
                match distinct.iter_mut().find(|d| d.0 == p.off) {
                    Some(d) => d.1.push(i),
                    None => {
                        let entries = read_leaf(
                            store,
                            &p,
                            inner.block_shift,
                            file_len,
                            inner.blocks_of(snaps[i].virtual_size),
                        )
                        .map_err(|e| e.context(format!("snapshot '{}'", snaps[i].name)))?;
                        distinct.push((p.off, vec![i], entries));
                    }
                }
            }
            if distinct.len() == 1 && distinct[0].1.len() > 1 {
                continue; // one record shared by several snapshots: nothing is exclusive
            }
            let head = inner
                .map
                .read()
                .leaves
                .get(&leaf)
                .map(|l| l.entries.clone());
            count_leaf(&distinct, head.as_deref(), &mut exclusive);
        }
        Ok(snaps
            .iter()
            .zip(exclusive)
            .map(|(s, bytes)| SnapshotUsage {
                info: inner.snapshot_info(s),
                exclusive_bytes: bytes,
            })
            .collect())
    }
}

/// Adds, per owner, the record bytes of one leaf that only that owner maps.
fn count_leaf(distinct: &Distinct, head: Option<&[MapEntry]>, exclusive: &mut [u64]) {
    // (record offset, number of owners, first owner, record length)
    let mut offs: Vec<(u64, usize, usize, u32)> = Vec::with_capacity(distinct.len());
    for pos in 0..LEAF_ENTRIES as usize {
        offs.clear();
        for (_, owners, entries) in distinct {
            let Some(e) = entries.get(pos).filter(|e| e.kind == EntryKind::Data) else {
                continue;
            };
            match offs.iter_mut().find(|o| o.0 == e.off) {
                Some(o) => o.1 += owners.len(),
                None => offs.push((e.off, owners.len(), owners[0], e.len)),
            }
        }
        let in_head = |off: u64| {
            head.and_then(|h| h.get(pos))
                .is_some_and(|e| e.kind == EntryKind::Data && e.off == off)
        };
        for &(off, count, owner, len) in &offs {
            if count == 1 && !in_head(off) {
                exclusive[owner] += u64::from(len);
            }
        }
    }
}
