//! Snapshots at the engine level: create, list, delete, rollback, readers
//! while the head changes, persistence, holds, names, space accounting, check,
//! many snapshots, and creation time under a writer.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vbdfs::io::MemStore;
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

const BS: u64 = 4096;

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 1 << 20,
        workers: 2,
        ..OpenOptions::default()
    }
}

fn create_mem(size: u64, codec: Codec) -> (Arc<MemStore>, Image) {
    let store = Arc::new(MemStore::new());
    let c = CreateOptions {
        size,
        block_size: BS,
        codec,
    };
    let img = Image::create_on(store.clone(), &c, &opts()).unwrap();
    (store, img)
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    img.read_at(&mut buf, off).unwrap();
    buf
}

fn read_snap(r: &vbdfs::engine::SnapshotReader, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    r.read_at(&mut buf, off).unwrap();
    buf
}

#[test]
fn create_list_read_delete() {
    let (_store, img) = create_mem(1 << 20, Codec::Zstd(1));
    img.write_at(&[0xAA; 10_000], 5000).unwrap();
    let info = img.snapshot_create("s1").unwrap();
    assert_eq!(info.name, "s1");
    assert_eq!(info.virtual_size, 1 << 20);
    img.write_at(&[0xBB; 3000], 6000).unwrap();
    img.discard(0, 1 << 20).unwrap_or(());
    img.write_at(&[0xCC; 100], 0).unwrap();

    let snap = img.open_snapshot("s1").unwrap();
    assert_eq!(snap.len(), 1 << 20);
    let got = read_snap(&snap, 0, 20_000);
    assert!(got[..5000].iter().all(|&b| b == 0));
    assert!(got[5000..15_000].iter().all(|&b| b == 0xAA));
    assert!(got[15_000..].iter().all(|&b| b == 0));
    assert_eq!(read(&img, 0, 100), vec![0xCC; 100]);
    assert_eq!(snap.next_data(0), Some(4096));
    assert_eq!(snap.next_hole(4096), 16_384);
    assert_eq!(snap.next_data(16_384), None);

    let list = img.snapshot_list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].allocated_bytes, 3 * BS);
    assert_eq!(
        img.snapshot_create("s1").unwrap_err().kind(),
        ErrorKind::Exists
    );
    // Open readers pin the snapshot.
    let e = img.snapshot_delete("s1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert_eq!(e.errno(), libc::EBUSY);
    drop(snap);
    img.snapshot_delete("s1").unwrap();
    assert!(img.snapshot_list().is_empty());
    let e = img.snapshot_delete("s1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.errno(), libc::ENOENT);
    assert_eq!(
        img.open_snapshot("s1").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // Ids are never reused.
    assert!(img.snapshot_create("s1").unwrap().id > info.id);
}

#[test]
fn bad_names_are_invalid() {
    let (_store, img) = create_mem(1 << 20, Codec::None);
    for bad in [
        "",
        ".",
        "..",
        ".x",
        "-x",
        "a/b",
        "a b",
        "a@b",
        &"x".repeat(65),
    ] {
        let e = img.snapshot_create(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{bad:?}: {e}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    img.snapshot_create(&"x".repeat(64)).unwrap();
    img.snapshot_create("v1.2_rc-3").unwrap();
}

#[test]
fn snapshots_persist_across_reopen_and_roll_back() {
    let (store, img) = create_mem(1 << 20, Codec::Zstd(1));
    img.write_at(&[1; 8192], 0).unwrap();
    img.snapshot_create("one").unwrap();
    img.write_at(&[2; 4096], 4096).unwrap();
    img.snapshot_create("two").unwrap();
    img.write_at(&[3; 4096], 0).unwrap();
    img.write_at(&[3; 4096], 65536).unwrap();
    img.close().unwrap();

    let mut img = Image::open_on(store.clone(), &opts()).unwrap();
    let names: Vec<String> = img.snapshot_list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["one", "two"]);
    let one = img.open_snapshot("one").unwrap();
    assert_eq!(read_snap(&one, 0, 8192), vec![1; 8192]);
    let two = img.open_snapshot("two").unwrap();
    let mut want = vec![1; 4096];
    want.extend_from_slice(&[2; 4096]);
    assert_eq!(read_snap(&two, 0, 8192), want);
    drop((one, two));

    img.snapshot_rollback("two").unwrap();
    assert_eq!(read(&img, 0, 8192), want);
    assert_eq!(read(&img, 65536, 4096), vec![0; 4096]);
    img.write_at(&[9; 10], 100).unwrap();
    img.close().unwrap();
    let img = Image::open_on(store, &opts()).unwrap();
    assert_eq!(read(&img, 100, 10), vec![9; 10]);
    assert_eq!(read(&img, 4096, 4096), vec![2; 4096]);
    assert_eq!(read(&img, 65536, 4096), vec![0; 4096]);
    assert_eq!(img.snapshot_list().len(), 2);
    assert!(img.check().unwrap().is_ok());
}

#[test]
fn holds_refuse_delete_until_released_or_forced() {
    let (_store, img) = create_mem(1 << 20, Codec::None);
    img.snapshot_create("gold").unwrap();
    assert_eq!(img.snapshot_hold("gold").unwrap().holds, 1);
    assert_eq!(img.snapshot_hold("gold").unwrap().holds, 2);
    let e = img.snapshot_delete("gold").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("held by 2 clone(s)"), "{e}");
    img.snapshot_release("gold").unwrap();
    assert_eq!(img.snapshot("gold").unwrap().holds, 1);
    img.snapshot_delete_forced("gold").unwrap();
    assert!(img.snapshot_list().is_empty());
    assert_eq!(
        img.snapshot_hold("nope").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn read_only_images_refuse_snapshot_changes() {
    let (store, img) = create_mem(1 << 20, Codec::None);
    img.snapshot_create("a").unwrap();
    img.close().unwrap();
    let ro = OpenOptions {
        read_only: true,
        ..opts()
    };
    let img = Image::open_on(store, &ro).unwrap();
    assert_eq!(
        img.snapshot_create("b").unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        img.snapshot_delete("a").unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert!(img.open_snapshot("a").is_ok());
}

#[test]
fn exclusive_space_counts_records_only_one_snapshot_holds() {
    let (_store, img) = create_mem(8 << 20, Codec::None);
    let rec = 64 + BS; // a stored (uncompressed) DATA record
    img.write_at(&vec![1; 4 * BS as usize], 0).unwrap();
    img.snapshot_create("s1").unwrap();
    img.write_at(&vec![2; 2 * BS as usize], 0).unwrap();
    img.snapshot_create("s2").unwrap();
    img.write_at(&vec![3; 2 * BS as usize], 0).unwrap();
    img.write_at(&vec![4; BS as usize], 1500 * BS).unwrap(); // another leaf
    img.snapshot_create("s3").unwrap();
    let usage = img.snapshot_usage().unwrap();
    let got: Vec<(String, u64)> = usage
        .into_iter()
        .map(|u| (u.info.name, u.exclusive_bytes))
        .collect();
    assert_eq!(
        got,
        [
            ("s1".to_string(), 2 * rec),
            ("s2".to_string(), 2 * rec),
            ("s3".to_string(), 0)
        ]
    );
}

#[test]
fn check_verifies_records_only_snapshots_hold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.vbd");
    let c = CreateOptions {
        size: 1 << 20,
        block_size: BS,
        codec: Codec::None,
    };
    let img = Image::create(&path, &c, &opts()).unwrap();
    img.write_at(&[0x5A; 4096], 0).unwrap();
    img.snapshot_create("old").unwrap();
    img.write_at(&[0x6B; 4096], 0).unwrap();
    img.close().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w.iter().all(|&b| b == 0x5A))
        .unwrap();
    bytes[at] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    let report = img.check().unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.snapshots_checked, 1);
    assert!(
        report.bad[0].reason.contains("snapshot 'old'"),
        "{report:?}"
    );
    let snap = img.open_snapshot("old").unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        snap.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

/// A writer stamps block `k % n` with `k`; a snapshot must hold every write
/// completed before the call, and none started after it returned.
#[test]
fn snapshot_under_a_writer_holds_exactly_the_completed_writes() {
    let n: u64 = 64;
    let (_store, img) = create_mem(n * BS, Codec::Zstd(1));
    let img = Arc::new(img);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (img, done, stop) = (img.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let buf = vec![k as u8; BS as usize];
                let mut stamped = buf;
                stamped[..8].copy_from_slice(&k.to_le_bytes());
                img.write_at(&stamped, (k % n) * BS).unwrap();
                done.store(k, Ordering::Release);
                k += 1;
            }
        })
    };
    for round in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
        let before = done.load(Ordering::Acquire);
        let name = format!("r{round}");
        img.snapshot_create(&name).unwrap();
        let after = done.load(Ordering::Acquire) + 1;
        let snap = img.open_snapshot(&name).unwrap();
        for b in 0..n {
            let got = read_snap(&snap, b * BS, BS as usize);
            let k = u64::from_le_bytes(got[..8].try_into().unwrap());
            // The last write to b completed before the call.
            let last_before = (0..=before).rev().find(|k| k % n == b && *k > 0);
            if let Some(min) = last_before {
                assert!(k >= min, "round {round} block {b}: {k} older than {min}");
            }
            assert!(
                k <= after,
                "round {round} block {b}: {k} is newer than {after}"
            );
            if k > 0 {
                assert_eq!(k % n, b);
                assert!(got[8..].iter().all(|&x| x == k as u8), "torn block {b}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[test]
fn hundreds_of_snapshots_keep_the_head_fast() {
    let (_store, img) = create_mem(64 << 20, Codec::None);
    let data = vec![7u8; 256 << 10];
    let pass = |img: &Image| {
        let t = Instant::now();
        for i in 0..32u64 {
            img.write_at(&data, i * (256 << 10)).unwrap();
        }
        img.flush().unwrap();
        let mut buf = vec![0u8; 256 << 10];
        for i in 0..32u64 {
            img.read_at(&mut buf, i * (256 << 10)).unwrap();
        }
        t.elapsed()
    };
    let before = (0..3).map(|_| pass(&img)).min().unwrap();
    for i in 0..300u64 {
        img.write_at(&[i as u8; 512], (i % 100) * 65536).unwrap();
        img.snapshot_create(&format!("snap-{i:03}")).unwrap();
    }
    let after = (0..3).map(|_| pass(&img)).min().unwrap();
    eprintln!("head pass: {before:?} with no snapshots, {after:?} with 300");
    assert!(after < before * 3 + Duration::from_millis(50));
    assert_eq!(img.snapshot_list().len(), 300);
    let s = img.open_snapshot("snap-150").unwrap();
    let mut want = vec![0u8; 512];
    want.copy_from_slice(&[150u8; 512]);
    assert_eq!(read_snap(&s, 50 * 65536, 512), want);
}

/// Creation time with a writer running, on a real file with 256 MiB written.
#[test]
fn snapshot_time_under_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size: 4 << 30,
        ..CreateOptions::default()
    };
    let o = OpenOptions {
        cache_bytes: 64 << 20,
        ..OpenOptions::default()
    };
    let img = Arc::new(Image::create(&dir.path().join("t.vbd"), &c, &o).unwrap());
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..256u64 {
        img.write_at(&chunk, i << 20).unwrap();
    }
    img.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (img, stop, chunk) = (img.clone(), stop.clone(), chunk.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                img.write_at(&chunk[..256 << 10], (i % 4096) << 18).unwrap();
                i += 1;
            }
        })
    };
    let mut worst = Duration::ZERO;
    for n in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        img.snapshot_create(&format!("t{n}")).unwrap();
        let total = t.elapsed();
        let timing = img.last_snapshot_timing().unwrap();
        eprintln!(
            "snapshot t{n}: total {total:?} (flush {:?}, commit {:?})",
            timing.flush, timing.commit
        );
        worst = worst.max(total);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "slowest snapshot took {worst:?}"
    );
}

