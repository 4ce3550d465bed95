//! [`FileStore`]: a [`Store`] over a real host file.

use super::{direct_span_bytes, span_slots, AlignedBuf, Store, DIRECT_ALIGN};
use crate::sys;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// A host file used as a store. Reads and writes are `pread`/`pwrite`; `sync` is
/// `fdatasync`. The store also holds a second descriptor of the same file
/// with `O_DIRECT` where the host file system allows it. Records are read
/// through it ([`Store::read_head_and_body`], [`Store::read_direct`]) and, on
/// a store opened for writing, the log is appended through it
/// ([`Store::write_direct_at`]): image data never sits in the host page
/// cache, so the engine's own cache (`cache=`) is the only copy in memory and
/// there are no page-cache writeback stalls.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    direct: Option<File>,
    /// `direct` is open for writing too.
    direct_writes: bool,
}

/// A thread's bounce buffer for direct reads of single records is kept for
/// its next read up to this size (a record of a 256 KiB block with its
/// alignment slack); larger ones are freed after the read. A buffer only
/// grows to the records read: the daemon's ~35 reading threads keep ~2.5 MiB
/// for an image of 64 KiB blocks, ~9 MiB for 256 KiB blocks. Kept at 128 KiB
/// before, every 4 KiB random read of a 256 KiB-block image reallocated it:
/// 4.9–5.7k IOPS against 5.3–6.0k now (`benches/RESULTS.md`, session 9).
const BOUNCE_KEEP: usize = (256 << 10) + (8 << 10);

