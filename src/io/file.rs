//! [`FileStore`]: a [`Store`] over a real host file.

use super::Store;
use crate::sys;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A host file used as a store. Reads and writes are `pread`/`pwrite`; `sync` is
/// `fdatasync`.
#[derive(Debug)]
pub struct FileStore {
    file: File,
}

impl FileStore {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileStore { file }
    }

    /// The underlying file (for locking).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Store for FileStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        sys::pwritev_all(&self.file, bufs, off)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        sys::punch_hole(&self.file, off, len)
    }

    fn allocated(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn forget(&self, off: u64, len: u64) {
        sys::drop_page_cache(&self.file, off, len);
    }

    fn writeback_hint(&self, off: u64, len: u64, wait: bool) {
        sys::writeback_hint(&self.file, off, len, wait);
    }
}
