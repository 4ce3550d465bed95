//! Second copies of map records (docs/format.md §4, "Second copies"): one
//! damaged byte in a LEAF, INDEX, SNAP_TABLE or CONFIG record must not cost
//! the image. Every such record in the file is damaged in turn, in its first
//! copy, in both, and in its first copy and then (after a read-write open has
//! written it anew) in its second: the head and a snapshot must read their
//! exact bytes whenever one copy is intact, and an error — never wrong data
//! — when none is.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::path::Path;
use std::sync::Arc;
use vbdfs::crypto::{KdfParams, KeyMaterial};
use vbdfs::engine::CloneOptions;
use vbdfs::format::{
    align_up, RecordHeader, RecordKind, LOG_START, LOG_UNIT, RECORD_ALIGN, RECORD_FLAG_COPY,
    RECORD_HEADER_LEN,
};
use vbdfs::io::MemStore;
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

const BS: u64 = 4096;
/// Two map leaves (1024 blocks each).
const SIZE: u64 = 1100 * BS;

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        cache_bytes: 1 << 20,
        workers: 2,
        ..OpenOptions::default()
    }
}

fn key() -> KeyMaterial {
    KeyMaterial::from_bytes(b"copies")
        .unwrap()
        .with_kdf(KdfParams::insecure_for_tests())
}

fn block(seed: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| (i.wrapping_mul(seed | 1) >> 3) as u8 ^ seed as u8)
        .collect()
}

/// The disk's bytes after writing `blocks` (block, seed) over `base`.
fn apply(base: &mut [u8], blocks: &[(u64, u64)]) {
    for &(b, seed) in blocks {
        base[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&block(seed));
    }
}

/// An image with a snapshot `s1` and a head that differs from it in both
/// leaves, closed cleanly: its bytes, and the contents of head and `s1`.
fn image(encrypted: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let store = Arc::new(MemStore::new());
    let create = CreateOptions {
        size: SIZE,
        block_size: BS,
        codec: Codec::Zstd(1),
    };
    let img = if encrypted {
        Image::create_on_encrypted(store.clone(), &create, &opts(false), &key()).unwrap()
    } else {
        Image::create_on(store.clone(), &create, &opts(false)).unwrap()
    };
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
struct Pair {
    kind: RecordKind,
    first: u64,
    second: u64,
}

/// Every metadata record of the file with its second copy (each must have one).
fn pairs(bytes: &[u8]) -> Vec<Pair> {
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
                first: off,
                second,
            });
        }
        off = align_up(off + h.total_len(), RECORD_ALIGN);
    }
    out
}

/// Flips a byte in the payload of the record at `off`.
fn damage(bytes: &mut [u8], off: u64) {
    bytes[off as usize + RECORD_HEADER_LEN + 3] ^= 0x5a;
}

/// How an image read back.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Head and snapshot read their exact bytes.
    Right,
    /// The open failed (a typed error).
    OpenFails,
    /// The head is right; the snapshot cannot be read.
    SnapshotFails,
}

/// Opens `bytes` (read-only unless `rw`) and reads head and `s1` in full.
/// Wrong data is a panic. A read-write open is closed, and the store's
/// bytes after it returned.
fn read_back(
    bytes: Vec<u8>,
    want: (&[u8], &[u8]),
    encrypted: bool,
    rw: bool,
) -> (Outcome, Vec<u8>) {
    let store = Arc::new(MemStore::from_bytes(bytes));
    let k = key();
    let opened = Image::open_on_with_key(store.clone(), &opts(!rw), encrypted.then_some(&k));
    let img = match opened {
        Ok(img) => img,
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            return (Outcome::OpenFails, store.to_bytes());
        }
    };
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == want.0, "the head reads wrong data");
    let outcome = match img.open_snapshot("s1") {
        Ok(snap) => match snap.read_at(&mut buf, 0) {
            Ok(()) => {
                assert!(buf == want.1, "the snapshot reads wrong data");
                Outcome::Right
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
                Outcome::SnapshotFails
            }
        },
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            Outcome::SnapshotFails
        }
    };
    img.close().unwrap();
    (outcome, store.to_bytes())
}

