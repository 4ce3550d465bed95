//! Reliability through the real mount: kill -9 of the daemon under a writer
//! that fsyncs, repeated; and a host file system that runs out of space.
//!
//! `VBDFS_KILL_CYCLES=N` runs N kill cycles (default 4).
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::{create, fuse_available, is_mounted, p, run, Aligned, Mount};
use std::collections::HashSet;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SLOT: usize = 4096;
const SLOTS: u64 = 2048;

/// A 4 KiB block tagged with (id, slot) in every 16-byte unit: a torn or
/// misplaced block cannot pass for a whole one.
fn tagged(id: u64, slot: u64) -> Vec<u8> {
    let mut unit = [0u8; 16];
    unit[..8].copy_from_slice(&id.to_le_bytes());
    unit[8..].copy_from_slice(&slot.to_le_bytes());
    unit.iter().copied().cycle().take(SLOT).collect()
}

/// The id a block holds (0 = never written), or an error if it is not a
/// whole tagged block of this slot.
fn id_of(block: &[u8], slot: u64) -> Result<u64, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let first = &block[..16];
    if block.chunks(16).any(|u| u != first) {
        return Err(format!("slot {slot}: block is a mix of writes"));
    }
    let id = u64::from_le_bytes(first[..8].try_into().unwrap());
    let owner = u64::from_le_bytes(first[8..].try_into().unwrap());
    if owner != slot {
        return Err(format!("slot {slot}: holds the block of slot {owner}"));
    }
    Ok(id)
}

/// Per slot: the values it may hold after a crash (the last fsync-acknowledged
/// one and everything written after it).
struct Model {
    allowed: Vec<HashSet<u64>>,
    pending: Vec<(u64, u64)>,
}

impl Model {
    fn new() -> Self {
        Model {
            allowed: (0..SLOTS).map(|_| HashSet::from([0])).collect(),
            pending: Vec::new(),
        }
    }
    fn wrote(&mut self, slot: u64, id: u64) {
        self.allowed[slot as usize].insert(id);
        self.pending.push((slot, id));
    }
    fn acked(&mut self) {
        for (slot, id) in self.pending.drain(..) {
            self.allowed[slot as usize] = HashSet::from([id]);
        }
    }
}

fn writer(
    disk: &Path,
    model: &Mutex<Model>,
    cycle: u64,
    stop: &AtomicBool,
    acks: &std::sync::mpsc::Sender<()>,
) {
    let Ok(f) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(disk)
    else {
        return;
    };
    let mut buf = Aligned::new(SLOT);
    let mut x = cycle.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for seq in 1u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let slot = x % SLOTS;
        let id = (cycle << 32) | seq;
        buf.as_mut_slice().copy_from_slice(&tagged(id, slot));
        // Recorded before the write: a write that fails may still have landed.
        model.lock().unwrap().wrote(slot, id);
        if let Err(e) = f.write_all_at(buf.as_slice(), slot * SLOT as u64) {
            eprintln!("cycle {cycle}: writer stopped after {seq} writes: {e}");
            return;
        }
        if seq % 16 == 0 {
            if f.sync_data().is_err() {
                return;
            }
            model.lock().unwrap().acked();
            let _ = acks.send(());
        }
    }
}

fn verify(disk: &Path, model: &Mutex<Model>, what: &str) {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(disk)
        .unwrap();
    let mut buf = Aligned::new(SLOT);
    let mut m = model.lock().unwrap();
    for slot in 0..SLOTS {
        f.read_exact_at(buf.as_mut_slice(), slot * SLOT as u64)
            .unwrap();
        let id = id_of(buf.as_slice(), slot).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            m.allowed[slot as usize].contains(&id),
            "{what}: slot {slot} holds {id:#x}, not its last acknowledged or a later value"
        );
        // What survived is the new baseline.
        m.allowed[slot as usize] = HashSet::from([id]);
    }
    m.pending.clear();
}

