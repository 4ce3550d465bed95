//! The control file through a real mount: status keys, `flush`, and failing
//! commands that make the shell's `echo` fail with a fitting errno.

mod common;

use std::process::Command;

use common::{create, fuse_available, p, Mount};

/// `bash -c 'echo CMD > CONTROL'`: (success, stderr).
fn echo_to(control: &std::path::Path, cmd: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("echo '{cmd}' > '{}'", p(control)))
        .output()
        .expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn status_and_commands() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "32M", &["--block-size", "4K", "--compress", "none"]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=8M,threads=4"));

    let status = std::fs::read_to_string(m.control()).expect("read control");
    let keys: Vec<&str> = status
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(k, _)| k))
        .collect();
    assert_eq!(
        keys,
        [
            "state",
            "image",
            "mountpoint",
            "pid",
            "read-only",
            "size",
            "block-size",
            "codec",
            "codec-adapt",
            "uuid",
            "allocated-bytes",
            "stored-bytes",
            "file-bytes",
            "file-allocated-bytes",
            "dead-bytes",
            "reclaim-pending-bytes",
            "log-run",
            "cache-size",
            "cache-used",
            "cache-hits",
            "cache-misses",
            "dirty-bytes",
            "generation",
            "snapshots",
            "log-damage",
            "last-error",
            "stats-seconds",
            "read",
            "read-latency-us",
            "write",
            "write-latency-us",
            "flush",
            "flush-latency-us",
            "discard",
            "discard-latency-us",
            "slow-requests"
        ],
        "{status}"
    );
    assert_eq!(m.status_value("state").as_deref(), Some("mounted"));
    assert_eq!(m.status_value("log-damage").as_deref(), Some("none"));
    assert_eq!(
        m.status_value("image"),
        Some(img.canonicalize().expect("canon").display().to_string())
    );
    assert_eq!(m.status_value("size").as_deref(), Some("33554432"));
    assert_eq!(m.status_value("block-size").as_deref(), Some("4096"));
    assert_eq!(m.status_value("codec").as_deref(), Some("none"));
    assert_eq!(m.status_value("codec-adapt").as_deref(), Some("off"));
    assert_eq!(m.status_value("cache-size").as_deref(), Some("8388608"));
    assert_eq!(m.status_value("read-only").as_deref(), Some("no"));
    assert_eq!(m.status_value("last-error").as_deref(), Some("none"));
    // The room allocated ahead of the log is not dead space.
    let dead: u64 = m
        .status_value("dead-bytes")
        .and_then(|v| v.parse().ok())
        .expect("dead-bytes");
    assert!(dead < 1 << 20, "a fresh mount shows {dead} dead bytes");

    // Data written, then flushed through the control file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 8192], 4096))
        .expect("write disk");
    let (ok, err) = echo_to(&m.control(), "flush");
    assert!(ok, "flush failed: {err}");
    assert_eq!(m.status_value("dirty-bytes").as_deref(), Some("0"));
    let allocated: u64 = m
        .status_value("allocated-bytes")
        .and_then(|v| v.parse().ok())
        .expect("allocated");
    assert_eq!(allocated, 8192);

    // Failing commands: the shell's write fails with the errno.
    for (cmd, errno_text) in [
        ("bogus", "Invalid argument"),
        ("flush now", "Invalid argument"),
        ("snapshot", "Invalid argument"),
        ("snapshot bad/name", "Invalid argument"),
        ("snapshot .hidden", "Invalid argument"),
        ("delete-snapshot pre-upgrade", "No such file or directory"),
    ] {
        let (ok, err) = echo_to(&m.control(), cmd);
        assert!(!ok, "{cmd:?} succeeded");
        assert!(err.contains(errno_text), "{cmd:?}: {err}");
    }
    let last = m.status_value("last-error").expect("last-error");
    assert!(last.contains("pre-upgrade"), "{last}");
    // A rejected name's control characters are escaped: the status stays
    // one `key: value` line each.
    let (ok, _) = echo_to(&m.control(), "delete-snapshot a\x1b[2Jb");
    assert!(!ok, "a name with an escape character was taken");
    let last = m.status_value("last-error").expect("last-error");
    assert!(last.contains("a\\u{1b}[2Jb"), "{last}");
    let status = std::fs::read_to_string(m.control()).expect("read control");
    assert!(!status.contains('\u{1b}'), "{status:?}");
    // compact works through the control file.
    let (ok, err) = echo_to(&m.control(), "compact");
    assert!(ok, "compact failed: {err}");
    assert_eq!(m.status_value("state").as_deref(), Some("mounted"));
    m.umount();
}

