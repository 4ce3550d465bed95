//! Snapshots: create, list, delete, hold/release, roll back and open (the
//! table in memory and its commit hook are in `snaptable.rs`).
//!
//! A snapshot is the INDEX record of one checkpoint plus its generation: the
//! checkpoint that creates it writes the map's dirty leaves and an INDEX, and
//! the new snapshot table (naming that INDEX) in the same commit. Creation
//! therefore costs one checkpoint — the leaves dirtied since the last one, an
//! index of 24 bytes per 1024 blocks written, the table and two syncs —
//! whatever the amount of data: nothing is copied.
//!
//! **Liveness rule (for the cleaner, issue 5).** Records are immutable and
//! nothing is reclaimed yet. Once a cleaner exists, a record is live if it is
//! reachable from the head's map *or from any snapshot's INDEX*: every DATA
//! record a snapshot's leaves point at, those LEAF records and the INDEX
//! itself, plus the current SNAP_TABLE and CONFIG records. Snapshot records
//! must neither be freed nor moved while the snapshot exists: open readers
//! (here and in clones of this image, in other processes) hold their offsets.
//! A deleted snapshot's records become garbage unless still reachable
//! otherwise.
//!
//! Lock order: checkpoint lock → snapshot state → log lock. The snapshot state
//! is never held across I/O.

use super::checkpoint::Committed;
use super::dropsnap::DeletedSnapshot;
use super::open::now_ns;
use super::reader::SnapshotReader;
use super::snaptable::{not_found, plain_info, SnapState};
use super::{Image, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{check_snapshot_name, SnapEntry, MAX_SNAPSHOTS};
use serde::Serialize;
use std::time::{Duration, Instant};

/// A snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Unique id within the image (never reused).
    pub id: u64,
    /// Name.
    pub name: String,
    /// Creation time, ns since the Unix epoch.
    pub created_ns: u64,
    /// Checkpoint generation that committed it.
    pub generation: u64,
    /// Virtual size of the disk in the snapshot.
    pub virtual_size: u64,
    /// Clones based on it (deletion is refused while > 0).
    pub holds: u32,
    /// Bytes of the disk that held data at the snapshot.
    pub allocated_bytes: u64,
    /// Bytes of the records of that data.
    pub stored_bytes: u64,
}

/// A snapshot with the space only it holds.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotUsage {
    /// The snapshot.
    pub info: SnapshotInfo,
    /// Bytes of DATA records referenced by this snapshot and by neither the
    /// head nor any other snapshot (what deleting it would free once a cleaner
    /// runs).
    pub exclusive_bytes: u64,
}

/// Where the time of the last `snapshot_create` went.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SnapshotTiming {
    /// Waiting for the writes completed before the call to reach the log.
    pub flush: Duration,
    /// The checkpoint: leaves, index, table, two syncs, superblock.
    pub commit: Duration,
}

impl Inner {
    pub(super) fn snapshot_info(&self, e: &SnapEntry) -> SnapshotInfo {
        plain_info(e, self.block_size())
    }

    fn check_snap_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "image is open read-only"));
        }
        self.check_failed()
    }

    /// Waits until every write completed before now is in the log and the map.
    fn wait_dirty(&self) -> Result<()> {
        self.check_failed()?;
        for (slot, version) in self.cache.dirty_slots() {
            slot.wait_written(version);
        }
        self.check_failed()
    }

    /// Changes one snapshot's entry in a commit; `f` may refuse.
    pub(super) fn edit_entry(
        &self,
        name: &str,
        mut f: impl FnMut(&SnapState, &mut SnapEntry) -> Result<()>,
    ) -> Result<SnapEntry> {
        check_snapshot_name(name)?;
        self.check_snap_writable()?;
        let mut out = None;
        self.commit(
            false,
            Some(&mut |st: &mut SnapState, _: &Committed| {
                let mut table = st.table.clone();
                let entry = table
                    .entries
                    .iter_mut()
                    .find(|e| e.name == name)
                    .ok_or_else(|| not_found(name))?;
                f(st, entry)?;
                out = Some(entry.clone());
                Ok(table)
            }),
        )?;
        out.ok_or_else(|| not_found(name))
    }
}

