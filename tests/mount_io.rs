//! I/O through a real kernel FUSE mount: layout, O_DIRECT and buffered reads and
//! writes at odd offsets, the fixed size, fallocate, and data surviving remounts.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use common::{create, fuse_available, pattern, Aligned, Mount};

const MIB: u64 = 1 << 20;

fn open_disk(m: &Mount, direct: bool) -> std::fs::File {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(m.disk()).expect("open disk")
}

#[test]
fn layout_and_attributes() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "48M", &[]);
    let m = Mount::new(
        &img,
        &tmp.path().join("mnt"),
        Some("mode=0640,uid=1234,gid=99"),
    );
    let mut names: Vec<String> = std::fs::read_dir(&m.dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["control", "disk", "snapshots"]);
    let disk = std::fs::metadata(m.disk()).expect("stat disk");
    assert!(disk.is_file());
    assert_eq!(disk.len(), 48 * MIB);
    assert_eq!(disk.mode() & 0o7777, 0o640);
    assert_eq!((disk.uid(), disk.gid()), (1234, 99));
    let control = std::fs::metadata(m.control()).expect("stat control");
    assert_eq!(control.mode() & 0o7777, 0o600);
    assert!(std::fs::metadata(m.dir.join("snapshots"))
        .expect("stat")
        .is_dir());
    assert_eq!(
        std::fs::read_dir(m.dir.join("snapshots"))
            .expect("readdir")
            .count(),
        0
    );
    assert!(std::fs::metadata(m.dir.join("nope")).is_err());

    // The names are fixed: no new files, directories or links, no removal
    // or renaming (EPERM, not "function not implemented").
    let snaps = m.dir.join("snapshots");
    let attempts: Vec<(&str, std::io::Result<()>)> = vec![
        ("rm disk", std::fs::remove_file(m.disk())),
        ("rm control", std::fs::remove_file(m.control())),
        ("rmdir snapshots", std::fs::remove_dir(&snaps)),
        ("mkdir", std::fs::create_dir(m.dir.join("d"))),
        ("mkdir in snapshots", std::fs::create_dir(snaps.join("d"))),
        ("create", std::fs::File::create(m.dir.join("new")).map(drop)),
        (
            "create in snapshots",
            std::fs::File::create(snaps.join("s")).map(drop),
        ),
        ("rename", std::fs::rename(m.disk(), m.dir.join("disk2"))),
        ("link", std::fs::hard_link(m.disk(), m.dir.join("disk2"))),
        (
            "symlink",
            std::os::unix::fs::symlink("disk", m.dir.join("l")),
        ),
    ];
    for (what, result) in attempts {
        let err = result.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{what}: {err}");
    }
    names.clear();
    for e in std::fs::read_dir(&m.dir).expect("readdir") {
        names.push(e.expect("entry").file_name().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(names, ["control", "disk", "snapshots"]);
    m.umount();
}

#[test]
fn direct_and_buffered_io_at_odd_offsets_survive_remount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    let dir = tmp.path().join("mnt");
    create(&img, "64M", &["--block-size", "64K"]);
    let size = 64 * MIB;
    let mut expect = vec![0u8; size as usize];
    let put = |expect: &mut Vec<u8>, off: u64, data: &[u8]| {
        expect[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    {
        let m = Mount::new(&img, &dir, None);
        // O_DIRECT: aligned buffers, 4 KiB-aligned offsets, sizes up to 2 MiB.
        let f = open_disk(&m, true);
        for (i, (off, len)) in [
            (0, 4096),
            (8192, 65536),
            (3 * MIB, 2 * MIB),
            (size - 4096, 4096),
        ]
        .iter()
        .enumerate()
        {
            let mut buf = Aligned::new(*len as usize);
            buf.as_mut_slice()
                .copy_from_slice(&pattern(*len as usize, i as u64));
            f.write_all_at(buf.as_slice(), *off)
                .expect("O_DIRECT write");
            put(&mut expect, *off, buf.as_slice());
        }
        // Buffered: odd offsets and lengths, across block boundaries.
        let g = open_disk(&m, false);
        for (i, (off, len)) in [
            (1u64, 1usize),
            (65535, 3),
            (100_001, 200_003),
            (size - 7, 7),
            (5 * MIB + 13, (MIB + 17) as usize),
        ]
        .iter()
        .enumerate()
        {
            let data = pattern(*len, 100 + i as u64);
            g.write_all_at(&data, *off).expect("buffered write");
            put(&mut expect, *off, &data);
        }
        g.sync_all().expect("fsync");
        // Read back both ways, at odd offsets too.
        for (off, len) in [(0u64, 4096usize), (8192, 65536), (3 * MIB, 2 << 20)] {
            let mut buf = Aligned::new(len);
            f.read_exact_at(buf.as_mut_slice(), off)
                .expect("O_DIRECT read");
            assert!(
                buf.as_slice() == &expect[off as usize..off as usize + len],
                "O_DIRECT at {off}"
            );
        }
        for (off, len) in [
            (1u64, 10usize),
            (65530, 20),
            (100_000, 300_000),
            (size - 9, 9),
        ] {
            let mut buf = vec![0u8; len];
            g.read_exact_at(&mut buf, off).expect("buffered read");
            assert!(
                buf == expect[off as usize..off as usize + len],
                "buffered at {off}"
            );
        }
        // At and past the end: short/empty reads, refused writes.
        let mut buf = vec![0u8; 100];
        assert_eq!(g.read_at(&mut buf, size - 10).expect("read at end"), 10);
        assert_eq!(g.read_at(&mut buf, size).expect("read past end"), 0);
        let err = g.write_at(b"x", size).expect_err("write past end");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        // The size is fixed.
        assert!(g.set_len(size / 2).is_err(), "truncate succeeded");
        assert!(g.set_len(size).is_ok(), "truncate to the same size failed");
        drop((f, g));
        m.umount();
    }
    // Remount read-only: everything is still there.
    let m = Mount::new(&img, &dir, Some("ro"));
    let data = std::fs::read(m.disk()).expect("read whole disk");
    assert!(data == expect, "data differs after remount");
    assert!(
        OpenOptions::new().write(true).open(m.disk()).is_err(),
        "ro mount opened for write"
    );
    m.umount();
}

#[test]
fn fallocate_punch_and_zero() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "16M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let f = open_disk(&m, false);
    f.write_all_at(&pattern(4 * MIB as usize, 7), 0)
        .expect("write");
    let disk = m.disk();
    let d = common::p(&disk);
    common::sh(
        "fallocate",
        &["--punch-hole", "--offset", "65536", "--length", "131072", d],
    );
    common::sh(
        "fallocate",
        &["--zero-range", "--offset", "1000", "--length", "3000", d],
    );
    let data = std::fs::read(m.disk()).expect("read");
    let orig = pattern(4 * MIB as usize, 7);
    assert!(
        data[65536..196608].iter().all(|&b| b == 0),
        "punched range not zero"
    );
    assert!(
        data[1000..4000].iter().all(|&b| b == 0),
        "zeroed range not zero"
    );
    assert_eq!(data[..1000], orig[..1000]);
    assert_eq!(data[4000..65536], orig[4000..65536]);
    assert_eq!(
        data[196608..4 * MIB as usize],
        orig[196608..4 * MIB as usize]
    );
    // Growing is refused: the size is fixed.
    let out = std::process::Command::new("fallocate")
        .args(["--length", "32M", d])
        .output()
        .expect("run fallocate");
    assert!(!out.status.success(), "fallocate grew the disk");
    assert_eq!(std::fs::metadata(m.disk()).expect("stat").len(), 16 * MIB);
    drop(f);
    m.umount();
}

#[test]
fn concurrent_writers_and_readers() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "32M", &["--block-size", "16K"]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("threads=8"));
    const REGION: u64 = 4 * MIB;
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let m = &m;
                s.spawn(move || {
                    let direct = t % 2 == 0;
                    let f = open_disk(m, direct);
                    let base = t * REGION;
                    let mut model = vec![0u8; REGION as usize];
                    let mut x = t * 7919 + 1;
                    for i in 0..60u64 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let (mut off, mut len) = ((x >> 20) % REGION, (x >> 44) % (300 << 10) + 1);
                        if direct {
                            off &= !4095;
                            len = (len + 4095) & !4095;
                        }
                        len = len.min(REGION - off);
                        let data = pattern(len as usize, t * 1000 + i);
                        if direct {
                            let mut buf = Aligned::new(len as usize);
                            buf.as_mut_slice().copy_from_slice(&data);
                            f.write_all_at(buf.as_slice(), base + off)
                                .expect("direct write");
                        } else {
                            f.write_all_at(&data, base + off).expect("write");
                        }
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        // Read a random earlier range back while others write.
                        let roff = ((x >> 8) % REGION) & !4095;
                        let rlen = 8192.min(REGION - roff);
                        let mut got = Aligned::new(rlen as usize);
                        f.read_exact_at(got.as_mut_slice(), base + roff)
                            .expect("read");
                        assert!(
                            got.as_slice() == &model[roff as usize..(roff + rlen) as usize],
                            "thread {t}: read-back mismatch at {roff}"
                        );
                    }
                    f.sync_data().expect("fdatasync");
                    model
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let data = std::fs::read(m.disk()).expect("read disk");
    for (t, model) in models.iter().enumerate() {
        let base = t * REGION as usize;
        assert!(
            data[base..base + REGION as usize] == model[..],
            "region {t} differs"
        );
    }
    m.umount();
}

