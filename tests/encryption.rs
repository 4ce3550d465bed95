//! Encryption (issue 7): nothing readable in the file, wrong and missing keys
//! refused with nothing written, tampering detected per block, rekey and
//! snapshots on encrypted images. (Crash safety of encrypted images:
//! `tests/crash.rs`.)
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::pattern;

use std::sync::Arc;
use vbdfs::crypto::{KdfParams, KeyMaterial};
use vbdfs::io::{FaultStore, MemStore, Store};
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

const BS: usize = 4096;

fn key(s: &str) -> KeyMaterial {
    KeyMaterial::from_bytes(s.as_bytes())
        .unwrap()
        .with_kdf(KdfParams::insecure_for_tests())
}

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 64 * 1024,
        workers: 2,
        ..OpenOptions::default()
    }
}

fn create(codec: Codec, blocks: usize, k: Option<&KeyMaterial>) -> (Arc<MemStore>, Image) {
    let store = Arc::new(MemStore::new());
    let c = CreateOptions {
        size: (BS * blocks) as u64,
        block_size: BS as u64,
        codec,
    };
    let img = match k {
        Some(k) => Image::create_on_encrypted(store.clone(), &c, &opts(), k).unwrap(),
        None => Image::create_on(store.clone(), &c, &opts()).unwrap(),
    };
    (store, img)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const PATTERN: &[u8] = b"KNOWN-PLAINTEXT-PATTERN-0123456789";

#[test]
fn plaintext_is_absent_from_the_file() {
    for codec in [Codec::None, Codec::Zstd(1)] {
        for encrypted in [false, true] {
            let k = key("pass");
            let (store, img) = create(codec, 64, encrypted.then_some(&k));
            // The pattern once per block, in otherwise random bytes: zstd
            // keeps it literally, so only encryption can hide it.
            for b in 0..16u64 {
                let mut data = pattern(BS, b);
                data[100..100 + PATTERN.len()].copy_from_slice(PATTERN);
                img.write_at(&data, b * BS as u64).unwrap();
            }
            img.snapshot_create("secret-snapshot-name").unwrap();
            img.flush().unwrap();
            img.checkpoint().unwrap();
            img.close().unwrap();
            let bytes = store.to_bytes();
            assert_eq!(
                contains(&bytes, PATTERN),
                !encrypted,
                "{codec:?} encrypted={encrypted}"
            );
            // Metadata records are zstd-compressed even in the clear, and
            // zstd may entropy-code the name: only its absence is a claim.
            if encrypted {
                assert!(!contains(&bytes, b"secret-snapshot-name"), "{codec:?}");
            }
            if encrypted {
                let img = Image::open_on_with_key(store.clone(), &opts(), Some(&k)).unwrap();
                let mut got = vec![0u8; BS];
                img.read_at(&mut got, 5 * BS as u64).unwrap();
                assert_eq!(&got[100..100 + PATTERN.len()], PATTERN);
                assert_eq!(img.snapshot_list()[0].name, "secret-snapshot-name");
            }
        }
    }
}

#[test]
fn wrong_and_missing_key_are_refused_and_nothing_is_written() {
    let k = key("right");
    let (store, img) = create(Codec::Zstd(1), 16, Some(&k));
    img.write_at(&pattern(3 * BS, 1), 0).unwrap();
    img.close().unwrap();
    let before = store.to_bytes();
    for read_only in [false, true] {
        let o = OpenOptions {
            read_only,
            ..opts()
        };
        let e = Image::open_on(store.clone(), &o).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains("encrypted"), "{e}");
        let e = Image::open_on_with_key(store.clone(), &o, Some(&key("wrong"))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains("wrong key"), "{e}");
    }
    assert!(
        store.to_bytes() == before,
        "a refused open wrote to the image"
    );
    // A key for a plain image is refused too.
    let (plain, img) = create(Codec::Zstd(1), 16, None);
    img.close().unwrap();
    assert!(Image::open_on_with_key(plain, &opts(), Some(&k)).is_err());
    // The right key opens it.
    let img = Image::open_on_with_key(store, &opts(), Some(&k)).unwrap();
    let mut got = vec![0u8; 3 * BS];
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(got, pattern(3 * BS, 1));
}

