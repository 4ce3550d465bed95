//! The qcow2 header (versions 2 and 3) and its header extensions: read,
//! validated field by field before any arithmetic uses them. Layout per QEMU's
//! `docs/interop/qcow2.txt`; every integer is big-endian.

use crate::convert::source::{be32, be64, FileReader};
use crate::Result;

/// The qcow2 magic, "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest and largest cluster_bits accepted (512 B .. 2 MiB, QEMU's range).
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// QEMU's limit on the active L1 table: 32 MiB, i.e. 4 Mi entries.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// The longest backing file name the spec allows.
const MAX_BACKING_NAME: u32 = 1023;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (QEMU's default, compression_type 0).
    Zlib,
    /// zstd frames (compression_type 1).
    Zstd,
}

/// A validated qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, in 9..=21.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries of the active L1 table (bounded, and the table lies in the file).
    pub l1_size: u64,
    /// File offset of the active L1 table (cluster aligned).
    pub l1_offset: u64,
    /// Backing file name as stored (not resolved).
    pub backing_name: Option<String>,
    /// Backing format from the header extension ("qcow2", "raw"...), if given.
    pub backing_format: Option<String>,
    /// Internal snapshots in the file (ignored: only the active state is read).
    pub snapshots: u32,
    /// Compression type of compressed clusters.
    pub compression: Compression,
    /// Extended L2 entries (32 subclusters per cluster).
    pub extended_l2: bool,
    /// The corrupt bit is set (QEMU still reads such images).
    pub marked_corrupt: bool,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Reads and validates the header of `f`.
    pub fn read(f: &FileReader) -> Result<Header> {
        if f.len() < 72 {
            return Err(f.corrupt("too short for a qcow2 header"));
        }
        let mut fixed = [0u8; 112];
        f.read_at(&mut fixed, 0)?;
        if fixed.get(..4) != Some(&MAGIC[..]) {
            return Err(f.corrupt("not a qcow2 file (bad magic)"));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(f.unsupported(format!("qcow2 version {version} is not supported")));
        }
        let cluster_bits = be32(&fixed, 20);
        if !CLUSTER_BITS.contains(&cluster_bits) {
            return Err(f.corrupt(format!("qcow2 cluster_bits {cluster_bits} outside 9..=21")));
        }
        let cluster_size = 1u64 << cluster_bits;
        match be32(&fixed, 32) {
            0 => {}
            1 => return Err(f.unsupported("encrypted qcow2 (AES) is not supported")),
            2 => return Err(f.unsupported("encrypted qcow2 (LUKS) is not supported")),
            m => return Err(f.corrupt(format!("qcow2 crypt_method {m} is invalid"))),
        }
        let (incompat, header_len) = if version == 3 {
            let len = be32(&fixed, 100);
            if len < 104 || !len.is_multiple_of(8) || u64::from(len) > cluster_size {
                return Err(f.corrupt(format!("qcow2 header_length {len} is invalid")));
            }
            (be64(&fixed, 72), len)
        } else {
            (0, 72)
        };
        f.check_range(0, header_len.into(), "qcow2 header")?;
        // The first cluster holds the header, its extensions and the backing name.
        let first_len = cluster_size.min(f.len());
        let mut first = vec![0u8; first_len as usize];
        f.read_at(&mut first, 0)?;
        let ext = read_extensions(f, &first, header_len as usize)?;

        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names = feature_names(&ext.feature_names, unknown);
            return Err(f.unsupported(format!(
                "qcow2 uses unknown incompatible features {unknown:#x}{names}"
            )));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(f.unsupported("qcow2 with an external data file is not supported"));
        }
        let ctype = if header_len > 104 {
            fixed.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        let compression = match (incompat & INCOMPAT_COMPRESSION != 0, ctype) {
            (false, 0) => Compression::Zlib,
            (false, t) => {
                return Err(f.corrupt(format!(
                    "qcow2 compression_type {t} without the compression type feature bit"
                )))
            }
            (true, 1) => Compression::Zstd,
            (true, t) => {
                return Err(f.unsupported(format!("qcow2 compression_type {t} is not supported")))
            }
        };
        let extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(f.corrupt("qcow2 extended L2 entries need clusters of at least 16 KiB"));
        }

        let size = be64(&fixed, 24);
        let l1_size = u64::from(be32(&fixed, 36));
        let l1_offset = be64(&fixed, 40);
        let entry = if extended_l2 { 16 } else { 8 };
        let per_l1 = (cluster_size / entry).saturating_mul(cluster_size);
        let needed = size.div_ceil(per_l1);
        if needed > MAX_L1_ENTRIES {
            return Err(f.corrupt(format!("qcow2 virtual size {size} is too large")));
        }
        if l1_size < needed {
            return Err(f.corrupt(format!(
                "qcow2 L1 table too small ({l1_size} entries) for virtual size {size}"
            )));
        }
        if l1_size > MAX_L1_ENTRIES {
            return Err(f.corrupt(format!("qcow2 L1 table of {l1_size} entries is too large")));
        }
        if l1_size > 0 {
            if !l1_offset.is_multiple_of(cluster_size) {
                return Err(f.corrupt(format!("qcow2 L1 table offset {l1_offset} is unaligned")));
            }
            f.check_range(l1_offset, l1_size * 8, "qcow2 L1 table")?;
        }

        let backing_name = read_backing_name(f, &first, &fixed)?;
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_offset,
            backing_name,
            backing_format: ext.backing_format,
            snapshots: be32(&fixed, 60),
            compression,
            extended_l2,
            marked_corrupt: incompat & INCOMPAT_CORRUPT != 0,
        })
    }
}

