//! [`AlignedBuf`]: a growable byte buffer whose start is aligned for direct
//! I/O, built from page-sized, page-aligned chunks (no `unsafe`: zerocopy
//! views the chunks as bytes).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Offsets, lengths and buffer addresses of direct writes are multiples of
/// this ([`crate::io::Store::write_direct_at`]).
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(4096))]
struct Page([u8; DIRECT_ALIGN]);

/// A byte buffer aligned to [`DIRECT_ALIGN`], whose usable length is always
/// a multiple of it.
#[derive(Default)]
pub struct AlignedBuf {
    pages: Vec<Page>,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.pages.len() * DIRECT_ALIGN)
    }
}

impl AlignedBuf {
    /// The first `len` bytes rounded up to [`DIRECT_ALIGN`], growing the
    /// buffer (with zeros) if needed. Existing contents are kept.
    pub fn bytes(&mut self, len: usize) -> &mut [u8] {
        let pages = len.div_ceil(DIRECT_ALIGN);
        if self.pages.len() < pages {
            self.pages.resize(pages, Page([0; DIRECT_ALIGN]));
        }
        self.pages[..pages].as_mut_bytes()
    }

    /// Everything the buffer holds (a multiple of [`DIRECT_ALIGN`]).
    pub fn as_slice(&self) -> &[u8] {
        self.pages.as_bytes()
    }

    /// Frees everything past the first `keep` bytes (rounded up).
    pub fn shrink(&mut self, keep: usize) {
        self.pages.truncate(keep.div_ceil(DIRECT_ALIGN));
        self.pages.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_rounded_and_keeps_contents() {
        let mut buf = AlignedBuf::default();
        let b = buf.bytes(10);
        assert_eq!(b.len(), DIRECT_ALIGN);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        b[..3].copy_from_slice(b"abc");
        let b = buf.bytes(3 * DIRECT_ALIGN + 1);
        assert_eq!(b.len(), 4 * DIRECT_ALIGN);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(&b[..3], b"abc");
        assert!(b[3..].iter().all(|&x| x == 0));
        buf.shrink(1);
        assert_eq!(buf.bytes(1).len(), DIRECT_ALIGN);
    }
}
