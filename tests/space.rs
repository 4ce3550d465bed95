//! Space: dead records are returned to the host (hole punching) after
//! checkpoints and by compaction, never what a snapshot still holds.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::written_bytes;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const MIB: u64 = 1 << 20;

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 8 * MIB,
        workers: 2,
        ..OpenOptions::default()
    }
}

/// Random-ish, half-compressible data for pass `pass`.
fn data(len: usize, pass: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ pass.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (0..len)
        .map(|i| {
            if i % 4096 < 2048 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                0
            }
        })
        .collect()
}

fn image(dir: &Path, size: u64) -> (std::path::PathBuf, Image) {
    let path = dir.join("s.vbd");
    let c = CreateOptions {
        size,
        codec: Codec::Zstd(1),
        ..CreateOptions::default()
    };
    let img = Image::create(&path, &c, &opts()).unwrap();
    (path, img)
}

/// An uncompressed image of `size` whose first `blocks` 64 KiB blocks hold data.
fn uncompressed_image(dir: &Path, size: u64, blocks: u64) -> (std::path::PathBuf, Image) {
    let path = dir.join("u.vbd");
    let c = CreateOptions {
        size,
        codec: Codec::None,
        ..CreateOptions::default()
    };
    let img = Image::create(&path, &c, &opts()).unwrap();
    img.write_at(&data((blocks * 65536) as usize, 0), 0)
        .unwrap();
    (path, img)
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn overwrites_do_not_grow_the_file_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = image(dir.path(), 256 * MIB);
    let len = 32 * MIB as usize;
    for pass in 0..8 {
        img.write_at(&data(len, pass), 0).unwrap();
        img.flush().unwrap();
        img.checkpoint().unwrap();
    }
    let stored = img.stats().stored_bytes;
    let host = allocated(&path);
    // Without reclaim the file would hold all 8 passes (8x the live data).
    // While open, the log also holds up to 32 MiB preallocated past its tail.
    assert!(
        host < stored * 3 / 2 + 4 * MIB + 32 * MIB,
        "host space {host} for {stored} bytes of live records"
    );
    let mut got = vec![0u8; len];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == data(len, 7));
    img.close().unwrap();
    // A clean close gives the preallocation back.
    let host = allocated(&path);
    assert!(
        host < stored * 3 / 2 + 4 * MIB,
        "host space {host} after close for {stored} bytes of live records"
    );
    let img = Image::open(&path, &opts()).unwrap();
    img.read_at(&mut got, 0).unwrap();
    assert!(got == data(len, 7), "data lost after reopen");
    assert!(img.check().unwrap().is_ok());
}

#[test]
fn random_overwrites_leave_no_partly_dead_pages_behind() {
    // Uncompressed 64 KiB records span 17 pages: a record that dies alone
    // is punched but for the pages it shares with its live neighbours; those
    // must go once the neighbours die too (each punched in a later pass).
    let dir = tempfile::tempdir().unwrap();
    let blocks = 512u64; // 32 MiB of data
    let (path, img) = uncompressed_image(dir.path(), 256 * MIB, blocks);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..24 {
        for _ in 0..200 {
            let x = xorshift(&mut x);
            let off = (x % blocks) * 65536 + (x >> 32) % 16 * 4096;
            img.write_at(&data(4096, round + 1), off).unwrap();
        }
        img.flush().unwrap();
        img.checkpoint().unwrap();
    }
    let stored = img.stats().stored_bytes;
    img.close().unwrap();
    let host = allocated(&path);
    // Live records, at most one partly used page per record (neighbours
    // share theirs), the map and the superblocks. Punching each pass's dead
    // records on their own left ~3 MiB more here (the pages between records
    // that died in different passes).
    let bound = stored + 4096 * blocks + MIB;
    assert!(
        host <= bound,
        "host space {host} for {stored} bytes of live records (bound {bound})"
    );
    let img = Image::open(&path, &opts()).unwrap();
    assert!(img.check().unwrap().is_ok());
}

#[test]
fn dead_space_held_by_the_background_reclaim_is_punched_once_writes_stop() {
    // No explicit checkpoint: the background checkpoint (after 256 MiB of
    // log) finds the dead records, the reclaim thread holds the short runs
    // while writes go on and punches them once no new dead space arrives.
    let dir = tempfile::tempdir().unwrap();
    let blocks = 256u64; // 16 MiB of data
    let (path, img) = uncompressed_image(dir.path(), 64 * MIB, blocks);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..6000u64 {
        let x = xorshift(&mut x);
        img.write_at(&data(4096, i % 7 + 1), (x % blocks) * 65536)
            .unwrap();
        if i % 500 == 499 {
            img.flush().unwrap();
        }
    }
    img.flush().unwrap(); // ~390 MiB of log written: a checkpoint ran
    let stored = img.stats().stored_bytes;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = img.stats();
        // Live records, partly used pages, the map, the log's preallocation
        // and at most what the last checkpoint (or none) has not judged yet.
        let host = allocated(&path);
        if host <= stored + 4096 * blocks + 33 * MIB + 256 * MIB && st.reclaim_pending_bytes == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host space {host} for {stored} bytes live, {} held for reclaim",
            st.reclaim_pending_bytes
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    img.close().unwrap();
    let host = allocated(&path);
    assert!(
        host <= stored + 4096 * blocks + MIB,
        "host space {host} after close for {stored} bytes live"
    );
}

