//! The [`Source`] trait every foreign-format reader implements, and the small
//! helpers they share: a positional file reader that names its file in every
//! error, big-endian field access that cannot panic, and the walk that merges an
//! overlay's map with its backing file's extents.

use crate::{Error, ErrorKind, Result};
use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A read-only virtual disk in some foreign format, seen as a flat byte range
/// `0..len()`. Implementations are shared between reader threads.
pub trait Source: Send + Sync + fmt::Debug {
    /// The file this source was opened from (for messages).
    fn path(&self) -> &Path;
    /// Virtual size in bytes.
    fn len(&self) -> u64;
    /// True when the virtual size is 0.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the guest bytes at `off`. `off + buf.len()` must not
    /// exceed [`Source::len`].
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    /// The first range `[start, end)` inside `[off, limit)` that may hold
    /// non-zero bytes, or `None` when the whole of `[off, limit)` reads as
    /// zeros. The ranges are a superset: they may contain zeros, but bytes
    /// outside every returned range are guaranteed to read as zeros.
    fn next_data(&self, off: u64, limit: u64) -> Result<Option<(u64, u64)>>;
    /// Things the user should know about this source and its chain (ignored
    /// internal snapshots, size rounding...), one sentence each.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A host file read with `pread`; every error names the file.
#[derive(Debug)]
pub struct FileReader {
    file: File,
    path: PathBuf,
    len: u64,
}

impl FileReader {
    /// Opens `path` read-only: a regular file or a block device. Anything
    /// else (a FIFO, whose open would wait for a writer; a socket; a
    /// character device) is refused before it is read.
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        // Non-blocking: opening a FIFO without a writer returns at once (and
        // is refused below) instead of waiting; files and disks ignore it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| {
                let kind = if e.kind() == io::ErrorKind::NotFound {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Io
                };
                Error::new(kind, format!("{}: cannot open: {e}", path.display()))
            })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
        if meta.is_dir() {
            return Err(Error::invalid(format!(
                "{}: is a directory",
                path.display()
            )));
        }
        let kind = meta.file_type();
        let odd = if kind.is_fifo() {
            Some("a FIFO")
        } else if kind.is_socket() {
            Some("a socket")
        } else if kind.is_char_device() {
            Some("a character device")
        } else {
            None
        };
        if let Some(odd) = odd {
            return Err(Error::invalid(format!(
                "{}: is {odd}, not a disk file or block device",
                path.display()
            )));
        }
        let mut len = meta.len();
        if !meta.is_file() {
            // A block device reports length 0 in metadata; ask the device.
            len = (&file).seek(SeekFrom::End(0)).unwrap_or(len);
        }
        Ok(FileReader {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes (as when opened).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The open file (for `SEEK_DATA`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as
    /// zeros (as QEMU's file protocol does).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off.saturating_add(done as u64);
            let Some(rest) = buf.get_mut(done..) else {
                break;
            };
            match self.file.read_at(rest, pos) {
                Ok(0) => {
                    rest.fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("{}: read at {pos}", self.path.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `off`, which must lie inside the file:
    /// a structure that runs past the end is a truncated (corrupt) file.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.check_range(off, buf.len() as u64, what)?;
        self.read_at(buf, off)
    }

    /// Fails with `Corrupt` unless `[off, off+len)` lies inside the file.
    pub fn check_range(&self, off: u64, len: u64, what: &str) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(self.corrupt(format!(
                "{what} at offset {off} (+{len} bytes) lies outside the file ({} bytes); \
                 the file is truncated or damaged",
                self.len
            ))),
        }
    }

    /// A `Corrupt` error that names this file.
    pub fn corrupt(&self, msg: impl fmt::Display) -> Error {
        Error::corrupt(format!("{}: {msg}", self.path.display()))
    }

    /// An `Unsupported` error that names this file.
    pub fn unsupported(&self, msg: impl fmt::Display) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("{}: {msg}", self.path.display()),
        )
    }
}

/// Big-endian `u16` at `at` in `b` (0 if out of range: callers size `b`).
pub fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

/// Big-endian `u32` at `at` in `b` (0 if out of range: callers size `b`).
pub fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

/// Big-endian `u64` at `at` in `b` (0 if out of range: callers size `b`).
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// How a format maps one run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Stored in this file (may still be zeros).
    Data,
    /// Reads as zeros, whatever lies below.
    Zero,
    /// Not stored here: read from the backing file (zeros without one).
    Below,
}

/// The shared `next_data` walk for formats with an optional backing file.
/// `map(pos, limit)` classifies the run that starts at `pos` and returns its
/// kind and end (`pos < end <= limit`).
pub fn layered_next_data(
    off: u64,
    limit: u64,
    backing: Option<&dyn Source>,
    mut map: impl FnMut(u64, u64) -> Result<(Run, u64)>,
) -> Result<Option<(u64, u64)>> {
    let mut start: Option<u64> = None;
    let mut pos = off;
    while pos < limit {
        let (run, end) = map(pos, limit)?;
        let end = end.clamp(pos.saturating_add(1), limit);
        match run {
            Run::Data => {
                start.get_or_insert(pos);
            }
            Run::Zero => {
                if let Some(s) = start {
                    return Ok(Some((s, pos)));
                }
            }
            Run::Below => {
                let below = match backing {
                    Some(b) if pos < b.len() => b.next_data(pos, end.min(b.len()))?,
                    _ => None,
                };
                match (start, below) {
                    (Some(s), Some((bs, be))) if bs == pos => {
                        if be < end {
                            return Ok(Some((s, be)));
                        }
                    }
                    (Some(s), _) => return Ok(Some((s, pos))),
                    (None, Some((bs, be))) => {
                        if be < end {
                            return Ok(Some((bs, be)));
                        }
                        start = Some(bs);
                    }
                    (None, None) => {}
                }
            }
        }
        pos = end;
    }
    Ok(start.map(|s| (s, limit)))
}

/// Reads `buf` at `off` from `backing`, or zeros where there is no backing file
/// or it is shorter than the overlay.
pub fn read_below(backing: Option<&dyn Source>, buf: &mut [u8], off: u64) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let avail = b.len().saturating_sub(off).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(avail);
    if !head.is_empty() {
        b.read_at(head, off)?;
    }
    tail.fill(0);
    Ok(())
}

/// Fails with `Invalid` unless `[off, off+len)` lies inside a source of `size`.
pub fn check_read(path: &Path, size: u64, off: u64, len: usize) -> Result<()> {
    match off.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid(format!(
            "{}: read of {len} bytes at {off} is past the virtual size {size}",
            path.display()
        ))),
    }
}
