//! Snapshots: create, list, delete, hold/release and roll back, and the
//! in-memory snapshot table with the pins of open snapshot readers.
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
use super::log::read_record;
use super::open::now_ns;
use super::reader::SnapshotReader;
use super::{Image, Inner};
use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    check_snapshot_name, Codec, RecPtr, RecordKind, SnapEntry, SnapTable, Superblock, MAX_SNAPSHOTS,
};
use crate::io::Store;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
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

/// The snapshot table in memory and who uses which snapshot.
#[derive(Debug, Default)]
pub(crate) struct SnapState {
    /// The committed table.
    pub table: SnapTable,
    /// Where it is on disk.
    pub ptr: RecPtr,
    /// Open readers per snapshot id.
    pub pins: HashMap<u64, usize>,
    /// A snapshot being deleted: hidden from new readers until the commit ends.
    pub deleting: Option<u64>,
}

/// Shared by the image and its readers' pins.
#[derive(Debug, Default)]
pub(crate) struct Snapshots {
    state: Mutex<SnapState>,
    timing: Mutex<Option<SnapshotTiming>>,
}

/// A snapshot edit run inside a commit: gets the state and what the
/// checkpoint committed, returns the new table (or refuses).
pub(super) type SnapEdit<'a> = &'a mut dyn FnMut(&mut SnapState, &Committed) -> Result<SnapTable>;

/// Keeps a snapshot open (deletion fails with `Busy` while any pin exists).
#[derive(Debug)]
pub(crate) struct Pin {
    snaps: Arc<Snapshots>,
    id: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.snaps.state.lock();
        if let Some(n) = st.pins.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                st.pins.remove(&self.id);
            }
        }
    }
}

impl Snapshots {
    pub(super) fn install(&self, table: SnapTable, ptr: RecPtr) {
        let mut st = self.state.lock();
        st.table = table;
        st.ptr = ptr;
        st.deleting = None;
    }

    pub(super) fn abort(&self) {
        self.state.lock().deleting = None;
    }

    /// The entry named `name` and a pin on it.
    fn pin(self: &Arc<Self>, name: &str) -> Result<(SnapEntry, Pin)> {
        let mut st = self.state.lock();
        let entry = st
            .table
            .find(name)
            .filter(|e| st.deleting != Some(e.id))
            .cloned()
            .ok_or_else(|| not_found(name))?;
        *st.pins.entry(entry.id).or_insert(0) += 1;
        let pin = Pin {
            snaps: self.clone(),
            id: entry.id,
        };
        Ok((entry, pin))
    }
}

impl Snapshots {
    /// The committed entries.
    pub(super) fn entries(&self) -> Vec<SnapEntry> {
        self.state.lock().table.entries.clone()
    }

    /// The committed entry with id `id`.
    pub(super) fn entry_by_id(&self, id: u64) -> Option<SnapEntry> {
        let st = self.state.lock();
        st.table.entries.iter().find(|e| e.id == id).cloned()
    }
}

/// The API view of a table entry of an image with `block_size` blocks.
pub(super) fn plain_info(e: &SnapEntry, block_size: u64) -> SnapshotInfo {
    SnapshotInfo {
        id: e.id,
        name: e.name.clone(),
        created_ns: e.ctime_ns,
        generation: e.gen,
        virtual_size: e.virtual_size,
        holds: e.holds,
        allocated_bytes: e.data_blocks.saturating_mul(block_size),
        stored_bytes: e.stored_bytes,
    }
}

fn not_found(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no snapshot named '{name}'"))
}

/// Reads a metadata record named by a superblock pointer: kind, crc and raw
/// length checked, payload decoded.
pub(super) fn read_meta(
    store: &dyn Store,
    ptr: RecPtr,
    kind: RecordKind,
    max_raw: u32,
) -> Result<Vec<u8>> {
    let (h, payload) = read_record(store, ptr.off, ptr.len)?;
    if h.kind != kind || h.crc != ptr.crc || h.raw_len > max_raw {
        return Err(Error::corrupt(format!(
            "{kind:?} record at {} does not match its pointer",
            ptr.off
        )));
    }
    let mut raw = vec![0u8; h.raw_len as usize];
    codec::decode(h.codec, &payload, &mut raw)?;
    Ok(raw)
}

/// Loads the snapshot table the superblock names.
pub(super) fn load_table(store: &dyn Store, sb: &Superblock, file_len: u64) -> Result<Snapshots> {
    let mut state = SnapState {
        table: SnapTable {
            next_id: 1,
            entries: Vec::new(),
        },
        ptr: sb.snap_table,
        ..SnapState::default()
    };
    if sb.snap_table.off != 0 {
        let max = 32 + MAX_SNAPSHOTS as u32 * 144;
        let raw = read_meta(store, sb.snap_table, RecordKind::SnapTable, max)?;
        state.table = SnapTable::decode(&raw, file_len)?;
    }
    Ok(Snapshots {
        state: Mutex::new(state),
        timing: Mutex::new(None),
    })
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

    /// Runs `edit` under the snapshot state and appends the table it returns.
    pub(super) fn append_snap_table(
        &self,
        edit: SnapEdit<'_>,
        committed: &Committed,
    ) -> Result<(SnapTable, RecPtr)> {
        let table = edit(&mut self.snaps.state.lock(), committed)?;
        let raw = table.encode();
        let (stored, payload) = codec::encode(&raw, Codec::Zstd(1));
        let appended = self.log.lock().append(
            self.store.as_ref(),
            RecordKind::SnapTable,
            table.entries.len() as u64,
            stored,
            raw.len() as u32,
            &payload,
        );
        match appended {
            Ok(w) => Ok((
                table,
                RecPtr {
                    off: w.off,
                    len: w.len,
                    crc: w.crc,
                },
            )),
            Err(e) => {
                self.snaps.abort();
                Err(self.fail(e))
            }
        }
    }

    /// Changes one snapshot's entry in a commit; `f` may refuse.
    fn edit_entry(
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
        inner.wait_dirty()?;
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
                    virtual_size: inner.virtual_size,
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
            .ok_or_else(|| not_found(name))
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
                st.deleting = Some(id);
                let mut table = st.table.clone();
                table.entries.retain(|e| e.id != id);
                Ok(table)
            }),
        )
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

    /// Makes the head equal to snapshot `name` (writes made since are lost;
    /// the snapshot stays). Needs exclusive use of the image (`&mut`): offline.
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
        let map = super::open::load_map(
            inner.store.as_ref(),
            entry.index,
            inner.block_shift,
            file_len,
            inner.nblocks,
        )?;
        {
            let _one = inner.checkpoint_lock.lock();
            let _log = inner.log.lock();
            *inner.map.write() = map;
            inner.cache.remove_range(0, inner.nblocks.saturating_sub(1));
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
