//! Engine scenarios on real files: round trips, reopen, zeros, discard, bounds.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use std::sync::Arc;
use vbdfs::io::{FaultStore, MemStore, Store};
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 4 << 20,
        workers: 2,
        ..OpenOptions::default()
    }
}

fn create(size: u64, block: u64, codec: Codec) -> (tempfile::TempDir, std::path::PathBuf, Image) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vbd");
    let img = Image::create(
        &path,
        &CreateOptions {
            size,
            block_size: block,
            codec,
        },
        &opts(),
    )
    .unwrap();
    (dir, path, img)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

#[test]
fn unwritten_reads_zero_and_costs_nothing() {
    let (_d, _p, img) = create(1 << 30, 65536, Codec::Zstd(1));
    let mut buf = vec![1u8; 300_000];
    img.read_at(&mut buf, 12345).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(img.stats().allocated_bytes, 0);
}

#[test]
fn unaligned_writes_round_trip_across_reopen() {
    for codec in [Codec::None, Codec::Zstd(3)] {
        for block in [4096u64, 65536, 1 << 20] {
            let (_d, path, img) = create(64 << 20, block, codec);
            let a = pattern(200_001, 1);
            let b = pattern(777, 2);
            img.write_at(&a, 4095).unwrap();
            img.write_at(&b, 100_000).unwrap();
            img.flush().unwrap();
            img.close().unwrap();
            let img = Image::open(&path, &opts()).unwrap();
            let mut expect = vec![0u8; 300_000];
            expect[4095..4095 + a.len()].copy_from_slice(&a);
            expect[100_000..100_777].copy_from_slice(&b);
            let mut got = vec![0u8; 300_000];
            img.read_at(&mut got, 0).unwrap();
            assert!(got == expect, "{codec} block {block}");
            assert!(img.stats().clean, "closed image must reopen clean");
        }
    }
}

#[test]
fn zero_blocks_cost_no_space_and_discard_frees() {
    let (_d, _p, img) = create(64 << 20, 65536, Codec::Zstd(1));
    img.write_at(&vec![0u8; 1 << 20], 0).unwrap();
    img.flush().unwrap();
    assert_eq!(img.stats().allocated_bytes, 0);
    img.write_at(&pattern(1 << 20, 5), 0).unwrap();
    img.flush().unwrap();
    assert_eq!(img.stats().allocated_bytes, 1 << 20);
    img.discard(65536 + 100, 3 * 65536).unwrap();
    img.flush().unwrap();
    // Blocks 2 and 3 are wholly inside the range; 1 and 4 partially.
    assert_eq!(img.stats().allocated_bytes, (16 - 2) * 65536);
    let mut buf = vec![1u8; 3 * 65536];
    img.read_at(&mut buf, 65536 + 100).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut edge = [0u8; 100];
    img.read_at(&mut edge, 65536).unwrap();
    assert_eq!(&edge[..], &pattern(1 << 20, 5)[65536..65636]);
}

