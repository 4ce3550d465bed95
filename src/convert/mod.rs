//! Import from and export to other disk-image formats (see `docs/convert.md`).
//!
//! This module owns the foreign formats: readers for raw, qcow2 (v2/v3) and VHD
//! (fixed, dynamic, differencing) behind one [`Source`] trait, backing-chain
//! resolution (relative to the image, as QEMU does; depth limit; loops
//! detected by canonical path), format detection, and the two commands:
//! [`import`] (any source into a new standalone `.vbd`) and [`export`] (a
//! `.vbd` to a sparse raw file or a qcow2 file). Every value read from a
//! foreign file is checked before use; a bad file is an [`Error`] naming it.

mod commands;
mod export;
mod import;
mod pipeline;
mod progress;
pub mod qcow2;
mod qcow2_writer;
pub mod raw;
pub mod source;
pub mod staging;
pub mod vhd;

pub use commands::{run_export, run_import};
pub use export::{export, split_snapshot, ExportFormat};
pub use import::{import, import_report, ImportReport};
pub use source::Source;

use crate::{Error, ErrorKind, Result};
use source::FileReader;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Backing chains deeper than this are refused (QEMU's limit is similar).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// A foreign source format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A plain disk file or block device.
    Raw,
    /// QEMU qcow2, versions 2 and 3.
    Qcow2,
    /// Microsoft VHD (QEMU calls it `vpc`).
    Vhd,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vhd",
        })
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vhd" | "vpc" => Ok(Format::Vhd),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown format {other:?} (expected raw, qcow2 or vhd)"),
            )),
        }
    }
}

/// Guesses the format of `path` from its magic: qcow2 "QFI\xfb" at 0, a VHD
/// "conectix" cookie at 0 or in the last sector, else raw.
pub fn detect(path: &Path) -> Result<Format> {
    detect_in(&FileReader::open(path)?)
}

fn detect_in(f: &FileReader) -> Result<Format> {
    detect_magic(f, true)
}

/// `tail`: also take a VHD footer in the last sector (a fixed VHD has no
/// header). QEMU's own probe looks only at the start, so a qcow2's backing
/// file without a recorded format is probed without it: a fixed VHD there is
/// the raw disk QEMU reads, footer included.
fn detect_magic(f: &FileReader, tail: bool) -> Result<Format> {
    let mut magic = [0u8; 8];
    f.read_at(&mut magic, 0)?;
    if magic[..4] == qcow2::header::MAGIC {
        return Ok(Format::Qcow2);
    }
    if &magic == vhd::footer::COOKIE || (tail && vhd::footer::probe(f)?) {
        return Ok(Format::Vhd);
    }
    Ok(Format::Raw)
}

/// Whether the file starts like a vbd image (its first superblock's magic).
fn is_vbd(f: &FileReader) -> bool {
    let mut magic = [0u8; 8];
    f.read_at(&mut magic, 0).is_ok() && magic == crate::format::VBD_MAGIC
}

/// Opens `path` as a [`Source`], detecting the format unless `format` is
/// given; an explicit format that contradicts the file's magic is refused.
/// Backing files and VHD parents are opened and flattened into the source.
pub fn open_source(path: &Path, format: Option<Format>) -> Result<Box<dyn Source>> {
    open_in_chain(path, format, true, &mut Vec::new())
}

/// `strict`: refuse an explicit `format` that the magic contradicts (a user's
/// `--format`); a backing format recorded in an image is obeyed as QEMU does.
fn open_in_chain(
    path: &Path,
    format: Option<Format>,
    strict: bool,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn Source>> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        match chain.last() {
            Some(child) => Error::new(
                kind,
                format!("{}: backing file {}: {e}", child.display(), path.display()),
            ),
            None => Error::new(kind, format!("{}: {e}", path.display())),
        }
    })?;
    if let Some(child) = chain.last() {
        if chain.contains(&canonical) {
            return Err(Error::corrupt(format!(
                "{}: backing chain loop: {} is already in the chain",
                child.display(),
                canonical.display()
            )));
        }
        if chain.len() >= MAX_CHAIN_DEPTH {
            let top = chain.first().unwrap_or(child);
            return Err(Error::invalid(format!(
                "{}: backing chain deeper than {MAX_CHAIN_DEPTH} files (at {})",
                top.display(),
                child.display()
            )));
        }
    }
    let child = chain.last().cloned();
    chain.push(canonical);
    let file = FileReader::open(path).map_err(|e| match &child {
        Some(child) => e.context(format!("{}: backing file", child.display())),
        None => e,
    })?;
    let found = detect_magic(&file, child.is_none())?;
    let format = match format {
        Some(want) if strict && want != found => {
            return Err(Error::invalid(format!(
                "{}: the file looks like {found}, not {want}; give the right --format \
                 (or none to detect it)",
                path.display()
            )))
        }
        Some(want) => want,
        None if found == Format::Raw && is_vbd(&file) => {
            return Err(Error::invalid(format!(
                "{} is a vbd image already: copy it, clone it (vbdfs clone) or export it; \
                 --format raw imports its bytes as a raw disk",
                path.display()
            )))
        }
        None => found,
    };
    let source: Box<dyn Source> = match format {
        Format::Raw => Box::new(raw::RawSource::from_reader(file)),
        Format::Qcow2 => {
            let dir = base_dir(path);
            Box::new(qcow2::Qcow2Source::open(file, |name, fmt| {
                let fmt = match fmt {
                    Some(f) => Some(backing_format(path, f)?),
                    None => None,
                };
                if name.starts_with("json:") || name.contains("://") {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{}: backing file {name:?} is not a local file",
                            path.display()
                        ),
                    ));
                }
                open_in_chain(&dir.join(name), fmt, false, chain)
            })?)
        }
        Format::Vhd => Box::new(vhd::VhdSource::open(file, |parent| {
            open_in_chain(parent, Some(Format::Vhd), false, chain)
        })?),
    };
    Ok(source)
}

/// The directory relative backing names are resolved against: the one of the
/// image's path as given (QEMU does not follow the image's symlink first).
fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Maps a qcow2 backing format name to a [`Format`].
fn backing_format(path: &Path, name: &str) -> Result<Format> {
    match name {
        "raw" | "file" | "host_device" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        "vpc" => Ok(Format::Vhd),
        other => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: backing file format {other:?} is not supported",
                path.display()
            ),
        )),
    }
}
