//! The backing reference of a clone (CONFIG record, named by the superblock's
//! `config`): which snapshot of which base image the clone's unwritten blocks
//! read from, and where to find the base. Layout, encoding and validation.
//!
//! No I/O here: the engine opens the base, then checks its uuid, the snapshot
//! id, generation and index pointer against this reference.

use super::snap::{check_size, ptr_checked, ptr_raw, RawPtr, MAX_ID, VERSION};
use super::{check_snapshot_name, RecPtr, MAX_FILE_OFFSET};
use crate::error::{Error, Result};
use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Longest path stored in a backing reference.
pub const MAX_BACKING_PATH: usize = 4096;

const CONFIG_MAGIC: [u8; 4] = *b"VCFG";

/// A clone's reference to the snapshot of its base image (the CONFIG record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The base image's uuid (its superblock `image_uuid`).
    pub base_uuid: [u8; 16],
    /// The base snapshot's id.
    pub snap_id: u64,
    /// The base snapshot's generation.
    pub snap_gen: u64,
    /// The base snapshot's INDEX pointer (an extra identity check).
    pub snap_index: RecPtr,
    /// The base snapshot's virtual size.
    pub virtual_size: u64,
    /// Path of the base relative to the clone's directory (raw bytes).
    pub rel_path: Vec<u8>,
    /// Absolute path of the base when the clone was made (fallback), may be empty.
    pub abs_path: Vec<u8>,
    /// The base snapshot's name (for messages).
    pub snap_name: String,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawConfig {
    magic: [u8; 4],
    version: U16,
    flags: U16,
    base_uuid: [u8; 16],
    snap_id: U64,
    snap_gen: U64,
    snap_index: RawPtr,
    virtual_size: U64,
    rel_len: U16,
    abs_len: U16,
    name_len: u8,
    reserved: [u8; 11],
}
const CONFIG_LEN: usize = 80;
const _: () = assert!(std::mem::size_of::<RawConfig>() == CONFIG_LEN);

fn check_path(path: &[u8], what: &str, absolute: bool) -> Result<()> {
    let bad = path.len() > MAX_BACKING_PATH
        || path.contains(&0)
        || (absolute && !path.is_empty() && path.first() != Some(&b'/'))
        || (!absolute && path.is_empty());
    if bad {
        return Err(Error::corrupt(format!("backing reference: bad {what}")));
    }
    Ok(())
}

impl BackingRef {
    /// Encodes the CONFIG payload: the fixed part, then the relative path, the
    /// absolute path and the snapshot name.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawConfig {
            magic: CONFIG_MAGIC,
            version: VERSION.into(),
            flags: 0.into(),
            base_uuid: self.base_uuid,
            snap_id: self.snap_id.into(),
            snap_gen: self.snap_gen.into(),
            snap_index: ptr_raw(self.snap_index),
            virtual_size: self.virtual_size.into(),
            rel_len: (self.rel_path.len() as u16).into(),
            abs_len: (self.abs_path.len() as u16).into(),
            name_len: self.snap_name.len() as u8,
            reserved: [0; 11],
        };
        let mut out = raw.as_bytes().to_vec();
        out.extend_from_slice(&self.rel_path);
        out.extend_from_slice(&self.abs_path);
        out.extend_from_slice(self.snap_name.as_bytes());
        out
    }

    /// Checks the values before they are encoded (lengths that fit the fields).
    pub fn validate(&self) -> Result<()> {
        check_path(&self.rel_path, "relative path", false)?;
        check_path(&self.abs_path, "absolute path", true)?;
        check_snapshot_name(&self.snap_name)?;
        check_size(self.virtual_size, "backing reference")
    }

    /// Decodes and validates a CONFIG payload. The base's snapshot pointer is
    /// a pointer into the *base* file, so only its form is checked here.
    pub fn decode(bytes: &[u8]) -> Result<BackingRef> {
        let what = "backing reference";
        let (head, rest) = bytes
            .split_at_checked(CONFIG_LEN)
            .ok_or_else(|| Error::corrupt(format!("{what} truncated")))?;
        let r = RawConfig::read_from_bytes(head)
            .map_err(|_| Error::corrupt(format!("{what} truncated")))?;
        if r.magic != CONFIG_MAGIC || r.version.get() != VERSION {
            return Err(Error::corrupt(format!("{what}: bad magic or version")));
        }
        if r.flags.get() != 0 || r.reserved != [0; 11] {
            return Err(Error::corrupt(format!("{what}: reserved bytes set")));
        }
        let (rel, abs, name) = (
            usize::from(r.rel_len.get()),
            usize::from(r.abs_len.get()),
            usize::from(r.name_len),
        );
        if rest.len() != rel + abs + name {
            return Err(Error::corrupt(format!("{what}: lengths do not add up")));
        }
        let (rel_path, tail) = rest.split_at(rel);
        let (abs_path, name_bytes) = tail.split_at(abs);
        let snap_name = std::str::from_utf8(name_bytes)
            .map_err(|_| Error::corrupt(format!("{what}: name is not UTF-8")))?
            .to_string();
        let snap_index = ptr_checked(&r.snap_index, MAX_FILE_OFFSET, what)?;
        let b = BackingRef {
            base_uuid: r.base_uuid,
            snap_id: r.snap_id.get(),
            snap_gen: r.snap_gen.get(),
            snap_index,
            virtual_size: r.virtual_size.get(),
            rel_path: rel_path.to_vec(),
            abs_path: abs_path.to_vec(),
            snap_name,
        };
        b.validate()
            .map_err(|e| Error::corrupt(format!("{what}: {e}")))?;
        if b.snap_id == 0 || b.snap_id > MAX_ID || b.snap_gen >= u64::from(u32::MAX) {
            return Err(Error::corrupt(format!("{what}: snapshot id or generation")));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::LOG_START;

    #[test]
    fn backing_round_trip_and_checks() {
        let b = BackingRef {
            base_uuid: [7; 16],
            snap_id: 3,
            snap_gen: 9,
            snap_index: RecPtr {
                off: LOG_START,
                len: 80,
                crc: 1,
            },
            virtual_size: 1 << 30,
            rel_path: b"../base.vbd".to_vec(),
            abs_path: b"/srv/base.vbd".to_vec(),
            snap_name: "golden".into(),
        };
        let bytes = b.encode();
        assert_eq!(BackingRef::decode(&bytes).unwrap(), b);
        assert!(BackingRef::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = b.clone();
        bad.abs_path = b"relative".to_vec();
        assert!(BackingRef::decode(&bad.encode()).is_err());
        for i in 0..bytes.len() * 8 {
            let mut x = bytes.clone();
            x[i / 8] ^= 1 << (i % 8);
            let _ = BackingRef::decode(&x);
        }
    }
}
