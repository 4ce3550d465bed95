//! Second copies of map records (docs/format.md §4, "Second copies"): one
//! damaged byte in a LEAF, INDEX, SNAP_TABLE or CONFIG record must not cost
//! the image. Every such record in the file is damaged in turn, in its first
//! copy, in both, and in its first copy and then (after a read-write open has
//! written it anew) in its second: the head and a snapshot must read their
//! exact bytes whenever one copy is intact, and an error — never wrong data
//! — when none is.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;
mod copies_common;

use copies_common::*;
use std::path::Path;
use std::sync::Arc;
use vbdfs::engine::CloneOptions;
use vbdfs::format::{
    RecordHeader, RecordKind, LOG_START, LOG_UNIT, RECORD_FLAG_COPY, RECORD_HEADER_LEN,
};
use vbdfs::io::MemStore;
use vbdfs::{Codec, CreateOptions, ErrorKind, Image};

/// How an image read back.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Head and snapshot read their exact bytes.
    Right,
    /// The open failed (a typed error).
    OpenFails,
    /// A read-only open worked, the head's blocks of a lost map leaf did not.
    HeadBlocksFail,
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
    if let Err(e) = img.read_at(&mut buf, 0) {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(!rw && !img.lost_leaves().is_empty(), "{e}");
        return (Outcome::HeadBlocksFail, store.to_bytes());
    }
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
        // Header fields too: the lsn, the epoch, the flags (a first copy
        // that says it is a second one).
        for field in [16, 24, 6] {
            let mut header = bytes.clone();
            header[p.first as usize + field] ^= 0x01;
            let (outcome, _) = read_back(header, want, encrypted, false);
            assert_eq!(
                outcome,
                Outcome::Right,
                "{what}, header byte {field} of the first"
            );
        }
        // Both damaged: what the record held is gone; an error, never wrong
        // data. Which error tells who held the record.
        let mut both = one.clone();
        damage(&mut both, p.second);
        let (lost, _) = read_back(both.clone(), want, encrypted, false);
        // First copy damaged, a read-write open, then the second copy
        // damaged too: what the head holds was written anew by the open.
        let (_, healed) = read_back(one, want, encrypted, true);
        let mut later = healed;
        damage(&mut later, p.second);
        let (after, _) = read_back(later, want, encrypted, false);
        match lost {
            // A leaf costs its blocks read-only (the test below), the image
            // read-write.
            Outcome::OpenFails | Outcome::HeadBlocksFail => {
                assert_eq!(
                    lost == Outcome::HeadBlocksFail,
                    p.kind == RecordKind::Leaf,
                    "{what}"
                );
                let (rw, _) = read_back(both.clone(), want, encrypted, true);
                assert_eq!(rw, Outcome::OpenFails, "{what}, read-write");
                head_held += 1;
                assert_eq!(after, Outcome::Right, "{what}: not written anew");
            }
            // The snapshot table costs the snapshots read-only, the image
            // read-write (their records would be reclaimed); it is the
            // head's record, written anew by a read-write open.
            Outcome::SnapshotFails if p.kind == RecordKind::SnapTable => {
                let (rw, _) = read_back(both.clone(), want, encrypted, true);
                assert_eq!(rw, Outcome::OpenFails, "{what}, read-write");
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

/// A base image file in `dir` with `block(1)` at block 3, open; and where
/// its clone goes.
fn base_file(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Image) {
    let (base, clone) = (dir.join("base.vbd"), dir.join("clone.vbd"));
    let img = Image::create(&base, &create_options(), &opts(false)).unwrap();
    img.write_at(&block(1), 3 * BS).unwrap();
    (base, clone, img)
}

#[test]
fn a_clone_survives_a_damaged_backing_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (base, clone, img) = base_file(dir.path());
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

#[test]
fn check_reports_damaged_copies_and_repair_writes_them_anew() {
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
    assert!(report.damaged_copies[0].ends_with("its second copy is damaged or missing"));
    assert!(report.damaged_copies[1].starts_with("snapshot 's1': map leaf 0 at"));
    assert!(report.damaged_copies[1].ends_with("the second serves)"));
    assert!(report.repaired.is_empty() && report.single_copy_records == 0);
    // A read-write check writes the head's leaf anew, and the snapshot's
    // leaf and index (its entry names the new index).
    let (report, repaired) = check(bad, true);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.repaired.len(), 2, "{report:?}");
    assert!(
        report.repaired[0].starts_with("map leaf 1 at"),
        "{report:?}"
    );
    assert!(report.repaired[1].starts_with("snapshot 's1': 1 map record"));
    let (report, mut after) = check(repaired, false);
    assert!(report.is_ok() && report.repaired.is_empty(), "{report:?}");
    // The old records are no longer needed: their other copies can go too.
    damage(&mut after, head_leaf.first);
    damage(&mut after, snapshot_leaf.second);
    let (outcome, _) = read_back(after, (&head, &snap), false, false);
    assert_eq!(outcome, Outcome::Right);
}

#[test]
fn a_snapshot_a_clone_is_based_on_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let (base, clone, img) = base_file(dir.path());
    img.snapshot_create("s1").unwrap();
    img.write_at(&block(2), 3 * BS).unwrap();
    img.close().unwrap();
    let img = Image::create_clone(
        &clone,
        &base,
        Some("s1"),
        &CloneOptions::default(),
        &opts(false),
    )
    .unwrap();
    img.close().unwrap();
    // The first leaf record of the base is s1's.
    let mut bytes = std::fs::read(&base).unwrap();
    let leaf = pairs(&bytes)
        .into_iter()
        .find(|p| p.kind == RecordKind::Leaf)
        .unwrap();
    damage(&mut bytes, leaf.first);
    std::fs::write(&base, &bytes).unwrap();
    let img = Image::open(&base, &opts(false)).unwrap();
    let report = img.check().unwrap();
    img.close().unwrap();
    assert!(report.repaired.is_empty(), "{report:?}");
    assert_eq!(report.damaged_copies.len(), 1, "{report:?}");
    assert!(report.damaged_copies[0].starts_with("snapshot 's1': map leaf 0"));
    // The clone still opens on the index it was made from, and reads right.
    let img = Image::open(&clone, &opts(true)).unwrap();
    let mut buf = vec![0u8; BS as usize];
    img.read_at(&mut buf, 3 * BS).unwrap();
    assert!(buf == block(1));
}

