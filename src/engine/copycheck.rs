//! `check` of the two copies of every map record (`docs/format.md` §4,
//! "Second copies"): the head's (index, leaves, snapshot table, backing
//! reference) and every snapshot's (index, leaves). A damaged copy loses
//! nothing while the other serves, but it is damage to the file: it is
//! reported, and a read-write check (`vbdfs check --repair`, offline) writes
//! them anew: the head's, and a snapshot's as a new index (and new copies
//! of its damaged leaves) that its table entry names from then on — unless
//! a clone is based on the snapshot (the clone checks the index it was made
//! from: those records stay, reported).

use super::copies::{read_first, read_second, MetaRef, Rewrite};
use super::mapload::{leaf_ref, read_index, read_leaf};
use super::{CheckReport, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::format::RECORD_FLAG_HAS_COPY;
use crate::format::{LeafPtr, MapEntry, RecPtr, RecordKind, SnapEntry};
use std::collections::{HashMap, HashSet};

/// Which record of the head a map record is (what a repair writes anew).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadRecord {
    Index,
    Leaf(u64),
    SnapTable,
    Config,
}

/// A map record to check, named for the report.
struct Named {
    what: String,
    r: MetaRef,
    head: Option<HeadRecord>,
}

/// The state of a map record's two copies (two reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copies {
    Both,
    /// Written before copies existed: the first copy, without `HAS_COPY`.
    Single,
    FirstDamaged,
    SecondDamaged,
    /// Neither reads: the map cannot be read, which the open or the
    /// snapshot check reports.
    Neither,
}

impl Copies {
    fn of(store: &dyn crate::io::Store, r: &MetaRef) -> Copies {
        let first = read_first(store, r);
        let second = read_second(store, r).is_ok();
        match (first, second) {
            (Ok(_), true) => Copies::Both,
            (Err(_), true) => Copies::FirstDamaged,
            (Ok((h, _)), false) if h.flags & RECORD_FLAG_HAS_COPY != 0 => Copies::SecondDamaged,
            (Ok(_), false) => Copies::Single,
            (Err(_), false) => Copies::Neither,
        }
    }

    /// What is wrong, for the report.
    fn problem(self) -> Option<&'static str> {
        match self {
            Copies::FirstDamaged => Some("its first copy is damaged (the second serves)"),
            Copies::SecondDamaged => Some("its second copy is damaged or missing"),
            Copies::Both | Copies::Single | Copies::Neither => None,
        }
    }
}

impl Inner {
    /// Every map record of the head and of the snapshots, each once.
    fn map_records(&self) -> Result<Vec<Named>> {
        let sb = self.sb.lock().clone();
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut add = |what: String, ptr: RecPtr, kind, key, head| {
            if ptr.off != 0 && seen.insert(ptr.off) {
                out.push(Named {
                    what,
                    r: MetaRef { ptr, kind, key },
                    head,
                });
            }
        };
        let leaf_ptr = |p: &crate::format::LeafPtr| RecPtr {
            off: p.off,
            len: p.len,
            crc: p.crc,
        };
        let head_leaves: Vec<_> = self.map.read().ptrs.values().copied().collect();
        let head = Some(HeadRecord::Index);
        add(
            "the map index".into(),
            sb.index,
            RecordKind::Index,
            None,
            head,
        );
        for p in &head_leaves {
            let (what, head) = (
                format!("map leaf {}", p.leaf),
                Some(HeadRecord::Leaf(p.leaf)),
            );
            add(what, leaf_ptr(p), RecordKind::Leaf, Some(p.leaf), head);
        }
        let (table, config) = (Some(HeadRecord::SnapTable), Some(HeadRecord::Config));
        add(
            "the snapshot table".into(),
            sb.snap_table,
            RecordKind::SnapTable,
            None,
            table,
        );
        add(
            "the backing reference".into(),
            sb.config,
            RecordKind::Config,
            None,
            config,
        );
        let file_len = self.file_len()?;
        for snap in self.snapshot_entries() {
            let what = format!("snapshot '{}': its map index", snap.name);
            add(what, snap.index, RecordKind::Index, None, None);
            // An index that cannot be read is the snapshot check's finding.
            let store = self.store.as_ref();
            let nblocks = self.blocks_of(snap.virtual_size);
            let Ok(leaves) = read_index(store, snap.index, file_len, nblocks) else {
                continue;
            };
            for p in &leaves {
                let what = format!("snapshot '{}': map leaf {}", snap.name, p.leaf);
                add(what, leaf_ptr(p), RecordKind::Leaf, Some(p.leaf), None);
            }
        }
        Ok(out)
    }