#[test]
fn kill_9_under_fsyncing_writer_loses_nothing_acknowledged() {
    if !fuse_available() {
        return;
    }
    let cycles: u64 = std::env::var("VBDFS_KILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("k.vbd");
    // A slow codec makes write-back lag behind the writer, so an fsync that
    // returned before its data reached the file would be caught by the kill.
    create(&img, "64M", &["--compress", "zstd:19"]);
    let dir = tmp.path().join("mnt");
    let model = Arc::new(Mutex::new(Model::new()));
    for cycle in 1..=cycles {
        let mut m = Mount::new(&img, &dir, Some("cache=16M"));
        verify(&m.disk(), &model, &format!("cycle {cycle}, after remount"));
        let stop = Arc::new(AtomicBool::new(false));
        let (disk, model2, stop2) = (m.disk(), model.clone(), stop.clone());
        let (tx, acks) = std::sync::mpsc::channel();
        let w = std::thread::spawn(move || writer(&disk, &model2, cycle, &stop2, &tx));
        if cycle % 2 == 1 {
            // Kill right after an fsync returned: whatever that fsync
            // acknowledged must already be in the image file.
            for _ in 0..(5 + cycle * 7 % 20) {
                let _ = acks.recv_timeout(Duration::from_secs(10));
            }
        } else {
            std::thread::sleep(Duration::from_millis(150 + 137 * cycle % 400));
            // Snapshots and checkpoints in flight at the kill, too.
            let _ = std::fs::write(m.control(), format!("snapshot c{cycle}"));
        }
        let pid = m.pid.take().expect("daemon pid");
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        m.pid = Some(pid);
        m.wait_daemon_exit();
        let out = run(&["umount", p(&dir)]);
        assert!(!is_mounted(&dir), "dead mount not cleared: {out:?}");
    }
    let m = Mount::new(&img, &dir, Some("cache=16M"));
    verify(&m.disk(), &model, "final remount");
    m.umount();
    let out = run(&["check", p(&img)]);
    assert!(out.status.success(), "check after kill cycles: {out:?}");
}

/// A write through a file opened `O_DSYNC` or `O_SYNC` is durable when it
/// returns: the kernel sends no fsync after a write to a direct-I/O file,
/// only the flag, so the daemon must sync before it replies. A slow codec
/// keeps write-back behind, and 4 KiB pieces wait in write-behind: without
/// the sync the kill right after the last write loses them.
#[test]
fn o_dsync_and_o_sync_writes_survive_kill_9() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.vbd");
    create(&img, "64M", &["--compress", "zstd:19"]);
    let dir = tmp.path().join("mnt");
    let mut m = Mount::new(&img, &dir, Some("cache=64M"));
    let mut expected = Vec::new();
    for (n, (flag, piece)) in [
        (libc::O_DSYNC, 64 << 10),
        (libc::O_SYNC, 64 << 10),
        (libc::O_DSYNC, 4 << 10),
        (libc::O_SYNC | libc::O_DIRECT, 4 << 10),
    ]
    .into_iter()
    .enumerate()
    {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(flag)
            .open(m.disk())
            .unwrap();
        let start = n as u64 * (4 << 20);
        let data = common::pattern(2 << 20, n as u64 + 1);
        let mut buf = Aligned::new(piece);
        for (i, chunk) in data.chunks(piece).enumerate() {
            buf.as_mut_slice().copy_from_slice(chunk);
            f.write_all_at(buf.as_slice(), start + (i * piece) as u64)
                .unwrap();
        }
        expected.push((start, data));
    }
    let pid = m.pid.take().expect("daemon pid");
    common::sh("kill", &["-9", &pid.to_string()]);
    m.pid = Some(pid);
    m.wait_daemon_exit();
    let _ = run(&["umount", p(&dir)]);
    let m = Mount::new(&img, &dir, Some("cache=16M"));
    let disk = std::fs::File::open(m.disk()).unwrap();
    for (n, (start, data)) in expected.iter().enumerate() {
        let mut back = vec![0u8; data.len()];
        disk.read_exact_at(&mut back, *start).unwrap();
        let bad = back
            .chunks(4096)
            .zip(data.chunks(4096))
            .position(|(a, b)| a != b);
        assert_eq!(bad, None, "writer {n}: 4 KiB piece lost after kill -9");
    }
    drop(disk);
    m.umount();
}

