//! Mount lifecycle through a real kernel FUSE mount: readiness, refusals of a
//! second mount and of offline changes (naming the mount point), and clean
//! shutdown by `vbdfs umount`, plain `umount`, SIGTERM and `-f` + SIGINT, and
//! the warning about an image on ext4 mounted with `discard`.

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    create, fuse_available, is_clean, is_mounted, p, pattern, run, stderr, wait_for, FsMount, Loop,
    Mount,
};

/// A new image `a.vbd` of `size` and an empty mount point `mnt` in a fresh
/// directory; None (the test is skipped) without FUSE.
fn image_and_mount_point(
    size: &str,
) -> Option<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
    if !fuse_available() {
        return None;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, size, &[]);
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).expect("mkdir");
    Some((tmp, img, dir))
}

fn write_pattern(m: &Mount, seed: u64) -> Vec<u8> {
    let data = pattern(3 << 20, seed);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .expect("open disk");
    f.write_all_at(&data, 12345).expect("write");
    data
}

fn read_back(img: &std::path::Path, dir: &std::path::Path, len: usize) -> Vec<u8> {
    let m = Mount::new(img, dir, Some("ro"));
    let f = std::fs::File::open(m.disk()).expect("open disk");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 12345).expect("read");
    drop(f);
    m.umount();
    buf
}

#[test]
fn second_mount_and_offline_changes_are_refused_with_the_mount_point() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    let other = tmp.path().join("b.vbd");
    create(&img, "8M", &[]);
    create(&other, "8M", &[]);
    let dir = tmp.path().join("mnt");
    let m = Mount::new(&img, &dir, None);
    let canon_dir = dir.canonicalize().expect("canon");

    let err = Mount::try_new(&img, &tmp.path().join("mnt2"), None).expect_err("second mount");
    assert!(
        err.contains("already mounted") && err.contains(p(&canon_dir)),
        "{err}"
    );
    assert!(!is_mounted(&tmp.path().join("mnt2")));
    // Read-only too: one daemon owns an image (docs/admin.md §2).
    let err = Mount::try_new(&img, &tmp.path().join("mnt2"), Some("ro")).expect_err("ro mount");
    assert!(err.contains("already mounted"), "{err}");
    assert!(!is_mounted(&tmp.path().join("mnt2")));
    // A hard link names the same image.
    let link = tmp.path().join("link.vbd");
    std::fs::hard_link(&img, &link).expect("hard link");
    let err = Mount::try_new(&link, &tmp.path().join("mnt2"), None).expect_err("mount of a link");
    assert!(
        err.contains("already mounted") && err.contains(p(&canon_dir)),
        "{err}"
    );

    let err = Mount::try_new(&other, &dir, None).expect_err("mount over a vbdfs mount");
    assert!(err.contains("already a vbdfs mount point"), "{err}");

    let out = run(&["check", "--repair", p(&img)]);
    assert!(
        !out.status.success(),
        "check --repair on a mounted image succeeded"
    );
    let err = stderr(&out);
    assert!(
        err.contains("is mounted at") && err.contains(p(&canon_dir)),
        "{err}"
    );

    // Read-only inspection of a mounted image is allowed.
    let out = run(&["info", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::stdout(&out).contains(&format!("mounted at: {}", p(&canon_dir))));
    m.umount();
}

/// Lazily unmounts everything stacked on `dir` when dropped.
struct UnmountAll<'a>(&'a std::path::Path);

impl Drop for UnmountAll<'_> {
    fn drop(&mut self) {
        for _ in 0..8 {
            if !is_mounted(self.0) {
                break;
            }
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
}

/// Mounts stacked on `dir`, per /proc/self/mountinfo.
fn mounts_at(dir: &std::path::Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(p(dir)))
        .count()
}

