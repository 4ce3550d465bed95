//! Reads where the kernel refuses io_uring, as in a sandbox
//! (`kernel.io_uring_disabled=2`): the daemon reads the records of a request
//! one by one instead of submitting them together, and returns the same
//! bytes. The sysctl is global, so this is a test binary of its own (cargo
//! runs test binaries one at a time); a guard puts the old value back, also
//! when the test fails.

mod common;

use common::{p, pattern, vbdfs, Aligned, Mount};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
const BS: usize = 65536;
const BLOCKS: u64 = 48;

/// Sets `kernel.io_uring_disabled=2` until dropped.
struct UringOff {
    old: String,
}

impl UringOff {
    fn set() -> UringOff {
        let old = std::fs::read_to_string(SYSCTL).expect("read kernel.io_uring_disabled");
        std::fs::write(SYSCTL, "2").expect("set kernel.io_uring_disabled=2 (run as root)");
        UringOff { old }
    }
}

impl Drop for UringOff {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, self.old.trim()) {
            eprintln!("could not restore kernel.io_uring_disabled: {e}");
        }
    }
}

/// Mounts with the daemon's log in `log`.
fn mount_logged(image: &Path, dir: &Path, log: &Path) -> Mount {
    std::fs::create_dir_all(dir).expect("mkdir");
    let out = vbdfs()
        .env("VBDFS_LOG_FILE", log)
        .args(["mount", p(image), p(dir), "-o", "cache=8M"])
        .output()
        .expect("run vbdfs mount");
    assert!(out.status.success(), "{}", common::stderr(&out));
    Mount::adopt(image, dir)
}

/// Writes block `b` (half `seed`'s pattern, half zeros: it compresses) and
/// makes it durable on its own, so that its record is an append away from
/// its neighbours'.
fn write_block(disk: &Path, b: u64, seed: u64, model: &mut [u8]) {
    let mut bytes = pattern(BS / 2, seed);
    bytes.resize(BS, 0);
    let f = OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("open disk");
    f.write_all_at(&bytes, b * BS as u64).expect("write");
    f.sync_data().expect("fdatasync");
    model[b as usize * BS..][..BS].copy_from_slice(&bytes);
}

/// Reads `file` whole in 1 MiB O_DIRECT requests.
fn read_direct(file: &Path) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .expect("open O_DIRECT");
    let mut buf = Aligned::new(1 << 20);
    let mut out = Vec::new();
    let len = f.metadata().expect("stat").len();
    while (out.len() as u64) < len {
        let n = f
            .read_at(buf.as_mut_slice(), out.len() as u64)
            .expect("read");
        assert!(n > 0, "short read at {}", out.len());
        out.extend_from_slice(&buf.as_slice()[..n]);
    }
    out
}

#[test]
fn scattered_records_read_one_by_one_give_the_same_bytes() {
    assert!(common::fuse_available(), "/dev/fuse is needed");
    let _off = UringOff::set();
    for compress in ["none", "zstd"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let image = tmp.path().join("img.vbd");
        let dir = tmp.path().join("mnt");
        let log = tmp.path().join("daemon.log");
        common::create(&image, "3M", &["--compress", compress]);
        let mut head = vec![0u8; BLOCKS as usize * BS];

        // Every block on its own, in a scrambled order; a snapshot; then
        // every other block again: head and snapshot both lie scattered.
        let m = mount_logged(&image, &dir, &log);
        for i in 0..BLOCKS {
            let b = (i * 29 + 7) % BLOCKS;
            write_block(&m.disk(), b, b + 1, &mut head);
        }
        let snap = head.clone();
        std::fs::write(m.control(), "snapshot s1\n").expect("snapshot");
        for i in 0..BLOCKS / 2 {
            let b = (i * 2 * 13 + 3) % BLOCKS;
            write_block(&m.disk(), b, b + 1000, &mut head);
        }
        m.umount();

        // A fresh daemon has nothing cached: each 1 MiB read misses 16
        // blocks whose records lie apart.
        let m = mount_logged(&image, &dir, &log);
        assert!(
            read_direct(&m.disk()) == head,
            "{compress}: the disk read back other bytes"
        );
        let snapshot = read_direct(&m.dir.join("snapshots/s1"));
        assert!(
            snapshot == snap,
            "{compress}: the snapshot read back other bytes"
        );
        m.umount();

        let text = std::fs::read_to_string(&log).expect("daemon log");
        assert!(
            text.contains("io_uring is not available"),
            "{compress}: the daemon did not read without io_uring:\n{text}"
        );
        let check = common::run(&["check", p(&image)]);
        assert!(check.status.success(), "{}", common::stderr(&check));
    }
}
