//! Helpers shared by the tests of metadata records' second copies and of
//! records lost in both (`metadata_copies.rs`, `lost_map_records.rs`): a
//! small image with a snapshot, every map record of a file with its second
//! copy, and the damage done to them.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::sync::Arc;
use vbdfs::crypto::{KdfParams, KeyMaterial};
use vbdfs::format::{
    align_up, RecordHeader, RecordKind, LOG_START, LOG_UNIT, RECORD_ALIGN, RECORD_FLAG_COPY,
    RECORD_FLAG_HAS_COPY, RECORD_HEADER_LEN,
};
use vbdfs::io::MemStore;
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

pub const BS: u64 = 4096;
/// Two map leaves (1024 blocks each).
pub const SIZE: u64 = 1100 * BS;

pub fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        cache_bytes: 1 << 20,
        workers: 2,
        ..OpenOptions::default()
    }
}

pub fn key() -> KeyMaterial {
    KeyMaterial::from_bytes(b"copies")
        .unwrap()
        .with_kdf(KdfParams::insecure_for_tests())
}

pub fn block(seed: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| (i.wrapping_mul(seed | 1) >> 3) as u8 ^ seed as u8)
        .collect()
}

/// The disk's bytes after writing `blocks` (block, seed) over `base`.
pub fn apply(base: &mut [u8], blocks: &[(u64, u64)]) {
    for &(b, seed) in blocks {
        base[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&block(seed));
    }
}

/// The options every image of these tests is created with.
pub fn create_options() -> CreateOptions {
    CreateOptions {
        size: SIZE,
        block_size: BS,
        codec: Codec::Zstd(1),
    }
}

/// A new empty image in memory (encrypted under [`key`] if asked), open.
pub fn new_image(encrypted: bool) -> (Arc<MemStore>, Image) {
    let store = Arc::new(MemStore::new());
    let create = create_options();
    let img = if encrypted {
        Image::create_on_encrypted(store.clone(), &create, &opts(false), &key()).unwrap()
    } else {
        Image::create_on(store.clone(), &create, &opts(false)).unwrap()
    };
    (store, img)
}

/// An image with a snapshot `s1` and a head that differs from it in both
/// leaves, closed cleanly: its bytes, and the contents of head and `s1`.
pub fn image(encrypted: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (store, img) = new_image(encrypted);
    let mut head = vec![0u8; SIZE as usize];
    let first = [(0, 1), (5, 2), (1030, 3), (1099, 4)];
    for &(b, s) in &first {
        img.write_at(&block(s), b * BS).unwrap();
    }
    apply(&mut head, &first);
    img.snapshot_create("s1").unwrap();
    let snap = head.clone();
    let second = [(5, 12), (7, 13), (1030, 14)];
    for &(b, s) in &second {
        img.write_at(&block(s), b * BS).unwrap();
    }
    apply(&mut head, &second);
    img.close().unwrap();
    (store.to_bytes(), head, snap)
}

/// A metadata record's first copy and where its second copy is.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub kind: RecordKind,
    /// A LEAF's leaf number.
    pub key: u64,
    pub first: u64,
    pub second: u64,
}

/// Every metadata record of the file with its second copy (each must have one).
pub fn pairs(bytes: &[u8]) -> Vec<Pair> {
    let mut out = Vec::new();
    let mut off = LOG_START;
    while off + RECORD_HEADER_LEN as u64 <= bytes.len() as u64 {
        let Ok(h) = RecordHeader::decode(&bytes[off as usize..], off) else {
            off += RECORD_ALIGN;
            continue;
        };
        let metadata = matches!(
            h.kind,
            RecordKind::Leaf | RecordKind::Index | RecordKind::SnapTable | RecordKind::Config
        );
        if metadata && h.flags & RECORD_FLAG_COPY == 0 {
            assert!(h.flags & RECORD_FLAG_HAS_COPY != 0, "{h:?} at {off}");
            let second = align_up(off + h.total_len(), LOG_UNIT);
            let copy = RecordHeader::decode(&bytes[second as usize..], second).unwrap();
            assert!(
                copy.flags & RECORD_FLAG_COPY != 0
                    && copy.kind == h.kind
                    && copy.lsn == h.lsn + 1
                    && copy.payload_len == h.payload_len,
                "{:?} record at {off} has no second copy at {second}",
                h.kind
            );
            out.push(Pair {
                kind: h.kind,
                key: h.key,
                first: off,
                second,
            });
        }
        off = align_up(off + h.total_len(), RECORD_ALIGN);
    }
    out
}

/// Flips a byte in the payload of the record at `off`.
pub fn damage(bytes: &mut [u8], off: u64) {
    bytes[off as usize + RECORD_HEADER_LEN + 3] ^= 0x5a;
}

/// Opens `bytes` and runs `check`; a read-write check is closed, and the
/// store's bytes after it returned.
pub fn check(bytes: Vec<u8>, rw: bool) -> (vbdfs::CheckReport, Vec<u8>) {
    let store = Arc::new(MemStore::from_bytes(bytes));
    let img = Image::open_on(store.clone(), &opts(!rw)).unwrap();
    let report = img.check().unwrap();
    img.close().unwrap();
    (report, store.to_bytes())
}
