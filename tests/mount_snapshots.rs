//! Snapshots through a real mount: `echo snapshot NAME > control`, the
//! read-only `snapshots/NAME` files (O_DIRECT and buffered, while `disk`
//! keeps changing), errno of failing commands, pins, persistence across a
//! remount, offline commands refused while mounted, clones mounted, and the
//! creation time under a writer.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{create, fuse_available, p, pattern, run, stderr, Aligned, Mount};

const MIB: usize = 1 << 20;

/// `bash -c 'echo CMD > CONTROL'`: (success, stderr).
fn echo_to(control: &Path, cmd: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("echo '{cmd}' > '{}'", p(control)))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn command(m: &Mount, cmd: &str) {
    let (ok, err) = echo_to(&m.control(), cmd);
    assert!(ok, "{cmd}: {err}");
}

fn write_direct(path: &Path, data: &[u8], off: u64) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = Aligned::new(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    f.write_all_at(buf.as_slice(), off).unwrap();
    f.sync_all().unwrap();
}

fn read_direct(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = Aligned::new(len);
    f.read_exact_at(buf.as_mut_slice(), off).unwrap();
    buf.as_slice().to_vec()
}

fn read_buffered(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn snapshot_files_hold_the_disk_at_snapshot_time() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("a.vbd");
    create(&img, "64M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=16M"));
    let a = pattern(8 * MIB, 1);
    write_direct(&m.disk(), &a, 0);
    command(&m, "snapshot s1");
    let snap = m.dir.join("snapshots/s1");
    let names: Vec<String> = std::fs::read_dir(m.dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["s1"]);
    assert_eq!(std::fs::metadata(&snap).unwrap().len(), 64 << 20);
    assert_eq!(m.status_value("snapshots").as_deref(), Some("s1"));

    // A writer keeps changing the disk while the snapshot is read.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (disk, stop) = (m.disk(), stop.clone());
        std::thread::spawn(move || {
            let b = pattern(MIB, 2);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                write_direct(&disk, &b, (i % 12) * MIB as u64);
                i += 1;
            }
            i
        })
    };
    for _ in 0..3 {
        assert!(read_direct(&snap, 0, 8 * MIB) == a, "O_DIRECT read differs");
        assert!(
            read_buffered(&snap, 0, 8 * MIB) == a,
            "buffered read differs"
        );
        assert_eq!(read_buffered(&snap, 8 << 20, 4096), vec![0; 4096]);
        assert_eq!(read_buffered(&snap, 100_003, 777), a[100_003..100_780]);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    assert_eq!(read_direct(&m.disk(), 0, MIB), pattern(MIB, 2));

    // Read-only: writes, truncate and fallocate fail.
    let e = OpenOptions::new().write(true).open(&snap).unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS, "{e}");
    let out = Command::new("truncate")
        .args(["-s", "0", p(&snap)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new("fallocate")
        .args(["-p", "-o", "0", "-l", "4096", p(&snap)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(read_buffered(&snap, 0, 4096), a[..4096]);

    // Errors through echo.
    for (cmd, text) in [
        ("snapshot s1", "File exists"),
        ("delete-snapshot nope", "No such file or directory"),
        ("snapshot bad/name", "Invalid argument"),
        ("snapshot -x", "Invalid argument"),
    ] {
        let (ok, err) = echo_to(&m.control(), cmd);
        assert!(!ok && err.contains(text), "{cmd}: {err}");
    }
    // An open snapshot file pins the snapshot.
    let held = File::open(&snap).unwrap();
    let (ok, err) = echo_to(&m.control(), "delete-snapshot s1");
    assert!(!ok && err.contains("busy"), "{err}");
    drop(held);
    command(&m, "snapshot s2");
    command(&m, "delete-snapshot s1");
    assert!(!snap.exists());
    assert_eq!(m.status_value("snapshots").as_deref(), Some("s2"));
    m.umount();

    // Persistence across a remount.
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let s2 = m.dir.join("snapshots/s2");
    let mut want = a.clone();
    let head = read_buffered(&s2, 0, 8 * MIB);
    for i in 0..8 {
        if head[i * MIB..(i + 1) * MIB] != a[i * MIB..(i + 1) * MIB] {
            want[i * MIB..(i + 1) * MIB].copy_from_slice(&pattern(MIB, 2));
        }
    }
    assert!(head == want, "snapshot s2 changed across the remount");
    m.umount();
    let out = run(&["check", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn offline_commands_refused_while_mounted_clones_work() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("base.vbd");
    create(&img, "16M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let a = pattern(2 * MIB, 3);
    write_direct(&m.disk(), &a, 0);
    command(&m, "snapshot gold");
    // The control file takes snapshots and deletes them; a rollback needs
    // the image unmounted.
    for (args, online) in [
        (vec!["snapshot", "create", p(&img), "x"], true),
        (vec!["snapshot", "delete", p(&img), "gold"], true),
        (vec!["snapshot", "rollback", p(&img), "gold"], false),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("mounted at") && err.contains("unmount it first"),
            "{err}"
        );
        assert_eq!(err.contains("/control"), online, "{err}");
    }
    let out = run(&["snapshot", "list", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("gold"));

    // Clones of a mounted base: snapshot and hold go through its control file.
    let clone = tmp.path().join("vm.vbd");
    let out = run(&["clone", &format!("{}@gold", p(&img)), p(&clone)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (ok, err) = echo_to(&m.control(), "delete-snapshot gold");
    assert!(!ok && err.contains("busy"), "{err}");
    let vm2 = tmp.path().join("vm2.vbd");
    let out = run(&["create", p(&vm2), "--backing", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names = m.status_value("snapshots").unwrap();
    assert!(names.starts_with("gold clone-base-"), "{names}");
    // A clone that cannot be made leaves the base as it was: no snapshot.
    for bad in [
        vec!["create", "vm3.vbd", "--backing", p(&img), "--size", "1"],
        vec!["create", "nodir/vm3.vbd", "--backing", p(&img)],
    ] {
        let out = common::vbdfs()
            .args(&bad)
            .current_dir(tmp.path())
            .output()
            .expect("run vbdfs");
        assert!(!out.status.success(), "{bad:?} succeeded");
        assert_eq!(m.status_value("snapshots").unwrap(), names, "{bad:?}");
    }
    let out = run(&[
        "clone",
        &format!("{}@nope", p(&img)),
        p(&tmp.path().join("x.vbd")),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no snapshot named 'nope'"), "{err}");
    assert!(!tmp.path().join("x.vbd").exists());
    m.umount();

    // The clone, mounted: reads the base snapshot, writes stay in the clone.
    let base_mount = Mount::new(&img, &tmp.path().join("mnt"), None);
    write_direct(&base_mount.disk(), &pattern(MIB, 9), 0);
    let cm = Mount::new(&clone, &tmp.path().join("cmnt"), None);
    assert!(read_direct(&cm.disk(), 0, 2 * MIB) == a);
    write_direct(&cm.disk(), &pattern(MIB, 4), MIB as u64);
    assert!(read_direct(&cm.disk(), MIB as u64, MIB) == pattern(MIB, 4));
    let (ok, err) = echo_to(&base_mount.control(), "delete-snapshot gold");
    assert!(!ok && err.contains("busy"), "{err}");
    assert!(read_direct(&base_mount.disk(), MIB as u64, MIB) == a[MIB..]);
    cm.umount();
    base_mount.umount();
    let info = run(&["info", p(&clone)]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("@gold"));

    // A base mounted read-only cannot take a clone's hold: said so.
    let ro = Mount::new(&img, &tmp.path().join("mnt"), Some("ro"));
    let out = run(&[
        "clone",
        &format!("{}@gold", p(&img)),
        p(&tmp.path().join("r.vbd")),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("mounted read-only") && err.contains("unmount it first"),
        "{err}"
    );
    assert!(!tmp.path().join("r.vbd").exists());
    ro.umount();
}

#[test]
fn losetup_read_only_over_a_snapshot() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("a.vbd");
    create(&img, "32M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let a = pattern(4 * MIB, 5);
    write_direct(&m.disk(), &a, 0);
    command(&m, "snapshot ro");
    write_direct(&m.disk(), &pattern(4 * MIB, 6), 0);
    let snap = m.dir.join("snapshots/ro");
    let dev = common::sh("losetup", &["-f", "--show", "-r", p(&snap)]);
    let lo = common::Loop {
        dev: dev.trim().to_string(),
    };
    let got = read_buffered(Path::new(&lo.dev), 0, 4 * MIB);
    assert!(got == a, "loop device over the snapshot differs");
    let written = OpenOptions::new()
        .write(true)
        .open(&lo.dev)
        .and_then(|f| f.write_all_at(&[1; 4096], 0).and_then(|()| f.sync_all()));
    assert!(
        written.is_err(),
        "a write to the read-only loop device succeeded"
    );
    let (ok, err) = echo_to(&m.control(), "delete-snapshot ro");
    assert!(!ok && err.contains("busy"), "{err}");
    drop(lo);
    // losetup -d is asynchronous: wait until the loop lets go.
    assert!(common::wait_for(Duration::from_secs(10), || {
        echo_to(&m.control(), "delete-snapshot ro").0
    }));
    m.umount();
}

#[test]
fn snapshot_time_under_a_writer_through_the_mount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("t.vbd");
    create(&img, "2G", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=64M"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (disk, stop) = (m.disk(), stop.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&disk)
                .unwrap();
            let mut buf = Aligned::new(MIB);
            buf.as_mut_slice().copy_from_slice(&pattern(MIB, 8));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(buf.as_slice(), (i % 1024) * MIB as u64)
                    .unwrap();
                i += 1;
            }
            i
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::new();
    for n in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let mut f = OpenOptions::new().write(true).open(m.control()).unwrap();
        std::io::Write::write_all(&mut f, format!("snapshot t{n}\n").as_bytes()).unwrap();
        times.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    times.sort();
    eprintln!(
        "snapshot via control under a writer ({written} MiB written): min {:?}, median {:?}, max {:?}",
        times[0], times[5], times[9]
    );
    assert!(times[9] < Duration::from_secs(1), "{times:?}");
    assert_eq!(
        std::fs::read_dir(m.dir.join("snapshots")).unwrap().count(),
        10
    );
    m.umount();
}

/// ext4 on a loop device over `disk`, a writer creating files, a snapshot
/// taken mid-write: a copy of the snapshot passes e2fsck after journal replay.
#[test]
fn ext4_snapshot_mid_write_passes_e2fsck() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.vbd");
    create(&img, "256M", &[]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=32M"));
    let lo = common::Loop::new(&m.disk(), true);
    common::sh("mkfs.ext4", &["-q", "-F", &lo.dev]);
    let fs = common::FsMount::new(&lo.dev, &tmp.path().join("fs"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (fs.dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sub = dir.join(format!("d{}", n % 7));
                std::fs::create_dir_all(&sub).unwrap();
                std::fs::write(
                    sub.join(format!("f{n}")),
                    pattern(50_000 + (n as usize * 7919) % 300_000, n),
                )
                .unwrap();
                if n.is_multiple_of(10) {
                    File::open(sub.join(format!("f{n}")))
                        .and_then(|f| f.sync_all())
                        .unwrap();
                }
                // Keep 64 files live: a fast machine would otherwise fill
                // the 256 MiB filesystem before the snapshot is taken.
                if let Some(old) = n.checked_sub(64) {
                    let old_dir = dir.join(format!("d{}", old % 7));
                    std::fs::remove_file(old_dir.join(format!("f{old}"))).unwrap();
                }
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(2500));
    command(&m, "snapshot mid");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let files = writer.join().unwrap();
    fs.umount();
    drop(lo);
    let copy = tmp.path().join("mid.img");
    std::fs::copy(m.dir.join("snapshots/mid"), &copy).unwrap();
    m.umount();
    let replay = Command::new("e2fsck")
        .args(["-f", "-y", p(&copy)])
        .output()
        .unwrap();
    let code = replay.status.code().unwrap_or(8);
    assert!(
        code <= 1,
        "e2fsck -fy returned {code}: {}",
        String::from_utf8_lossy(&replay.stdout)
    );
    let clean = Command::new("e2fsck")
        .args(["-f", "-n", p(&copy)])
        .output()
        .unwrap();
    assert!(
        clean.status.success(),
        "e2fsck -fn after replay: {}",
        String::from_utf8_lossy(&clean.stdout)
    );
    let summary = String::from_utf8_lossy(&clean.stdout).into_owned();
    let used: u64 = summary
        .split_whitespace()
        .find_map(|w| w.split_once("/65536").and_then(|(n, _)| n.parse().ok()))
        .unwrap_or(0);
    assert!(used > 50, "the snapshot holds almost no files: {summary}");
    eprintln!(
        "{files} files written; snapshot fsck: {}",
        String::from_utf8_lossy(&replay.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
}

#[test]
fn hundreds_of_snapshot_files() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("h.vbd");
    create(&img, "64M", &["--block-size", "4K"]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    let disk = OpenOptions::new().write(true).open(m.disk()).unwrap();
    let mut control = OpenOptions::new().write(true).open(m.control()).unwrap();
    for i in 0..300u64 {
        disk.write_all_at(&i.to_le_bytes(), i * 4096).unwrap();
        std::io::Write::write_all(&mut control, format!("snapshot n{i:03}").as_bytes()).unwrap();
    }
    drop((disk, control));
    let count = std::fs::read_dir(m.dir.join("snapshots")).unwrap().count();
    assert_eq!(count, 300);
    for i in [0u64, 150, 299] {
        let snap = m.dir.join(format!("snapshots/n{i:03}"));
        let got = read_buffered(&snap, 0, 300 * 4096);
        for j in 0..300u64 {
            let want = if j <= i { j } else { 0 };
            let at = (j * 4096) as usize;
            assert_eq!(got[at..at + 8], want.to_le_bytes(), "n{i:03} block {j}");
        }
    }
    m.umount();
}

/// `vbdfs check` of a mounted image reads its last durable state while the
/// daemon goes on: overwrites, snapshots taken and deleted, each a
/// checkpoint after which the records that died are punched. What a check
/// finds bad is checked again in a newer state, so a healthy image is never
/// reported damaged (before, about half of such checks failed).
#[test]
fn check_of_a_mounted_image_under_churn_finds_nothing() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "32M", &["--block-size", "4K", "--compress", "none"]);
    let m = Mount::new(&img, &tmp.path().join("mnt"), Some("cache=8M"));
    let disk = OpenOptions::new()
        .write(true)
        .open(m.disk())
        .expect("open disk");
    disk.write_all_at(&pattern(32 << 20, 1), 0).expect("fill");
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, control) = (stop.clone(), m.control());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let off = (n * 7919 % 512) * 65536;
                disk.write_all_at(&pattern(65536, n), off).expect("write");
                if n.is_multiple_of(100) {
                    // Compaction punches what the check's older state replays.
                    let (ok, err) = echo_to(&control, "compact");
                    assert!(ok, "{err}");
                }
                if n.is_multiple_of(200) {
                    let (ok, err) = echo_to(&control, &format!("snapshot s{n}"));
                    assert!(ok, "{err}");
                    if n > 400 {
                        let (ok, err) = echo_to(&control, &format!("delete-snapshot s{}", n - 400));
                        assert!(ok, "{err}");
                    }
                }
            }
        })
    };
    let start = Instant::now();
    let mut checks = 0;
    while start.elapsed() < Duration::from_secs(8) {
        let out = run(&["check", p(&img)]);
        checks += 1;
        assert!(
            out.status.success(),
            "check {checks} of the mounted image failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().expect("churn thread");
    m.umount();
    let out = run(&["check", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
}
