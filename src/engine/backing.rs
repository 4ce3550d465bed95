//! Clones: opening the backing chain and reading through it.
//!
//! A clone's superblock names a CONFIG record, a [`BackingRef`]: the base
//! image's uuid, a snapshot id, generation and INDEX pointer, and the base's
//! path (relative to the clone's directory, plus the absolute path as a
//! fallback). Opening a clone opens the base read-only — no lock: the base
//! may be mounted read-write by another daemon, which is fine because a
//! snapshot's records are immutable — and checks its identity: the uuid, then
//! that the snapshot with that id still has that generation, INDEX and size.
//! A replaced or changed base is refused with a message naming it, never read.
//! The base may itself be a clone (a chain, at most [`MAX_DEPTH`] deep); an
//! image met twice on the way down is a cycle and is refused.
//!
//! Reads of UNMAPPED blocks of a clone fall through to the base snapshot;
//! partial writes copy the base block up; discards and zero blocks become ZERO
//! entries wherever the base has data, so the base never shows through them.

use super::map::BlockMap;
use super::open::read_superblock;
use super::reader::{read_backing, SnapshotReader};
use super::snaptable::{load_table, read_meta, Snapshots};
use super::Inner;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    BackingRef, EntryKind, MapEntry, RecordKind, SnapEntry, Superblock, MAX_BACKING_PATH,
};
use crate::io::{FileStore, Store};
use serde::Serialize;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use super::clone::CloneOptions;

/// Deepest backing chain accepted (a clone of a clone of ... 16 levels).
pub const MAX_DEPTH: usize = 16;

/// How the error for a chain deeper than [`MAX_DEPTH`] starts.
const TOO_DEEP: &str = "backing chain is deeper than";

/// One link of a backing chain, for `info`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackingInfo {
    /// Where the base was found.
    pub path: String,
    /// The base snapshot's name.
    pub snapshot: String,
    /// Its id in the base.
    pub snapshot_id: u64,
    /// The base image's uuid.
    pub uuid: String,
}

/// The open backing chain of a clone.
#[derive(Debug)]
pub(crate) struct Backing {
    /// The base snapshot (which reads through its own backing in turn).
    pub reader: Arc<SnapshotReader>,
    /// The chain, nearest base first.
    pub chain: Vec<BackingInfo>,
}