fn every_map_record(encrypted: bool) {
    let (bytes, head, snap) = image(encrypted);
    let want = (&head[..], &snap[..]);
    let pairs = pairs(&bytes);
    let (mut head_held, mut snapshot_held) = (0, 0);
    for p in &pairs {
        let what = format!("{p:?}");
        // One copy damaged: nothing is lost, read-only or read-write.
        let mut one = bytes.clone();
        damage(&mut one, p.first);
        for rw in [false, true] {
            let (outcome, _) = read_back(one.clone(), want, encrypted, rw);
            assert_eq!(
                outcome,
                Outcome::Right,
                "{what}, first copy damaged (rw {rw})"
            );
        }
        let mut second_only = bytes.clone();
        damage(&mut second_only, p.second);
        let (outcome, _) = read_back(second_only, want, encrypted, false);
        assert_eq!(outcome, Outcome::Right, "{what}, second copy damaged");
        // Both damaged: what the record held is gone; an error, never wrong
        // data. Which error tells who held the record.
        let mut both = one.clone();
        damage(&mut both, p.second);
        let (lost, _) = read_back(both, want, encrypted, false);
        // First copy damaged, a read-write open, then the second copy
        // damaged too: what the head holds was written anew by the open.
        let (_, healed) = read_back(one, want, encrypted, true);
        let mut later = healed;
        damage(&mut later, p.second);
        let (after, _) = read_back(later, want, encrypted, false);
        match lost {
            Outcome::OpenFails => {
                head_held += 1;
                assert_eq!(after, Outcome::Right, "{what}: not written anew");
            }
            Outcome::SnapshotFails => {
                // A snapshot's records are never rewritten (docs/format.md).
                snapshot_held += 1;
                assert_eq!(after, Outcome::SnapshotFails, "{what}");
            }
            Outcome::Right => assert_eq!(after, Outcome::Right, "{what}"),
        }
    }
    eprintln!(
        "{} map records: {head_held} held by the head, {snapshot_held} by the snapshot only",
        pairs.len()
    );
    // The committed index, two leaves and the snapshot table; the
    // snapshot's index and two leaves.
    assert!(head_held >= 4, "{head_held} head records in {pairs:?}");
    assert!(
        snapshot_held >= 3,
        "{snapshot_held} snapshot records in {pairs:?}"
    );
}

#[test]
fn every_map_record_survives_one_damaged_copy() {
    every_map_record(false);
}

#[test]
fn every_map_record_of_an_encrypted_image_survives_one_damaged_copy() {
    every_map_record(true);
}

