//! Second copies of metadata records (`docs/format.md` §4, "Second copies").
//!
//! Every LEAF, INDEX, SNAP_TABLE and CONFIG record is appended twice: the
//! record, flagged [`RECORD_FLAG_HAS_COPY`], then the same record again from
//! the next log unit after the first one ends (zeros between), with the
//! next lsn and [`RECORD_FLAG_COPY`]. Nothing points at the second copy:
//! its place follows from the pointer to the first. One damaged byte in a
//! map record used to make the whole image unreadable; now a reader that
//! finds the first copy damaged reads the second, checked against the same
//! pointer, and a read-write open writes the record anew.
//!
//! Images written before copies existed have none: a record without the
//! flag reads as before, and their old records are never mistaken for a copy
//! (a copy carries its flag, and at its place only the copy of that record
//! can be).

use super::checkpoint::Committed;
use super::log::{read_record, NewRecord};
use super::map::BlockMap;
use super::regions::Wish;
use super::snaptable::SnapState;
use super::Inner;
use crate::error::{Error, Result};
use crate::format::{align_up, RecordHeader, RecordKind, LOG_UNIT};
use crate::format::{RecPtr, Superblock, RECORD_HEADER_LEN};
use crate::format::{RECORD_FLAG_COPY, RECORD_FLAG_HAS_COPY};
use crate::io::Store;

/// Where the second copy of the record at `off`, `len` bytes long, starts:
/// the next log unit after the first ends.
pub(crate) fn second_off(off: u64, len: u32) -> u64 {
    align_up(off + u64::from(len), LOG_UNIT)
}

/// Which copy of a metadata record was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copy {
    First,
    Second,
}

/// A pointer to a metadata record: where its first copy is, its crc, and
/// what it must be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetaRef {
    pub ptr: RecPtr,
    pub kind: RecordKind,
    /// The header key it must have (a leaf's number), if the pointer says.
    pub key: Option<u64>,
}

impl MetaRef {
    fn matches(&self, h: &RecordHeader) -> bool {
        h.kind == self.kind && self.key.is_none_or(|k| k == h.key)
    }
}

/// Reads the metadata record `r` names, verified against it; when the
/// first copy does not read back (damaged, unreadable, not the record the
/// pointer names), its second copy. The first copy's error when neither does.
pub(crate) fn read_meta_record(
    store: &dyn Store,
    r: &MetaRef,
) -> Result<(RecordHeader, Vec<u8>, Copy)> {
    let first_err = match read_first(store, r) {
        Ok((h, payload)) => return Ok((h, payload, Copy::First)),
        Err(e) => e,
    };
    match read_second(store, r) {
        Ok((h, payload)) => {
            ::log::warn!(
                "{:?} record at {} is damaged ({first_err}); read its second copy at {}",
                r.kind,
                r.ptr.off,
                second_off(r.ptr.off, r.ptr.len)
            );
            Ok((h, payload, Copy::Second))
        }
        Err(second_err) => {
            // Name the second copy's damage too when there is one, or was
            // meant to be; a record of an older release has none.
            let at = second_off(r.ptr.off, r.ptr.len);
            let first = header_at(store, r.ptr.off);
            let flags = |h: Option<RecordHeader>| h.map_or(0, |h| h.flags);
            let detail = if flags(header_at(store, at)) & RECORD_FLAG_COPY != 0
                || flags(first) & RECORD_FLAG_HAS_COPY != 0
            {
                format!("{first_err}; its second copy at {at}: {second_err}")
            } else if first.is_none() {
                format!("{first_err}; no second copy at {at} either")
            } else {
                return Err(first_err);
            };
            Err(Error::new(first_err.kind(), detail))
        }
    }
}

/// The first copy: the record the pointer names (offset, length, crc).
pub(crate) fn read_first(store: &dyn Store, r: &MetaRef) -> Result<(RecordHeader, Vec<u8>)> {
    let (h, payload) = read_record(store, r.ptr.off, r.ptr.len)?;
    if !r.matches(&h) || h.crc != r.ptr.crc || h.flags & RECORD_FLAG_COPY != 0 {
        return Err(Error::corrupt(format!(
            "{:?} record at {} does not match its pointer",
            r.kind, r.ptr.off
        )));
    }
    Ok((h, payload))
}

/// The second copy, checked against the pointer to the first: at its place,
/// flagged as a copy, of the same kind, key and length, and holding the same
/// bytes — for a plain image, the first copy's header rebuilt from it (lsn
/// one less, its own offset, its `synced` claim) must give the pointer's
/// crc. An encrypted image's copy is authenticated with its offset and flags
/// (and its key is inside the sealed payload): written by the image's key at
/// that place, it can only be the copy of the record the pointer names (the
/// first copy's own header is not consulted: it may be the damaged part).
pub(crate) fn read_second(store: &dyn Store, r: &MetaRef) -> Result<(RecordHeader, Vec<u8>)> {
    let at = second_off(r.ptr.off, r.ptr.len);
    let (h, payload) = read_record(store, at, r.ptr.len)?;
    let bad = || {
        Error::corrupt(format!(
            "the second copy at {at} does not match the pointer to {:?} record at {}",
            r.kind, r.ptr.off
        ))
    };
    if h.flags & RECORD_FLAG_COPY == 0 || !r.matches(&h) {
        return Err(bad());
    }
    let bound =
        store.sealer().is_some() || first_crcs(&h, r.ptr.off, &payload).contains(&Some(r.ptr.crc));
    if !bound {
        return Err(bad());
    }
    Ok((h, payload))
}

