//! `check` of the two copies of every map record (`docs/format.md` §4,
//! "Second copies"): the head's (index, leaves, snapshot table, backing
//! reference) and every snapshot's (index, leaves). A damaged copy loses
//! nothing while the other serves, but it is damage to the file: it is
//! reported, and a read-write check (`vbdfs check --repair`) writes the
//! head's records anew. A snapshot's records are never rewritten (clones and
//! open snapshot files hold their offsets).

use super::copies::{announces_copy, read_first, read_second, MetaRef, Rewrite};
use super::open::read_index;
use super::{CheckReport, Inner};
use crate::error::Result;
use crate::format::{RecPtr, RecordKind};
use std::collections::HashSet;

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

/// What is wrong with a record's copies, if anything; `None` also for a
/// record that never had a second copy (written by an older vbdfs).
fn problem(store: &dyn crate::io::Store, r: &MetaRef) -> Option<&'static str> {
    let first = read_first(store, r).is_ok();
    let second = read_second(store, r).is_ok();
    match (first, second) {
        (false, true) => Some("its first copy is damaged (the second serves)"),
        (true, false) if announces_copy(store, r) => Some("its second copy is damaged or missing"),
        // Both bad: the map could not be read, which the open or the
        // snapshot check reports.
        _ => None,
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
            let Ok(leaves) = read_index(store, snap.index, file_len, self.nblocks) else {
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
            match problem(store, &n.r) {
                Some(p) => found.push((n, p)),
                None if read_first(store, &n.r).is_ok() && !announces_copy(store, &n.r) => {
                    single += 1
                }
                None => {}
            }
        }
        (found, single)
    }

    /// Checks both copies of every map record into `report`; a read-write
    /// open first writes the head's damaged ones anew (`repaired`).
    pub(super) fn check_copies(&self, report: &mut CheckReport) -> Result<()> {
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
                        // Every checkpoint writes a new index.
                        Some(HeadRecord::Index) | None => {}
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
        report.damaged_copies.extend(
            found
                .iter()
                .map(|(n, p)| format!("{} at {}: {p}", n.what, n.r.ptr.off)),
        );
        report.single_copy_records = single;
        Ok(())
    }
}