#[test]
fn discard_returns_host_space() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = image(dir.path(), 256 * MIB);
    img.write_at(&data(64 * MIB as usize, 1), 0).unwrap();
    img.flush().unwrap();
    img.checkpoint().unwrap();
    let full = written_bytes(&path);
    img.discard(0, 64 * MIB).unwrap();
    img.flush().unwrap();
    img.checkpoint().unwrap();
    let after = written_bytes(&path);
    assert!(
        after < full / 8,
        "discard freed too little: {full} -> {after}"
    );
    assert_eq!(img.stats().allocated_bytes, 0);
}

#[test]
fn snapshot_data_survives_reclaim_and_compact_frees_it_after_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = image(dir.path(), 256 * MIB);
    let len = 32 * MIB as usize;
    img.write_at(&data(len, 1), 0).unwrap();
    img.snapshot_create("before").unwrap();
    for pass in 2..6 {
        img.write_at(&data(len, pass), 0).unwrap();
        img.flush().unwrap();
        img.checkpoint().unwrap();
    }
    img.compact().unwrap();
    let snap = img.open_snapshot("before").unwrap();
    let mut got = vec![0u8; len];
    snap.read_at(&mut got, 0).unwrap();
    assert!(got == data(len, 1), "snapshot data punched");
    drop(snap);
    let with_snapshot = allocated(&path);
    img.snapshot_delete("before").unwrap();
    let report = img.compact().unwrap();
    let after = allocated(&path);
    assert!(
        after + 10 * MIB < with_snapshot,
        "deleting the snapshot freed too little: {with_snapshot} -> {after} ({report:?})"
    );
    img.read_at(&mut got, 0).unwrap();
    assert!(got == data(len, 5));
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    img.read_at(&mut got, 0).unwrap();
    assert!(got == data(len, 5), "data lost after compact and reopen");
    assert!(img.check().unwrap().is_ok());
}

/// Records that died after the last checkpoint but before a snapshot was
/// taken belong to no snapshot. They used to be judged at the next
/// checkpoint, against the new snapshot, and kept for it; its deletion never
/// found them (its map does not have them): rolling snapshots under writes
/// grew the file without bound until `compact`.
#[test]
fn data_overwritten_just_before_a_snapshot_is_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = uncompressed_image(dir.path(), 256 * MIB, 0);
    let len = 16 * MIB as usize;
    img.write_at(&data(len, 1), 0).unwrap();
    img.flush().unwrap();
    img.checkpoint().unwrap();
    // Pass 1 dies here, after the checkpoint: the snapshot's flush writes
    // pass 2 back just before it takes the map.
    img.write_at(&data(len, 2), 0).unwrap();
    img.snapshot_create("s").unwrap();
    img.checkpoint().unwrap();
    img.snapshot_delete("s").unwrap();
    img.checkpoint().unwrap();
    let mut got = vec![0u8; len];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == data(len, 2));
    img.close().unwrap();
    assert!(
        allocated(&path) < 16 * MIB + 4 * MIB,
        "{} MiB allocated for 16 MiB of data",
        allocated(&path) / MIB
    );
}

#[test]
fn deleting_a_snapshot_returns_what_only_it_held_without_compact() {
    // Three snapshots over overlapping overwrites of a 32 MiB region, then
    // deleted middle, newest, oldest: after each delete and a checkpoint
    // (no compaction) the host space falls by what only that snapshot held,
    // and everything still held reads back.
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = uncompressed_image(dir.path(), 256 * MIB, 0);
    let len = 32 * MIB as usize;
    let half = len / 2;
    let mut content = data(len, 1);
    img.write_at(&content, 0).unwrap();
    img.snapshot_create("a").unwrap();
    let at_a = content.clone();
    content[..half].copy_from_slice(&data(half, 2));
    img.write_at(&content[..half], 0).unwrap();
    img.snapshot_create("b").unwrap();
    let at_b = content.clone();
    content = data(len, 3);
    img.write_at(&content, 0).unwrap();
    img.snapshot_create("c").unwrap();
    let at_c = content.clone();
    content[half..].copy_from_slice(&data(half, 4));
    img.write_at(&content[half..], half as u64).unwrap();
    img.flush().unwrap();
    img.checkpoint().unwrap();
    let mut expect: Vec<(&str, Vec<u8>)> = vec![("a", at_a), ("b", at_b), ("c", at_c)];
    for name in ["b", "c", "a"] {
        let only = img
            .snapshot_usage()
            .unwrap()
            .into_iter()
            .find(|u| u.info.name == name)
            .unwrap()
            .exclusive_bytes;
        assert!(only >= 15 * MIB, "{name} holds {only} on its own");
        // Written bytes: the delete's checkpoint may grow the log's
        // preallocated window.
        let before = written_bytes(&path);
        img.snapshot_delete(name).unwrap();
        img.checkpoint().unwrap();
        let after = written_bytes(&path);
        assert!(
            before.saturating_sub(after) + MIB >= only,
            "deleting {name} freed {} of the {only} bytes only it held",
            before.saturating_sub(after)
        );
        expect.retain(|(n, _)| *n != name);
        let mut got = vec![0u8; len];
        for (n, want) in &expect {
            img.open_snapshot(n).unwrap().read_at(&mut got, 0).unwrap();
            assert!(got == *want, "snapshot {n} damaged by deleting {name}");
        }
        img.read_at(&mut got, 0).unwrap();
        assert!(got == content, "head damaged by deleting {name}");
        assert!(img.check().unwrap().is_ok());
    }
    img.close().unwrap();
    let live = 32 * MIB + (len as u64 / 64);
    assert!(
        allocated(&path) < live + 8 * MIB,
        "{} allocated for 32 MiB of live data",
        allocated(&path)
    );
    let img = Image::open(&path, &opts()).unwrap();
    let mut got = vec![0u8; len];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == content);
    assert!(img.check().unwrap().is_ok());
}
