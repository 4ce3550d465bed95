//! The VHD footer and dynamic-disk header (Microsoft VHD spec, big-endian),
//! checksum-verified and bound-checked, plus the parent locators of a
//! differencing disk.

use crate::convert::source::{be16, be32, be64, FileReader};
use crate::Result;

/// Footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
const SPARSE_COOKIE: &[u8; 8] = b"cxsparse";
/// QEMU's limit: 2040 GiB in 512-byte sectors.
const MAX_SECTORS: u64 = 0xff00_0000;
/// The largest CHS geometry; images with it use the footer's current size.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// Block sizes accepted: powers of two from one sector to 256 MiB.
const MAX_BLOCK: u32 = 256 << 20;
/// Longest parent locator read (a path, UTF-16 or UTF-8).
const MAX_LOCATOR: u32 = 8192;

/// The three disk types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Raw data followed by the footer.
    Fixed,
    /// Sparse, with a BAT and per-block sector bitmaps.
    Dynamic,
    /// Like dynamic; sectors not in this file come from the parent.
    Differencing,
}

/// A validated footer.
#[derive(Debug, Clone)]
pub struct Footer {
    /// Disk type.
    pub disk_type: DiskType,
    /// Offset of the dynamic header (dynamic and differencing only).
    pub data_offset: u64,
    /// Virtual size in bytes, computed as QEMU does (CHS or current size).
    pub size: u64,
    /// The disk's unique id.
    pub uuid: [u8; 16],
}

/// The ones' complement of the byte sum with the 4 checksum bytes at `at`
/// counted as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b.iter().enumerate().fold(0u32, |acc, (i, &x)| {
        if (at..at + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(x))
        }
    });
    !sum
}