#[test]
fn mounts_started_together_on_one_mount_point_leave_one_mount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).expect("mkdir");
    let dir = dir.canonicalize().expect("canon");
    let _cleanup = UnmountAll(&dir);
    let images: Vec<_> = (0..3)
        .map(|i| {
            let img = tmp.path().join(format!("{i}.vbd"));
            create(&img, "8M", &[]);
            img
        })
        .collect();
    for round in 0..4 {
        let children: Vec<_> = images
            .iter()
            .map(|img| {
                common::vbdfs()
                    .args(["mount", p(img), p(&dir)])
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn vbdfs mount")
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("wait"))
            .collect();
        let ok = outs.iter().filter(|o| o.status.success()).count();
        assert_eq!(ok, 1, "round {round}: {ok} of 3 mounts succeeded");
        assert_eq!(mounts_at(&dir), 1, "round {round}: stacked mounts");
        for out in outs.iter().filter(|o| !o.status.success()) {
            assert!(
                stderr(out).contains("already a vbdfs mount point"),
                "{}",
                stderr(out)
            );
        }
        let out = run(&["umount", p(&dir)]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[test]
fn an_image_inside_its_mount_point_is_refused_without_hanging() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vm");
    std::fs::create_dir(&dir).expect("mkdir");
    let img = dir.join("disk.vbd");
    create(&img, "8M", &[]);
    let _cleanup = UnmountAll(&dir);
    // Given as it is and as a path relative to the mount point, which is
    // the current directory. Stderr goes to a file: a daemon stuck on its
    // own mount would hold a pipe open.
    let log = tmp.path().join("stderr");
    for image in [img.clone(), "disk.vbd".into()] {
        let mut child = common::vbdfs()
            .args(["mount", p(&image), "."])
            .current_dir(&dir)
            .stderr(std::fs::File::create(&log).expect("stderr file"))
            .spawn()
            .expect("spawn vbdfs mount");
        let done = wait_for(Duration::from_secs(20), || {
            child.try_wait().expect("try_wait").is_some()
        });
        if !done {
            let _ = child.kill();
            let _ = Command::new("pkill").args(["-9", "-f", p(&img)]).status();
        }
        assert!(done, "mount of an image inside its mount point hung");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "mounted an image over its own directory");
        let err = std::fs::read_to_string(&log).expect("stderr");
        assert!(err.contains("lies inside the mount point"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert!(!is_mounted(&dir));
}

#[test]
fn a_cache_too_small_or_larger_than_the_host_memory_is_warned_about() {
    let Some((_tmp, img, dir)) = image_and_mount_point("8M") else {
        return;
    };
    let _cleanup = UnmountAll(&dir);
    for (cache, too_large, too_small) in [
        ("64T", true, false),
        ("64M", false, false),
        ("4M", false, true),
    ] {
        let out = run(&["mount", p(&img), p(&dir), "-o", &format!("cache={cache}")]);
        assert!(out.status.success(), "{}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(
            err.contains("is more than this host's memory"),
            too_large,
            "{err}"
        );
        assert_eq!(
            err.contains("leaves no room for cached blocks"),
            too_small,
            "{err}"
        );
        let out = run(&["umount", p(&dir)]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[test]
fn daemon_errors_reach_the_caller() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let junk = tmp.path().join("junk.vbd");
    std::fs::write(&junk, vec![0xa5u8; 1 << 20]).expect("write junk");
    let dir = tmp.path().join("mnt");
    let err = Mount::try_new(&junk, &dir, None).expect_err("mounting junk");
    assert!(
        err.starts_with("vbdfs: ") && err.contains("junk.vbd"),
        "{err}"
    );
    assert!(!is_mounted(&dir));
}

#[test]
fn vbdfs_umount_waits_and_refuses_when_busy() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "16M", &[]);
    let dir = tmp.path().join("mnt");
    let m = Mount::new(&img, &dir, None);
    let data = write_pattern(&m, 1);
    let held = std::fs::File::open(m.disk()).expect("open");
    let out = run(&["umount", p(&dir)]);
    assert!(!out.status.success(), "umount of a busy mount succeeded");
    assert!(stderr(&out).contains("busy"), "{}", stderr(&out));
    assert!(is_mounted(&dir));
    drop(held);
    m.umount(); // asserts the daemon has exited when vbdfs umount returns
    assert!(is_clean(&img), "not clean after vbdfs umount");
    assert_eq!(read_back(&img, &dir, data.len()), data);
}

#[test]
fn plain_umount_leaves_the_image_clean_and_remount_works() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "16M", &[]);
    let dir = tmp.path().join("mnt");
    let mut m = Mount::new(&img, &dir, None);
    let data = write_pattern(&m, 2);
    // Plain umount(8); under a loaded test run something may hold the mount
    // for a moment (EBUSY), as vbdfs umount also allows for: retry briefly.
    let unmounted = common::wait_for(std::time::Duration::from_secs(5), || {
        std::process::Command::new("umount")
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(unmounted, "plain umount kept failing");
    // Mounting again right away waits for the old daemon to finish closing.
    let again = read_back(&img, &dir, data.len());
    m.wait_daemon_exit();
    assert!(is_clean(&img), "not clean after plain umount");
    assert_eq!(again, data);
}

#[test]
fn sigterm_unmounts_and_leaves_the_image_clean() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "16M", &[]);
    let dir = tmp.path().join("mnt");
    let mut m = Mount::new(&img, &dir, None);
    let data = write_pattern(&m, 3);
    let pid = m.pid.expect("daemon pid in status");
    common::sh("kill", &["-TERM", &pid.to_string()]);
    m.wait_daemon_exit();
    assert!(!is_mounted(&dir), "still mounted after SIGTERM");
    assert!(is_clean(&img), "not clean after SIGTERM");
    assert_eq!(read_back(&img, &dir, data.len()), data);
}

#[test]
fn foreground_mount_stops_on_sigint() {
    let Some((_tmp, img, dir)) = image_and_mount_point("16M") else {
        return;
    };
    let child = common::vbdfs()
        .args(["mount", "-f", p(&img), p(&dir)])
        .env_remove("VBDFS_LOG_FILE")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vbdfs mount -f");
    // The guard cleans up if anything below fails.
    let mut guard = Mount {
        dir: dir.clone(),
        image: img.clone(),
        pid: Some(child.id()),
    };
    assert!(
        wait_for(Duration::from_secs(10), || is_mounted(&dir)),
        "-f never mounted"
    );
    let data = write_pattern(&guard, 4);
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "mount -f exited with {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(stderr(&out).contains("closed clean"), "{}", stderr(&out));
    guard.pid = None;
    assert!(!is_mounted(&dir));
    assert!(is_clean(&img));
    assert_eq!(read_back(&img, &dir, data.len()), data);
}

/// Runs `cat FILE` as user nobody; true if it succeeded.
fn nobody_can_read(file: &std::path::Path) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            p(file),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run setpriv (util-linux)")
        .success()
}

#[test]
fn allow_other_and_mode_control_access() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // Let user nobody traverse the temp dir.
    common::sh("chmod", &["755", p(tmp.path())]);
    let img = tmp.path().join("a.vbd");
    create(&img, "1M", &[]);
    let dir = tmp.path().join("mnt");
    let m = Mount::new(&img, &dir, None);
    assert!(
        !nobody_can_read(&m.disk()),
        "other users got in without allow_other"
    );
    m.umount();
    let m = Mount::new(&img, &dir, Some("allow_other,mode=0644"));
    assert!(
        nobody_can_read(&m.disk()),
        "mode=0644 + allow_other: nobody cannot read disk"
    );
    assert!(
        !nobody_can_read(&m.control()),
        "nobody can read the 0600 control file"
    );
    m.umount();
    let m = Mount::new(&img, &dir, Some("allow_other,uid=65534,mode=0400"));
    assert!(
        nobody_can_read(&m.disk()),
        "uid=65534: the owner cannot read disk"
    );
    m.umount();
}