#[test]
fn out_of_range_and_read_only_are_refused() {
    let (_d, path, img) = create(1 << 20, 65536, Codec::Zstd(1));
    assert_eq!(
        img.write_at(&[1], 1 << 20).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    assert_eq!(
        img.read_at(&mut [0; 2], (1 << 20) - 1).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    assert_eq!(
        img.read_at(&mut [0; 1], u64::MAX).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    // A second read-write open is refused while the first holds the lock.
    assert_eq!(
        Image::open(&path, &opts()).unwrap_err().kind(),
        ErrorKind::Locked
    );
    drop(img);
    let ro = Image::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(
        ro.write_at(&[1], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

#[test]
fn bad_create_options_name_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            CreateOptions {
                size: 0,
                ..Default::default()
            },
            "size 0",
        ),
        (
            CreateOptions {
                size: 1000,
                ..Default::default()
            },
            "size 1000",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                block_size: 3000,
                ..Default::default()
            },
            "block size 3000",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                block_size: 2 << 20,
                ..Default::default()
            },
            "block size 2097152",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                codec: Codec::Zstd(99),
                ..Default::default()
            },
            "level 99",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                codec: Codec::Zstd(0),
                ..Default::default()
            },
            "level 0",
        ),
        (
            CreateOptions {
                size: 1 << 20,
                codec: Codec::Zstd(-8),
                ..Default::default()
            },
            "level -8",
        ),
    ];
    for (c, needle) in cases {
        let err = Image::create(&dir.path().join("x.vbd"), &c, &opts()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        assert!(!dir.path().join("x.vbd").exists());
    }
    let p = dir.path().join("y.vbd");
    std::fs::write(&p, b"x").unwrap();
    let err = Image::create(
        &p,
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
        &opts(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists);
}

#[test]
fn fast_zstd_levels_compress_and_survive_reopen() {
    // Half zeros, half pattern: compressible at any level.
    let mut data = pattern(65536 * 4, 3);
    for chunk in data.chunks_mut(8192) {
        chunk[..4096].fill(0);
    }
    for level in [-1, -7] {
        let (_d, path, img) = create(1 << 20, 65536, Codec::Zstd(level));
        img.write_at(&data, 0).unwrap();
        img.close().unwrap();
        let img = Image::open(&path, &opts()).unwrap();
        assert_eq!(img.codec(), Codec::Zstd(level));
        let stats = img.stats();
        assert!(
            stats.stored_bytes < data.len() as u64 * 3 / 4,
            "level {level}: {} stored for {}",
            stats.stored_bytes,
            data.len()
        );
        let mut got = vec![0u8; data.len()];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == data, "level {level}");
    }
}

