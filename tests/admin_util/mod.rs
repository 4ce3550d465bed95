//! Helpers for the admin integration tests (`tests/admin_*.rs`): running
//! commands, the installed mount helper in /sbin, and RAII guards that always
//! clean up mounts, loop devices and daemons -- also when a test fails (each
//! guard's `Drop` unmounts, detaches or kills, and never panics).
//!
//! These tests need root and `/dev/fuse`; [`admin_env_ok`] says (and prints)
//! when they cannot run here, and the test then returns early.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// The `vbdfs` binary under test.
pub fn vbdfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vbdfs"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when running as root with `/dev/fuse` and mount(8) available.
pub fn admin_env_ok() -> bool {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        eprintln!("skipped: the admin tests need root (mount(8), /sbin helper)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: /dev/fuse is missing");
        return false;
    }
    true
}

/// Runs a command and returns its output (panics only if it cannot start).
pub fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let p = program.as_ref();
    Command::new(p)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", p.to_string_lossy()))
}

/// `umount DIR`, which must succeed. "target is busy" is retried for a
/// while: other tests of this process spawn commands in parallel, and a child
/// holds a copy of every open descriptor (a just-closed `disk` too) between
/// its fork and its exec.
pub fn umount_when_free(dir: &Path) {
    for _ in 0..30 {
        let out = run("umount", &[path_str(dir)]);
        if out.status.success() {
            return;
        }
        if !text(&out.stderr).contains("busy") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ok("umount", &[path_str(dir)]);
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let p = program.as_ref().to_owned();
    let out = run(&p, args);
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        p.to_string_lossy(),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `vbdfs create IMAGE --size SIZE [extra...]`.
pub fn create_image(img: &Path, size: &str, extra: &[&str]) {
    let mut args = vec!["create", path_str(img), "--size", size];
    args.extend_from_slice(extra);
    ok(vbdfs_bin(), &args);
}

/// `vbdfs info IMAGE --json` parsed.
pub fn info_json(img: &Path) -> serde_json::Value {
    let out = ok(vbdfs_bin(), &["info", path_str(img), "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("info --json: {e}: {out}"))
}

/// Is `dir` a mount point right now (per /proc/self/mountinfo)?
pub fn is_mounted(dir: &Path) -> bool {
    mount_entry(dir).is_some()
}

/// `(fstype, source, options)` of the topmost mount at `dir`.
pub fn mount_entry(dir: &Path) -> Option<(String, String, String)> {
    let want = dir.to_string_lossy().replace(' ', "\\040");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            (f.get(4)? == &want).then(|| {
                (
                    r.first().copied().unwrap_or("").to_string(),
                    r.get(1).copied().unwrap_or("").to_string(),
                    f.get(5).copied().unwrap_or("").to_string(),
                )
            })
        })
        .next_back()
}

/// The daemon serving the mount at `dir`: the `pid:` line of DIR/control, else
/// a /proc scan for a `vbdfs ... mount ... DIR` command line.
pub fn daemon_pid(dir: &Path) -> Option<u32> {
    if let Ok(status) = std::fs::read_to_string(dir.join("control")) {
        if let Some(pid) = status
            .lines()
            .find_map(|l| l.strip_prefix("pid:"))
            .and_then(|v| v.trim().parse().ok())
        {
            return Some(pid);
        }
    }
    let want = dir.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_vbdfs = args.first().is_some_and(|a| a.ends_with("vbdfs"));
        if is_vbdfs && args.iter().any(|a| a == "mount") && args.contains(&want) {
            return Some(pid);
        }
    }
    None
}

/// True while `pid` runs (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Waits up to `secs` for `pid` to exit; true if it did.
pub fn wait_gone(pid: u32, secs: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while alive(pid) {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Is `pid` a vbdfs process (checked before any signal)?
fn is_vbdfs(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"vbdfs"))
        })
        .unwrap_or(false)
}

/// Sends `sig` to `pid` with kill(1) (no unsafe here), only if it is vbdfs.
fn signal(pid: u32, sig: &str) {
    if alive(pid) && is_vbdfs(pid) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status();
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A mount that is always undone: `Drop` unmounts (`umount`, then lazily) and
/// waits for the daemon, which is SIGTERMed and finally SIGKILLed if it hangs.
#[derive(Debug)]
pub struct MountGuard {
    pub dir: PathBuf,
    pub pid: Option<u32>,
}

impl MountGuard {
    /// Takes charge of an existing mount at `dir` (finds its daemon).
    pub fn adopt(dir: &Path) -> MountGuard {
        MountGuard {
            dir: dir.to_path_buf(),
            pid: daemon_pid(dir),
        }
    }

    /// `vbdfs mount IMAGE DIR [-o OPTS]` (creating DIR).
    pub fn vbdfs_mount(img: &Path, dir: &Path, opts: Option<&str>) -> MountGuard {
        std::fs::create_dir_all(dir).expect("mkdir mount point");
        let mut args = vec!["mount", path_str(img), path_str(dir)];
        if let Some(o) = opts {
            args.extend_from_slice(&["-o", o]);
        }
        let out = run(vbdfs_bin(), &args);
        // Take charge before asserting, so a half-made mount is still cleaned up.
        let guard = MountGuard::adopt(dir);
        assert!(
            out.status.success(),
            "vbdfs mount {} failed: {}",
            img.display(),
            text(&out.stderr)
        );
        assert!(is_mounted(dir), "{} not mounted", dir.display());
        guard
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// Plain `umount DIR`, then waits until the daemon has exited (it writes
    /// the clean state after the kernel let go of the mount).
    pub fn umount(mut self) {
        let pid = self.pid.or_else(|| daemon_pid(&self.dir));
        umount_when_free(&self.dir);
        if let Some(pid) = pid {
            assert!(
                wait_gone(pid, 60),
                "daemon {pid} still running 60 s after umount"
            );
        }
        self.pid = None;
        self.dir = PathBuf::new();
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return;
        }
        let pid = self.pid.or_else(|| daemon_pid(&self.dir));
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg(&self.dir).output();
            if is_mounted(&self.dir) {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
            }
        }
        if let Some(pid) = pid {
            if !wait_gone(pid, 30) {
                signal(pid, "TERM");
                if !wait_gone(pid, 10) {
                    signal(pid, "KILL");
                    wait_gone(pid, 5);
                }
            }
        }
    }
}