pub(super) fn uuid_text(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the backing chain of the image whose superblock is `sb` (None for a
/// plain image). `origin` is the image's own path.
pub(super) fn open_backing(
    store: &dyn Store,
    sb: &Superblock,
    file_len: u64,
    origin: Option<&Path>,
) -> Result<Option<Backing>> {
    let mut seen = vec![sb.image_uuid];
    open_level(store, sb, file_len, origin, &mut seen)
}

fn open_level(
    store: &dyn Store,
    sb: &Superblock,
    file_len: u64,
    origin: Option<&Path>,
    seen: &mut Vec<[u8; 16]>,
) -> Result<Option<Backing>> {
    if sb.config.off == 0 {
        return Ok(None);
    }
    if sb.config.off.saturating_add(u64::from(sb.config.len)) > file_len {
        return Err(Error::corrupt("backing reference points past the end"));
    }
    let max = 80 + 2 * MAX_BACKING_PATH as u32 + 64;
    let raw = read_meta(store, sb.config, RecordKind::Config, max)?;
    let r = BackingRef::decode(&raw)?;
    if seen.len() > MAX_DEPTH {
        return Err(Error::invalid(format!(
            "{TOO_DEEP} {MAX_DEPTH} images (at {})",
            origin.map_or_else(|| "?".into(), |p| p.display().to_string())
        )));
    }
    let (path, file) = find_base(&r, origin)?;
    let what = path.display().to_string();
    let base_store: Arc<dyn Store> = Arc::new(FileStore::new(file));
    let base_len = base_store
        .len()
        .map_err(|e| Error::io(format!("{what}: size"), e))?;
    let base_sb = read_superblock(base_store.as_ref(), base_len).map_err(|e| e.context(&what))?;
    // An encrypted base is unlocked with the key that unlocked the clone
    // (an encrypted base has only encrypted clones); its superblock is then
    // read again through the keys, which checks its MAC.
    let (base_store, base_sb) = if base_sb.crypto != 0 {
        let key = store.sealer().and_then(|s| s.secret()).ok_or_else(|| {
            Error::new(
                crate::ErrorKind::Unsupported,
                format!("{what}: the base is encrypted but this clone is not"),
            )
        })?;
        let sealed = crate::crypto::attach(base_store, &base_sb, Some(key)).map_err(|e| {
            e.context(format!(
                "{what} (the base, unlocked with its clone's key: a base and its clones \
                     are rekeyed together)"
            ))
        })?;
        let sb = read_superblock(sealed.as_ref(), base_len).map_err(|e| e.context(&what))?;
        (sealed, sb)
    } else {
        (base_store, base_sb)
    };
    if base_sb.image_uuid != r.base_uuid {
        return Err(changed(
            &what,
            format!(
                "it is not the image the clone was made from (uuid {} instead of {}): \
                 the base was replaced",
                uuid_text(&base_sb.image_uuid),
                uuid_text(&r.base_uuid)
            ),
        ));
    }
    if seen.contains(&base_sb.image_uuid) {
        return Err(Error::invalid(format!(
            "backing chain has a cycle: {what} (uuid {}) appears twice",
            uuid_text(&base_sb.image_uuid)
        )));
    }
    seen.push(base_sb.image_uuid);
    let below = open_level(base_store.as_ref(), &base_sb, base_len, Some(&path), seen).map_err(
        |e| match e.to_string().starts_with(TOO_DEEP) {
            true => e, // one line, not every image of the chain in front
            false => e.context(&what),
        },
    )?;
    let snaps =
        load_table(base_store.as_ref(), &base_sb, base_len).map_err(|e| e.context(&what))?;
    let entry = match snaps.lost() {
        Some(why) => {
            ::log::warn!(
                "{what}: {why}; the clone reads its snapshot '{}' through its own reference",
                r.snap_name
            );
            referenced_snapshot(&r)
        }
        None => listed_snapshot(&snaps, &r, &what)?,
    };
    let info = super::snaptable::plain_info(&entry, base_sb.block_size());
    let reader = SnapshotReader::load(
        base_store,
        &entry,
        info,
        base_sb.block_shift,
        below.as_ref().map(|b| b.reader.clone()),
        None,
    )
    .map_err(|e| e.context(&what))?;
    let mut chain = vec![BackingInfo {
        path: what,
        snapshot: entry.name.clone(),
        snapshot_id: entry.id,
        uuid: uuid_text(&base_sb.image_uuid),
    }];
    chain.extend(below.map(|b| b.chain).unwrap_or_default());
    Ok(Some(Backing {
        reader: Arc::new(reader),
        chain,
    }))
}

/// The base snapshot `r` names, as the base's table lists it: the same
/// snapshot (id, generation, index and size) the clone was made from.
fn listed_snapshot(snaps: &Snapshots, r: &BackingRef, what: &str) -> Result<SnapEntry> {
    let entry = snaps.entry_by_id(r.snap_id).ok_or_else(|| {
        changed(
            what,
            format!(
                "its snapshot '{}' (id {}) no longer exists",
                r.snap_name, r.snap_id
            ),
        )
    })?;
    if entry.gen != r.snap_gen
        || entry.index != r.snap_index
        || entry.virtual_size != r.virtual_size
    {
        return Err(changed(
            what,
            format!("its snapshot '{}' (id {}) changed", r.snap_name, r.snap_id),
        ));
    }
    Ok(entry)
}

/// The base snapshot as the clone's reference names it, when the base's
/// table is lost. Enough to read it: the pointer to its index carries the
/// record's length and crc, and the records below it are checked in turn,
/// so a reader gets exactly the snapshot's bytes or an error (a snapshot
/// deleted since and reclaimed reads as damage, never as other data: the
/// log never writes over a record's place). Nothing reclaims them meanwhile:
/// an image whose table is lost only opens read-only.
fn referenced_snapshot(r: &BackingRef) -> SnapEntry {
    SnapEntry {
        id: r.snap_id,
        name: r.snap_name.clone(),
        gen: r.snap_gen,
        ctime_ns: 0,
        virtual_size: r.virtual_size,
        index: r.snap_index,
        holds: 0,
        data_blocks: 0,
        stored_bytes: 0,
    }
}

fn changed(what: &str, why: String) -> Error {
    Error::new(
        ErrorKind::Invalid,
        format!("backing image {what}: {why}; refusing to read the clone through it"),
    )
}

/// Opens the base: relative to the clone's directory, else the absolute path
/// (the identity checks make the fallback safe).
fn find_base(r: &BackingRef, origin: Option<&Path>) -> Result<(PathBuf, std::fs::File)> {
    let rel = Path::new(std::ffi::OsStr::from_bytes(&r.rel_path));
    let abs = Path::new(std::ffi::OsStr::from_bytes(&r.abs_path));
    let dir = origin
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tried = vec![dir.join(rel)];
    if !r.abs_path.is_empty() && tried[0] != abs {
        tried.push(abs.to_path_buf());
    }
    for path in &tried {
        match std::fs::File::open(path) {
            Ok(file) => return Ok((path.clone(), file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("backing image {}", path.display()), e)),
        }
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "backing image not found (looked at {}); the clone needs its base's snapshot '{}'",
            list.join(" and "),
            r.snap_name
        ),
    ))
}