/// An encrypted uncompressed image with blocks 0..8 but 3 written and
/// flushed, then `last` written and flushed on their own: the store, the
/// key, the open image, and where that last flush's records start (where
/// the bytes first changed: an append starts a log unit; the log's
/// preallocated zeros do not count as a change).
fn image_with_a_last_flush(last: &[u64]) -> (Arc<MemStore>, KeyMaterial, Image, usize) {
    let k = key("k");
    let (store, img) = create(Codec::None, 16, Some(&k));
    for b in (0..8u64).filter(|&b| b != 3) {
        img.write_at(&pattern(BS, b), b * BS as u64).unwrap();
    }
    img.flush().unwrap();
    let before = store.to_bytes();
    for &b in last {
        img.write_at(&pattern(BS, b), b * BS as u64).unwrap();
    }
    img.flush().unwrap();
    let after = store.to_bytes();
    let start = (0..after.len())
        .find(|&i| before.get(i).copied().unwrap_or(0) != after[i])
        .unwrap();
    assert_eq!(start % 4096, 0);
    assert_eq!(&after[start..start + 4], b"VREC");
    (store, k, img, start)
}

/// An encrypted image with blocks 0..8 written, block 3 in its own flush,
/// closed; returns the store, the key and the byte range of block 3's
/// sealed raw DATA record.
fn image_with_known_record() -> (Arc<MemStore>, KeyMaterial, u64, u64) {
    let (store, k, img, start) = image_with_a_last_flush(&[3]);
    img.close().unwrap();
    let start = start as u64;
    (store, k, start, start + 64 + BS as u64 + 56)
}

fn fix_crc(bytes: &mut [u8], at: usize, len: usize) {
    bytes[at + 56..at + 60].fill(0);
    let crc = crc32c::crc32c(&bytes[at..at + len]);
    bytes[at + 56..at + 60].copy_from_slice(&crc.to_le_bytes());
}

fn read_blocks(img: &Image, n: u64) -> Vec<Result<Vec<u8>, ErrorKind>> {
    (0..n)
        .map(|b| {
            let mut got = vec![0u8; BS];
            img.read_at(&mut got, b * BS as u64)
                .map(|()| got)
                .map_err(|e| e.kind())
        })
        .collect()
}

#[test]
fn tampered_block_fails_alone_and_check_names_it() {
    // A flipped byte (crc left stale), and a flipped byte with the crc fixed
    // (a deliberate change: only the authentication tag catches it).
    for fix in [false, true] {
        let (store, k, start, end) = image_with_known_record();
        let mut bytes = store.to_bytes();
        let at = (start + 64 + 1000) as usize;
        bytes[at] ^= 0x20;
        if fix {
            fix_crc(&mut bytes, start as usize, (end - start) as usize);
        }
        let store = Arc::new(MemStore::from_bytes(bytes));
        let img = Image::open_on_with_key(store, &opts(), Some(&k)).unwrap();
        let got = read_blocks(&img, 8);
        for (b, r) in got.iter().enumerate() {
            if b == 3 {
                assert_eq!(r.as_ref().unwrap_err(), &ErrorKind::Corrupt, "fix={fix}");
            } else {
                assert_eq!(r.as_ref().unwrap(), &pattern(BS, b as u64), "block {b}");
            }
        }
        let report = img.check().unwrap();
        assert!(!report.is_ok());
        assert_eq!(
            report.bad.iter().map(|b| b.block).collect::<Vec<_>>(),
            vec![3],
            "{:?}",
            report.bad
        );
        if fix {
            assert!(
                report.bad[0].reason.contains("authentication"),
                "{:?}",
                report.bad
            );
        }
    }
}

