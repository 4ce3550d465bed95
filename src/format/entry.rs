//! Map entries (16 bytes each), leaves of 1024 entries, and the leaf index.

use super::{LEAF_ENTRIES, MAX_FILE_OFFSET};
use crate::error::{Error, Result};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// What a map entry says about a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryKind {
    /// Never written (or discarded): reads as zeros, or from the backing image.
    #[default]
    Unmapped = 0,
    /// Reads as zeros, even over a backing image.
    Zero = 1,
    /// Stored in a DATA record.
    Data = 2,
}

/// Where one block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapEntry {
    /// Unmapped, zero or data.
    pub kind: EntryKind,
    /// DATA: byte offset of the record header.
    pub off: u64,
    /// DATA: total record length (header + payload).
    pub len: u32,
    /// Checkpoint generation the content was written in.
    pub birth: u32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy)]
#[repr(C)]
struct RawEntry {
    off_kind: U64,
    len: U32,
    birth: U32,
}
const _: () = assert!(std::mem::size_of::<RawEntry>() == 16);

impl MapEntry {
    /// The entry of a DATA record of `len` bytes at `off`, born in `birth`.
    pub fn data(off: u64, len: u32, birth: u32) -> MapEntry {
        MapEntry {
            kind: EntryKind::Data,
            off,
            len,
            birth,
        }
    }
}

/// One leaf record as listed in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafPtr {
    /// Leaf number (block index / 1024).
    pub leaf: u64,
    /// Record offset.
    pub off: u64,
    /// Record total length.
    pub len: u32,
    /// Record crc32c.
    pub crc: u32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawLeafPtr {
    leaf: U64,
    off: U64,
    len: U32,
    crc: U32,
}
const _: () = assert!(std::mem::size_of::<RawLeafPtr>() == 24);

/// Raw bytes of one leaf.
pub const LEAF_BYTES: usize = LEAF_ENTRIES as usize * 16;

/// Encodes a leaf of exactly [`LEAF_ENTRIES`] entries.
pub fn encode_leaf(entries: &[MapEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEAF_BYTES);
    for e in entries {
        let raw = RawEntry {
            off_kind: (e.off | (e.kind as u64) << 56).into(),
            len: e.len.into(),
            birth: e.birth.into(),
        };
        out.extend_from_slice(raw.as_bytes());
    }
    out
}

/// Decodes and validates a leaf: every DATA entry must point into the log
/// before `file_len` and have a plausible length.
pub fn decode_leaf(bytes: &[u8], file_len: u64, max_record: u32) -> Result<Vec<MapEntry>> {
    if bytes.len() != LEAF_BYTES {
        return Err(Error::corrupt(format!(
            "leaf has {} bytes, not {LEAF_BYTES}",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(LEAF_ENTRIES as usize);
    for chunk in bytes.chunks_exact(16) {
        let raw = RawEntry::read_from_bytes(chunk).map_err(|_| Error::corrupt("leaf entry"))?;
        let word = raw.off_kind.get();
        let off = word & MAX_FILE_OFFSET;
        let kind = match word >> 56 {
            0 => EntryKind::Unmapped,
            1 => EntryKind::Zero,
            2 => EntryKind::Data,
            k => return Err(Error::corrupt(format!("map entry of unknown kind {k}"))),
        };
        let e = MapEntry {
            kind,
            off,
            len: raw.len.get(),
            birth: raw.birth.get(),
        };
        let bad = match kind {
            EntryKind::Data => {
                e.len < super::RECORD_HEADER_LEN as u32
                    || e.len > max_record
                    || off < super::LOG_START
                    || off + u64::from(e.len) > file_len
            }
            _ => off != 0 || e.len != 0,
        };
        if bad {
            return Err(Error::corrupt(format!(
                "map entry {e:?} points outside the log"
            )));
        }
        out.push(e);
    }
    Ok(out)
}

/// Encodes the leaf index.
pub fn encode_index(ptrs: &[LeafPtr]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ptrs.len() * 24);
    for p in ptrs {
        let raw = RawLeafPtr {
            leaf: p.leaf.into(),
            off: p.off.into(),
            len: p.len.into(),
            crc: p.crc.into(),
        };
        out.extend_from_slice(raw.as_bytes());
    }
    out
}

/// Decodes the leaf index: leaves strictly increasing and below `max_leaves`.
pub fn decode_index(bytes: &[u8], max_leaves: u64) -> Result<Vec<LeafPtr>> {
    if !bytes.len().is_multiple_of(24) {
        return Err(Error::corrupt("leaf index length is not a multiple of 24"));
    }
    let mut out: Vec<LeafPtr> = Vec::with_capacity(bytes.len() / 24);
    for chunk in bytes.chunks_exact(24) {
        let raw = RawLeafPtr::read_from_bytes(chunk).map_err(|_| Error::corrupt("leaf index"))?;
        let p = LeafPtr {
            leaf: raw.leaf.get(),
            off: raw.off.get(),
            len: raw.len.get(),
            crc: raw.crc.get(),
        };
        if p.leaf >= max_leaves || out.last().is_some_and(|last| last.leaf >= p.leaf) {
            return Err(Error::corrupt(format!(
                "leaf index entry for leaf {} out of order",
                p.leaf
            )));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_round_trip() {
        let mut entries = vec![MapEntry::default(); LEAF_ENTRIES as usize];
        entries[3] = MapEntry::data(65536, 100, 7);
        entries[4] = MapEntry {
            kind: EntryKind::Zero,
            off: 0,
            len: 0,
            birth: 2,
        };
        let bytes = encode_leaf(&entries);
        assert_eq!(decode_leaf(&bytes, 1 << 20, 1 << 21).unwrap(), entries);
    }

    #[test]
    fn entry_past_file_end_is_corrupt() {
        let mut entries = vec![MapEntry::default(); LEAF_ENTRIES as usize];
        entries[0] = MapEntry::data(1 << 20, 100, 1);
        let bytes = encode_leaf(&entries);
        assert!(decode_leaf(&bytes, 1 << 20, 1 << 21).is_err());
    }

    #[test]
    fn index_must_be_sorted() {
        let a = LeafPtr {
            leaf: 2,
            off: 65536,
            len: 80,
            crc: 1,
        };
        let b = LeafPtr {
            leaf: 1,
            off: 65536,
            len: 80,
            crc: 1,
        };
        assert!(decode_index(&encode_index(&[a, b]), 10).is_err());
        assert_eq!(
            decode_index(&encode_index(&[b, a]), 10).unwrap(),
            vec![b, a]
        );
        assert!(decode_index(&encode_index(&[a]), 2).is_err());
    }
}