fn parse_footer(f: &FileReader, b: &[u8]) -> Result<Footer> {
    if checksum(b, 64) != be32(b, 64) {
        return Err(f.corrupt("VHD footer checksum mismatch"));
    }
    let disk_type = match be32(b, 60) {
        2 => DiskType::Fixed,
        3 => DiskType::Dynamic,
        4 => DiskType::Differencing,
        t => return Err(f.unsupported(format!("VHD disk type {t} is not supported"))),
    };
    let chs = u64::from(be16(b, 56))
        * u64::from(b.get(58).copied().unwrap_or(0))
        * u64::from(b.get(59).copied().unwrap_or(0));
    // QEMU's rule (since 9.x): only Virtual PC ("vpc ") and old QEMU ("qemu")
    // images are sized by CHS geometry; every other creator (Hyper-V,
    // XenServer, Disk2vhd, VirtualBox...) by the footer's current size.
    let by_chs = matches!(b.get(28..32), Some(b"vpc " | b"qemu"));
    let sectors = if by_chs && chs != MAX_GEOMETRY {
        chs
    } else {
        be64(b, 48) / 512
    };
    if sectors > MAX_SECTORS {
        return Err(f.unsupported(format!(
            "VHD virtual size of {sectors} sectors exceeds 2040 GiB"
        )));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(b.get(68..84).unwrap_or(&[0; 16]));
    Ok(Footer {
        disk_type,
        data_offset: be64(b, 16),
        size: sectors * 512,
        uuid,
    })
}

/// True when the last sector of `f` (or its first) starts with the VHD cookie.
pub fn probe(f: &FileReader) -> Result<bool> {
    let mut b = [0u8; 8];
    f.read_at(&mut b, 0)?;
    if &b == COOKIE {
        return Ok(true);
    }
    if f.len() >= 512 {
        f.read_at(&mut b, f.len() - 512)?;
        return Ok(&b == COOKIE);
    }
    Ok(false)
}

/// Reads the footer: the one at the end of the file, or the copy at offset 0
/// when the end one is missing or damaged (dynamic disks keep both).
pub fn read_footer(f: &FileReader) -> Result<Footer> {
    if f.len() < 512 {
        return Err(f.corrupt("too short for a VHD footer"));
    }
    let mut end = [0u8; 512];
    f.read_at(&mut end, f.len() - 512)?;
    let mut head = [0u8; 512];
    f.read_at(&mut head, 0)?;
    let from_end = if end.starts_with(COOKIE) {
        Some(parse_footer(f, &end))
    } else {
        None
    };
    match from_end {
        Some(Ok(footer)) => Ok(footer),
        Some(Err(e)) if !head.starts_with(COOKIE) => Err(e),
        None if !head.starts_with(COOKIE) => Err(f.corrupt("no VHD footer (cookie missing)")),
        _ => {
            let footer = parse_footer(f, &head)?;
            if footer.disk_type == DiskType::Fixed {
                return Err(f.corrupt("fixed VHD without a valid footer at the end"));
            }
            Ok(footer)
        }
    }
}

/// A validated dynamic-disk header.
#[derive(Debug, Clone)]
pub struct DynHeader {
    /// File offset of the BAT.
    pub bat_offset: u64,
    /// Bytes per block (power of two, 512 B ..= 256 MiB).
    pub block_size: u64,
    /// Bytes of the sector bitmap in front of each block (sector multiple).
    pub bitmap_size: u64,
    /// Parent's unique id (differencing).
    pub parent_uuid: [u8; 16],
    /// Parent's name as stored in the header (differencing).
    pub parent_name: String,
    /// Parent locator paths as (platform code, decoded path).
    pub locators: Vec<([u8; 4], String)>,
}

/// Reads the dynamic header of a disk of `size` bytes at `off`.
pub fn read_dyn_header(f: &FileReader, off: u64, size: u64, diff: bool) -> Result<DynHeader> {
    let mut b = vec![0u8; 1024];
    f.read_exact_at(&mut b, off, "VHD dynamic header")?;
    if b.get(..8) != Some(&SPARSE_COOKIE[..]) {
        return Err(f.corrupt("VHD dynamic header has a bad cookie"));
    }
    if checksum(&b, 36) != be32(&b, 36) {
        return Err(f.corrupt("VHD dynamic header checksum mismatch"));
    }
    let block = be32(&b, 32);
    if !block.is_power_of_two() || !(512..=MAX_BLOCK).contains(&block) {
        return Err(f.corrupt(format!("VHD block size {block} is invalid")));
    }
    let block_size = u64::from(block);
    let entries = u64::from(be32(&b, 28));
    let used = size.div_ceil(block_size);
    if entries < used {
        return Err(f.corrupt(format!(
            "VHD BAT has {entries} entries, the disk needs {used}"
        )));
    }
    let bat_offset = be64(&b, 16);
    f.check_range(bat_offset, used * 4, "VHD block allocation table")?;
    let bitmap_size = (block_size / 512).div_ceil(8).div_ceil(512) * 512;
    let mut parent_uuid = [0u8; 16];
    parent_uuid.copy_from_slice(b.get(40..56).unwrap_or(&[0; 16]));
    let parent_name = utf16(b.get(64..576).unwrap_or(&[]), true);
    let mut locators = Vec::new();
    if diff {
        for e in b.get(576..768).unwrap_or(&[]).chunks_exact(24) {
            let mut code = [0u8; 4];
            code.copy_from_slice(e.get(..4).unwrap_or(&[0; 4]));
            let len = be32(e, 8);
            let at = be64(e, 16);
            if code == [0; 4] || len == 0 || len > MAX_LOCATOR {
                continue;
            }
            let mut raw = vec![0u8; len as usize];
            f.read_exact_at(&mut raw, at, "VHD parent locator")?;
            let path = match &code {
                b"W2ru" | b"W2ku" => utf16(&raw, false),
                b"MacX" => String::from_utf8_lossy(&raw)
                    .trim_end_matches('\0')
                    .to_string(),
                _ => continue,
            };
            locators.push((code, path));
        }
    }
    Ok(DynHeader {
        bat_offset,
        block_size,
        bitmap_size,
        parent_uuid,
        parent_name,
        locators,
    })
}

/// Decodes NUL-terminated UTF-16 (big- or little-endian).
fn utf16(b: &[u8], big: bool) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| {
            let pair = [
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ];
            if big {
                u16::from_be_bytes(pair)
            } else {
                u16::from_le_bytes(pair)
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// The id as 32 hex digits with dashes, for messages.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let part = |r: std::ops::Range<usize>| hex.get(r).unwrap_or("").to_string();
    format!(
        "{}-{}-{}-{}-{}",
        part(0..8),
        part(8..12),
        part(12..16),
        part(16..20),
        part(20..32)
    )
}