/// The bytes of the fixture images (tests/fixtures, written by vbdfs at
/// fd8b8cb, before copies existed): `base.vbd` (2 MiB of `old_pattern(1)`,
/// snapshot `s1`, then 64 KiB of `old_pattern(2)` at 1 MiB) and `clone.vbd`
/// (a clone of `base.vbd@s1` with 64 KiB of `old_pattern(3)` at 512 KiB).
fn old_images(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let unpack = |name: &str| {
        let packed = std::fs::read(fixtures.join(format!("old-{name}.zst"))).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, zstd::decode_all(&packed[..]).unwrap()).unwrap();
        path
    };
    (unpack("base.vbd"), unpack("clone.vbd"))
}

fn old_pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

/// Checks the image at `path` (read-write: a compaction first): its report.
fn check_file(path: &Path, compact: bool) -> vbdfs::CheckReport {
    let img = Image::open(path, &opts(!compact)).unwrap();
    if compact {
        img.compact().unwrap();
    }
    let report = img.check().unwrap();
    img.close().unwrap();
    report
}

#[test]
fn images_from_before_copies_read_and_compact_gives_the_head_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (base, clone) = old_images(dir.path());
    let snap = old_pattern(2 << 20, 1);
    let mut head = snap.clone();
    head[1 << 20..(1 << 20) + 65536].copy_from_slice(&old_pattern(65536, 2));
    let mut cloned = snap.clone();
    cloned[512 << 10..(512 << 10) + 65536].copy_from_slice(&old_pattern(65536, 3));
    let reads_right = |head: &[u8], cloned: &[u8]| {
        let img = Image::open(&base, &opts(true)).unwrap();
        let mut buf = vec![0u8; 2 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf == head, "the base's head reads wrong data");
        img.open_snapshot("s1")
            .unwrap()
            .read_at(&mut buf, 0)
            .unwrap();
        assert!(buf == snap, "the base's snapshot reads wrong data");
        drop(img);
        let img = Image::open(&clone, &opts(true)).unwrap();
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf == cloned, "the clone reads wrong data");
    };
    reads_right(&head, &cloned);
    // Index, leaf and snapshot table of the head; index and leaf of s1.
    let report = check_file(&base, false);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.single_copy_records, 5, "{report:?}");
    // The clone: its backing reference, index and leaf.
    assert_eq!(check_file(&clone, false).single_copy_records, 3);
    // Writes and checkpoints over the old records, then compaction: the
    // head's records get copies, the snapshot's are left as they are.
    let img = Image::open(&base, &opts(false)).unwrap();
    for (i, b) in [1u64, 20, 1].into_iter().enumerate() {
        let data = block(200 + i as u64);
        img.write_at(&data, b * BS).unwrap();
        head[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
        img.checkpoint().unwrap();
    }
    img.close().unwrap();
    let report = check_file(&base, true);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.single_copy_records, 2, "{report:?}");
    let report = check_file(&clone, true);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.single_copy_records, 0, "{report:?}");
    reads_right(&head, &cloned);
    // The clone's backing reference was written anew: one damaged copy of
    // it no longer matters.
    let bytes = std::fs::read(&clone).unwrap();
    let config = pairs(&bytes)
        .into_iter()
        .find(|p| p.kind == RecordKind::Config)
        .unwrap();
    let mut damaged = bytes;
    damage(&mut damaged, config.first);
    std::fs::write(&clone, &damaged).unwrap();
    reads_right(&head, &cloned);
    // The clone deleted and its hold released (a clone checks the index it
    // was made from), compaction gives s1's records copies too.
    std::fs::remove_file(&clone).unwrap();
    let img = Image::open(&base, &opts(false)).unwrap();
    img.snapshot_release("s1").unwrap();
    img.compact().unwrap();
    let report = img.check().unwrap();
    img.close().unwrap();
    assert!(
        report.is_ok() && report.single_copy_records == 0,
        "{report:?}"
    );
    let img = Image::open(&base, &opts(true)).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    img.open_snapshot("s1")
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    assert!(buf == snap, "the base's snapshot reads wrong data");
    drop(img);
}

