//! Resizing the disk (`Image::resize`, offline): it behaves as `truncate` on
//! a raw file — data below the new end kept, zeros past the old end, also
//! where data was before a shrink and in a clone over its base — snapshots
//! keep their own size (a rollback takes it back), deleted snapshots of
//! other sizes give their space back, and a crash at any write of a resize
//! leaves the old size with the old data or the new size with the new.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::pattern;

use std::sync::Arc;
use vbdfs::engine::CloneOptions;
use vbdfs::io::{FaultStore, MemStore, Store};
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

const BS: usize = 4096;

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 256 * 1024,
        workers: 2,
        ..OpenOptions::default()
    }
}

fn create_opts(size: usize) -> CreateOptions {
    CreateOptions {
        size: size as u64,
        block_size: BS as u64,
        codec: Codec::Zstd(1),
    }
}

/// A raw file's bytes under the same operations: the model.
struct Raw(Vec<u8>);

impl Raw {
    fn write(&mut self, off: usize, data: &[u8]) {
        self.0[off..off + data.len()].copy_from_slice(data);
    }
    fn truncate(&mut self, size: usize) {
        self.0.resize(size, 0);
    }
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut got = vec![0u8; img.len() as usize];
    img.read_at(&mut got, 0).unwrap();
    got
}

fn assert_same(img: &Image, raw: &Raw, what: &str) {
    assert_eq!(img.len(), raw.0.len() as u64, "{what}: size");
    let got = read_all(img);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != raw.0[i]) {
        panic!(
            "{what}: byte {i} reads {:#x}, a raw file has {:#x}",
            got[i], raw.0[i]
        );
    }
}