/// The `p50=… p90=… p99=… p99.9=… max=…` values of a latency line.
fn latencies(line: &str) -> Vec<u64> {
    line.split(' ')
        .map(|kv| {
            let (_, v) = kv.split_once('=').expect("key=value");
            v.parse().expect("number")
        })
        .collect()
}

#[test]
fn request_statistics_count_what_the_disk_served_and_reset() {
    use std::os::unix::fs::FileExt;
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "8M", &["--block-size", "4K"]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let (ok, err) = echo_to(&m.control(), "reset-stats");
    assert!(ok, "reset-stats failed: {err}");
    assert_eq!(
        m.status_value("write").as_deref(),
        Some("requests=0 bytes=0 errors=0")
    );
    assert_eq!(m.status_value("write-latency-us").as_deref(), Some("none"));

    // `disk` is opened with direct I/O: each call below is one request.
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.disk())
        .expect("open disk");
    disk.write_all_at(&common::pattern(12288, 5), 4096)
        .expect("write");
    disk.write_all_at(&[1u8; 4096], 64 << 10).expect("write");
    let mut back = vec![0u8; 8192];
    disk.read_exact_at(&mut back, 8192).expect("read");
    disk.sync_all().expect("fsync");
    common::sh(
        "fallocate",
        &["-p", "-o", "4096", "-l", "4096", p(&m.disk())],
    );
    let err = disk
        .write_at(&[1u8; 512], 8 << 20)
        .expect_err("write past the end");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");

    assert_eq!(
        m.status_value("write").as_deref(),
        Some("requests=3 bytes=16384 errors=1")
    );
    assert_eq!(
        m.status_value("read").as_deref(),
        Some("requests=1 bytes=8192 errors=0")
    );
    // Our fsync, and util-linux `fallocate`'s after its punch.
    assert_eq!(
        m.status_value("flush").as_deref(),
        Some("requests=2 errors=0")
    );
    assert_eq!(
        m.status_value("discard").as_deref(),
        Some("requests=1 bytes=4096 errors=0")
    );
    for op in ["read", "write", "flush", "discard"] {
        let line = m
            .status_value(&format!("{op}-latency-us"))
            .expect("latency line");
        let v = latencies(&line);
        assert_eq!(v.len(), 5, "{op}: {line}");
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{op}: {line}");
        assert!(v[4] > 0 && v[4] < 10_000_000, "{op}: {line}");
    }
    assert_eq!(m.status_value("slow-requests").as_deref(), Some("0"));

    let (ok, err) = echo_to(&m.control(), "reset-stats");
    assert!(ok, "reset-stats failed: {err}");
    assert_eq!(
        m.status_value("read").as_deref(),
        Some("requests=0 bytes=0 errors=0")
    );
    assert_eq!(m.status_value("flush-latency-us").as_deref(), Some("none"));
    let seconds: f64 = m
        .status_value("stats-seconds")
        .and_then(|v| v.parse().ok())
        .expect("stats-seconds");
    assert!(seconds < 5.0, "{seconds}");
    drop(disk);
    m.umount();
}

#[test]
fn read_only_mount_refuses_writes_and_offline_writers() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "8M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("ro"));
    assert_eq!(m.status_value("read-only").as_deref(), Some("yes"));
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .expect_err("opened rw");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let (ok, _) = echo_to(&m.control(), "flush");
    assert!(!ok, "control write on a read-only mount succeeded");
    // Offline writers are refused while it serves (they would change the
    // image under it: its reads then failed); readers are not.
    let before = std::fs::read(m.disk()).expect("read disk");
    for args in [
        &["snapshot", "create", p(&img), "s"][..],
        &["compact", p(&img)],
        &["resize", p(&img), "16M"],
        &["check", "--repair", p(&img)],
    ] {
        let out = common::run(args);
        let err = common::stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded under a ro mount");
        assert!(err.contains("is mounted at"), "{args:?}: {err}");
        // Its control file takes no such command: not advised.
        assert!(!err.contains("/control"), "{args:?}: {err}");
    }
    for args in [&["info", p(&img)][..], &["check", p(&img)]] {
        let out = common::run(args);
        assert!(out.status.success(), "{args:?}: {}", common::stderr(&out));
    }
    assert_eq!(std::fs::read(m.disk()).expect("read disk"), before);
    m.umount();
}

#[test]
fn a_damaged_block_reads_as_eio_and_is_reported() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = common::damaged_image(tmp.path());
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("ro"));
    let err = std::fs::read(m.disk()).expect_err("reading a damaged disk succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let last = m.status_value("last-error").expect("last-error");
    assert!(last.contains("read disk"), "{last}");
    m.umount();
}