/// A loop device that is always detached.
#[derive(Debug)]
pub struct LoopGuard {
    pub dev: String,
}

impl LoopGuard {
    /// `losetup -f --show [args] FILE`.
    pub fn attach(file: &Path, args: &[&str]) -> LoopGuard {
        let mut a = vec!["-f", "--show"];
        a.extend_from_slice(args);
        a.push(path_str(file));
        let dev = ok("losetup", &a).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopGuard { dev }
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        for _ in 0..50 {
            match Command::new("losetup").args(["-d", &self.dev]).output() {
                Ok(o) if o.status.success() => return,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// Serializes the tests that use /sbin/mount.vbdfs: a mutex inside this test
/// binary and an exclusive file lock across processes (another `cargo test`).
pub struct HelperLock {
    _file: File,
    _guard: MutexGuard<'static, ()>,
}

static HELPER_MUTEX: Mutex<()> = Mutex::new(());

impl HelperLock {
    pub fn take() -> HelperLock {
        let guard = HELPER_MUTEX.lock().unwrap_or_else(|p| p.into_inner());
        let file = File::create("/run/lock/vbdfs-admin-tests.lock")
            .or_else(|_| File::create("/tmp/vbdfs-admin-tests.lock"))
            .expect("lock file");
        file.lock().expect("flock");
        HelperLock {
            _file: file,
            _guard: guard,
        }
    }
}

/// /sbin/mount.vbdfs for the duration of a test: a copy of `helper` (the one
/// install.sh put in a temporary prefix). Whatever was at that path before (a
/// real installation) is moved aside and put back by `Drop`.
pub struct SbinHelper {
    path: PathBuf,
    backup: Option<PathBuf>,
    _lock: HelperLock,
}

impl SbinHelper {
    pub fn install(helper: &Path) -> SbinHelper {
        let lock = HelperLock::take();
        let path = PathBuf::from("/sbin/mount.vbdfs");
        let backup = if path.symlink_metadata().is_ok() {
            let b = PathBuf::from(format!(
                "/sbin/.mount.vbdfs.admin-test-{}",
                std::process::id()
            ));
            std::fs::rename(&path, &b).expect("move the existing /sbin/mount.vbdfs aside");
            Some(b)
        } else {
            None
        };
        let me = SbinHelper {
            path,
            backup,
            _lock: lock,
        };
        std::fs::copy(helper, &me.path).expect("copy helper to /sbin");
        me
    }
}

impl Drop for SbinHelper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(b) = &self.backup {
            let _ = std::fs::rename(b, &self.path);
        }
    }
}

/// A temporary installation (install.sh --prefix TMP/prefix --bin <test binary>),
/// uninstalled by `Drop`.
pub struct Installed {
    pub prefix: PathBuf,
    pub log: String,
}

impl Installed {
    pub fn new(prefix: &Path, extra: &[&str]) -> Installed {
        let mut args = vec![
            "--prefix",
            path_str(prefix),
            "--bin",
            env!("CARGO_BIN_EXE_vbdfs"),
            "--no-reload",
        ];
        args.extend_from_slice(extra);
        let log = ok(repo().join("mount-helpers/install.sh"), &args);
        Installed {
            prefix: prefix.to_path_buf(),
            log,
        }
    }

    pub fn helper(&self) -> PathBuf {
        self.prefix.join("sbin/mount.vbdfs")
    }

    pub fn bin(&self) -> PathBuf {
        self.prefix.join("bin/vbdfs")
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.prefix.join("share/vbdfs/install-manifest").exists() {
            let _ = Command::new(repo().join("mount-helpers/install.sh"))
                .args([
                    "--prefix",
                    path_str(&self.prefix),
                    "--uninstall",
                    "--no-reload",
                ])
                .output();
        }
    }
}

/// A recognisable 1 MiB block for image `n`, round `r`.
pub fn pattern(n: u64, r: u64) -> Vec<u8> {
    let mut v = vec![0u8; MIB as usize];
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        let x = (n << 40) ^ (r << 32) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// Writes `data` at `off` into `disk` (buffered, then fsync).
pub fn write_at(disk: &Path, data: &[u8], off: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", disk.display()));
    f.write_all_at(data, off).expect("write");
    f.sync_all().expect("fsync");
}

/// Reads `len` bytes at `off` from `disk`.
pub fn read_at(disk: &Path, len: usize, off: u64) -> Vec<u8> {
    let f = File::open(disk).unwrap_or_else(|e| panic!("open {}: {e}", disk.display()));
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).expect("read");
    v
}
