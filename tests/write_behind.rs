//! Write-behind of partly written blocks: a block written in 4 KiB pieces is
//! written back once, not once per batch of pieces that arrived while the
//! previous write-back was in flight; a flush still makes every piece
//! durable at once.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::sync::Arc;
use std::time::{Duration, Instant};
use vbdfs::io::MemStore;
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const BLOCK: usize = 64 << 10;
const PIECE: usize = 4 << 10;

fn image() -> (Arc<MemStore>, Image) {
    let store = Arc::new(MemStore::new());
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
    let base = store.bytes_written();
    for i in 0..blocks * BLOCK / PIECE {
        img.write_at(&piece(i), (i * PIECE) as u64).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    img.flush().unwrap();
    let written = store.bytes_written() - base;
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
/// store's bytes has it. (Timed three times: a flush that waited for the
/// delay would take it every time; a loaded machine may slow one.)
#[test]
fn flush_writes_a_partly_written_block_at_once() {
    let (store, img) = image();
    let mut fastest = Duration::MAX;
    for i in 0..3 {
        img.write_at(&piece(i), 8192 + (i * BLOCK) as u64).unwrap();
        let t = Instant::now();
        img.flush().unwrap();
        fastest = fastest.min(t.elapsed());
        let copy = Arc::new(MemStore::from_bytes(store.to_bytes()));
        let reopened = Image::open_on(copy, &OpenOptions::default()).unwrap();
        let mut buf = vec![0; PIECE];
        reopened
            .read_at(&mut buf, 8192 + (i * BLOCK) as u64)
            .unwrap();
        assert_eq!(buf, piece(i));
    }
    assert!(
        fastest < vbdfs::cache::WRITE_BEHIND,
        "every flush took at least {fastest:?}"
    );
    drop(img);
}
