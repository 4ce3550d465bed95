//! Raw sources: a plain file (or block device) read as the disk itself. Host
//! holes are found with `SEEK_DATA`/`SEEK_HOLE` so sparse files import quickly;
//! on file systems without hole reporting the whole file counts as data and the
//! importer's zero detection does the rest.

use super::source::{check_read, FileReader, Source};
use crate::{sys, Error, Result};
use std::path::Path;

/// A raw disk file.
#[derive(Debug)]
pub struct RawSource {
    file: FileReader,
}

impl RawSource {
    /// Opens `path` as a raw disk.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(RawSource {
            file: FileReader::open(path)?,
        })
    }

    /// Wraps an already open file.
    pub fn from_reader(file: FileReader) -> Self {
        RawSource { file }
    }
}

impl Source for RawSource {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn len(&self) -> u64 {
        self.file.len()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_read(self.path(), self.len(), off, buf.len())?;
        self.file.read_at(buf, off)
    }

    fn next_data(&self, off: u64, limit: u64) -> Result<Option<(u64, u64)>> {
        let limit = limit.min(self.len());
        if off >= limit {
            return Ok(None);
        }
        let ctx = |e| Error::io(format!("{}: seek", self.path().display()), e);
        let start = match sys::seek_data(self.file.file(), off) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            // No hole reporting here (or not a regular file): all of it is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((off, limit))),
            Err(e) => return Err(ctx(e)),
        };
        if start >= limit {
            return Ok(None);
        }
        let end = match sys::seek_hole(self.file.file(), start) {
            Ok(Some(h)) => h,
            Ok(None) => limit,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => limit,
            Err(e) => return Err(ctx(e)),
        };
        Ok(Some((start, end.clamp(start + 1, limit))))
    }
}