#[test]
fn replacing_an_old_leaf_never_takes_the_next_one_for_its_copy() {
    // old-two-leaves.vbd (fd8b8cb): 128 MiB, block 0 = old_pattern(4), block
    // 1024 = old_pattern(5); its two leaf records have the same length and
    // lie in consecutive log units, where leaf 0's second copy would be.
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let packed = std::fs::read(fixtures.join("old-two-leaves.vbd.zst")).unwrap();
    let path = dir.path().join("two.vbd");
    std::fs::write(&path, zstd::decode_all(&packed[..]).unwrap()).unwrap();
    let img = Image::open(&path, &opts(false)).unwrap();
    let new = block(77);
    img.write_at(&new, 0).unwrap();
    // The checkpoint replaces leaf 0 and reclaims its old record.
    img.checkpoint().unwrap();
    img.close().unwrap();
    let img = Image::open(&path, &opts(true)).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 1024 * 65536).unwrap();
    assert!(buf == old_pattern(65536, 5), "block 1024 lost");
    img.read_at(&mut buf[..BS as usize], 0).unwrap();
    assert!(buf[..BS as usize] == new[..]);
    assert!(img.check().unwrap().is_ok());
}

#[test]
fn a_file_cut_after_the_first_copy_of_its_index_opens_and_is_repaired() {
    let (bytes, head, snap) = image(false);
    // The last log unit holds the second copy of the index of the close.
    let cut = bytes[..bytes.len() - LOG_UNIT as usize].to_vec();
    let (outcome, _) = read_back(cut.clone(), (&head, &snap), false, false);
    assert_eq!(outcome, Outcome::Right);
    let (report, _) = check(cut.clone(), false);
    assert_eq!(report.damaged_copies.len(), 1, "{report:?}");
    assert!(
        report.damaged_copies[0].starts_with("the map index at")
            && report.damaged_copies[0].ends_with("its second copy is damaged or missing"),
        "{report:?}"
    );
    // Any read-write open writes a new index (with its copy) at once.
    let (report, repaired) = check(cut, true);
    assert!(report.is_ok(), "{report:?}");
    let (report, _) = check(repaired.clone(), false);
    assert!(report.is_ok() && report.repaired.is_empty(), "{report:?}");
    let (outcome, _) = read_back(repaired, (&head, &snap), false, false);
    assert_eq!(outcome, Outcome::Right);
}