/// A tmpfs of `mb` MiB mounted at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);
impl Tmpfs {
    fn new(dir: &Path, mb: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}M"), "tmpfs", p(dir)])
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_host_disk_fails_writes_keeps_acknowledged_data_and_resumes() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fs = tmp.path().join("small");
    let _tmpfs = Tmpfs::new(&fs, 48);
    let img = fs.join("full.vbd");
    create(&img, "1G", &["--compress", "none"]);
    let filler = fs.join("filler");
    std::fs::write(&filler, vec![1u8; 16 << 20]).unwrap();
    let dir = tmp.path().join("mnt");
    let mut m = Mount::new(&img, &dir, Some("cache=8M"));
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.disk())
        .unwrap();
    let mut buf = Aligned::new(1 << 20);
    // MiBs written (write() returned) and acknowledged by an fsync, which
    // comes after every fourth.
    let (mut written, mut acked) = (0u64, 0u64);
    let mut failed = None;
    for i in 0..200u64 {
        buf.as_mut_slice()
            .copy_from_slice(&common::pattern(1 << 20, i + 1));
        if let Err(e) = f.write_all_at(buf.as_slice(), i << 20) {
            failed = Some(e);
            break;
        }
        written = i + 1;
        if written % 4 != 0 {
            continue;
        }
        match f.sync_data() {
            Ok(()) => acked = written,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    // ENOSPC, as from a raw file on that disk (QEMU pauses the guest on it
    // by default; EIO reaches the guest as a disk error), every time after.
    let err = failed.expect("48 MiB of host space must run out");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let again = f
        .sync_data()
        .expect_err("fsync succeeded after a failed write-back");
    assert_eq!(again.raw_os_error(), Some(libc::ENOSPC), "{again}");
    let again = f
        .write_all_at(buf.as_slice(), 0)
        .expect_err("write after failure");
    assert_eq!(again.raw_os_error(), Some(libc::ENOSPC), "{again}");
    assert!(acked > 4, "only {acked} MiB acknowledged before ENOSPC");
    // The failed mount still reads what write() took, or fails the read:
    // never older data (twice over 8M of cache: nothing is served from it
    // that it let go).
    let r = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.disk())
        .unwrap();
    for _ in 0..2 {
        for i in 0..written {
            match r.read_exact_at(buf.as_mut_slice(), i << 20) {
                Ok(()) => assert!(
                    buf.as_slice() == common::pattern(1 << 20, i + 1),
                    "MiB {i} (of {written} written) reads other data"
                ),
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
            }
        }
    }
    drop(r);
    // Free space: the mount goes on, as a raw file would (a guest paused on
    // ENOSPC resumes): the next write or fsync resumes the image. Nothing
    // write() took is lost: an fsync now makes all of it durable.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // one try a second
    buf.as_mut_slice()
        .copy_from_slice(&common::pattern(1 << 20, 999));
    f.write_all_at(buf.as_slice(), 100 << 20)
        .expect("write after space was freed");
    f.sync_data().expect("fsync after space was freed");
    assert_eq!(m.status_value("state").as_deref(), Some("mounted"));
    drop(f);
    // kill -9: every MiB write() took, and the one after, survive.
    let pid = m.pid.expect("pid");
    common::sh("kill", &["-KILL", &pid.to_string()]);
    m.wait_daemon_exit();
    let _ = run(&["umount", p(&dir)]);
    drop(m);
    let m = Mount::new(&img, &dir, Some("cache=8M"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.disk())
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    for i in 0..written {
        f.read_exact_at(&mut got, i << 20).unwrap();
        assert!(
            got == common::pattern(1 << 20, i + 1),
            "MiB {i} lost (of {written} written, {acked} acknowledged before the disk filled)"
        );
    }
    f.read_exact_at(&mut got, 100 << 20).unwrap();
    assert!(
        got == common::pattern(1 << 20, 999),
        "the write after resuming lost"
    );
    f.write_all_at(&[7u8; 4096], 0).unwrap();
    f.sync_data().unwrap();
    drop(f);
    m.umount();
    let out = run(&["check", p(&img)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A file-size limit on the daemon (`ulimit -f`, systemd `LimitFSIZE=`):
/// once the log reaches it, writes fail (EIO) and the image is failed, as on
/// a full disk; the daemon used to die of SIGXFSZ, leaving a dead mount.
#[test]
fn a_file_size_limit_fails_writes_without_killing_the_daemon() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("limited.vbd");
    create(&img, "32M", &["--compress", "none"]);
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    // 96 MiB (ulimit -f counts 1 KiB blocks).
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 98304 && exec {} mount {} {} -o cache=8M",
            env!("CARGO_BIN_EXE_vbdfs"),
            p(&img),
            p(&dir)
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut m = Mount::adopt(&img, &dir);
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.disk())
        .unwrap();
    let mut buf = Aligned::new(1 << 20);
    let mut failed = None;
    for i in 0..512u64 {
        buf.as_mut_slice()
            .copy_from_slice(&common::pattern(1 << 20, i + 1));
        let done = f
            .write_all_at(buf.as_slice(), (i % 32) << 20)
            .and_then(|()| f.sync_data());
        if let Err(e) = done {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("the log must reach 96 MiB");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The daemon is alive and says why.
    assert_eq!(m.status_value("state").as_deref(), Some("failed"));
    let last = m.status_value("last-error").unwrap_or_default();
    assert!(last.contains("File too large"), "{last}");
    drop(f);
    let out = run(&["umount", p(&dir)]);
    assert!(!is_mounted(&dir), "{out:?}");
    m.wait_daemon_exit();
    let out = run(&["check", p(&img)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `vbdfs create` on a host file system with too little room left (8 KiB:
/// the format fits, the first checkpoint's superblock does not; an empty
/// image takes 16 KiB): one error line, and no image file left behind (a
/// second try used to say "already exists").
#[test]
fn create_on_a_nearly_full_disk_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("fs.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let lo = common::Loop::new(&backing, false);
    // No blocks reserved for root: the room left is the room there is.
    common::sh("mkfs.ext4", &["-q", "-F", "-m", "0", &lo.dev]);
    let dir = tmp.path().join("fs");
    std::fs::create_dir_all(&dir).unwrap();
    let fs = common::FsMount::new(&lo.dev, &dir);
    let out = Command::new("df")
        .args(["-k", "--output=avail", p(&dir)])
        .output()
        .unwrap();
    let avail: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap();
    let filler = dir.join("filler");
    common::sh("fallocate", &["-l", &format!("{}K", avail - 8), p(&filler)]);
    let img = dir.join("a.vbd");
    let out = run(&["create", p(&img), "--size", "1G"]);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "created with 8 KiB left");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "filler" && n != "lost+found")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    fs.umount();
    drop(lo);
}