#[test]
fn a_clone_survives_a_damaged_backing_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (base, clone) = (dir.path().join("base.vbd"), dir.path().join("clone.vbd"));
    let create = CreateOptions {
        size: SIZE,
        block_size: BS,
        codec: Codec::Zstd(1),
    };
    let img = Image::create(&base, &create, &opts(false)).unwrap();
    img.write_at(&block(1), 3 * BS).unwrap();
    img.close().unwrap();
    let img =
        Image::create_clone(&clone, &base, None, &CloneOptions::default(), &opts(false)).unwrap();
    img.write_at(&block(2), 4 * BS).unwrap();
    img.close().unwrap();
    let mut want = vec![0u8; SIZE as usize];
    apply(&mut want, &[(3, 1), (4, 2)]);
    let reads_right = |path: &Path, rw: bool| -> Result<(), vbdfs::Error> {
        let img = Image::open(path, &opts(!rw))?;
        let mut buf = vec![0u8; SIZE as usize];
        img.read_at(&mut buf, 0)?;
        assert!(buf == want, "the clone reads wrong data");
        img.close()
    };
    let bytes = std::fs::read(&clone).unwrap();
    // The CONFIG record is the first record of a clone.
    let config = pairs(&bytes)
        .into_iter()
        .find(|p| p.kind == RecordKind::Config)
        .unwrap();
    assert_eq!(config.first, LOG_START);
    let mut damaged = bytes.clone();
    damage(&mut damaged, config.first);
    std::fs::write(&clone, &damaged).unwrap();
    reads_right(&clone, false).unwrap();
    // A read-write open writes it anew: then the old second copy can go too.
    reads_right(&clone, true).unwrap();
    let mut healed = std::fs::read(&clone).unwrap();
    damage(&mut healed, config.second);
    std::fs::write(&clone, &healed).unwrap();
    reads_right(&clone, false).unwrap();
    // Both copies of the reference damaged (no open in between): an error.
    damage(&mut damaged, config.second);
    std::fs::write(&clone, &damaged).unwrap();
    let e = reads_right(&clone, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

#[test]
fn a_second_copy_that_does_not_hold_the_firsts_bytes_is_refused() {
    let (bytes, head, snap) = image(false);
    let indexes: Vec<Pair> = pairs(&bytes)
        .into_iter()
        .filter(|p| p.kind == RecordKind::Index)
        .collect();
    // The snapshot's index, then the head's (committed at the close).
    let [older, newer] = indexes[..] else {
        panic!("two indexes expected: {indexes:?}");
    };
    let payload = |p: &Pair| {
        let h = RecordHeader::decode(&bytes[p.first as usize..], p.first).unwrap();
        let at = (p.first as usize) + RECORD_HEADER_LEN;
        (h, bytes[at..at + h.payload_len as usize].to_vec())
    };
    let ((newer_h, _), (_, older_payload)) = (payload(&newer), payload(&older));
    assert_eq!(newer_h.payload_len as usize, older_payload.len());
    // A well-formed copy of the head's index, at its place, flagged, with a
    // valid crc, but holding the snapshot's leaf pointers.
    let mut forged = RecordHeader::decode(&bytes[newer.second as usize..], newer.second).unwrap();
    let record = forged.encode(&older_payload);
    let mut bad = bytes.clone();
    bad[newer.second as usize..newer.second as usize + record.len()].copy_from_slice(&record);
    let (outcome, _) = read_back(bad.clone(), (&head, &snap), false, false);
    assert_eq!(outcome, Outcome::Right, "the first copy is intact");
    damage(&mut bad, newer.first);
    let (outcome, _) = read_back(bad, (&head, &snap), false, false);
    assert_eq!(outcome, Outcome::OpenFails);
}

/// Opens `bytes` and runs `check`; a read-write check is closed, and the
/// store's bytes after it returned.
fn check(bytes: Vec<u8>, rw: bool) -> (vbdfs::CheckReport, Vec<u8>) {
    let store = Arc::new(MemStore::from_bytes(bytes));
    let img = Image::open_on(store.clone(), &opts(!rw)).unwrap();
    let report = img.check().unwrap();
    img.close().unwrap();
    (report, store.to_bytes())
}

#[test]
fn check_reports_damaged_copies_and_repair_writes_the_heads_anew() {
    let (bytes, head, snap) = image(false);
    let pairs = pairs(&bytes);
    // Leaves are written in order, the snapshot's first: the last leaf is
    // the head's, the first the snapshot's only.
    let leaves: Vec<&Pair> = pairs
        .iter()
        .filter(|p| p.kind == RecordKind::Leaf)
        .collect();
    let (snapshot_leaf, head_leaf) = (leaves[0], leaves[leaves.len() - 1]);
    let mut bad = bytes.clone();
    damage(&mut bad, head_leaf.second);
    damage(&mut bad, snapshot_leaf.first);
    let (report, _) = check(bad.clone(), false);
    assert!(!report.is_ok() && report.bad.is_empty(), "{report:?}");
    assert_eq!(report.damaged_copies.len(), 2, "{report:?}");
    assert!(
        report.damaged_copies[0].starts_with("map leaf 1 at"),
        "{report:?}"
    );
    assert!(report.damaged_copies[0].ends_with("its second copy is damaged"));
    assert!(report.damaged_copies[1].starts_with("snapshot 's1': map leaf 0 at"));
    assert!(report.damaged_copies[1].ends_with("the second serves)"));
    assert!(report.repaired.is_empty() && report.single_copy_records == 0);
    // A read-write check writes the head's leaf anew; the snapshot's stays.
    let (report, repaired) = check(bad, true);
    assert_eq!(report.repaired.len(), 1, "{report:?}");
    assert!(
        report.repaired[0].starts_with("map leaf 1 at"),
        "{report:?}"
    );
    assert_eq!(report.damaged_copies.len(), 1, "{report:?}");
    assert!(report.damaged_copies[0].starts_with("snapshot 's1'"));
    let (report, after) = check(repaired, false);
    assert_eq!(report.damaged_copies.len(), 1, "{report:?}");
    assert!(report.repaired.is_empty());
    let (outcome, _) = read_back(after, (&head, &snap), false, false);
    assert_eq!(outcome, Outcome::Right);
}

/// `bytes` as an image written before copies existed: every second copy
/// zeroed (its own append, so the layout is exactly the old one).
fn without_copies(bytes: &[u8]) -> Vec<u8> {
    let mut old = bytes.to_vec();
    for p in pairs(bytes) {
        let end = (align_up(p.second + 1, LOG_UNIT) as usize).min(old.len());
        old[p.second as usize..end].fill(0);
    }
    old
}

#[test]
fn an_image_without_copies_reads_and_compact_gives_the_head_its_copies() {
    let (bytes, mut head, snap) = image(false);
    let old = without_copies(&bytes);
    let (report, _) = check(old.clone(), false);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.single_copy_records, 7, "{report:?}");
    // Writes, checkpoints and reclaim over the old records, then compaction.
    let store = Arc::new(MemStore::from_bytes(old));
    let img = Image::open_on(store.clone(), &opts(false)).unwrap();
    for (i, b) in [1, 6, 1040, 1].into_iter().enumerate() {
        img.write_at(&block(100 + i as u64), b * BS).unwrap();
        apply(&mut head, &[(b, 100 + i as u64)]);
        img.checkpoint().unwrap();
    }
    let report = img.check().unwrap();
    assert!(report.is_ok(), "{report:?}");
    // The snapshot's three records, and the first snapshot table, which the
    // close left in place.
    assert!(report.single_copy_records >= 3, "{report:?}");
    img.compact().unwrap();
    let report = img.check().unwrap();
    assert!(report.is_ok(), "{report:?}");
    // The snapshot's records are never rewritten.
    assert_eq!(report.single_copy_records, 3, "{report:?}");
    img.close().unwrap();
    let (outcome, _) = read_back(store.to_bytes(), (&head, &snap), false, false);
    assert_eq!(outcome, Outcome::Right);
}

#[test]
fn replaced_map_records_are_reclaimed_with_their_copies() {
    let store = Arc::new(MemStore::new());
    let create = CreateOptions {
        size: SIZE,
        block_size: BS,
        codec: Codec::Zstd(1),
    };
    let img = Image::create_on(store.clone(), &create, &opts(false)).unwrap();
    for round in 0..10 {
        img.write_at(&block(round), 3 * BS).unwrap();
        img.write_at(&block(round + 50), 1050 * BS).unwrap();
        img.checkpoint().unwrap();
    }
    img.close().unwrap();
    let bytes = store.to_bytes();
    let copies = (LOG_START..bytes.len() as u64)
        .step_by(LOG_UNIT as usize)
        .filter(|&off| {
            RecordHeader::decode(&bytes[off as usize..], off)
                .is_ok_and(|h| h.flags & RECORD_FLAG_COPY != 0)
        })
        .count();
    // The index and the two leaves the head holds; nothing of the ten
    // checkpoints before.
    assert_eq!(pairs(&bytes).len(), 3);
    assert_eq!(
        copies, 3,
        "second copies of replaced records left in the file"
    );
}