/// The crcs the first copy of the plain record `copy` can have: its header
/// is the copy's with the other flag, the lsn one less and its own offset;
/// its `synced` claim is one less than the copy's (both count back to the
/// same durable lsn), or 0 when the copy claims nothing (or could not: a
/// distance beyond 32 bits, where the first's may just fit).
fn first_crcs(copy: &RecordHeader, first_off: u64, payload: &[u8]) -> [Option<u32>; 2] {
    let Some(lsn) = copy.lsn.checked_sub(1) else {
        return [None, None];
    };
    let payload_crc = crc32c::crc32c(payload);
    let crc_with = |synced: u32| {
        let mut first = RecordHeader {
            flags: copy.flags & !RECORD_FLAG_COPY | RECORD_FLAG_HAS_COPY,
            lsn,
            self_off: first_off,
            synced,
            ..*copy
        };
        first.encode_header_for(payload_crc);
        Some(first.crc)
    };
    match copy.synced {
        0 => [crc_with(0), crc_with(u32::MAX)],
        v => [crc_with(v - 1), None],
    }
}

/// The header at `off` if one decodes there.
fn header_at(store: &dyn Store, off: u64) -> Option<RecordHeader> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    store.read_at(&mut head, off).ok()?;
    RecordHeader::decode(&head, off).ok()
}

/// Where the second copy of the metadata record at `off` (`len` bytes)
/// ends, if it has one: a header flagged as a copy, of a metadata kind and
/// of the same length, at the second copy's place (and, if the first's
/// header still decodes, of its kind and announced by it). Only the copy of
/// that record can be there (two records of one length ending in the same
/// log unit would overlap), so this is enough both to keep it live
/// (compaction) and to punch it with its first copy (reclaim).
pub(crate) fn second_end(store: &dyn Store, off: u64, len: u32) -> Option<u64> {
    let at = second_off(off, len);
    let h = header_at(store, at)?;
    let first = header_at(store, off);
    let metadata = matches!(
        h.kind,
        RecordKind::Leaf | RecordKind::Index | RecordKind::SnapTable | RecordKind::Config
    );
    (h.flags & RECORD_FLAG_COPY != 0
        && metadata
        && first.is_none_or(|f| f.kind == h.kind && f.flags & RECORD_FLAG_HAS_COPY != 0)
        && h.total_len() == u64::from(len))
    .then(|| at + u64::from(len))
}

/// Records named by the superblock whose first copy was found damaged when
/// the image was opened: the recovery checkpoint of a read-write open writes
/// them anew ([`Inner::recovery_checkpoint`]).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Rewrite {
    pub snap_table: bool,
    pub config: bool,
    /// The index: a checkpoint that changed no leaf names the index it has
    /// ([`Inner::commit_moving`]) unless this asks for a new one.
    pub index: bool,
}

/// What an open read from second copies: a note for each, and what to write
/// anew.
pub(crate) struct Damaged {
    pub notes: Vec<String>,
    pub rewrite: Rewrite,
}

/// After the head's map, the snapshot table and the backing reference were
/// loaded from the records `sb` names: which of them were read from a second
/// copy. Read-write opens mark those leaves for the recovery checkpoint (which
/// writes a new index for them) and note the index, table and backing reference for it.
pub(crate) fn damaged_firsts(
    store: &dyn Store,
    sb: &Superblock,
    map: &mut BlockMap,
    read_only: bool,
) -> Damaged {
    let anew = if read_only { "" } else { "; written anew" };
    // A record lost in both copies (a read-only session's snapshot table)
    // was not read from its second copy.
    let first_bad = |ptr: RecPtr, kind| {
        let r = MetaRef {
            ptr,
            kind,
            key: None,
        };
        ptr.off != 0 && read_first(store, &r).is_err() && read_second(store, &r).is_ok()
    };
    let mut notes = Vec::new();
    let mut second = |what: String, off: u64| {
        notes.push(format!(
            "{what} at {off} is damaged; read from its second copy{anew}"
        ));
    };
    let bad_index = first_bad(sb.index, RecordKind::Index);
    if bad_index {
        second("the map index".into(), sb.index.off);
    }
    for leaf in std::mem::take(&mut map.from_second_copy) {
        second(format!("map leaf {leaf}"), map.ptrs[&leaf].off);
        if !read_only {
            map.rewrite_leaf(leaf);
        }
    }
    // An index whose second copy is damaged or missing is written anew
    // too (a checkpoint that changed no leaf would name it again).
    let index_ref = MetaRef {
        ptr: sb.index,
        kind: RecordKind::Index,
        key: None,
    };
    let single_index = sb.index.off != 0 && read_second(store, &index_ref).is_err();
    let rewrite = Rewrite {
        snap_table: first_bad(sb.snap_table, RecordKind::SnapTable),
        config: first_bad(sb.config, RecordKind::Config),
        index: bad_index || single_index,
    };
    if rewrite.snap_table {
        second("the snapshot table".into(), sb.snap_table.off);
    }
    if rewrite.config {
        second("the backing reference".into(), sb.config.off);
    }
    let rewrite = if read_only {
        Rewrite::default()
    } else {
        rewrite
    };
    Damaged { notes, rewrite }
}

