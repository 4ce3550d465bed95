//! [`FileStore`]: a [`Store`] over a real host file.

use super::Store;
use crate::sys;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// A host file used as a store. Reads and writes are `pread`/`pwrite`; `sync` is
/// `fdatasync`. A store opened for writing also holds a second descriptor of
/// the same file with `O_DIRECT`, for [`Store::write_direct_at`] (log
/// appends): those bytes skip the host page cache (no second copy of what the
/// engine caches, no page-cache writeback stalls).
#[derive(Debug)]
pub struct FileStore {
    file: File,
    direct: Option<File>,
}

impl FileStore {
    /// Wraps an open file (every write buffered).
    pub fn new(file: File) -> Self {
        FileStore { file, direct: None }
    }

    /// Wraps a file open for writing, with `O_DIRECT` log writes where the
    /// host file system supports them (not tmpfs: writes stay buffered there).
    pub fn with_direct_writes(file: File) -> Self {
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| ::log::debug!("no O_DIRECT writes on this file: {e}"))
            .ok();
        FileStore { file, direct }
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

    fn read_head_and_body(
        &self,
        head: &mut [u8],
        body_len: usize,
        off: u64,
    ) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        sys::preadv_head_and_body(&self.file, head, &mut body, body_len, off)?;
        Ok(body)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        sys::pwritev_all(&self.file, bufs, off)
    }

    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match &self.direct {
            Some(direct) => match direct.write_all_at(buf, off) {
                // A file system that opened O_DIRECT but refuses this
                // alignment: the buffered write is just as correct.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.file.write_all_at(buf, off)
                }
                other => other,
            },
            None => self.file.write_all_at(buf, off),
        }
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

    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        sys::allocate(&self.file, off, len)
    }

    fn preallocate_window(&self) -> u64 {
        32 << 20
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        sys::punch_hole(&self.file, off, len)
    }

    fn allocated(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn writeback_hint(&self, off: u64, len: u64, wait: bool) {
        if self.direct.is_some() {
            return; // the log never sat in the page cache
        }
        sys::writeback_hint(&self.file, off, len, wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(bytes: &[u8]) -> (tempfile::NamedTempFile, FileStore) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().write_all_at(bytes, 0).unwrap();
        let store = FileStore::new(tmp.reopen().unwrap());
        (tmp, store)
    }

    #[test]
    fn read_head_and_body_splits_one_read() {
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (_tmp, store) = store_with(&bytes);
        let mut head = [0u8; 40];
        let body = store.read_head_and_body(&mut head, 65_536, 1000).unwrap();
        assert_eq!(head[..], bytes[1000..1040]);
        assert_eq!(body.len(), 65_536);
        assert_eq!(body[..], bytes[1040..1040 + 65_536]);
    }

    #[test]
    fn read_head_and_body_past_the_end_is_unexpected_eof() {
        let (_tmp, store) = store_with(&[1u8; 4096]);
        let mut head = [0u8; 40];
        let err = store.read_head_and_body(&mut head, 8192, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = store.read_head_and_body(&mut head, 0, 4090).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