impl Image {
    /// Creates snapshot `name` holding exactly the writes completed before the
    /// call (crash-consistent), durable on return. `Exists` for a duplicate
    /// name, `Invalid` for a bad one, `NoSpace` past [`MAX_SNAPSHOTS`].
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        let inner = &self.inner;
        check_snapshot_name(name)?;
        inner.check_snap_writable()?;
        let refuse = |st: &SnapState| {
            if st.table.find(name).is_some() {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("snapshot '{name}' already exists"),
                ));
            }
            if st.table.entries.len() >= MAX_SNAPSHOTS {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!("the image already holds {MAX_SNAPSHOTS} snapshots (the limit)"),
                ));
            }
            Ok(())
        };
        refuse(&inner.snaps.state.lock())?;
        let start = Instant::now();
        // The writes completed before now reach the log and are made durable
        // here, so the checkpoint's first sync only covers what came since.
        inner.flush()?;
        let flushed = Instant::now();
        let mut made = None;
        inner.commit(
            false,
            Some(&mut |st: &mut SnapState, c: &Committed| {
                refuse(st)?;
                let mut table = st.table.clone();
                let entry = SnapEntry {
                    id: table.next_id,
                    name: name.to_string(),
                    gen: c.gen,
                    ctime_ns: now_ns(),
                    virtual_size: inner.virtual_size(),
                    index: c.index,
                    holds: 0,
                    data_blocks: c.data_blocks,
                    stored_bytes: c.stored_bytes,
                };
                table.next_id += 1;
                table.entries.push(entry.clone());
                made = Some(entry);
                Ok(table)
            }),
        )?;
        let timing = SnapshotTiming {
            flush: flushed - start,
            commit: flushed.elapsed(),
        };
        *inner.snaps.timing.lock() = Some(timing);
        ::log::info!(
            "snapshot '{name}' created (flush {:?}, commit {:?})",
            timing.flush,
            timing.commit
        );
        let entry = made.ok_or_else(|| not_found(name))?;
        Ok(inner.snapshot_info(&entry))
    }

    /// Where the time of the last [`Image::snapshot_create`] went.
    pub fn last_snapshot_timing(&self) -> Option<SnapshotTiming> {
        *self.inner.snaps.timing.lock()
    }

    /// Every snapshot, oldest first.
    pub fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        let st = self.inner.snaps.state.lock();
        st.table
            .entries
            .iter()
            .filter(|e| st.deleting != Some(e.id))
            .map(|e| self.inner.snapshot_info(e))
            .collect()
    }

    /// The snapshot named `name` (`NotFound` if none).
    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let st = self.inner.snaps.state.lock();
        st.table
            .find(name)
            .map(|e| self.inner.snapshot_info(e))
            .ok_or_else(|| self.inner.snaps.missing(name))
    }

    /// Deletes snapshot `name`. `Busy` while it is open (a reader exists) or
    /// held by clones; `NotFound` if there is none.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.delete(name, false)
    }

    /// Deletes snapshot `name` even if clones hold it (those clones can no
    /// longer be opened). Still `Busy` while it is open.
    pub fn snapshot_delete_forced(&self, name: &str) -> Result<()> {
        self.delete(name, true)
    }

    fn delete(&self, name: &str, force: bool) -> Result<()> {
        check_snapshot_name(name)?;
        self.inner.check_snap_writable()?;
        let block_size = self.inner.block_size();
        let mut gone = None;
        self.inner.commit(
            false,
            Some(&mut |st: &mut SnapState, _: &Committed| {
                let e = st.table.find(name).ok_or_else(|| not_found(name))?;
                let readers = st.pins.get(&e.id).copied().unwrap_or(0);
                if readers > 0 {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("snapshot '{name}' is open ({readers} reader(s)); close it first"),
                    ));
                }
                if e.holds > 0 && !force {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "snapshot '{name}' is held by {} clone(s); it cannot be deleted \
                             while clones are based on it",
                            e.holds
                        ),
                    ));
                }
                let id = e.id;
                gone = Some(DeletedSnapshot {
                    index: e.index,
                    gen: e.gen,
                    nblocks: (e.virtual_size).div_ceil(block_size),
                    compactions: self
                        .inner
                        .compactions
                        .load(std::sync::atomic::Ordering::Acquire),
                    next_leaf: 0,
                });
                st.deleting = Some(id);
                let mut table = st.table.clone();
                table.entries.retain(|e| e.id != id);
                Ok(table)
            }),
        )?;
        if let Some(gone) = gone {
            self.inner.snapshot_deleted(gone);
        }
        Ok(())
    }

    /// Records one more clone based on snapshot `name` (see [`Image::create_clone`]).
    pub fn snapshot_hold(&self, name: &str) -> Result<SnapshotInfo> {
        let e = self.inner.edit_entry(name, |_, e| {
            e.holds = e.holds.checked_add(1).ok_or_else(|| {
                Error::new(
                    ErrorKind::Busy,
                    format!("snapshot '{name}' has too many holds"),
                )
            })?;
            Ok(())
        })?;
        Ok(self.inner.snapshot_info(&e))
    }

    /// Drops one hold on snapshot `name` (a clone based on it was removed).
    pub fn snapshot_release(&self, name: &str) -> Result<SnapshotInfo> {
        let e = self.inner.edit_entry(name, |_, e| {
            e.holds = e.holds.checked_sub(1).ok_or_else(|| {
                Error::invalid(format!("snapshot '{name}' is not held by any clone"))
            })?;
            Ok(())
        })?;
        Ok(self.inner.snapshot_info(&e))
    }

    /// Makes the head equal to snapshot `name`, its size too (writes made
    /// since are lost; the snapshot stays). Needs exclusive use of the image
    /// (`&mut`): offline.
    pub fn snapshot_rollback(&mut self, name: &str) -> Result<()> {
        let inner = &self.inner;
        check_snapshot_name(name)?;
        inner.check_snap_writable()?;
        let (entry, _pin) = inner.snaps.pin(name)?;
        inner.wait_dirty()?;
        let file_len = inner
            .store
            .len()
            .map_err(|e| Error::io("size of image", e))?;
        let mut map = super::mapload::load_map(
            inner.store.as_ref(),
            entry.index,
            inner.block_shift,
            file_len,
            inner.blocks_of(entry.virtual_size),
        )?;
        // The head's leaves read from a second copy are written anew by the
        // checkpoint below (the snapshot keeps its own records).
        for leaf in std::mem::take(&mut map.from_second_copy) {
            map.rewrite_leaf(leaf);
        }
        {
            let _one = inner.checkpoint_lock.lock();
            let _log = inner.log.lock();
            *inner.map.write() = map;
            inner
                .cache
                .remove_range(0, inner.nblocks().saturating_sub(1));
            inner
                .disk_size
                .store(entry.virtual_size, std::sync::atomic::Ordering::Release);
        }
        inner.checkpoint(false)
    }

    /// Opens snapshot `name` for reading. The reader pins the snapshot (it
    /// cannot be deleted while the reader lives) and reads concurrently with
    /// writes to the head.
    pub fn open_snapshot(&self, name: &str) -> Result<SnapshotReader> {
        let inner = &self.inner;
        let (entry, pin) = inner.snaps.pin(name)?;
        let info = inner.snapshot_info(&entry);
        SnapshotReader::load(
            inner.store.clone(),
            &entry,
            info,
            inner.block_shift,
            inner.backing.as_ref().map(|b| b.reader.clone()),
            Some(pin),
        )
    }
}