impl Inner {
    /// The checkpoint that starts a read-write session; it also writes anew
    /// what the open read from second copies (`damaged_firsts`).
    /// Its run starts in a hole of the file if one is big enough (else
    /// at the end): each session would otherwise lengthen the file by what
    /// it writes before the first move.
    pub(super) fn recovery_checkpoint(&self) -> Result<()> {
        self.checkpoint_moving(self.rewrite, Wish::Seek)
    }

    /// A checkpoint that also writes anew the records `rewrite` names (the
    /// head's leaves to write anew are marked dirty by the caller).
    pub(super) fn checkpoint_rewriting(&self, rewrite: Rewrite) -> Result<()> {
        self.checkpoint_moving(rewrite, Wish::Stay)
    }

    /// [`Inner::checkpoint_rewriting`] that moves the log as `wish` says.
    fn checkpoint_moving(&self, rewrite: Rewrite, wish: Wish) -> Result<()> {
        if rewrite.index {
            *self.index_listed.lock() = None;
        }
        if rewrite.config {
            let sb = self.sb.lock().clone();
            let r = MetaRef {
                ptr: sb.config,
                kind: RecordKind::Config,
                key: None,
            };
            let (h, payload, _) = read_meta_record(self.store.as_ref(), &r)?;
            self.make_room(2 * super::regions::record_bytes(payload.len() as u64))?;
            let w = self
                .log
                .lock()
                .append_twice(
                    self.store.as_ref(),
                    &[NewRecord::new(
                        RecordKind::Config,
                        0,
                        h.codec,
                        h.raw_len,
                        &payload,
                    )],
                )
                .map_err(|e| self.fail(e))?[0];
            // The checkpoint's superblock names it (after syncing it).
            self.sb.lock().config = RecPtr {
                off: w.off,
                len: w.len,
                crc: w.crc,
            };
        }
        if rewrite.snap_table {
            self.commit_moving(
                false,
                Some(&mut |st: &mut SnapState, _: &Committed| Ok(st.table.clone())),
                wish,
            )
        } else {
            self.commit_moving(false, None, wish)
        }
    }

    /// The records the superblock names (the index, the snapshot table,
    /// the backing reference) that lie in `window`, with their copies: a
    /// checkpoint that changes no leaf and edits nothing writes none of
    /// them anew, so they stay where they are unless asked.
    pub(super) fn superblock_records_in(&self, window: (u64, u64)) -> Rewrite {
        use super::evacuate::{meta_span, overlaps};
        let sb = self.sb.lock().clone();
        let inside = |p: RecPtr| p.off != 0 && overlaps(window, meta_span(p.off, p.len));
        Rewrite {
            snap_table: inside(sb.snap_table),
            config: inside(sb.config),
            index: inside(sb.index),
        }
    }

    /// Marks the head's records without a readable second copy (written
    /// before vbdfs wrote copies, or the copy damaged) for
    /// [`Inner::checkpoint_rewriting`]: compaction gives an older image its
    /// copies and repairs the head's.
    pub(super) fn missing_copies(&self) -> Rewrite {
        let store = self.store.as_ref();
        let single = |ptr: RecPtr, kind| {
            let r = MetaRef {
                ptr,
                kind,
                key: None,
            };
            ptr.off != 0 && read_second(store, &r).is_err()
        };
        let sb = self.sb.lock().clone();
        let rewrite = Rewrite {
            snap_table: single(sb.snap_table, RecordKind::SnapTable),
            config: single(sb.config, RecordKind::Config),
            index: single(sb.index, RecordKind::Index),
        };
        let ptrs: Vec<_> = self.map.read().ptrs.values().copied().collect();
        let leaves: Vec<u64> = ptrs
            .iter()
            .filter(|p| read_second(store, &super::mapload::leaf_ref(p)).is_err())
            .map(|p| p.leaf)
            .collect();
        let mut map = self.map.write();
        for leaf in leaves {
            map.rewrite_leaf(leaf);
        }
        rewrite
    }
}
