//! A slow host disk, made with the kernel's block throttling (cgroup v1
//! `blkio.throttle.write_bps_device` on the loop device that holds the
//! image's file system): the stall it causes must show in the control
//! file's statistics and in the daemon's log, as an admin would look for it.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{create, fuse_available, p, vbdfs, FsMount, Loop, Mount};

const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// A blkio cgroup that limits one process's writes to one device; dropping it
/// moves the process back to the root group and removes the group.
struct Throttle {
    dir: PathBuf,
    pid: u32,
}

impl Throttle {
    fn new(dev: &str, pid: u32, bytes_per_sec: u64) -> Throttle {
        let rdev = std::fs::metadata(dev).expect("stat loop device").rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        // One group per throttle: the tests of this file run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Path::new(BLKIO).join(format!("vbdfs-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).expect("create blkio cgroup");
        let t = Throttle { dir, pid };
        std::fs::write(
            t.dir.join("blkio.throttle.write_bps_device"),
            format!("{major}:{minor} {bytes_per_sec}\n"),
        )
        .expect("set write limit");
        std::fs::write(t.dir.join("cgroup.procs"), pid.to_string()).expect("move daemon");
        t
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), self.pid.to_string());
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An uncompressed image of `size` on a fresh ext4 on a loop device (whose
/// writes a [`Throttle`] can slow down), or None where FUSE or cgroup v1
/// blkio throttling is missing (the test is skipped).
fn slow_disk_setup(size: &str) -> Option<(tempfile::TempDir, Loop, FsMount, PathBuf)> {
    if !fuse_available() {
        return None;
    }
    if !Path::new(BLKIO)
        .join("blkio.throttle.write_bps_device")
        .exists()
    {
        eprintln!("skipped: no cgroup v1 blkio throttling at {BLKIO}");
        return None;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let lo = Loop::with_ext4(&tmp.path().join("fs.img"), 256 << 20);
    let fs = FsMount::new(&lo.dev, &tmp.path().join("fs"));
    let img = fs.dir.join("a.vbd");
    create(&img, size, &["--compress", "none"]);
    Some((tmp, lo, fs, img))
}

#[test]
fn a_slow_host_disk_shows_in_the_statistics_and_the_log() {
    let Some((tmp, lo, fs, img)) = slow_disk_setup("64M") else {
        return;
    };

    let log = tmp.path().join("daemon.log");
    let dir = tmp.path().join("mnt");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let out = vbdfs()
        .env("VBDFS_LOG_FILE", &log)
        .args(["mount", p(&img), p(&dir)])
        .output()
        .expect("run vbdfs mount");
    assert!(out.status.success(), "{}", common::stderr(&out));
    let m = Mount::adopt(&img, &dir);
    let pid = m.pid.expect("daemon pid");

    // 2 MiB/s for the daemon's writes to the loop device: flushing 6 MiB
    // takes about 3 s.
    let throttle = Throttle::new(&lo.dev, pid, 2 << 20);
    std::fs::write(m.control(), "reset-stats").expect("reset-stats");
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .expect("open disk");
    disk.write_all_at(&common::pattern(6 << 20, 9), 0)
        .expect("write");
    let t = Instant::now();
    disk.sync_all().expect("fsync");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(1), "fsync took only {took:?}");

    let line = m.status_value("flush-latency-us").expect("flush latency");
    let max: u64 = line
        .rsplit_once("max=")
        .and_then(|(_, v)| v.parse().ok())
        .expect("max");
    assert!(max >= 1_000_000, "{line}");
    // The daemon's time lies within the caller's (it stops the clock just
    // after replying, so allow a little).
    let within = (took + Duration::from_millis(100)).as_micros() as u64;
    assert!(max <= within, "{line} vs fsync {took:?}");
    let slow: u64 = m
        .status_value("slow-requests")
        .and_then(|v| v.parse().ok())
        .expect("slow-requests");
    assert!(slow >= 1, "slow-requests {slow}");
    drop(throttle);
    drop(disk);
    m.umount();

    let text = std::fs::read_to_string(&log).expect("daemon log");
    assert!(
        text.lines()
            .any(|l| l.contains("slow request: flush") && l.contains(" took ")),
        "no slow-request line in the daemon log:\n{text}"
    );
    fs.umount();
}

/// While writes wait for a host disk that cannot keep up, `stat disk` and
/// reading `control` still answer: a FUSE thread is kept free of writes
/// that wait for write-back (they used to take every FUSE thread, and the
/// admin's own look at the mount hung with the guest).
#[test]
fn stat_and_control_answer_while_writes_wait_for_a_slow_disk() {
    let Some((tmp, lo, fs, img)) = slow_disk_setup("128M") else {
        return;
    };
    // The last free FUSE thread waits only past 1.5x the dirty limit (half
    // the cache): the 4 writes in flight must fit in that half-limit margin
    // (at cache=16M it is 3 MiB, and 4 blocked 1 MiB writes can pass it).
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=64M"));
    let pid = m.pid.expect("daemon pid");
    // 256 KiB/s: every MiB of write-back takes ~4 s.
    let throttle = Throttle::new(&lo.dev, pid, 256 << 10);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (disk, stop) = (m.disk(), stop.clone());
            std::thread::spawn(move || {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(disk)
                    .expect("open disk");
                let mut buf = common::Aligned::new(1 << 20);
                buf.as_mut_slice()
                    .copy_from_slice(&common::pattern(1 << 20, w));
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = f.write_all_at(buf.as_slice(), (w * 32 + i % 32) << 20);
                    i += 1;
                }
            })
        })
        .collect();
    // Long enough for the cache to fill: from then on writes wait. The
    // probe runs in its own thread: if it hangs, the throttle is lifted
    // (which lets it finish) and the test fails instead of hanging.
    std::thread::sleep(Duration::from_secs(3));
    let (disk, control) = (m.disk(), m.control());
    let (tx, rx) = std::sync::mpsc::channel();
    let probe = std::thread::spawn(move || {
        let mut slowest = Duration::ZERO;
        for _ in 0..5 {
            let t = Instant::now();
            std::fs::metadata(&disk).expect("stat disk");
            let status = std::fs::read_to_string(&control).expect("read control");
            slowest = slowest.max(t.elapsed());
            let dirty: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("dirty-bytes: "))
                .and_then(|v| v.parse().ok())
                .expect("dirty-bytes");
            let _ = tx.send((slowest, dirty));
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while seen.len() < 5 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(v) => seen.push(v),
            Err(_) => break,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(throttle);
    probe.join().expect("probe");
    for w in writers {
        w.join().expect("writer");
    }
    assert_eq!(
        seen.len(),
        5,
        "stat and control hung behind held-back writes"
    );
    let (slowest, _) = seen[4];
    let most_dirty = seen.iter().map(|s| s.1).max().unwrap_or(0);
    assert!(
        most_dirty >= 16 << 20,
        "the writes were not held back ({most_dirty} dirty)"
    );
    assert!(
        slowest < Duration::from_millis(1000),
        "stat and control took {slowest:?} behind held-back writes"
    );
    m.umount();
    fs.umount();
}