thread_local! {
    /// This thread's aligned buffer for [`Store::read_head_and_body`].
    static BOUNCE: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

impl FileStore {
    /// Wraps an open file: writes buffered, records read past the host page
    /// cache where the host file system allows.
    pub fn new(file: File) -> Self {
        let direct = reopen_direct(&file, false);
        FileStore {
            file,
            direct,
            direct_writes: false,
        }
    }

    /// Wraps a file open for writing, with `O_DIRECT` log writes and record
    /// reads where the host file system supports them.
    pub fn with_direct_writes(file: File) -> Self {
        let direct = reopen_direct(&file, true);
        FileStore {
            file,
            direct_writes: direct.is_some(),
            direct,
        }
    }

    /// The underlying file (for locking).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `len` bytes at `off` into `span` (aligned, at least
    /// [`direct_span_bytes`] long) and says where in it they are: through the
    /// `O_DIRECT` descriptor where the file system allows, else buffered.
    fn read_direct_into(&self, span: &mut [u8], off: u64, len: usize) -> io::Result<Range<usize>> {
        match self.try_read_direct(span, off, len) {
            Some(read) => read,
            None => {
                self.file.read_exact_at(&mut span[..len], off)?;
                Ok(0..len)
            }
        }
    }

    /// [`FileStore::read_direct_into`] through the `O_DIRECT` descriptor:
    /// `None` if there is none or the file system refused the request (the
    /// caller reads buffered instead).
    fn try_read_direct(
        &self,
        span: &mut [u8],
        off: u64,
        len: usize,
    ) -> Option<io::Result<Range<usize>>> {
        let direct = self.direct.as_ref()?;
        let lead = (off % DIRECT_ALIGN as u64) as usize;
        let start = off - lead as u64;
        let span = &mut span[..direct_span_bytes(off, len)];
        let mut done = 0;
        while done < lead + len {
            // Only the end of the file makes a direct read short; the next
            // read, unaligned, is then refused (EINVAL) and the buffered
            // read reports the end of file.
            match direct.read_at(&mut span[done..], start + done as u64) {
                Ok(0) => return Some(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(lead..lead + len))
    }
}

/// A second descriptor of `file` with `O_DIRECT` (read-write if `write`),
/// or `None` where the host file system refuses it.
fn reopen_direct(file: &File, write: bool) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| ::log::debug!("no O_DIRECT access to this file: {e}"))
        .ok()
}

/// Holes one [`FileStore::find_hole`] looks at, at most.
const HOLE_PROBES: usize = 1 << 16;

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
        let len = head.len() + body_len;
        let direct = self.direct.is_some().then(|| {
            BOUNCE.with(|bounce| {
                let mut bounce = bounce.borrow_mut();
                let span = bounce.bytes(direct_span_bytes(off, len));
                let read = self.try_read_direct(span, off, len).map(|read| {
                    let bytes = &bounce.as_slice()[read?];
                    let (h, body) = bytes.split_at(head.len());
                    head.copy_from_slice(h);
                    Ok(body.to_vec())
                });
                if bounce.as_slice().len() > BOUNCE_KEEP {
                    bounce.shrink(BOUNCE_KEEP);
                }
                read
            })
        });
        if let Some(read) = direct.flatten() {
            return read;
        }
        let mut body = Vec::new();
        sys::preadv_head_and_body(&self.file, head, &mut body, body_len, off)?;
        Ok(body)
    }

    fn read_direct(&self, buf: &mut AlignedBuf, off: u64, len: usize) -> io::Result<Range<usize>> {
        self.read_direct_into(buf.bytes(direct_span_bytes(off, len)), off, len)
    }

    fn read_direct_spans(
        &self,
        buf: &mut AlignedBuf,
        spans: &[(u64, usize)],
    ) -> Vec<io::Result<Range<usize>>> {
        let slots = span_slots(spans);
        let mut rest = buf.bytes(slots.last().map_or(0, |s| s.end));
        let mut parts = Vec::with_capacity(spans.len());
        for slot in &slots {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(slot.len());
            parts.push(part);
            rest = tail;
        }
        // All spans at once through io_uring; a span it did not read whole
        // (the end of the file, a file system refusing O_DIRECT, an error,
        // no io_uring) is read again on its own, which reports why.
        let mut done: Vec<Option<Range<usize>>> = vec![None; spans.len()];
        if let (Some(direct), true) = (&self.direct, spans.len() > 1) {
            let mut reads: Vec<(u64, &mut [u8])> = spans
                .iter()
                .zip(parts.iter_mut())
                .map(|(&(off, _), part)| (off - off % DIRECT_ALIGN as u64, &mut **part))
                .collect();
            if let Some(results) = sys::uring::read_many(direct, &mut reads) {
                for ((slot, &(off, len)), (result, done)) in slots
                    .iter()
                    .zip(spans)
                    .zip(results.into_iter().zip(done.iter_mut()))
                {
                    let lead = (off % DIRECT_ALIGN as u64) as usize;
                    if matches!(result, Ok(n) if n >= lead + len) {
                        *done = Some(slot.start + lead..slot.start + lead + len);
                    }
                }
            }
        }
        parts
            .into_iter()
            .zip(slots.iter().zip(spans).zip(done))
            .map(|(part, ((slot, &(off, len)), done))| match done {
                Some(range) => Ok(range),
                None => self
                    .read_direct_into(part, off, len)
                    .map(|r| slot.start + r.start..slot.start + r.end),
            })
            .collect()
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        sys::pwritev_all(&self.file, bufs, off)
    }

    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self.direct.as_ref().filter(|_| self.direct_writes) {
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

    /// Asks the file system (`SEEK_HOLE`, `SEEK_DATA`), hole after hole,
    /// for at most [`HOLE_PROBES`] holes: a search stays well under a
    /// second however fragmented the file is. (ext4 and tmpfs report a
    /// preallocated range never written as a hole; XFS and btrfs as data,
    /// which is never reused.)
    fn find_hole(&self, from: u64, to: u64, min_len: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len()?;
        let to = to.min(len);
        let mut at = from;
        for _ in 0..HOLE_PROBES {
            let Some(start) = sys::seek_hole(&self.file, at)?.filter(|&s| s < to) else {
                return Ok(None);
            };
            let end = sys::seek_data(&self.file, start)?.unwrap_or(len);
            if end.min(to) - start >= min_len {
                return Ok(Some((start, end.min(to))));
            }
            at = end;
        }
        Ok(None)
    }

    fn allocated(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn writeback_hint(&self, off: u64, len: u64, wait: bool) {
        if self.direct_writes {
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
    fn read_direct_returns_the_bytes_asked_for_at_any_offset() {
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let (_tmp, store) = store_with(&bytes);
        assert!(store.direct.is_some(), "the test file takes O_DIRECT");
        let mut buf = AlignedBuf::default();
        for (off, len) in [
            (0, 4096),
            (1000, 7000),
            (4095, 1),
            (8192, 11_808),
            (19_999, 1),
        ] {
            let got = store.read_direct(&mut buf, off as u64, len).unwrap();
            assert_eq!(buf.as_slice()[got], bytes[off..off + len], "{off}+{len}");
        }
        let err = store.read_direct(&mut buf, 16_000, 4001).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = store.read_direct(&mut buf, 20_480, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_direct_spans_reads_every_span_and_reports_each_end_of_file() {
        spans_read_their_own_bytes();
    }

    #[test]
    fn read_direct_spans_without_io_uring_read_the_same() {
        crate::sys::uring::refuse_on_this_thread();
        spans_read_their_own_bytes();
    }

    fn spans_read_their_own_bytes() {
        let bytes: Vec<u8> = (0..600_000u32).map(|i| (i * 17 % 253) as u8).collect();
        let (_tmp, store) = store_with(&bytes);
        // Spans anywhere and of any length, more than one ring submission
        // holds, two running past the end of the file.
        let mut spans: Vec<(u64, usize)> = (0..150u64)
            .map(|i| ((i * 3_989) % 590_000, 1 + (i as usize * 61) % 9_000))
            .collect();
        spans.insert(40, (599_000, 1_001));
        spans.insert(90, (600_000, 1));
        let mut buf = AlignedBuf::default();
        let got = store.read_direct_spans(&mut buf, &spans);
        assert_eq!(got.len(), spans.len());
        for (&(off, len), got) in spans.iter().zip(got) {
            let (off, end) = (off as usize, off as usize + len);
            match got {
                Ok(range) => assert!(buf.as_slice()[range] == bytes[off..end], "{off}+{len}"),
                Err(e) => {
                    assert!(end > bytes.len(), "{off}+{len}: {e}");
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                }
            }
        }
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
