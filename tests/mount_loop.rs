//! A loop device over `MOUNTPOINT/disk`, buffered and with `--direct-io=on`:
//! raw data round trips, and ext4 (mkfs, a file tree, fstrim, e2fsck -f, a
//! remount of the image, diff) as a Xen `file:` disk would use it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{create, fuse_available, p, pattern, sh, FsMount, Loop, Mount};

/// Writes a tree of files with known content under `dir`.
fn make_tree(dir: &Path) {
    for d in 0..4u64 {
        let sub = dir.join(format!("dir{d}"));
        std::fs::create_dir_all(sub.join("deeper")).expect("mkdir");
        for f in 0..12u64 {
            let len = ((d * 12 + f) * 37_813) % 700_000 + 1;
            std::fs::write(
                sub.join(format!("f{f}.bin")),
                pattern(len as usize, d * 100 + f),
            )
            .expect("write file");
        }
        std::fs::write(
            sub.join("deeper/text.txt"),
            format!("hello {d}\n").repeat(1000),
        )
        .expect("write text");
    }
}

fn fsck_clean(dev: &str) {
    let out = Command::new("e2fsck")
        .args(["-f", "-n", dev])
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -f found problems: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn allocated(m: &Mount) -> u64 {
    m.status_value("allocated-bytes")
        .and_then(|v| v.parse().ok())
        .expect("allocated-bytes")
}

#[test]
fn raw_data_through_loop_devices() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "32M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    for (direct, seed) in [(false, 1u64), (true, 2)] {
        let lo = Loop::new(&m.disk(), direct);
        let src = tmp.path().join(format!("src{seed}"));
        std::fs::write(&src, pattern(5 << 20, seed)).expect("write src");
        let of = format!("of={}", lo.dev);
        let ifile = format!("if={}", p(&src));
        sh(
            "dd",
            &[
                &ifile,
                &of,
                "bs=1M",
                "seek=3",
                "oflag=direct",
                "conv=fsync",
                "status=none",
            ],
        );
        drop(lo);
        let data = std::fs::read(m.disk()).expect("read disk");
        assert!(
            data[3 << 20..8 << 20] == pattern(5 << 20, seed),
            "loop dio={direct}: mismatch"
        );
    }
    m.umount();
}

#[test]
fn ext4_on_a_direct_io_loop_device_survives_remount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("fs.vbd");
    let mnt = tmp.path().join("mnt");
    let fsdir = tmp.path().join("fs");
    let tree = tmp.path().join("tree");
    make_tree(&tree);
    create(&img, "256M", &[]);
    {
        let m = Mount::new(&img, &mnt, Some("cache=32M"));
        let lo = Loop::new(&m.disk(), true);
        sh("mkfs.ext4", &["-q", "-F", &lo.dev]);
        let fs = FsMount::new(&lo.dev, &fsdir);
        sh("cp", &["-a", p(&tree), p(&fsdir.join("tree"))]);
        // Heavy use: four copies in parallel, then a big file, all into scratch/.
        let copies: Vec<_> = (0..4)
            .map(|i| {
                let dst = fsdir.join("scratch").join(format!("c{i}"));
                std::fs::create_dir_all(&dst).expect("mkdir");
                Command::new("cp")
                    .args(["-a", p(&tree), p(&dst)])
                    .spawn()
                    .expect("spawn cp")
            })
            .collect();
        for mut c in copies {
            assert!(c.wait().expect("wait cp").success(), "cp failed");
        }
        let big = format!("of={}", p(&fsdir.join("scratch/big")));
        sh(
            "dd",
            &["if=/dev/urandom", &big, "bs=1M", "count=24", "status=none"],
        );
        sh("sync", &[]);
        let before = allocated(&m);
        // Deleted files are discarded (loop turns DISCARD into PUNCH_HOLE).
        sh("rm", &["-rf", p(&fsdir.join("scratch"))]);
        sh("sync", &[]); // ext4 frees the blocks when the journal commits
        sh("fstrim", &[p(&fsdir)]);
        let after = allocated(&m);
        assert!(after < before, "fstrim freed nothing: {before} -> {after}");
        fs.umount();
        fsck_clean(&lo.dev);
        drop(lo);
        m.umount();
    }
    assert!(common::is_clean(&img));
    // Remount the image, buffered loop this time, and compare the tree.
    let m = Mount::new(&img, &mnt, None);
    let lo = Loop::new(&m.disk(), false);
    fsck_clean(&lo.dev);
    let fs = FsMount::new(&lo.dev, &fsdir);
    sh("diff", &["-r", p(&tree), p(&fsdir.join("tree"))]);
    fs.umount();
    fsck_clean(&lo.dev);
    drop(lo);
    m.umount();
    let out = common::run(&["check", p(&img)]);
    assert!(
        out.status.success(),
        "check failed: {}",
        common::stdout(&out)
    );
}

#[test]
fn sigterm_under_a_loop_device_detaches_lazily_and_closes_clean() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "16M", &[]);
    let dir = tmp.path().join("mnt");
    let mut m = Mount::new(&img, &dir, None);
    let lo = Loop::new(&m.disk(), true);
    let pid = m.pid.expect("pid");
    sh("kill", &["-TERM", &pid.to_string()]);
    assert!(
        common::wait_for(std::time::Duration::from_secs(5), || !common::is_mounted(
            &dir
        )),
        "SIGTERM did not detach the mount"
    );
    // The loop device keeps working until it is detached.
    let src = tmp.path().join("src");
    std::fs::write(&src, pattern(1 << 20, 9)).expect("write src");
    let (ifile, of) = (format!("if={}", p(&src)), format!("of={}", lo.dev));
    sh(
        "dd",
        &[
            &ifile,
            &of,
            "bs=1M",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
    );
    assert!(
        common::alive(pid),
        "daemon exited while the loop device still used it"
    );
    drop(lo);
    m.wait_daemon_exit();
    assert!(
        common::is_clean(&img),
        "not clean after SIGTERM + loop detach"
    );
    let m = Mount::new(&img, &dir, Some("ro"));
    let data = std::fs::read(m.disk()).expect("read");
    assert!(
        data[..1 << 20] == pattern(1 << 20, 9)[..],
        "loop writes after SIGTERM lost"
    );
    m.umount();
}
