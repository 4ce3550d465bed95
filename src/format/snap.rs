//! The snapshot table (SNAP_TABLE record) and snapshot names: byte layout,
//! encoding and validation of every field.
//!
//! The table is a small metadata record written with a checkpoint and named
//! by the superblock (`snap_table`); the clone's CONFIG record is in
//! [`super::config`]. This module does no I/O: the engine
//! reads the record, verifies its header and crc, decodes the payload (zstd or
//! stored) and hands the raw bytes here. Every length, count, offset and name
//! is checked; decoding never panics on hostile bytes.

use super::{RecPtr, LOG_START, MAX_FILE_OFFSET, MAX_VIRTUAL_SIZE};
use crate::error::{Error, Result};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Most snapshots one image may hold (bounds the table record: 4096 x 144 bytes).
pub const MAX_SNAPSHOTS: usize = 4096;
/// Longest snapshot name, in bytes.
pub const MAX_SNAP_NAME: usize = 64;

const TABLE_MAGIC: [u8; 4] = *b"VSNP";
pub(super) const VERSION: u16 = 1;
/// Largest snapshot id accepted: far from `u64::MAX`, so `next_id + 1` cannot
/// overflow, and unreachable at one snapshot per microsecond.
pub(super) const MAX_ID: u64 = 1 << 62;

/// Checks a snapshot name: 1..=64 bytes of `A-Z a-z 0-9 . _ -`, the first one
/// a letter, digit or `_` (so never `.`, `..`, a hidden name or an option).
pub fn check_snapshot_name(name: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || name.len() > MAX_SNAP_NAME || !name.chars().all(ok) {
        return Err(Error::invalid(format!(
            "invalid snapshot name '{name}': use 1 to {MAX_SNAP_NAME} letters, digits, '.', '_' \
             or '-', starting with a letter, digit or '_'"
        )));
    }
    Ok(())
}

/// One snapshot as stored in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapEntry {
    /// Unique id, never reused within an image (ids grow from 1).
    pub id: u64,
    /// Name (see [`check_snapshot_name`]).
    pub name: String,
    /// Checkpoint generation that committed the snapshot.
    pub gen: u64,
    /// Creation time, ns since the Unix epoch.
    pub ctime_ns: u64,
    /// Virtual size of the disk at the snapshot.
    pub virtual_size: u64,
    /// The INDEX record of the snapshot's map (off 0 = an empty map).
    pub index: RecPtr,
    /// Clones whose backing reference names this snapshot.
    pub holds: u32,
    /// Blocks mapped to data at the snapshot (informational).
    pub data_blocks: u64,
    /// Bytes of their records (informational).
    pub stored_bytes: u64,
}

