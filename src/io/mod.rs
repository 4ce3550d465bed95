//! The storage layer: where the bytes of an image file live.
//!
//! Everything above talks to a [`Store`]: positional reads and writes, a sync that
//! makes all earlier writes durable, hole punching and length changes. Three
//! backends implement it: [`FileStore`] (a real host file), [`MemStore`] (a byte
//! vector, for tests and fuzzing) and [`FaultStore`] (a crash simulator that keeps
//! writes volatile until `sync`, fails on demand and materialises what a power
//! loss could leave behind). This layer knows nothing of the format.

mod aligned;
mod fault;
mod file;
mod holes;
mod mem;

pub use aligned::{AlignedBuf, DIRECT_ALIGN};
pub use fault::{CrashImage, FaultStore};
pub use file::FileStore;
pub use mem::MemStore;

use std::io;

/// Where [`Store::read_direct_spans`] puts each span in its buffer: slots
/// back to back, each starting at a multiple of [`DIRECT_ALIGN`] and as long
/// as the span widened to [`DIRECT_ALIGN`] boundaries. A span's bytes start
/// in its slot at the span's offset within its first aligned unit.
pub fn span_slots(spans: &[(u64, usize)]) -> Vec<std::ops::Range<usize>> {
    let mut at = 0;
    spans
        .iter()
        .map(|&(off, len)| {
            let slot = at..at + direct_span_bytes(off, len);
            at = slot.end;
            slot
        })
        .collect()
}

/// Bytes a direct read of `len` bytes at `off` spans: widened to
/// [`DIRECT_ALIGN`] boundaries on both sides.
pub fn direct_span_bytes(off: u64, len: usize) -> usize {
    (lead(off) + len).next_multiple_of(DIRECT_ALIGN)
}

/// How far `off` lies past the [`DIRECT_ALIGN`] boundary below it.
fn lead(off: u64) -> usize {
    (off % DIRECT_ALIGN as u64) as usize
}

/// Positional storage for one image file. Implementations are shared between
/// threads; every method may be called concurrently.
#[allow(clippy::len_without_is_empty)] // a store's length is a size, not a collection
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `off`. Reading past the end is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Reads `head.len() + body_len` bytes at `off`: the first into `head`,
    /// the rest into a new vector (one read, past the host page cache, where
    /// the backend can: a record, which the engine caches itself).
    fn read_head_and_body(
        &self,
        head: &mut [u8],
        body_len: usize,
        off: u64,
    ) -> io::Result<Vec<u8>> {
        let mut body = vec![0; body_len];
        self.read_at(head, off)?;
        self.read_at(&mut body, off + head.len() as u64)?;
        Ok(body)
    }
    /// Reads `len` bytes at `off` into `buf` and says where in
    /// [`AlignedBuf::as_slice`] they are: past the host page cache where the
    /// backend can (`O_DIRECT`; the span read then widens to
    /// [`DIRECT_ALIGN`] boundaries). For runs of records, which the engine
    /// caches itself. Any offset and length; reading past the end is
    /// `UnexpectedEof`.
    fn read_direct(
        &self,
        buf: &mut AlignedBuf,
        off: u64,
        len: usize,
    ) -> io::Result<std::ops::Range<usize>> {
        self.read_at(&mut buf.bytes(len)[..len], off)?;
        Ok(0..len)
    }
    /// Reads several spans like [`Store::read_direct`], each into its own
    /// slot of `buf` ([`span_slots`]), submitted together where the backend
    /// can: one wait for all of them instead of one per span. For each
    /// `(off, len)`, in order: where in [`AlignedBuf::as_slice`] its bytes
    /// are, or its error.
    fn read_direct_spans(
        &self,
        buf: &mut AlignedBuf,
        spans: &[(u64, usize)],
    ) -> Vec<io::Result<std::ops::Range<usize>>> {
        let slots = span_slots(spans);
        let bytes = buf.bytes(slots.last().map_or(0, |s| s.end));
        spans
            .iter()
            .zip(&slots)
            .map(|(&(off, len), slot)| {
                let at = slot.start + lead(off);
                self.read_at(&mut bytes[at..at + len], off)
                    .map(|()| at..at + len)
            })
            .collect()
    }
    /// Writes all of `buf` at `off`, growing the store if needed. Not durable
    /// until [`Store::sync`] returns.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Writes the concatenation of `bufs` at `off` (one `pwritev` where the
    /// backend can). Not durable until [`Store::sync`] returns.
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        self.write_at(&bufs.concat(), off)
    }
    /// Writes `buf` at `off` past the host page cache where the backend can
    /// (`O_DIRECT`); `off`, `buf.len()` and `buf`'s address are multiples of
    /// [`DIRECT_ALIGN`]. Not durable until [`Store::sync`] returns.
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_at(buf, off)
    }
    /// Makes every earlier completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends to `len` (extension reads as zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Allocates `[off, off+len)` where the backend can, growing the store
    /// to cover it; bytes not written before read as zeros. Not durable
    /// until [`Store::sync`] returns.
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        if self.len()? < off + len {
            self.set_len(off + len)?;
        }
        Ok(())
    }
    /// How far ahead the log preallocates on this store (bytes).
    fn preallocate_window(&self) -> u64 {
        16 << 10
    }
    /// Deallocates `[off, off+len)`; it reads back as zeros. The length is kept.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()>;
    /// The first hole (a range that was punched, or never written, and
    /// holds nothing) of at least `min_len` bytes that starts in
    /// `[from, to)`, clipped to that range; `None` if there is none or the
    /// backend cannot tell. The log reuses such ranges.
    fn find_hole(&self, _from: u64, _to: u64, _min_len: u64) -> io::Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// Bytes of host storage the store occupies, where the backend knows.
    fn allocated(&self) -> Option<u64> {
        None
    }
    /// Hint that `[off, off+len)` was appended: start writing it to disk now;
    /// with `wait`, wait for that and drop it from host caches. Advisory only:
    /// it never replaces `sync`.
    fn writeback_hint(&self, _off: u64, _len: u64, _wait: bool) {}
    /// The keys of an unlocked encrypted image: records are sealed on append
    /// and opened on read by the log layer (`crate::crypto::SealedStore`).
    fn sealer(&self) -> Option<&crate::crypto::Sealer> {
        None
    }
}