#[test]
fn replaced_map_records_are_reclaimed_with_their_copies() {
    let (store, img) = new_image(false);
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

#[test]
fn a_checkpoint_of_many_leaves_gives_each_its_copy() {
    // More dirty leaves than one append takes: several appends of pairs.
    const LEAVES: u64 = 150;
    let store = Arc::new(MemStore::new());
    let create = CreateOptions {
        size: LEAVES * 1024 * BS,
        block_size: BS,
        codec: Codec::Zstd(1),
    };
    let img = Image::create_on(store.clone(), &create, &opts(false)).unwrap();
    for leaf in 0..LEAVES {
        img.write_at(&block(leaf), (leaf * 1024 + leaf % 7) * BS)
            .unwrap();
    }
    img.close().unwrap();
    let bytes = store.to_bytes();
    let pairs = pairs(&bytes);
    let leaves = pairs.iter().filter(|p| p.kind == RecordKind::Leaf).count();
    assert_eq!(leaves as u64, LEAVES);
    // Every first copy damaged at once: the second copies carry the image.
    let mut bad = bytes;
    for p in &pairs {
        damage(&mut bad, p.first);
    }
    let img = Image::open_on(Arc::new(MemStore::from_bytes(bad)), &opts(true)).unwrap();
    let mut buf = vec![0u8; BS as usize];
    for leaf in 0..LEAVES {
        img.read_at(&mut buf, (leaf * 1024 + leaf % 7) * BS)
            .unwrap();
        assert!(buf == block(leaf), "leaf {leaf}");
    }
    assert_eq!(img.check().unwrap().damaged_copies.len(), pairs.len());
}

#[test]
fn one_flipped_bit_anywhere_in_a_map_record_costs_nothing() {
    for encrypted in [false, true] {
        let (bytes, head, snap) = image(encrypted);
        let mut flips = 0;
        for p in pairs(&bytes) {
            let h = RecordHeader::decode(&bytes[p.first as usize..], p.first).unwrap();
            for copy in [p.first, p.second] {
                for at in copy..copy + h.total_len() {
                    let mut bad = bytes.clone();
                    bad[at as usize] ^= 1 << (at % 8);
                    let (outcome, _) = read_back(bad, (&head, &snap), encrypted, false);
                    assert_eq!(outcome, Outcome::Right, "byte {at} (encrypted {encrypted})");
                    flips += 1;
                }
            }
        }
        assert!(flips > 1000, "{flips}");
    }
}

#[test]
fn a_leaf_record_snapshots_share_is_written_anew_once() {
    let (store, img) = new_image(false);
    img.write_at(&block(1), 1030 * BS).unwrap();
    img.write_at(&block(2), 0).unwrap();
    img.snapshot_create("s1").unwrap();
    // Leaf 0 changes between the snapshots, leaf 1 does not: s1, s2 and
    // the head share one record of leaf 1.
    img.write_at(&block(3), 0).unwrap();
    img.snapshot_create("s2").unwrap();
    img.write_at(&block(4), 0).unwrap();
    img.close().unwrap();
    let bytes = store.to_bytes();
    let leaf1 = |bytes: &[u8]| -> Vec<Pair> {
        pairs(bytes)
            .into_iter()
            .filter(|p| {
                p.kind == RecordKind::Leaf
                    && RecordHeader::decode(&bytes[p.first as usize..], p.first)
                        .unwrap()
                        .key
                        == 1
            })
            .collect()
    };
    let before = leaf1(&bytes);
    assert_eq!(before.len(), 1, "{before:?}");
    let mut bad = bytes.clone();
    damage(&mut bad, before[0].first);
    let (report, repaired) = check(bad, true);
    assert!(report.is_ok(), "{report:?}");
    let names: Vec<&str> = report.repaired.iter().map(|r| &r[..13]).collect();
    // (The head's leaf was written anew by the read-write open itself.)
    assert_eq!(names, ["snapshot 's1'", "snapshot 's2'"], "{report:?}");
    // The old record (left to compaction), the head's, and one record the
    // two snapshots share.
    let after = leaf1(&repaired);
    assert_eq!(after.len(), 3, "{after:?}");
    let mut gone = repaired;
    damage(&mut gone, before[0].second);
    let img = Image::open_on(Arc::new(MemStore::from_bytes(gone)), &opts(true)).unwrap();
    let mut buf = vec![0u8; BS as usize];
    for name in ["s1", "s2"] {
        img.open_snapshot(name)
            .unwrap()
            .read_at(&mut buf, 1030 * BS)
            .unwrap();
        assert!(buf == block(1), "{name}");
    }
}

#[test]
fn a_rollback_does_not_leave_the_head_on_a_damaged_copy() {
    let (bytes, _, snap) = image(false);
    // Leaves are written in order, the snapshot's first.
    let leaf = pairs(&bytes)
        .into_iter()
        .find(|p| p.kind == RecordKind::Leaf)
        .unwrap();
    let mut bad = bytes;
    damage(&mut bad, leaf.first);
    let store = Arc::new(MemStore::from_bytes(bad));
    let mut img = Image::open_on(store.clone(), &opts(false)).unwrap();
    img.snapshot_rollback("s1").unwrap();
    img.close().unwrap();
    let mut after = store.to_bytes();
    damage(&mut after, leaf.second);
    // The head (now s1's content) has its own records; s1 lost its leaf.
    let img = Image::open_on(Arc::new(MemStore::from_bytes(after)), &opts(true)).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == snap, "the head reads wrong data");
    let s1 = img.open_snapshot("s1").unwrap();
    let lost = s1.lost_leaves();
    assert!(
        lost.len() == 1 && lost[0].contains("its second copy at"),
        "{lost:?}"
    );
    let e = s1.read_at(&mut buf[..BS as usize], 0).unwrap_err();
    assert!(e.to_string().contains("map leaf 0"), "{e}");
}