/// Regression: multi-block snapshot reads batch back-to-back records; blocks
/// written in reverse order (records out of block order) must still read right.
#[test]
fn multi_block_snapshot_reads_with_records_in_any_order() {
    let (_store, img) = create_mem(1 << 20, Codec::None);
    for b in (0..64u64).rev() {
        img.write_at(&[b as u8 + 1; BS as usize], b * BS).unwrap();
        if b % 3 == 0 {
            img.flush().unwrap();
        }
    }
    img.snapshot_create("rev").unwrap();
    let snap = img.open_snapshot("rev").unwrap();
    let got = read_snap(&snap, 100, 64 * BS as usize - 200);
    for (i, &byte) in got.iter().enumerate() {
        let b = (i as u64 + 100) / BS;
        assert_eq!(byte, b as u8 + 1, "byte {i}");
    }
}

/// Creation time does not follow the amount of data: 4096 touched map leaves
/// (a block in every 64 MiB of a 256 GiB disk) against one.
#[test]
fn snapshot_time_with_a_large_map() {
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size: 256 << 30,
        ..CreateOptions::default()
    };
    let o = OpenOptions {
        cache_bytes: 64 << 20,
        ..OpenOptions::default()
    };
    let img = Image::create(&dir.path().join("big.vbd"), &c, &o).unwrap();
    let time = |img: &Image, name: &str| {
        img.write_at(&[1; 4096], 0).unwrap();
        let t = Instant::now();
        img.snapshot_create(name).unwrap();
        (t.elapsed(), img.last_snapshot_timing().unwrap().commit)
    };
    let small = time(&img, "small");
    for leaf in 0..4096u64 {
        img.write_at(&[leaf as u8; 65536], leaf << 26).unwrap();
    }
    img.flush().unwrap();
    img.checkpoint().unwrap();
    let large = time(&img, "large");
    eprintln!(
        "snapshot with 1 leaf: {:?} (commit {:?}); with 4096 leaves: {:?} (commit {:?})",
        small.0, small.1, large.0, large.1
    );
    assert!(large.0 < Duration::from_secs(1), "{large:?}");
    let snap = img.open_snapshot("large").unwrap();
    let mut buf = vec![0u8; 16];
    snap.read_at(&mut buf, 4095 << 26).unwrap();
    assert_eq!(buf, vec![255u8; 16]);
}