/// The snapshot table of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapTable {
    /// The id the next snapshot gets.
    pub next_id: u64,
    /// Snapshots, ids strictly increasing.
    pub entries: Vec<SnapEntry>,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub(super) struct RawPtr {
    pub(super) off: U64,
    pub(super) len: U32,
    pub(super) crc: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawTableHeader {
    magic: [u8; 4],
    version: U16,
    entry_len: U16,
    count: U32,
    reserved0: U32,
    next_id: U64,
    reserved: [u8; 8],
}
const TABLE_HEADER_LEN: usize = 32;
const _: () = assert!(std::mem::size_of::<RawTableHeader>() == TABLE_HEADER_LEN);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawSnapEntry {
    id: U64,
    gen: U64,
    ctime_ns: U64,
    virtual_size: U64,
    index: RawPtr,
    holds: U32,
    name_len: u8,
    flags: u8,
    reserved0: [u8; 2],
    data_blocks: U64,
    stored_bytes: U64,
    name: [u8; MAX_SNAP_NAME],
    reserved: [u8; 8],
}
const ENTRY_LEN: usize = 144;
const _: () = assert!(std::mem::size_of::<RawSnapEntry>() == ENTRY_LEN);

pub(super) fn ptr_raw(p: RecPtr) -> RawPtr {
    RawPtr {
        off: p.off.into(),
        len: p.len.into(),
        crc: p.crc.into(),
    }
}

/// A record pointer read from a payload: none, or inside the log and the file.
pub(super) fn ptr_checked(p: &RawPtr, file_len: u64, what: &str) -> Result<RecPtr> {
    let ptr = RecPtr {
        off: p.off.get(),
        len: p.len.get(),
        crc: p.crc.get(),
    };
    let bad = if ptr.off == 0 {
        ptr.len != 0 || ptr.crc != 0
    } else {
        ptr.off < LOG_START
            || ptr.off > MAX_FILE_OFFSET
            || ptr
                .off
                .checked_add(u64::from(ptr.len))
                .is_none_or(|end| end > file_len)
    };
    if bad {
        return Err(Error::corrupt(format!(
            "{what}: record pointer {} (+{}) is outside the file",
            ptr.off, ptr.len
        )));
    }
    Ok(ptr)
}

pub(super) fn check_size(size: u64, what: &str) -> Result<()> {
    if size == 0 || size > MAX_VIRTUAL_SIZE || !size.is_multiple_of(512) {
        return Err(Error::corrupt(format!(
            "{what}: virtual size {size} out of range"
        )));
    }
    Ok(())
}

/// Decodes `len` name bytes from a fixed field whose tail must be zero.
fn name_from(field: &[u8], len: usize, what: &str) -> Result<String> {
    let (name, rest) = field
        .split_at_checked(len)
        .ok_or_else(|| Error::corrupt(format!("{what}: name length {len} out of range")))?;
    if rest.iter().any(|&b| b != 0) {
        return Err(Error::corrupt(format!("{what}: bytes after the name")));
    }
    let name = std::str::from_utf8(name)
        .map_err(|_| Error::corrupt(format!("{what}: name is not UTF-8")))?;
    check_snapshot_name(name).map_err(|e| Error::corrupt(format!("{what}: {e}")))?;
    Ok(name.to_string())
}

impl SnapTable {
    /// Encodes the table payload (header + entries).
    pub fn encode(&self) -> Vec<u8> {
        let header = RawTableHeader {
            magic: TABLE_MAGIC,
            version: VERSION.into(),
            entry_len: (ENTRY_LEN as u16).into(),
            count: (self.entries.len() as u32).into(),
            reserved0: 0.into(),
            next_id: self.next_id.into(),
            reserved: [0; 8],
        };
        let mut out = Vec::with_capacity(TABLE_HEADER_LEN + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(header.as_bytes());
        for e in &self.entries {
            let mut name = [0u8; MAX_SNAP_NAME];
            let n = e.name.len().min(MAX_SNAP_NAME);
            name[..n].copy_from_slice(&e.name.as_bytes()[..n]);
            let raw = RawSnapEntry {
                id: e.id.into(),
                gen: e.gen.into(),
                ctime_ns: e.ctime_ns.into(),
                virtual_size: e.virtual_size.into(),
                index: ptr_raw(e.index),
                holds: e.holds.into(),
                name_len: n as u8,
                flags: 0,
                reserved0: [0; 2],
                data_blocks: e.data_blocks.into(),
                stored_bytes: e.stored_bytes.into(),
                name,
                reserved: [0; 8],
            };
            out.extend_from_slice(raw.as_bytes());
        }
        out
    }

    /// Decodes and validates a table payload of an image `file_len` bytes long.
    pub fn decode(bytes: &[u8], file_len: u64) -> Result<SnapTable> {
        let what = "snapshot table";
        let (head, body) = bytes
            .split_at_checked(TABLE_HEADER_LEN)
            .ok_or_else(|| Error::corrupt(format!("{what} truncated")))?;
        let h = RawTableHeader::read_from_bytes(head)
            .map_err(|_| Error::corrupt(format!("{what} truncated")))?;
        if h.magic != TABLE_MAGIC || h.version.get() != VERSION {
            return Err(Error::corrupt(format!("{what}: bad magic or version")));
        }
        let count = h.count.get() as usize;
        if usize::from(h.entry_len.get()) != ENTRY_LEN
            || count > MAX_SNAPSHOTS
            || body.len() != count * ENTRY_LEN
            || h.reserved0.get() != 0
            || h.reserved != [0; 8]
        {
            return Err(Error::corrupt(format!(
                "{what}: {count} entries do not fit its {} bytes",
                bytes.len()
            )));
        }
        let next_id = h.next_id.get();
        if next_id == 0 || next_id > MAX_ID {
            return Err(Error::corrupt(format!("{what}: next id {next_id}")));
        }
        let mut entries: Vec<SnapEntry> = Vec::with_capacity(count);
        for chunk in body.chunks_exact(ENTRY_LEN) {
            let r = RawSnapEntry::read_from_bytes(chunk)
                .map_err(|_| Error::corrupt(format!("{what} entry truncated")))?;
            let id = r.id.get();
            let ew = format!("{what} entry {id}");
            let name = name_from(&r.name, usize::from(r.name_len), &ew)?;
            let e = SnapEntry {
                id,
                name,
                gen: r.gen.get(),
                ctime_ns: r.ctime_ns.get(),
                virtual_size: r.virtual_size.get(),
                index: ptr_checked(&r.index, file_len, &ew)?,
                holds: r.holds.get(),
                data_blocks: r.data_blocks.get(),
                stored_bytes: r.stored_bytes.get(),
            };
            let prev = entries.last().map_or(0, |p| p.id);
            if id <= prev || id >= next_id {
                return Err(Error::corrupt(format!("{ew}: id out of order")));
            }
            if e.gen == 0 || e.gen >= u64::from(u32::MAX) {
                return Err(Error::corrupt(format!("{ew}: generation {}", e.gen)));
            }
            if r.flags != 0 || r.reserved0 != [0; 2] || r.reserved != [0; 8] {
                return Err(Error::corrupt(format!("{ew}: reserved bytes set")));
            }
            check_size(e.virtual_size, &ew)?;
            if entries.iter().any(|p| p.name == e.name) {
                return Err(Error::corrupt(format!("{ew}: duplicate name {}", e.name)));
            }
            entries.push(e);
        }
        Ok(SnapTable { next_id, entries })
    }

    /// The entry named `name`.
    pub fn find(&self, name: &str) -> Option<&SnapEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, name: &str) -> SnapEntry {
        SnapEntry {
            id,
            name: name.into(),
            gen: 3,
            ctime_ns: 5,
            virtual_size: 1 << 20,
            index: RecPtr {
                off: LOG_START,
                len: 100,
                crc: 9,
            },
            holds: 2,
            data_blocks: 4,
            stored_bytes: 400,
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "pre-upgrade", "v1.2_x", "_x", "A9", &"n".repeat(64)] {
            assert!(check_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".h",
            "-x",
            "a/b",
            "a b",
            "a@b",
            "é",
            &"n".repeat(65),
        ] {
            assert!(check_snapshot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_round_trip_and_checks() {
        let t = SnapTable {
            next_id: 5,
            entries: vec![entry(1, "a"), entry(4, "b")],
        };
        let bytes = t.encode();
        assert_eq!(bytes.len(), 32 + 2 * 144);
        assert_eq!(SnapTable::decode(&bytes, 1 << 20).unwrap(), t);
        // The pointer must lie inside the file.
        assert!(SnapTable::decode(&bytes, LOG_START + 50).is_err());
        for bad in [
            SnapTable {
                next_id: 4,
                entries: t.entries.clone(),
            },
            SnapTable {
                next_id: 9,
                entries: vec![entry(4, "a"), entry(1, "b")],
            },
            SnapTable {
                next_id: 9,
                entries: vec![entry(1, "a"), entry(2, "a")],
            },
        ] {
            assert!(
                SnapTable::decode(&bad.encode(), 1 << 20).is_err(),
                "{bad:?}"
            );
        }
        assert!(SnapTable::decode(&bytes[..bytes.len() - 1], 1 << 20).is_err());
    }

    #[test]
    fn table_never_panics_on_flipped_bytes() {
        let bytes = SnapTable {
            next_id: 2,
            entries: vec![entry(1, "a")],
        }
        .encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let _ = SnapTable::decode(&b, 1 << 20);
        }
    }
}