/// The committed index with a damaged second copy, on an image nothing is
/// written to: a read-write open writes it anew (a checkpoint that changes
/// no leaf names the index it has, which would keep the damage).
#[test]
fn an_idle_open_writes_anew_an_index_whose_second_copy_is_damaged() {
    let (bytes, head, snap) = image(false);
    let want = (&head[..], &snap[..]);
    let head_index_damaged = |bytes: &[u8]| {
        let store = Arc::new(MemStore::from_bytes(bytes.to_vec()));
        let img = Image::open_on(store, &opts(true)).unwrap();
        let report = img.check().unwrap();
        report
            .damaged_copies
            .iter()
            .any(|d| d.starts_with("the map index"))
    };
    let mut found = 0;
    for p in pairs(&bytes).iter().filter(|p| p.kind == RecordKind::Index) {
        let mut damaged = bytes.clone();
        damage(&mut damaged, p.second);
        if !head_index_damaged(&damaged) {
            continue; // the snapshot's index, or a dead one
        }
        found += 1;
        let (outcome, healed) = read_back(damaged, want, false, true);
        assert_eq!(outcome, Outcome::Right);
        assert!(
            !head_index_damaged(&healed),
            "the damaged copy is still named"
        );
    }
    assert_eq!(found, 1, "the committed index not found");
}