    /// The records of `records` with a damaged copy, and how many have no
    /// second copy.
    fn damaged_copies(&self, records: Vec<Named>) -> (Vec<(Named, &'static str)>, u64) {
        let store = self.store.as_ref();
        let mut single = 0;
        let mut found = Vec::new();
        for n in records {
            let copies = Copies::of(store, &n.r);
            match copies.problem() {
                Some(p) => found.push((n, p)),
                None if copies == Copies::Single => single += 1,
                None => {}
            }
        }
        (found, single)
    }

    /// Checks both copies of every map record into `report`; a read-write
    /// open first writes the head's damaged ones anew (`repaired`).
    pub(super) fn check_copies(&self, report: &mut CheckReport) -> Result<()> {
        // Rewriting snapshot maps appends outside a checkpoint's bound.
        let _paused = (!self.read_only).then(|| self.pause_moves());
        let (mut found, mut single) = self.damaged_copies(self.map_records()?);
        let head: Vec<_> = found.iter().filter(|(n, _)| n.head.is_some()).collect();
        if !self.read_only && !head.is_empty() {
            let mut rewrite = Rewrite::default();
            {
                let mut map = self.map.write();
                for (n, _) in &head {
                    match n.head {
                        Some(HeadRecord::Leaf(leaf)) => map.rewrite_leaf(leaf),
                        Some(HeadRecord::SnapTable) => rewrite.snap_table = true,
                        Some(HeadRecord::Config) => rewrite.config = true,
                        Some(HeadRecord::Index) => rewrite.index = true,
                        None => {}
                    }
                }
            }
            let repaired: Vec<String> = head
                .iter()
                .map(|(n, p)| format!("{} at {}: {p}; written anew", n.what, n.r.ptr.off))
                .collect();
            self.checkpoint_rewriting(rewrite)?;
            report.repaired.extend(repaired);
            (found, single) = self.damaged_copies(self.map_records()?);
        }
        if !self.read_only && !found.is_empty() {
            for (name, n) in self.rewrite_snapshot_maps(false)? {
                report.repaired.push(format!(
                    "snapshot '{name}': {n} map record(s) with a damaged copy; its index and \
                     those leaves written anew"
                ));
            }
            (found, single) = self.damaged_copies(self.map_records()?);
        }
        report.damaged_copies.extend(
            found
                .iter()
                .map(|(n, p)| format!("{} at {}: {p}", n.what, n.r.ptr.off)),
        );
        report.single_copy_records = single;
        Ok(())
    }

    /// Gives the snapshots no clone is based on second copies of their map
    /// records where they have none (written before copies existed):
    /// compaction's part for snapshots.
    pub(super) fn copy_snapshot_maps(&self) -> Result<()> {
        self.rewrite_snapshot_maps(true).map(|_| ())
    }

    /// [`Inner::rewrite_snapshot_map`] for every snapshot no clone is based
    /// on; a leaf record several snapshots share is written anew once, and
    /// shared again. Returns each snapshot written anew and how many of its
    /// records needed it.
    fn rewrite_snapshot_maps(&self, single_too: bool) -> Result<Vec<(String, usize)>> {
        let mut rewritten = HashMap::new();
        let mut out = Vec::new();
        for snap in self.snapshot_entries().iter().filter(|s| s.holds == 0) {
            match self.rewrite_snapshot_map(snap, single_too, &mut rewritten) {
                Ok(Some(n)) => out.push((snap.name.clone(), n)),
                Ok(None) => {}
                // A clone made or the snapshot deleted meanwhile (a mount's
                // compaction): left as it is.
                Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Writes anew the map records of snapshot `snap` that have a damaged
    /// copy (and, if `single_too`, those without a second copy): those
    /// leaves, and a new index listing them, which the snapshot's entry
    /// names from then on (committed with the table; the old records are
    /// left to compaction). `None` if there was nothing to write.
    fn rewrite_snapshot_map(
        &self,
        snap: &SnapEntry,
        single_too: bool,
        rewritten: &mut HashMap<u64, LeafPtr>,
    ) -> Result<Option<usize>> {
        let store = self.store.as_ref();
        let file_len = self.file_len()?;
        // A map that cannot be read at all is the snapshot check's finding.
        let nblocks = self.blocks_of(snap.virtual_size);
        let Ok(mut leaves) = read_index(store, snap.index, file_len, nblocks) else {
            return Ok(None);
        };
        let index = MetaRef {
            ptr: snap.index,
            kind: RecordKind::Index,
            key: None,
        };
        let needed = |r: &MetaRef| {
            let copies = Copies::of(store, r);
            copies.problem().is_some() || single_too && copies == Copies::Single
        };
        let mut count = usize::from(needed(&index));
        let mut damaged = Vec::new();
        for (i, leaf) in leaves.iter_mut().enumerate() {
            if let Some(done) = rewritten.get(&leaf.off) {
                *leaf = *done;
                count += 1;
            } else if needed(&leaf_ref(leaf)) {
                damaged.push(i);
                count += 1;
            }
        }
        if count == 0 {
            return Ok(None);
        }
        let mut loaded = Vec::with_capacity(damaged.len());
        for &i in &damaged {
            let leaf = read_leaf(store, &leaves[i], self.block_shift, file_len, nblocks);
            let Ok(entries) = leaf else {
                return Ok(None);
            };
            loaded.push((leaves[i].leaf, entries));
        }
        let refs: Vec<(u64, &[MapEntry])> = loaded.iter().map(|(l, e)| (*l, &e[..])).collect();
        // The leaves and the index, each twice: outside a checkpoint's bound.
        let leaf_bytes = super::regions::record_bytes(crate::format::LEAF_ENTRIES * 16);
        let index_bytes = super::regions::record_bytes(leaves.len() as u64 * 24);
        self.make_room(2 * (refs.len() as u64 * leaf_bytes + index_bytes))?;
        for (&i, new) in damaged.iter().zip(self.append_leaves(&refs)?) {
            rewritten.insert(leaves[i].off, new);
            leaves[i] = new;
        }
        let new_index = self.append_index(&leaves)?;
        // The commit's sync makes the records durable before the table that
        // names them.
        self.edit_entry(&snap.name, |_, entry| {
            if entry.id != snap.id || entry.holds > 0 || entry.index != snap.index {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("snapshot '{}' changed while it was repaired", snap.name),
                ));
            }
            entry.index = new_index;
            Ok(())
        })?;
        Ok(Some(count))
    }
}