#[test]
fn seek_data_and_seek_hole() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "8M", &["--block-size", "64K"]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let f = open_disk(&m, false);
    f.write_all_at(&[1u8; 4096], 3 * MIB + 100).expect("write");
    f.sync_data().expect("sync");
    assert_eq!(
        vbdfs::sys::seek_data(&f, 0).expect("SEEK_DATA"),
        Some(3 * MIB)
    );
    assert_eq!(
        vbdfs::sys::seek_hole(&f, 3 * MIB).expect("SEEK_HOLE"),
        Some(3 * MIB + 65536)
    );
    assert_eq!(vbdfs::sys::seek_hole(&f, 0).expect("SEEK_HOLE"), Some(0));
    assert_eq!(vbdfs::sys::seek_data(&f, 4 * MIB).expect("SEEK_DATA"), None);
    assert_eq!(
        vbdfs::sys::seek_hole(&f, 8 * MIB).expect("SEEK_HOLE at end"),
        None
    );
    drop(f);
    m.umount();
}

/// `disk` looks like a sparse raw file to backup and copy tools: its blocks
/// count what it holds (never 0 once written, even before write-back: `tar
/// --sparse` skips a file without blocks), its mtime moves with writes and
/// takes `touch`, and `df` shows the host file system the image grows in.
#[test]
fn times_blocks_and_space_look_like_a_sparse_raw_file() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "64M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let before = std::fs::metadata(m.disk()).expect("stat");
    assert_eq!(before.blocks(), 0, "a fresh disk holds nothing");
    std::thread::sleep(std::time::Duration::from_millis(20));

    // 4 KiB into the middle of a block: it waits in write-behind, unwritten.
    let f = open_disk(&m, false);
    f.write_all_at(&pattern(4096, 1), 8 * MIB + 4096)
        .expect("write");
    let after = std::fs::metadata(m.disk()).expect("stat");
    assert!(
        after.blocks() > 0,
        "written data not counted before write-back"
    );
    assert!(
        after.modified().expect("mtime") > before.modified().expect("mtime"),
        "a write did not move the mtime"
    );
    f.write_all_at(&pattern(MIB as usize, 2), 16 * MIB)
        .expect("write");
    f.sync_all().expect("fsync");
    let synced = std::fs::metadata(m.disk()).expect("stat");
    assert!(
        synced.blocks() * 512 >= MIB && synced.blocks() * 512 < 8 * MIB,
        "{} blocks for ~1 MiB of data",
        synced.blocks()
    );

    // A snapshot file counts what the snapshot holds too (`du` of
    // snapshots/ showed every snapshot at the disk's full size).
    let (ok, err) = {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo 'snapshot s1' > '{}'",
                common::p(&m.control())
            ))
            .output()
            .expect("sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(ok, "{err}");
    let snap = std::fs::metadata(m.dir.join("snapshots/s1")).expect("stat snapshot");
    assert_eq!(snap.len(), std::fs::metadata(m.disk()).expect("stat").len());
    assert!(
        snap.blocks() * 512 >= MIB && snap.blocks() * 512 < 8 * MIB,
        "{} blocks for a snapshot of ~1 MiB of data",
        snap.blocks()
    );

    let then = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    f.set_modified(then).expect("touch");
    assert_eq!(
        std::fs::metadata(m.disk()).expect("stat").modified().ok(),
        Some(then)
    );
    drop(f);

    // df: the mount reports the image's file system, not a full disk.
    let df = |dir: &std::path::Path| -> Vec<u64> {
        let out = common::sh("df", &["--output=size,avail", "-B1", common::p(dir)]);
        let last = out.lines().last().unwrap_or_default().to_string();
        last.split_whitespace()
            .map(|v| v.parse().expect("number"))
            .collect()
    };
    let (mount, host) = (df(&m.dir), df(tmp.path()));
    assert_eq!(
        mount[0], host[0],
        "size: df of the mount {mount:?}, host {host:?}"
    );
    assert!(
        mount[1].abs_diff(host[1]) < 1 << 30 && mount[1] > 0,
        "available: df of the mount {mount:?}, host {host:?}"
    );
    m.umount();
}