/// Sets `[first, first+count)` to "reads as zeros": UNMAPPED where the backing
/// has no data, ZERO where it has (so the base does not show through).
pub(super) fn set_holes(
    map: &mut BlockMap,
    backing: Option<&SnapshotReader>,
    first: u64,
    count: u64,
    block_shift: u8,
) {
    map.set_range(first, count, MapEntry::default());
    let Some(b) = backing else {
        return;
    };
    let end = (first + count) << block_shift;
    let mut pos = first << block_shift;
    while let Some(d) = b.next_data(pos).filter(|&d| d < end) {
        let block = d >> block_shift;
        map.set(block, zero_entry());
        pos = (block + 1) << block_shift;
    }
}

fn zero_entry() -> MapEntry {
    MapEntry {
        kind: EntryKind::Zero,
        ..MapEntry::default()
    }
}

/// The first block >= `first` that is UNMAPPED in `map` and has data in
/// `backing`.
pub(super) fn next_backed(
    map: &BlockMap,
    backing: &SnapshotReader,
    first: u64,
    nblocks: u64,
    block_shift: u8,
) -> Option<u64> {
    let mut pos = first.checked_shl(u32::from(block_shift))?;
    loop {
        let block = backing.next_data(pos)? >> block_shift;
        if block >= nblocks {
            return None;
        }
        if map.get(block).kind == EntryKind::Unmapped {
            return Some(block);
        }
        pos = (block + 1) << block_shift;
    }
}

impl Inner {
    pub(super) fn base(&self) -> Option<&SnapshotReader> {
        self.backing.as_ref().map(|b| b.reader.as_ref())
    }

    /// Whether an entry of this kind needs a read (DATA, or UNMAPPED in a clone).
    pub(super) fn has_content(&self, kind: EntryKind) -> bool {
        kind == EntryKind::Data || (kind == EntryKind::Unmapped && self.backing.is_some())
    }

    /// The content of UNMAPPED blocks of a clone from `block` on, as many as
    /// `data` holds: the base's bytes.
    pub(super) fn read_base_block(&self, block: u64, data: &mut [u8]) -> Result<()> {
        read_backing(self.base(), data, block << self.block_shift)
    }

    /// The map entry of a block that now reads as zeros.
    pub(super) fn hole_entry(&self, block: u64) -> MapEntry {
        match self.base() {
            Some(b) if b.range_has_data(block << self.block_shift, self.block_size()) => {
                zero_entry()
            }
            _ => MapEntry::default(),
        }
    }

    /// The first block >= `first` whose data comes from the base.
    pub(super) fn next_backed(&self, first: u64, map: &BlockMap) -> Option<u64> {
        next_backed(map, self.base()?, first, self.nblocks(), self.block_shift)
    }

    /// True if UNMAPPED `block` shows data of the base.
    pub(super) fn base_has_data(&self, block: u64) -> bool {
        self.base()
            .is_some_and(|b| b.range_has_data(block << self.block_shift, self.block_size()))
    }
}

impl super::Image {
    /// The backing chain of a clone, nearest base first (empty for a plain image).
    pub fn backing_chain(&self) -> Vec<BackingInfo> {
        self.inner
            .backing
            .as_ref()
            .map(|b| b.chain.clone())
            .unwrap_or_default()
    }
}