/// A record of the log written since the last checkpoint that passes its
/// crc but fails authentication (altered, its crc fixed) refuses the open —
/// going past it silently would drop a write — with the way out: salvage
/// (`check --repair`) replays past it, notes what it dropped, and every
/// other block reads its data.
#[test]
fn an_altered_record_in_the_replayed_log_is_salvaged_by_repair() {
    let (store, k, img, start) = image_with_a_last_flush(&[3, 8]);
    // A crash now: the writes are only in the log after the checkpoint.
    let mut crashed = store.to_bytes();
    drop(img);
    let len = 64 + BS + 56;
    crashed[start + 64 + 1000] ^= 0x20;
    fix_crc(&mut crashed, start, len);
    let open = |read_only: bool, salvage_log: bool| {
        let store = Arc::new(MemStore::from_bytes(crashed.clone()));
        let o = OpenOptions {
            read_only,
            salvage_log,
            ..opts()
        };
        Image::open_on_with_key(store, &o, Some(&k))
    };
    for read_only in [true, false] {
        let e = open(read_only, false).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("fails authentication") && text.contains("vbdfs check --repair"),
            "{text}"
        );
    }
    let img = open(false, true).unwrap();
    let notes = img.recovery_notes().join("; ");
    assert!(
        notes.contains("salvage") && notes.contains("fails authentication"),
        "{notes}"
    );
    let got = read_blocks(&img, 9);
    // The altered record is whichever of blocks 3 and 8 went first; it
    // reads its older value (never written: zeros), the other its data.
    let dropped: Vec<u64> = [3u64, 8]
        .into_iter()
        .filter(|&b| got[b as usize].as_ref().unwrap() != &pattern(BS, b))
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(got[dropped[0] as usize].as_ref().unwrap(), &vec![0u8; BS]);
    for b in (0..8u64).filter(|&b| b != 3) {
        assert_eq!(
            got[b as usize].as_ref().unwrap(),
            &pattern(BS, b),
            "block {b}"
        );
    }
    assert!(img.check().unwrap().is_ok());
    img.close().unwrap();
}

#[test]
fn record_copied_over_another_is_detected() {
    let (store, k, start, end) = image_with_known_record();
    let bytes = store.to_bytes();
    let len = (end - start) as usize;
    // Block 3's record copied over the one just before it (the last of the
    // first flush: records of one size are back to back).
    let aligned = len.div_ceil(16) * 16;
    let victim = start as usize - aligned;
    for rewrite_place in [false, true] {
        let mut b = bytes.clone();
        let rec = b[start as usize..end as usize].to_vec();
        b[victim..victim + len].copy_from_slice(&rec);
        if rewrite_place {
            // The attacker also fixes self_off and the crc.
            b[victim + 32..victim + 40].copy_from_slice(&(victim as u64).to_le_bytes());
            fix_crc(&mut b, victim, len);
        }
        let img =
            Image::open_on_with_key(Arc::new(MemStore::from_bytes(b)), &opts(), Some(&k)).unwrap();
        let got = read_blocks(&img, 8);
        let bad: Vec<usize> = (0..8).filter(|&i| got[i].is_err()).collect();
        // The victim is whichever block's record was appended last in the
        // first flush (write-back workers run in parallel): exactly one fails.
        assert_eq!(bad.len(), 1, "rewrite_place={rewrite_place}: {bad:?}");
        assert_ne!(bad[0], 3);
        assert_eq!(got[3].as_ref().unwrap(), &pattern(BS, 3));
    }
}

#[test]
fn rekey_changes_the_key_not_the_data() {
    let old = key("old");
    let (store, img) = create(Codec::Zstd(1), 16, Some(&old));
    img.write_at(&pattern(5 * BS, 9), 0).unwrap();
    img.close().unwrap();
    let before = store.to_bytes();
    let new = key("new");
    assert!(vbdfs::crypto::rekey(store.as_ref(), &key("bad"), &new).is_err());
    vbdfs::crypto::rekey(store.as_ref(), &old, &new).unwrap();
    let after = store.to_bytes();
    // Only the keyslot area changed.
    assert_eq!(before[..8192], after[..8192]);
    assert_eq!(before[16384..], after[16384..]);
    assert_ne!(before[8192..16384], after[8192..16384]);
    let e = Image::open_on_with_key(store.clone(), &opts(), Some(&old)).unwrap_err();
    assert!(e.to_string().contains("wrong key"), "{e}");
    let img = Image::open_on_with_key(store, &opts(), Some(&new)).unwrap();
    let mut got = vec![0u8; 5 * BS];
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(got, pattern(5 * BS, 9));
}