#[test]
fn killed_daemon_leaves_a_dead_mount_that_umount_clears() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "16M", &[]);
    let dir = tmp.path().join("mnt");
    let mut m = Mount::new(&img, &dir, None);
    let data = pattern(3 << 20, 5);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .expect("open disk");
    f.write_all_at(&data, 12345).expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    let pid = m.pid.expect("pid");
    common::sh("kill", &["-KILL", &pid.to_string()]);
    m.wait_daemon_exit();
    let err = Mount::try_new(&img, &dir, None).expect_err("mount on a dead mount");
    assert!(err.contains("dead mount"), "{err}");
    let info = common::stdout(&run(&["info", p(&img)]));
    assert!(
        info.contains("state: dirty (its mount's daemon is gone"),
        "{info}"
    );
    assert!(info.contains("(a dead mount: run `vbdfs umount"), "{info}");
    // Cleaned up: exit 0 (scripts go on to mount again), with a warning.
    let out = run(&["umount", p(&dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
    assert!(!is_mounted(&dir), "dead mount still there");
    assert!(
        !is_clean(&img),
        "a killed daemon cannot have closed the image"
    );
    // A read-write mount recovers; the fsync'd data is there.
    Mount::new(&img, &dir, None).umount();
    assert!(is_clean(&img));
    assert_eq!(read_back(&img, &dir, data.len()), data);
}

/// An image on ext4 mounted with `discard` gets one warning line from a
/// successful `vbdfs mount` (every hole it punches is discarded while its
/// writes wait); mounted `ro`, or on the same file system mounted
/// `nodiscard`, the mount says nothing.
#[test]
fn mount_warns_when_the_image_is_on_ext4_with_online_discard() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let lo = Loop::with_ext4(&tmp.path().join("host.img"), 64 << 20);
    let host_dir = tmp.path().join("host");
    let dir = tmp.path().join("mnt");
    for (options, mount_opts, warns) in [
        ("discard", "cache=16M", true),
        ("discard", "ro", false),
        ("nodiscard", "cache=16M", false),
    ] {
        let host = FsMount::with_options(&lo.dev, &host_dir, options);
        let img = host.dir.join("a.vbd");
        if !img.exists() {
            create(&img, "8M", &[]);
        }
        std::fs::create_dir_all(&dir).expect("mkdir");
        let out = run(&["mount", p(&img), p(&dir), "-o", mount_opts]);
        assert!(out.status.success(), "{}", stderr(&out));
        let m = Mount::adopt(&img, &dir);
        let err = stderr(&out);
        if warns {
            // A mount that fails says only why.
            let bogus = host.dir.join("bogus.vbd");
            std::fs::write(&bogus, b"vbd").expect("write");
            let dir2 = tmp.path().join("mnt2");
            std::fs::create_dir_all(&dir2).expect("mkdir");
            let out = run(&["mount", p(&bogus), p(&dir2)]);
            assert!(!out.status.success());
            let failed = stderr(&out);
            assert!(
                failed.lines().count() == 1 && failed.contains("too short"),
                "{failed}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains("warning") && err.contains("`discard`") && err.contains(p(&host_dir)),
                "{err}"
            );
        } else {
            assert_eq!(err, "", "{options}, -o {mount_opts}");
        }
        m.umount();
        host.umount();
    }
}

/// The daemon closes what its caller passed down: a script that mounts
/// under `flock` must not find its lock held for the life of the mount
/// (the next `flock` of it waited forever).
#[test]
fn the_daemon_keeps_nothing_its_caller_passed_down() {
    let Some((tmp, img, dir)) = image_and_mount_point("8M") else {
        return;
    };
    let lockf = tmp.path().join("lockf");
    let out = Command::new("flock")
        .arg(&lockf)
        .arg(env!("CARGO_BIN_EXE_vbdfs"))
        .args(["mount", p(&img), p(&dir)])
        .output()
        .expect("flock vbdfs mount");
    assert!(out.status.success(), "{out:?}");
    let m = Mount::adopt(&img, &dir);
    let free = Command::new("flock")
        .args(["-n", p(&lockf), "true"])
        .status()
        .expect("flock -n");
    assert!(free.success(), "the daemon holds its caller's flock");
    m.umount();
}

/// `vbdfs umount` of an image moved or deleted while mounted succeeds, waits
/// for the daemon, and checks the image where it is now (it used to fail
/// "open: No such file" on the old path).
#[test]
fn umount_follows_an_image_moved_or_deleted_while_mounted() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    let moved = tmp.path().join("moved.vbd");
    create(&img, "16M", &[]);
    let dir = tmp.path().join("mnt");
    let mut m = Mount::new(&img, &dir, None);
    std::fs::rename(&img, &moved).expect("rename");
    write_pattern(&m, 1);
    let out = run(&["umount", p(&dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    m.wait_daemon_exit();
    drop(m);
    assert!(is_clean(&moved), "the moved image was not closed clean");

    let mut m = Mount::new(&moved, &dir, None);
    std::fs::remove_file(&moved).expect("rm");
    write_pattern(&m, 2);
    let out = run(&["umount", p(&dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("deleted while mounted"),
        "{}",
        stderr(&out)
    );
    assert!(!is_mounted(&dir));
    m.wait_daemon_exit();
}

/// An image on a file system without `fallocate` (ext2; NFSv3 is the same):
/// the log grows by its writes instead of being preallocated. It used to
/// refuse every read-write open ("allocate the log …: Operation not
/// supported").
#[test]
fn an_image_on_a_file_system_without_fallocate_works() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let lo = Loop::with_fs(&tmp.path().join("fs.img"), 128 << 20, "mkfs.ext2");
    let fs = FsMount::new(&lo.dev, &tmp.path().join("fs"));
    let img = fs.dir.join("a.vbd");
    create(&img, "64M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    write_pattern(&m, 1);
    let want = write_pattern(&m, 2);
    m.umount();
    let out = run(&["check", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_back(&img, &tmp.path().join("mnt"), want.len());
    assert!(got == want, "data differs after remount");
    fs.umount();
}

/// A `VBDFS_LOG_FILE` that cannot be opened fails the mount in one line
/// (the daemon's messages used to be dropped without a word).
#[test]
fn an_unusable_log_file_fails_the_mount() {
    let Some((tmp, img, dir)) = image_and_mount_point("8M") else {
        return;
    };
    let out = common::vbdfs()
        .env("VBDFS_LOG_FILE", tmp.path().join("missing/dir/log"))
        .args(["mount", p(&img), p(&dir)])
        .output()
        .expect("run vbdfs mount");
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("VBDFS_LOG_FILE="),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!is_mounted(&dir));
}

/// Without `/dev/log` (a container, this machine) a daemonized mount's
/// warnings reach the kernel's log (they used to be dropped), each at once
/// and whole; its news (info) stays out of that shared log.
#[test]
fn without_syslog_the_daemons_warnings_go_to_the_kernel_log() {
    let no_syslog = !std::path::Path::new("/dev/log").exists()
        && std::env::var_os("VBDFS_LOG_FILE").is_none()
        && std::env::var_os("VBDFS_LOG").is_none();
    if !no_syslog || Command::new("dmesg").output().is_err() {
        return;
    }
    let Some((_tmp, img, dir)) = image_and_mount_point("8M") else {
        return;
    };
    let m = Mount::new(&img, &dir, Some("cache=2M"));
    let pid = m.status_value("pid").expect("pid in control");
    let ours = |log: &str| -> Vec<String> {
        let tag = format!("vbdfs[{pid}]: ");
        log.lines()
            .filter_map(|l| Some(l.split_once(&tag)?.1.to_string()))
            .collect()
    };
    let mut lines = Vec::new();
    let seen = wait_for(Duration::from_secs(5), || {
        lines = ours(&common::sh("dmesg", &[]));
        lines
            .iter()
            .any(|l| l.starts_with("cache= of 2 MiB leaves no room"))
    });
    m.umount();
    assert!(
        seen,
        "the daemon's warning is in the kernel's log: {lines:?}"
    );
    let closed = ours(&common::sh("dmesg", &[]));
    assert!(
        !closed
            .iter()
            .any(|l| l.starts_with("mounted ") || l.contains("closed clean")),
        "info messages stay out of the kernel's log: {closed:?}"
    );
}
