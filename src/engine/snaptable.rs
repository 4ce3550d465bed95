//! The snapshot table in memory: the committed table, where it is on disk,
//! the pins of open snapshot readers, and the commit hook that writes a new
//! table as part of a checkpoint (see `checkpoint.rs`).
//!
//! The state is behind one mutex that is never held across I/O; lock order:
//! checkpoint lock → snapshot state → log lock.

use super::checkpoint::Committed;
use super::copies::{read_meta_record, MetaRef};
use super::log::{read_record, NewRecord};
use super::snapshot::SnapshotInfo;
use super::Inner;
use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{Codec, RecPtr, RecordKind, SnapEntry, SnapTable, Superblock, MAX_SNAPSHOTS};
use crate::io::Store;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
    pub(super) state: Mutex<SnapState>,
    pub(super) timing: Mutex<Option<super::snapshot::SnapshotTiming>>,
    /// LEAF and INDEX offsets the snapshots reference, for the table at this
    /// pointer (space reclaim must not punch them).
    meta: Mutex<Option<(RecPtr, Arc<HashSet<u64>>)>>,
    /// Why the table could not be read in either copy (read-only sessions
    /// only: the table is then empty and no snapshot can be opened).
    lost: Option<String>,
    /// Entries of the committed table (read without a lock under the log's:
    /// `super::regions`).
    count: std::sync::atomic::AtomicUsize,
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
        self.count
            .store(table.entries.len(), std::sync::atomic::Ordering::Release);
        st.table = table;
        st.ptr = ptr;
        st.deleting = None;
    }

    /// Entries of the committed table.
    pub(super) fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where the committed table is.
    pub(super) fn table_ptr(&self) -> RecPtr {
        self.state.lock().ptr
    }

    /// The snapshots' LEAF/INDEX offsets if computed for the table at `table`.
    pub(super) fn cached_meta(&self, table: RecPtr) -> Option<Arc<HashSet<u64>>> {
        let meta = self.meta.lock();
        meta.as_ref()
            .filter(|(ptr, _)| *ptr == table)
            .map(|(_, m)| m.clone())
    }

    pub(super) fn set_cached_meta(&self, table: RecPtr, meta: Arc<HashSet<u64>>) {
        *self.meta.lock() = Some((table, meta));
    }

    pub(super) fn abort(&self) {
        self.state.lock().deleting = None;
    }

    /// The entry named `name` and a pin on it.
    pub(super) fn pin(self: &Arc<Self>, name: &str) -> Result<(SnapEntry, Pin)> {
        let mut st = self.state.lock();
        let entry = st
            .table
            .find(name)
            .filter(|e| st.deleting != Some(e.id))
            .cloned()
            .ok_or_else(|| self.missing(name))?;
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

    /// Why the table could not be read in either copy, if so.
    pub(super) fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// The error for a snapshot `name` not in the table: not found, or
    /// unknown when the table is lost.
    pub(super) fn missing(&self, name: &str) -> Error {
        match &self.lost {
            Some(why) => Error::corrupt(format!("snapshot '{name}': {why}")),
            None => not_found(name),
        }
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

pub(super) fn not_found(name: &str) -> Error {
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
    let (h, payload, _) = read_meta_record(
        store,
        &MetaRef {
            ptr,
            kind,
            key: None,
        },
    )?;
    if h.raw_len > max_raw {
        return Err(Error::corrupt(format!(
            "{kind:?} record at {} is {} bytes decoded, at most {max_raw} allowed",
            ptr.off, h.raw_len
        )));
    }
    let mut raw = vec![0u8; h.raw_len as usize];
    codec::decode(h.codec, &payload, &mut raw)?;
    Ok(raw)
}

/// Loads the snapshot table the superblock names. A table whose record
/// cannot be read in either copy because its bytes are damaged loads empty,
/// with why in [`Snapshots::lost`]: the head does not depend on it (the
/// caller decides what else may go on without it). A sound record that does
/// not decode is refused (the image contradicts itself).
pub(super) fn load_table(store: &dyn Store, sb: &Superblock, file_len: u64) -> Result<Snapshots> {
    let mut lost = None;
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
        match read_meta(store, sb.snap_table, RecordKind::SnapTable, max) {
            Ok(raw) => state.table = SnapTable::decode(&raw, file_len)?,
            Err(e)
                if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io)
                    && read_record(store, sb.snap_table.off, sb.snap_table.len).is_err() =>
            {
                lost = Some(format!(
                    "the snapshot table could not be read in either copy ({e}): its snapshots \
                     cannot be read"
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Snapshots {
        count: state.table.entries.len().into(),
        state: Mutex::new(state),
        timing: Mutex::new(None),
        meta: Mutex::new(None),
        lost,
    })
}

impl Inner {
    /// Runs `edit` under the snapshot state and appends the table it returns.
    pub(super) fn append_snap_table(
        &self,
        edit: SnapEdit<'_>,
        committed: &Committed,
    ) -> Result<(SnapTable, RecPtr)> {
        let table = edit(&mut self.snaps.state.lock(), committed)?;
        let raw = table.encode();
        let (stored, payload) = codec::encode(&raw, Codec::Zstd(1));
        let record = NewRecord::new(
            RecordKind::SnapTable,
            table.entries.len() as u64,
            stored,
            raw.len() as u32,
            &payload,
        );
        let appended = self.log.lock().append_twice(self.store.as_ref(), &[record]);
        match appended.map(|w| w[0]) {
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
}