/// Sizes off block boundaries on purpose: the last block is partly past the
/// end, and what lies past it must never come into view.
#[test]
fn grow_and_shrink_behave_as_truncate_on_a_raw_file() {
    let store = Arc::new(MemStore::new());
    let size = 40 * BS + 1536;
    let mut img = Image::create_on(store.clone(), &create_opts(size), &opts()).unwrap();
    let mut raw = Raw(vec![0; size]);
    let data = pattern(size, 1);
    img.write_at(&data, 0).unwrap();
    raw.write(0, &data);
    let steps: [usize; 6] = [
        100 * BS + 512, // grow, the old partial block zeroed past the old end
        10 * BS + 2560, // shrink into a block with data
        64 * BS,        // grow again: zeros where data was
        64 * BS,        // same size: nothing to do
        3 * BS + 512,   // shrink to a few blocks
        2048 * BS,      // grow across a map leaf boundary (1024 blocks)
    ];
    for (i, new) in steps.into_iter().enumerate() {
        img.resize(new as u64).unwrap();
        raw.truncate(new);
        assert_same(&img, &raw, &format!("step {i}, open"));
        // Write across the end, as a guest grows its file system.
        let tail = pattern(2 * BS, 10 + i as u64);
        let at = new - 2 * BS;
        img.write_at(&tail, at as u64).unwrap();
        raw.write(at, &tail);
        img.close().unwrap();
        img = Image::open_on(store.clone(), &opts()).unwrap();
        assert_same(&img, &raw, &format!("step {i}, reopened"));
        assert!(img.check().unwrap().is_ok(), "step {i}: check");
    }
    // Writes past the end are refused as before.
    let e = img.write_at(&[1], raw.0.len() as u64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    img.compact().unwrap();
    assert_same(&img, &raw, "compacted");
}

#[test]
fn bad_sizes_and_read_only_images_are_refused() {
    let store = Arc::new(MemStore::new());
    let mut img = Image::create_on(store.clone(), &create_opts(16 * BS), &opts()).unwrap();
    for bad in [0, 1000, (64u64 << 40) + 512] {
        let e = img.resize(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{bad}: {e}");
        assert!(e.to_string().contains("multiple of 512"), "{e}");
    }
    assert_eq!(img.len(), 16 * BS as u64);
    img.close().unwrap();
    let ro = OpenOptions {
        read_only: true,
        ..opts()
    };
    let mut img = Image::open_on(store, &ro).unwrap();
    assert_eq!(
        img.resize(32 * BS as u64).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

/// Snapshots keep the size they were taken at; a rollback takes the head
/// back to it; deleting snapshots of other sizes than the head gives their
/// records back; `check` and `compact` read every map at its own size.
#[test]
fn snapshots_keep_their_size_and_a_rollback_takes_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("img.vbd");
    let small = 64 * BS;
    let mut img = Image::create(&path, &create_opts(small), &opts()).unwrap();
    let first = pattern(small, 1);
    img.write_at(&first, 0).unwrap();
    img.snapshot_create("small").unwrap();
    let big = 3000 * BS; // three map leaves
    img.resize(big as u64).unwrap();
    let grown = pattern(big - small, 2);
    img.write_at(&grown, small as u64).unwrap();
    img.snapshot_create("big").unwrap();
    img.resize((8 * BS) as u64).unwrap();
    img.write_at(&pattern(8 * BS, 3), 0).unwrap();
    assert!(img.check().unwrap().is_ok());

    let s = img.open_snapshot("small").unwrap();
    assert_eq!(s.len(), small as u64);
    let mut got = vec![0u8; small];
    s.read_at(&mut got, 0).unwrap();
    assert_eq!(got, first, "snapshot 'small'");
    drop(s);
    let b = img.open_snapshot("big").unwrap();
    assert_eq!(b.len(), big as u64);
    let mut got = vec![0u8; big];
    b.read_at(&mut got, 0).unwrap();
    assert!(
        got[..small] == first[..] && got[small..] == grown[..],
        "snapshot 'big'"
    );
    drop(b);
    let listed: Vec<u64> = img.snapshot_list().iter().map(|s| s.virtual_size).collect();
    assert_eq!(listed, [small as u64, big as u64]);

    img.snapshot_rollback("big").unwrap();
    assert_eq!(img.len(), big as u64);
    assert!(read_all(&img)[small..] == grown[..], "rolled back to 'big'");
    img.close().unwrap();
    let mut img = Image::open(&path, &opts()).unwrap();
    assert_eq!(
        img.len(),
        big as u64,
        "rollback's size kept across a reopen"
    );
    img.snapshot_rollback("small").unwrap();
    assert_eq!(read_all(&img), first, "rolled back to 'small'");
    img.compact().unwrap();
    assert!(img.check().unwrap().is_ok());

    // Only 'big' held the grown region's records: deleting it (and the
    // other) gives their space back, judged at their own sizes.
    let before = img.stats().file_allocated_bytes;
    img.snapshot_delete("big").unwrap();
    img.snapshot_delete("small").unwrap();
    // Not `compact` (which finds everything anyway): the deletions' own
    // reclaim, which the close finishes.
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    let after = img.stats().file_allocated_bytes;
    assert!(
        after + (big - small) as u64 / 2 < before,
        "deleted snapshots' records not given back: {before} -> {after} bytes"
    );
    assert_eq!(read_all(&img), first);
    assert!(img.check().unwrap().is_ok());
}

/// A clone reads its base where it has no block of its own: past its old
/// end too, unless the grow hides the base there.
#[test]
fn a_grown_clone_reads_zeros_not_its_base_past_its_old_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, new) = (tmp.path().join("base.vbd"), tmp.path().join("clone.vbd"));
    let size = 64 * BS;
    let img = Image::create(&base, &create_opts(size), &opts()).unwrap();
    let gold = pattern(size, 7);
    img.write_at(&gold, 0).unwrap();
    img.snapshot_create("gold").unwrap();
    img.close().unwrap();
    // The clone starts smaller than its base, off a block boundary.
    let small = 20 * BS + 512;
    let options = CloneOptions {
        size: Some(small as u64),
        ..CloneOptions::default()
    };
    let mut clone = Image::create_clone(&new, &base, Some("gold"), &options, &opts()).unwrap();
    let mut raw = Raw(gold[..small].to_vec());
    assert_same(&clone, &raw, "new clone");
    for (i, to) in [48 * BS, 10 * BS + 1024, size + 8 * BS]
        .into_iter()
        .enumerate()
    {
        clone.resize(to as u64).unwrap();
        raw.truncate(to);
        assert_same(&clone, &raw, &format!("clone step {i}"));
        clone.close().unwrap();
        clone = Image::open(&new, &opts()).unwrap();
        assert_same(&clone, &raw, &format!("clone step {i}, reopened"));
        assert!(clone.check().unwrap().is_ok());
    }
}

fn crash_store(size: usize, data: &[u8], snapshot: bool) -> Arc<FaultStore> {
    let store = Arc::new(FaultStore::new());
    let img = Image::create_on(store.clone(), &create_opts(size), &opts()).unwrap();
    img.write_at(data, 0).unwrap();
    if snapshot {
        img.snapshot_create("before").unwrap();
    }
    img.close().unwrap();
    store.sync().unwrap();
    store
}

/// A crash at every write of a resize (grow past a partial block, shrink
/// into one, with and without a snapshot holding the dropped blocks): each
/// crash image opens without repair, passes `check` and is either the old
/// disk or the new one, byte for byte.
#[test]
fn a_crash_at_every_write_of_a_resize_leaves_the_old_disk_or_the_new() {
    let old = 40 * BS + 1536;
    let data = pattern(old, 5);
    let mut checked = 0;
    for (new, snapshot) in [
        (1100 * BS + 512, false),
        (9 * BS + 2560, false),
        (9 * BS + 2560, true),
    ] {
        let mut expect_new = data.clone();
        expect_new.resize(new, 0);
        let full = crash_store(old, &data, snapshot);
        let base = full.events();
        {
            let mut img = Image::open_on(full.clone(), &opts()).unwrap();
            img.resize(new as u64).unwrap();
            img.close().unwrap();
        }
        let total = full.events() - base;
        assert!(total > 3, "resize to {new}: only {total} events");
        for k in 0..total + 1 {
            let store = crash_store(old, &data, snapshot);
            store.crash_at(store.events() + k);
            if let Ok(mut img) = Image::open_on(store.clone(), &opts()) {
                let _ = img.resize(new as u64);
                let _ = img.close();
            }
            let Some(image) = store.crashed() else {
                continue;
            };
            for (name, bytes) in image.variants(k, 4) {
                let what = format!("resize to {new}, event {k}, variant {name}");
                let mut img = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &opts())
                    .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
                let got = read_all(&img);
                let expect = if img.len() == new as u64 {
                    &expect_new
                } else {
                    assert_eq!(img.len(), old as u64, "{what}: size");
                    &data
                };
                assert!(got == *expect, "{what}: data of size {}", img.len());
                let report = img.check().unwrap();
                assert!(report.is_ok(), "{what}: check found {:?}", report.bad);
                if snapshot {
                    let s = img.open_snapshot("before").unwrap();
                    let mut got = vec![0u8; old];
                    s.read_at(&mut got, 0).unwrap();
                    assert!(got == data, "{what}: snapshot");
                }
                // Shrunk, perhaps cut before the dropped bytes of its last
                // block were zeroed: grown back, it reads zeros there.
                if img.len() < old as u64 {
                    img.resize(old as u64).unwrap();
                    let mut expect = expect_new.clone();
                    expect.resize(old, 0);
                    assert!(read_all(&img) == expect, "{what}: grown back");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} crash images checked");
}
