//! Write-behind of partly written blocks: a block written in 4 KiB pieces is
//! written back once, not once per batch of pieces that arrived while the
//! previous write-back was in flight; a flush still makes every piece
//! durable at once.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vbdfs::io::{AlignedBuf, MemStore, Store};
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

/// A [`MemStore`] that counts the bytes written to it.
#[derive(Debug, Default)]
struct Counting {
    inner: MemStore,
    written: AtomicU64,
}

impl Counting {
    fn count(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Store for Counting {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn read_direct(&self, buf: &mut AlignedBuf, off: u64, len: usize) -> io::Result<Range<usize>> {
        self.inner.read_direct(buf, off, len)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.count(buf.len());
        self.inner.write_at(buf, off)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        self.count(bufs.iter().map(|b| b.len()).sum());
        self.inner.write_vectored_at(bufs, off)
    }
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.count(buf.len());
        self.inner.write_direct_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(off, len)
    }
}

const BLOCK: usize = 64 << 10;
const PIECE: usize = 4 << 10;

fn image() -> (Arc<Counting>, Image) {
    let store = Arc::new(Counting::default());
    let img = Image::create_on(
        store.clone(),
        &CreateOptions {
            size: 64 << 20,
            block_size: BLOCK as u64,
            codec: Codec::None,
        },
        &OpenOptions {
            cache_bytes: 16 << 20,
            workers: 2,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    (store, img)
}

fn piece(i: usize) -> Vec<u8> {
    (0..PIECE)
        .map(|j| (i * 7 + j * 13 + j / 251) as u8)
        .collect()
}

/// 64 blocks written sequentially in 4 KiB pieces, a little apart (a slow
/// writer: every write-back worker is idle between two pieces): each block
/// is written back once. Eagerly queued, a block went out after its first
/// piece and again after the next ones: 2–16 records per block.
#[test]
fn a_block_written_in_pieces_is_written_back_once() {
    let (store, img) = image();
    let blocks = 64;
    let base = store.written.load(Ordering::Relaxed);
    for i in 0..blocks * BLOCK / PIECE {
        img.write_at(&piece(i), (i * PIECE) as u64).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    img.flush().unwrap();
    let written = store.written.load(Ordering::Relaxed) - base;
    let data = (blocks * BLOCK) as u64;
    assert!(
        written < data + data / 8,
        "{written} bytes written for {data} bytes of data"
    );
    for i in 0..blocks * BLOCK / PIECE {
        let mut buf = vec![0; PIECE];
        img.read_at(&mut buf, (i * PIECE) as u64).unwrap();
        assert_eq!(buf, piece(i), "piece {i}");
    }
}

/// A flush does not wait out the write-behind delay of a partly written
/// block, and the block is then in the image: an image opened from the
/// store's bytes has it.
#[test]
fn flush_writes_a_partly_written_block_at_once() {
    let (store, img) = image();
    img.write_at(&piece(1), 8192).unwrap();
    let t = Instant::now();
    img.flush().unwrap();
    let took = t.elapsed();
    let copy = Arc::new(MemStore::from_bytes(store.inner.to_bytes()));
    let reopened = Image::open_on(copy, &OpenOptions::default()).unwrap();
    let mut buf = vec![0; PIECE];
    reopened.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, piece(1));
    assert!(took < vbdfs::cache::WRITE_BEHIND, "flush took {took:?}");
    drop(img);
}
