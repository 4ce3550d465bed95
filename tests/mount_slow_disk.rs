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
        let dir = Path::new(BLKIO).join(format!("vbdfs-test-{}", std::process::id()));
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

#[test]
fn a_slow_host_disk_shows_in_the_statistics_and_the_log() {
    if !fuse_available() {
        return;
    }
    if !Path::new(BLKIO)
        .join("blkio.throttle.write_bps_device")
        .exists()
    {
        eprintln!("skipped: no cgroup v1 blkio throttling at {BLKIO}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let lo = Loop::with_ext4(&tmp.path().join("fs.img"), 256 << 20);
    let fs = FsMount::new(&lo.dev, &tmp.path().join("fs"));
    let img = fs.dir.join("a.vbd");
    create(&img, "64M", &["--compress", "none"]);

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
