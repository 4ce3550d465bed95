//! [`MemStore`]: a [`Store`] in a byte vector, for tests and fuzzing.

use super::Store;
use parking_lot::RwLock;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// An in-memory store. Every write is immediately "durable".
#[derive(Debug, Default)]
pub struct MemStore {
    bytes: RwLock<Vec<u8>>,
    holes: parking_lot::Mutex<super::holes::Holes>,
    written: AtomicU64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemStore {
            bytes: RwLock::new(bytes),
            holes: Default::default(),
            written: AtomicU64::new(0),
        }
    }

    /// Bytes written to the store so far (every write counts, also of
    /// bytes written before).
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// A copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

fn range(off: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
    Ok((start, end))
}

impl Store for MemStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let (start, end) = range(off, buf.len())?;
        let bytes = self.bytes.read();
        let src = bytes.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let (start, end) = range(off, buf.len())?;
        self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let mut bytes = self.bytes.write();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        self.holes.lock().fill(off, end as u64);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let (len, _) = range(len, 0)?;
        let mut bytes = self.bytes.write();
        bytes.resize(len, 0);
        self.holes.lock().truncate(len as u64);
        Ok(())
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let (start, end) = range(off, len)?;
        let mut bytes = self.bytes.write();
        let end = end.min(bytes.len());
        if start < end {
            bytes[start..end].fill(0);
            self.holes.lock().punch(start as u64, end as u64);
        }
        Ok(())
    }

    fn find_hole(&self, from: u64, to: u64, min_len: u64) -> io::Result<Option<(u64, u64)>> {
        Ok(self.holes.lock().find(from, to, min_len))
    }

    /// What is not in holes, to the byte (a host file system counts pages).
    fn allocated(&self) -> Option<u64> {
        let len = self.bytes.read().len() as u64;
        Some(len - self.holes.lock().bytes_below(len))
    }
}
