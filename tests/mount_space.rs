//! Space through the real mount: zeros cost nothing, and punch hole, zero
//! range and blkdiscard through a loop device give host space back.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::{create, fuse_available, p, pattern, sh, written_bytes, Loop, Mount};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn host_space(img: &Path) -> u64 {
    std::fs::metadata(img).unwrap().blocks() * 512
}

fn write_data(disk: &Path, off: u64, mib: u64, seed: u64) {
    let f = OpenOptions::new().write(true).open(disk).unwrap();
    for i in 0..mib {
        f.write_all_at(&pattern(MIB as usize, seed + i), off + i * MIB)
            .unwrap();
    }
    f.sync_data().unwrap();
}

fn compact(m: &Mount) {
    std::fs::write(m.control(), "compact").unwrap();
}

/// Requires `model` on the mounted disk, again after a remount, and a clean
/// `check` of the image once unmounted.
fn read_back_remounted_checked(m: Mount, img: &Path, mnt: &Path, model: &[u8]) {
    let read_back = |disk: &Path, what: &str| {
        let got = std::fs::read(disk).unwrap();
        assert!(
            got == model,
            "{what}: the disk differs from what was written"
        );
    };
    read_back(&m.disk(), "mounted");
    drop(m);
    let m = Mount::new(img, mnt, Some("cache=32M"));
    read_back(&m.disk(), "remounted");
    drop(m);
    let out = common::run(&["check", p(img)]);
    assert!(
        out.status.success(),
        "check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn zeros_cost_nothing_and_discards_return_host_space() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("s.vbd");
    create(&img, "1G", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=32M"));

    // 1 GiB of zeros: no data space at all.
    let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
    let zeros = vec![0u8; MIB as usize];
    for i in 0..1024 {
        f.write_all_at(&zeros, i * MIB).unwrap();
    }
    f.sync_data().unwrap();
    drop(f);
    compact(&m);
    assert_eq!(m.status_value("allocated-bytes").as_deref(), Some("0"));
    assert!(
        host_space(&img) < 2 * MIB,
        "zeros took {} bytes",
        host_space(&img)
    );

    // Punch hole and zero range free what they cover.
    write_data(&m.disk(), 0, 64, 1);
    compact(&m);
    let full = host_space(&img);
    assert!(
        full > 60 * MIB,
        "64 MiB of random data stored in {full} bytes?"
    );
    sh("fallocate", &["-p", "-o", "0", "-l", "32M", p(&m.disk())]);
    sh("fallocate", &["-z", "-o", "32M", "-l", "32M", p(&m.disk())]);
    compact(&m);
    let after = host_space(&img);
    assert!(
        after < 4 * MIB,
        "punch/zero range left {after} of {full} bytes"
    );
    let f = OpenOptions::new().read(true).open(m.disk()).unwrap();
    let mut got = vec![1u8; MIB as usize];
    f.read_exact_at(&mut got, 40 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    drop(f);

    // blkdiscard on a loop device over disk reaches the engine.
    write_data(&m.disk(), 128 * MIB, 64, 100);
    compact(&m);
    let full = host_space(&img);
    let dev = Loop::new(&m.disk(), true);
    sh(
        "blkdiscard",
        &[
            "-o",
            &(128 * MIB).to_string(),
            "-l",
            &(64 * MIB).to_string(),
            &dev.dev,
        ],
    );
    drop(dev);
    compact(&m);
    let after = host_space(&img);
    assert!(
        after + 56 * MIB < full,
        "blkdiscard freed too little: {full} -> {after}"
    );
    m.umount();
}

fn du_kib(img: &Path) -> u64 {
    host_space(img) / 1024
}

#[test]
fn ext4_fstrim_and_compact_shrink_the_image_back() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("e.vbd");
    create(&img, "1G", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=32M"));
    let dev = Loop::new(&m.disk(), true);
    sh("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &dev.dev]);
    let fsdir = tmp.path().join("fs");
    std::fs::create_dir_all(&fsdir).unwrap();
    let fs = common::FsMount::new(&dev.dev, &fsdir);
    std::fs::write(m.control(), "flush").unwrap();
    compact(&m);
    let empty = du_kib(&img);
    for i in 0..8 {
        std::fs::write(fsdir.join(format!("f{i}")), pattern(8 * MIB as usize, i)).unwrap();
    }
    sh("sync", &[]);
    compact(&m);
    let full = du_kib(&img);
    assert!(
        full > empty + 60 * 1024,
        "64 MiB of files took only {full} KiB (empty {empty})"
    );
    for i in 0..8 {
        std::fs::remove_file(fsdir.join(format!("f{i}"))).unwrap();
    }
    // ext4 can trim freed blocks only once the transaction that freed them
    // has committed.
    sh("sync", &[]);
    sh("fstrim", &[p(&fsdir)]);
    sh("sync", &[]);
    compact(&m);
    let trimmed = du_kib(&img);
    assert!(
        trimmed < empty + 8 * 1024,
        "after rm + fstrim + compact the image holds {trimmed} KiB (empty fs {empty}, full {full})"
    );
    fs.umount();
    drop(dev);
    m.umount();
    let out = common::run(&["check", p(&img)]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn deleting_a_snapshot_returns_its_space_online_and_offline() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.vbd");
    create(&img, "1G", &["--compress", "none"]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=32M"));
    write_data(&m.disk(), 0, 64, 1);
    std::fs::write(m.control(), "snapshot one").unwrap();
    write_data(&m.disk(), 0, 64, 100);
    std::fs::write(m.control(), "snapshot two").unwrap();
    write_data(&m.disk(), 0, 64, 200);
    std::fs::write(m.control(), "flush").unwrap();
    // Written bytes, not allocated ones: the delete's own checkpoint may
    // grow the log's preallocated window by up to 32 MiB.
    let held = written_bytes(&img);
    assert!(held > 190 * MIB, "three versions held: {held}");
    // Online: the reclaim thread returns what only "one" held, no compact.
    std::fs::write(m.control(), "delete-snapshot one").unwrap();
    assert!(
        common::wait_for(std::time::Duration::from_secs(20), || {
            written_bytes(&img) < held - 60 * MIB
        }),
        "deleting a snapshot online freed {} of 64 MiB (host space {}; control: dead {:?}, \
         reclaim pending {:?}, snapshots {:?})",
        held.saturating_sub(written_bytes(&img)),
        host_space(&img),
        m.status_value("dead-bytes"),
        m.status_value("reclaim-pending-bytes"),
        m.status_value("snapshots"),
    );
    let f = std::fs::File::open(m.disk()).unwrap();
    let mut got = vec![0u8; MIB as usize];
    for i in 0..64 {
        f.read_exact_at(&mut got, i * MIB).unwrap();
        assert!(got == pattern(MIB as usize, 200 + i), "head MiB {i}");
    }
    drop(f);
    m.umount();
    // Offline: `vbdfs snapshot delete` returns it before it exits.
    let before = host_space(&img);
    let out = common::run(&["snapshot", "delete", p(&img), "two"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let after = host_space(&img);
    assert!(
        after + 60 * MIB < before,
        "offline delete freed {} of 64 MiB",
        before - after
    );
    let out = common::run(&["check", p(&img)]);
    assert!(out.status.success(), "{}", common::stdout(&out));
}

/// Through the real mount with `log-region=`: the disk overwritten 40 times
/// (fsync and `checkpoint` between rounds) leaves the image file far
/// shorter than everything the log appended, and the disk reads back,
/// remounted too; `vbdfs check` is clean.
#[test]
fn overwrites_reuse_the_files_holes_and_read_back() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("r.vbd");
    create(&img, "16M", &["--compress", "none", "--block-size", "4K"]);
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(&img, &mnt, Some("cache=32M,log-region=1M"));
    let mut model = vec![0u8; 16 * MIB as usize];
    for round in 0..40u64 {
        // Each round rewrites the whole disk in 64 KiB pieces, in an order
        // that differs from round to round.
        let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
        for k in 0..256u64 {
            let piece = (k * 97 + round * 31) % 256;
            let data = pattern(65536, round * 1000 + piece);
            f.write_all_at(&data, piece * 65536).unwrap();
            let at = (piece * 65536) as usize;
            model[at..at + data.len()].copy_from_slice(&data);
        }
        f.sync_data().unwrap();
        drop(f);
        std::fs::write(m.control(), "checkpoint").unwrap();
    }
    let run = m.status_value("log-run").unwrap();
    let moves: u64 = run
        .rsplit_once('(')
        .and_then(|(_, n)| n.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("log-run: {run}"));
    assert!(moves > 10, "log-run: {run}");
    let len = std::fs::metadata(&img).unwrap().len();
    // 640 MiB appended in all: without reuse the file is that long.
    assert!(len < 160 * MIB, "the image file is {len} bytes long");
    read_back_remounted_checked(m, &img, &mnt, &model);
}

/// Through the mount, with no checkpoint asked for: sequential overwrites
/// of the whole disk leave long runs of dead records, which the daemon
/// keeps for the log instead of punching them; its runs overwrite them
/// (`log-run` counts the bytes), and every byte reads back, remounted too.
#[test]
fn sequential_overwrites_are_written_over_dead_records() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("q.vbd");
    create(&img, "32M", &["--compress", "none"]);
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(&img, &mnt, Some("cache=32M,log-region=8M"));
    let mut model = vec![0u8; 32 * MIB as usize];
    // 24 passes, 768 MiB: background checkpoints every 256 MiB of log.
    for pass in 0..24u64 {
        write_data(&m.disk(), 0, 32, pass << 8);
        for i in 0..32u64 {
            let at = (i * MIB) as usize;
            model[at..at + MIB as usize].copy_from_slice(&pattern(MIB as usize, (pass << 8) + i));
        }
    }
    let run = m.status_value("log-run").unwrap();
    let overwritten: u64 = run
        .split_once("moves into holes, ")
        .and_then(|(_, n)| n.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("log-run: {run}"));
    assert!(overwritten >= 64 * MIB, "log-run: {run}");
    read_back_remounted_checked(m, &img, &mnt, &model);
}

/// Through the mount: blocks written once beside a hot eighth of the disk
/// keep old ranges of the file from dying whole; the daemon moves them out
/// on its own (`log-run` counts the ranges) and every byte reads back.
/// Offline, `vbdfs compact` then cuts the file near its data.
#[test]
fn cold_blocks_are_moved_out_and_compact_shortens_the_file() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("e.vbd");
    create(&img, "16M", &["--compress", "none", "--block-size", "4K"]);
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(&img, &mnt, Some("cache=32M,log-region=1M"));
    let mut model = vec![0u8; 16 * MIB as usize];
    let f = OpenOptions::new().write(true).open(m.disk()).unwrap();
    let mut write = |at: u64, seed: u64| {
        let data = pattern(65536, seed);
        f.write_all_at(&data, at).unwrap();
        model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut ranges = 0;
    for round in 0..400u64 {
        // The first eighth over and over, one cold piece a round.
        for k in 0..32u64 {
            write(((k * 7 + round) % 32) * 65536, round * 100 + k);
        }
        write((32 + round % 224) * 65536, round * 100 + 99);
        f.sync_data().unwrap();
        std::fs::write(m.control(), "checkpoint").unwrap();
        let run = m.status_value("log-run").unwrap();
        ranges = run
            .rsplit_once("out of ")
            .and_then(|(_, n)| n.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("log-run: {run}"));
        if (round > 250 && ranges > 2) || std::time::Instant::now() > deadline {
            break;
        }
    }
    assert!(ranges > 2, "{ranges} ranges moved out");
    drop(f);
    let got = std::fs::read(m.disk()).unwrap();
    assert!(got == model, "the disk differs from what was written");
    drop(m);
    let long = std::fs::metadata(&img).unwrap().len();
    let out = common::run(&["compact", p(&img)]);
    assert!(out.status.success(), "compact: {out:?}");
    let short = std::fs::metadata(&img).unwrap().len();
    assert!(
        short < 40 * MIB && short < long,
        "compact: the file {long} -> {short} bytes ({})",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let out = common::run(&["check", p(&img)]);
    assert!(out.status.success(), "check: {out:?}");
    let m = Mount::new(&img, &mnt, Some("cache=32M"));
    let got = std::fs::read(m.disk()).unwrap();
    assert!(
        got == model,
        "compacted: the disk differs from what was written"
    );
}