/// Text-like data (words from a small vocabulary): what zstd's levels
/// compress differently.
fn words(len: usize, seed: u64) -> Vec<u8> {
    const VOCAB: [&str; 12] = [
        "disk ",
        "image ",
        "block ",
        "record ",
        "the ",
        "of ",
        "snapshot ",
        "write ",
        "cache ",
        "log\n",
        "zstd ",
        "fsync ",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(VOCAB[(x % 12) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn adaptive_compression_uses_faster_levels_when_write_back_falls_behind() {
    // A 2 MiB block cache (16 dirty blocks at most) and 32 MiB written as
    // fast as possible: writers wait on write-back, so with `adapt_floor`
    // blocks are compressed at faster levels (stored larger), and every
    // block still reads back, also after a reopen without it.
    let data = words(32 << 20, 7);
    let mut stored = Vec::new();
    for floor in [None, Some(-5)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vbd");
        let create = CreateOptions {
            size: 64 << 20,
            block_size: 65536,
            codec: Codec::Zstd(1),
        };
        let open = OpenOptions {
            adapt_floor: floor,
            ..opts()
        };
        let img = Image::create(&path, &create, &open).unwrap();
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            img.write_at(chunk, (i as u64) << 20).unwrap();
        }
        img.flush().unwrap();
        let stats = img.stats();
        assert_eq!(stats.adapt_floor, floor);
        match floor {
            None => assert_eq!(stats.faster_blocks, 0),
            Some(_) => assert!(
                stats.faster_blocks > 64,
                "{} of 512 blocks compressed faster",
                stats.faster_blocks
            ),
        }
        stored.push(stats.stored_bytes);
        img.close().unwrap();
        let img = Image::open(&path, &opts()).unwrap();
        assert_eq!(img.stats().faster_blocks, 0);
        let mut got = vec![0u8; data.len()];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == data, "floor {floor:?}: data differs after reopen");
        assert!(img.check().unwrap().is_ok());
    }
    assert!(
        stored[1] > stored[0],
        "faster levels stored {} bytes, level 1 {}",
        stored[1],
        stored[0]
    );
}

#[test]
fn adaptive_compression_is_refused_where_it_cannot_be_faster() {
    for (codec, floor, needle) in [
        (Codec::None, -3, "needs a compressed image"),
        (Codec::Zstd(-3), -2, "not faster than the image's zstd:-3"),
        (Codec::Zstd(1), 0, "expected a zstd level"),
    ] {
        let (_d, path, img) = create(1 << 20, 65536, codec);
        img.close().unwrap();
        let open = OpenOptions {
            adapt_floor: Some(floor),
            ..opts()
        };
        let err = Image::open(&path, &open).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        // Read-only opens write nothing: the option does not apply.
        let ro = OpenOptions {
            read_only: true,
            ..open
        };
        Image::open(&path, &ro).unwrap().close().unwrap();
    }
}

#[test]
fn sixteen_tib_image_works_sparse() {
    let (_d, path, img) = create(16 << 40, 65536, Codec::Zstd(1));
    let data = pattern(65536 * 3, 9);
    let far = (16u64 << 40) - data.len() as u64;
    img.write_at(&data, far).unwrap();
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    let mut got = vec![0u8; data.len()];
    img.read_at(&mut got, far).unwrap();
    assert!(got == data);
    assert!(std::fs::metadata(&path).unwrap().len() < 4 << 20);
    assert_eq!(img.next_data(0), Some(far));
    assert_eq!(img.next_hole(far), 16 << 40);
}

#[test]
fn flush_failure_latches() {
    let store = Arc::new(FaultStore::new());
    let img = Image::create_on(
        store.clone(),
        &CreateOptions {
            size: 8 << 20,
            ..Default::default()
        },
        &opts(),
    )
    .unwrap();
    img.write_at(&pattern(65536, 1), 0).unwrap();
    store.fail_at(store.events() + 1, libc::EIO);
    // The failure hits the record write or the sync; either way flush fails
    // and keeps failing.
    assert!(img.flush().is_err());
    assert_eq!(img.flush().unwrap_err().kind(), ErrorKind::Failed);
    assert_eq!(img.write_at(&[1], 0).unwrap_err().kind(), ErrorKind::Failed);
    std::mem::forget(img); // closing would fail too; the store is dropped with the test
}

/// Writes whose write-back fails (the image fails with them) keep reading
/// what was written: the cache must not let such a block go and read its
/// older record instead (seen with a full host disk: a block acknowledged
/// by write() read back as zeros, without an error).
#[test]
fn a_failed_write_back_never_reads_older_data() {
    const BS: usize = 64 << 10;
    let store = Arc::new(FaultStore::new());
    let small = OpenOptions {
        cache_bytes: 2 << 20,
        ..opts()
    };
    let create = CreateOptions {
        size: 64 << 20,
        ..Default::default()
    };
    let img = Image::create_on(store.clone(), &create, &small).unwrap();
    // Every block written once and made durable, then written again while
    // the disk fails: the second version must read back, or an error.
    for b in 0..64u64 {
        img.write_at(&pattern(BS, 1), b * BS as u64).unwrap();
    }
    img.flush().unwrap();
    store.fail_from(store.events() + 2, libc::ENOSPC);
    let mut written = Vec::new();
    for b in 0..64u64 {
        if img.write_at(&pattern(BS, 2), b * BS as u64).is_err() {
            break;
        }
        written.push(b);
    }
    assert!(img.flush().is_err(), "the injected failure was not hit");
    // How many writes the cache takes before write-back hits the failure
    // depends on scheduling (a loaded machine: 5); a few are enough.
    assert!(written.len() >= 3, "{} blocks written", written.len());
    // Reading every block, twice, passes far more through the cache than it
    // holds: a written block it let go would be read from its older record.
    for _ in 0..2 {
        for b in 0..64u64 {
            let mut got = vec![0u8; BS];
            if img.read_at(&mut got, b * BS as u64).is_ok() {
                let want = if written.contains(&b) { 2 } else { 1 };
                assert!(got == pattern(BS, want), "block {b} reads other data");
            }
        }
    }
    std::mem::forget(img); // closing fails too; the store is dropped with the test
}

#[test]
fn memstore_images_reopen() {
    let store = Arc::new(MemStore::new());
    let img = Image::create_on(
        store.clone(),
        &CreateOptions {
            size: 8 << 20,
            ..Default::default()
        },
        &opts(),
    )
    .unwrap();
    img.write_at(&pattern(100_000, 3), 5).unwrap();
    img.close().unwrap();
    let bytes = store.to_bytes();
    let img = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &opts()).unwrap();
    let mut got = vec![0u8; 100_000];
    img.read_at(&mut got, 5).unwrap();
    assert!(got == pattern(100_000, 3));
    let _ = store.len();
}

#[test]
fn reads_disk_tells_which_requests_need_a_disk_read() {
    let (_d, path, img) = create(8 << 20, 65536, Codec::Zstd(1));
    let bs = 65536u64;
    // Nothing stored yet: every request is served from memory.
    assert!(!img.reads_disk(100, 4096, false));
    assert!(!img.reads_disk(100, 4096, true));
    img.write_at(&pattern(2 * bs as usize, 3), 0).unwrap();
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    // Stored and not cached: a read, or a partial write, reads the disk;
    // a write covering whole blocks does not.
    assert!(img.reads_disk(100, 4096, false));
    assert!(img.reads_disk(100, 4096, true));
    assert!(!img.reads_disk(0, 2 * bs, true));
    assert!(
        img.reads_disk(bs - 1, bs + 1, true),
        "the last byte of block 0"
    );
    assert!(
        !img.reads_disk(2 * bs, bs + 7, true),
        "unstored blocks need no read"
    );
    // Once loaded, block 0 is served from memory; block 1 still is not.
    let mut buf = vec![0u8; 10];
    img.read_at(&mut buf, 5).unwrap();
    assert!(!img.reads_disk(0, bs, false));
    assert!(!img.reads_disk(100, 4096, true));
    assert!(img.reads_disk(bs - 1, 2, false));
    // Outside the disk: no read (the request fails without I/O).
    assert!(!img.reads_disk(8 << 20, 1, false));
}

#[test]
fn sequential_reads_load_the_blocks_ahead_and_random_reads_do_not() {
    let (_d, path, img) = create(16 << 20, 65536, Codec::Zstd(1));
    img.write_at(&pattern(16 << 20, 5), 0).unwrap();
    img.close().unwrap();
    let open = OpenOptions {
        cache_bytes: 64 << 20,
        ..opts()
    };
    let img = Image::open(&path, &open).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // Random reads: nothing is loaded beyond them.
    for off in [9u64 << 20, 3 << 20, 12 << 20] {
        img.read_at(&mut buf, off).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(img.reads_disk((3 << 20) + (64 << 10), 64 << 10, false));
    // A sequential reader: the blocks after its last read get loaded.
    for i in 0..4u64 {
        img.read_at(&mut buf, (1 << 20) + i * (64 << 10)).unwrap();
        assert_eq!(
            buf,
            pattern(16 << 20, 5)[(1 << 20) + i as usize * 65536..][..65536]
        );
    }
    let ahead = (1 << 20) + 4 * (64 << 10);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while img.reads_disk(ahead, 256 << 10, false) {
        assert!(
            std::time::Instant::now() < deadline,
            "readahead never loaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut rest = vec![0u8; 256 << 10];
    img.read_at(&mut rest, ahead).unwrap();
    assert_eq!(rest, pattern(16 << 20, 5)[ahead as usize..][..256 << 10]);
}

/// Offset of the newest DATA record of `block` in an image file.
fn data_record_of(bytes: &[u8], block: u64) -> usize {
    *common::data_records_of(bytes, block).last().unwrap()
}

#[test]
fn large_reads_of_scattered_records_read_each_block_and_fail_only_a_damaged_one() {
    // 32 blocks written in a scrambled order, each flushed on its own: every
    // block's record is an append of its own, away from its neighbours'. A
    // 2 MiB read of a fresh open then reads 32 separate spans together.
    let (_d, path, img) = create(64 << 20, 65536, Codec::None);
    let blocks: Vec<u64> = (0..32u64).map(|i| (i * 13 + 5) % 32).collect();
    for &b in &blocks {
        img.write_at(&pattern(65536, b as u8), b * 65536).unwrap();
        img.flush().unwrap();
    }
    img.close().unwrap();
    let expect: Vec<u8> = (0..32u8).flat_map(|b| pattern(65536, b)).collect();
    let img = Image::open(&path, &opts()).unwrap();
    let mut buf = vec![0u8; 32 * 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == expect, "a scattered 2 MiB read returned other bytes");
    img.close().unwrap();

    // One damaged record in the middle: the large read fails, and block by
    // block only that block does; the others read their own bytes.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = data_record_of(&bytes, 17);
    bytes[at + 64 + 100] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    let mut one = vec![0u8; 65536];
    for b in 0..32u64 {
        match img.read_at(&mut one, b * 65536) {
            Ok(()) => assert!(b != 17 && one == pattern(65536, b as u8), "block {b}"),
            Err(e) => assert!(b == 17 && e.kind() == ErrorKind::Corrupt, "block {b}: {e}"),
        }
    }
}

#[test]
fn a_recheck_keeps_real_damage_and_drops_what_a_newer_state_no_longer_holds() {
    // Blocks 0..4; snapshot s1; blocks 1 and 2 rewritten, so s1 alone holds
    // their first records. Damage: the head's (and s1's) record of block 3,
    // and s1's record of block 1.
    let (_d, path, img) = create(4 << 20, 65536, Codec::None);
    for b in 0..4u64 {
        img.write_at(&pattern(65536, b as u8), b * 65536).unwrap();
    }
    img.snapshot_create("s1").unwrap();
    for b in 1..3u64 {
        img.write_at(&pattern(65536, 10 + b as u8), b * 65536)
            .unwrap();
    }
    img.close().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let first_of_1 = common::data_records_of(&bytes, 1)[0];
    let of_3 = data_record_of(&bytes, 3);
    bytes[first_of_1 + 64 + 7] ^= 1;
    bytes[of_3 + 64 + 7] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let found = |report: &vbdfs::CheckReport| -> Vec<(u64, Option<String>)> {
        let mut v: Vec<_> = report
            .bad
            .iter()
            .map(|b| (b.block, b.snapshot.clone()))
            .collect();
        v.sort();
        v
    };
    let img = Image::open(&path, &opts()).unwrap();
    let report = img.check().unwrap();
    let want = vec![(1, Some("s1".to_string())), (3, None)];
    assert_eq!(found(&report), want);
    // Checked again (a fresh open of the same state): the same damage.
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    let again = img.recheck(&report).unwrap();
    assert_eq!(found(&again), want);
    assert_eq!(again.blocks_checked, report.blocks_checked);
    // A newer state: block 3 rewritten, s1 deleted. Nothing is bad now.
    img.write_at(&pattern(65536, 33), 3 * 65536).unwrap();
    img.snapshot_delete("s1").unwrap();
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    assert!(img.recheck(&report).unwrap().is_ok());
    assert!(img.check().unwrap().is_ok());
}

/// Sessions and checkpoints with nothing new name the index they have: the
/// file keeps its length (each used to append an index, 8 KiB or more: a
/// tiny image's file grew with every mount and every `compact`). What
/// changes the index's leaves still commits a new one: a leaf emptied by a
/// discard, a rollback (which replaces the map without dirtying a leaf).
#[test]
fn checkpoints_with_nothing_new_keep_the_file_and_changes_still_commit() {
    let (_d, path, img) = create(64 << 20, 4096, Codec::Zstd(1));
    let len = || std::fs::metadata(&path).unwrap().len();
    let read = |img: &Image, off: u64, n: usize| {
        let mut buf = vec![0u8; n];
        img.read_at(&mut buf, off).unwrap();
        buf
    };
    // 4 KiB blocks: a leaf maps 4 MiB. Leaves 0 and 1 written.
    let (a, b) = (pattern(1 << 20, 1), pattern(4 << 20, 2));
    img.write_at(&a, 0).unwrap();
    img.write_at(&b, 4 << 20).unwrap();
    img.close().unwrap();
    let before = len();
    for _ in 0..3 {
        let img = Image::open(&path, &opts()).unwrap();
        for _ in 0..3 {
            img.checkpoint().unwrap();
        }
        img.close().unwrap();
        assert_eq!(
            len(),
            before,
            "a session that changed nothing lengthened the file"
        );
    }

    // Leaf 1 emptied: it leaves the index (its records are reclaimed).
    let img = Image::open(&path, &opts()).unwrap();
    img.snapshot_create("s").unwrap();
    img.discard(4 << 20, 4 << 20).unwrap();
    img.checkpoint().unwrap();
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    assert!(read(&img, 4 << 20, 4 << 20).iter().all(|&x| x == 0));
    assert!(read(&img, 0, a.len()) == a);
    assert!(img.check().unwrap().is_ok());
    img.close().unwrap();

    // A rollback to the snapshot brings leaf 1 back, also after a reopen.
    let mut img = Image::open(&path, &opts()).unwrap();
    img.snapshot_rollback("s").unwrap();
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    assert!(read(&img, 4 << 20, 4 << 20) == b);
    assert!(read(&img, 0, a.len()) == a);
    assert!(img.check().unwrap().is_ok());
    img.close().unwrap();
}