#[test]
fn snapshots_on_an_encrypted_image() {
    let k = key("snap");
    let (store, img) = create(Codec::Zstd(1), 32, Some(&k));
    img.write_at(&pattern(4 * BS, 1), 0).unwrap();
    img.snapshot_create("before").unwrap();
    img.write_at(&pattern(4 * BS, 2), 0).unwrap();
    img.close().unwrap();
    let img = Image::open_on_with_key(store, &opts(), Some(&k)).unwrap();
    let snap = img.open_snapshot("before").unwrap();
    let mut got = vec![0u8; 4 * BS];
    snap.read_at(&mut got, 0).unwrap();
    assert_eq!(got, pattern(4 * BS, 1));
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(got, pattern(4 * BS, 2));
    drop(snap);
    img.snapshot_delete("before").unwrap();
    img.compact().unwrap();
    assert!(img.check().unwrap().is_ok());
}

#[test]
fn clone_of_an_encrypted_base() {
    use vbdfs::engine::CloneOptions;
    let tmp = tempfile::tempdir().unwrap();
    let (base, new) = (tmp.path().join("base.vbd"), tmp.path().join("clone.vbd"));
    let k = key("shared");
    let c = CreateOptions {
        size: (BS * 32) as u64,
        block_size: BS as u64,
        codec: Codec::Zstd(1),
    };
    let img = Image::create_encrypted(&base, &c, &opts(), &k).unwrap();
    let mut block = pattern(BS, 1);
    block[10..10 + PATTERN.len()].copy_from_slice(PATTERN);
    img.write_at(&block, 0).unwrap();
    img.snapshot_create("gold").unwrap();
    img.close().unwrap();
    // Without the key the base cannot be cloned; with it, the clone is
    // encrypted under the same key.
    let none = CloneOptions::default();
    assert!(Image::create_clone(&new, &base, Some("gold"), &none, &opts()).is_err());
    assert!(!new.exists());
    let clone =
        Image::create_clone_with_key(&new, &base, Some("gold"), &none, &opts(), Some(&k)).unwrap();
    assert!(clone.is_encrypted());
    let mut other = pattern(BS, 2);
    other[10..10 + PATTERN.len()].copy_from_slice(PATTERN);
    clone.write_at(&other, BS as u64).unwrap();
    clone.close().unwrap();
    let bytes = std::fs::read(&new).unwrap();
    assert!(!contains(&bytes, PATTERN));
    assert!(!contains(&bytes, b"base.vbd"), "backing path visible");
    let e = Image::open(&new, &opts()).unwrap_err();
    assert!(e.to_string().contains("encrypted"), "{e}");
    assert!(Image::open_with_key(&new, &opts(), Some(&key("bad"))).is_err());
    let clone = Image::open_with_key(&new, &opts(), Some(&k)).unwrap();
    let mut got = vec![0u8; 2 * BS];
    clone.read_at(&mut got, 0).unwrap();
    assert_eq!(&got[..BS], &block[..], "base block through the clone");
    assert_eq!(&got[BS..], &other[..]);
    assert!(clone.check().unwrap().is_ok());
}

#[test]
fn rekey_is_crash_safe() {
    let (old, new) = (key("old"), key("new"));
    let mut crashed = 0;
    for k in 0..8 {
        let store = Arc::new(FaultStore::new());
        let c = CreateOptions {
            size: (BS * 8) as u64,
            block_size: BS as u64,
            codec: Codec::Zstd(1),
        };
        let img = Image::create_on_encrypted(store.clone(), &c, &opts(), &old).unwrap();
        img.write_at(&pattern(2 * BS, 4), 0).unwrap();
        img.close().unwrap();
        store.sync().unwrap();
        store.crash_at(store.events() + k);
        let done = vbdfs::crypto::rekey(store.as_ref(), &old, &new).is_ok();
        let Some(image) = store.crashed() else {
            assert!(done);
            continue;
        };
        for (name, bytes) in image.variants(k, 6) {
            let s = Arc::new(MemStore::from_bytes(bytes));
            let ro = OpenOptions {
                read_only: true,
                ..opts()
            };
            let img = Image::open_on_with_key(s.clone(), &ro, Some(&new))
                .or_else(|_| Image::open_on_with_key(s, &ro, Some(&old)))
                .unwrap_or_else(|e| panic!("event {k} {name}: neither key opens: {e}"));
            let mut got = vec![0u8; 2 * BS];
            img.read_at(&mut got, 0).unwrap();
            assert_eq!(got, pattern(2 * BS, 4), "event {k} {name}");
            crashed += 1;
        }
    }
    assert!(crashed > 0);
}
