//! Space: dead records are returned to the host (hole punching) after
//! checkpoints and by compaction, never what a snapshot still holds.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

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
fn discard_returns_host_space() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = image(dir.path(), 256 * MIB);
    img.write_at(&data(64 * MIB as usize, 1), 0).unwrap();
    img.flush().unwrap();
    img.checkpoint().unwrap();
    let full = allocated(&path);
    img.discard(0, 64 * MIB).unwrap();
    img.flush().unwrap();
    img.checkpoint().unwrap();
    let after = allocated(&path);
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