#[derive(Debug, Default)]
struct Extensions {
    backing_format: Option<String>,
    feature_names: Vec<u8>,
}

/// Walks the header extensions that follow the header inside the first cluster.
fn read_extensions(f: &FileReader, first: &[u8], start: usize) -> Result<Extensions> {
    let mut out = Extensions::default();
    let mut at = start;
    // Version 2 headers may have no extension area at all (old images).
    while let Some(head) = first.get(at..at + 8) {
        let kind = be32(head, 0);
        let len = be32(head, 4) as usize;
        if kind == EXT_END {
            break;
        }
        let data_at = at + 8;
        let Some(data) = data_at
            .checked_add(len)
            .and_then(|end| first.get(data_at..end))
        else {
            return Err(f.corrupt(format!(
                "qcow2 header extension {kind:#x} runs past the header"
            )));
        };
        match kind {
            EXT_BACKING_FORMAT => {
                out.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_NAMES => out.feature_names = data.to_vec(),
            _ => {}
        }
        at = data_at + len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// " (name, name)" for the set bits of `bits` that the feature name table names.
fn feature_names(table: &[u8], bits: u64) -> String {
    let names: Vec<String> = table
        .chunks_exact(48)
        .filter(|e| e.first() == Some(&0))
        .filter(|e| e.get(1).is_some_and(|&b| b < 64 && bits & (1u64 << b) != 0))
        .map(|e| {
            let name = e.get(2..).unwrap_or(&[]);
            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            String::from_utf8_lossy(name.get(..end).unwrap_or(&[])).into_owned()
        })
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

fn read_backing_name(f: &FileReader, first: &[u8], fixed: &[u8]) -> Result<Option<String>> {
    let off = be64(fixed, 8);
    if off == 0 {
        return Ok(None);
    }
    let len = be32(fixed, 16);
    // An empty name is no backing file, as QEMU reads it.
    if len == 0 {
        return Ok(None);
    }
    if len > MAX_BACKING_NAME {
        return Err(f.corrupt(format!("qcow2 backing file name length {len} is invalid")));
    }
    f.check_range(off, len.into(), "qcow2 backing file name")?;
    let name = usize::try_from(off)
        .ok()
        .and_then(|o| first.get(o..o.checked_add(len as usize)?))
        .ok_or_else(|| f.corrupt("qcow2 backing file name lies outside the first cluster"))?;
    let name = String::from_utf8(name.to_vec())
        .map_err(|_| f.unsupported("qcow2 backing file name is not UTF-8"))?;
    Ok(Some(name))
}