#[test]
fn a_damaged_synced_log_record_reads_as_eio_and_later_writes_survive_through_the_mount() {
    use std::os::unix::fs::FileExt;
    use vbdfs::{Codec, CreateOptions, Image, OpenOptions};
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("live.vbd");
    let create = CreateOptions {
        size: 1 << 20,
        block_size: 4096,
        codec: Codec::None,
    };
    let opts = OpenOptions {
        cache_bytes: 4 << 20,
        ..OpenOptions::default()
    };
    let img = Image::create(&path, &create, &opts).expect("create");
    img.write_at(&common::pattern(4096, 1), 0).expect("write");
    img.close().expect("close");
    // A session that flushes block 1, then block 0, and is killed: the
    // file as the host holds it then.
    let img = Image::open(&path, &opts).expect("open");
    let b = common::pattern(4096, 2);
    img.write_at(&b, 4096).expect("write");
    img.flush().expect("flush");
    let c = common::pattern(4096, 3);
    img.write_at(&c, 0).expect("write");
    img.flush().expect("flush");
    let mut bytes = std::fs::read(&path).expect("read image");
    drop(img);
    let at = bytes
        .windows(4096)
        .position(|w| w == b.as_slice())
        .expect("block 1's record");
    bytes[at + 2000] ^= 0x40; // bit rot in a synced record
    let crashed = tmp.path().join("crashed.vbd");
    std::fs::write(&crashed, &bytes).expect("write image");

    let m = Mount::new(&crashed, &tmp.path().join("mnt"), None);
    let damage = m.status_value("log-damage").expect("log-damage");
    assert!(damage.contains("is damaged"), "{damage}");
    let disk = std::fs::File::open(m.disk()).expect("open disk");
    let mut got = vec![0u8; 4096];
    let err = disk
        .read_exact_at(&mut got, 4096)
        .expect_err("damaged block read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    disk.read_exact_at(&mut got, 0).expect("block 0");
    assert!(
        got == c,
        "block 0 keeps the write flushed after the damaged one"
    );
    drop(disk);
    m.umount();
    let out = common::run(&["check", p(&crashed)]);
    assert!(!out.status.success());
    assert!(
        common::stdout(&out).contains("bad block 1 "),
        "{}",
        common::stdout(&out)
    );
}

#[test]
fn adapt_compresses_faster_under_a_write_backlog_and_is_refused_for_uncompressed_images() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("z.vbd");
    create(&img, "256M", &[]);
    // An 8 MiB cache fills at once: write-back is behind for most of 64 MiB.
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=8M,adapt=-4"));
    let data: Vec<Vec<u8>> = (0..64).map(|i| common::pattern(1 << 20, 500 + i)).collect();
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.disk())
        .expect("open disk");
    for (i, d) in data.iter().enumerate() {
        disk.write_all_at(d, (i as u64) << 20).expect("write");
    }
    disk.sync_all().expect("fsync");
    let adapt = m.status_value("codec-adapt").unwrap_or_default();
    let faster: u64 = adapt
        .strip_prefix("to zstd:-4 (")
        .and_then(|r| r.split_once(' '))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("codec-adapt: {adapt}"));
    assert!(faster > 0, "codec-adapt: {adapt}");
    assert_eq!(m.status_value("codec").as_deref(), Some("zstd:1"));
    drop(disk);
    m.umount();
    let out = common::run(&["check", p(&img)]);
    assert!(out.status.success(), "{}", common::stdout(&out));
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    assert_eq!(m.status_value("codec-adapt").as_deref(), Some("off"));
    let disk = std::fs::File::open(m.disk()).expect("open disk");
    let mut got = vec![0u8; 1 << 20];
    for (i, d) in data.iter().enumerate() {
        disk.read_exact_at(&mut got, (i as u64) << 20)
            .expect("read");
        assert!(got == *d, "MiB {i} differs after remount");
    }
    drop(disk);
    m.umount();

    // Refused with one line where it cannot be faster.
    let plain = tmp.path().join("n.vbd");
    create(&plain, "16M", &["--compress", "none"]);
    for (image, opt, needle) in [
        (&plain, "adapt", "needs a compressed image"),
        (&img, "adapt=2", "not faster than the image's zstd:1"),
    ] {
        let err = Mount::try_new(image, &tmp.path().join("mnt2"), Some(opt))
            .expect_err("mount with a useless adapt");
        assert!(
            err.contains(needle) && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(!common::is_mounted(&tmp.path().join("mnt2")));
    }
}
