//! Shared helpers for the integration tests: running `vbdfs`, and RAII guards
//! that always clean up mounts, loop devices and daemons, also when a test
//! fails (each guard's `Drop` unmounts lazily / detaches / kills).
//!
//! Tests that need the kernel's FUSE call [`fuse_available`] first; it returns
//! false (and prints why) only when `/dev/fuse` is absent.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Bytes of the file at `path` that hold written data (`SEEK_DATA` /
/// `SEEK_HOLE`). Unlike its allocated blocks, this leaves out the log's
/// preallocated window (ext4 reports unwritten extents as holes), which any
/// append of an open image may grow by up to 32 MiB: a test comparing the
/// space of an open image at two moments measures this.
pub fn written_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).expect("open the image");
    let (mut total, mut off) = (0, 0);
    while let Some(start) = vbdfs::sys::seek_data(&f, off).expect("SEEK_DATA") {
        let end = vbdfs::sys::seek_hole(&f, start)
            .expect("SEEK_HOLE")
            .expect("data is followed by a hole or the end");
        total += end - start;
        off = end;
    }
    total
}

/// The `vbdfs` binary under test.
pub fn vbdfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vbdfs"))
}

/// Runs `vbdfs ARGS...` and returns its output.
pub fn run(args: &[&str]) -> Output {
    vbdfs().args(args).output().expect("run vbdfs")
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (is it installed?)");
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of an output as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// stdout of an output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if the kernel FUSE device exists; otherwise prints why the test is skipped.
pub fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/fuse is absent, this test needs kernel FUSE");
    false
}

/// A path inside a temp dir, as &str.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Creates an image of `size` (e.g. "64M") with extra create arguments.
pub fn create(image: &Path, size: &str, extra: &[&str]) {
    let mut args = vec!["create", p(image), "--size", size];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "create failed: {}", stderr(&out));
}

/// Imports 2 MiB of [`pattern`] data (seed 11) into `dir/damaged.vbd` and
/// damages the middle of the file, where a stored block lives.
pub fn damaged_image(dir: &Path) -> PathBuf {
    let raw = dir.join("src.raw");
    std::fs::write(&raw, pattern(2 << 20, 11)).expect("write raw");
    let img = dir.join("damaged.vbd");
    let out = run(&["import", p(&raw), p(&img)]);
    assert!(out.status.success(), "import failed: {}", stderr(&out));
    let mut bytes = std::fs::read(&img).expect("read image");
    let mid = bytes.len() / 2;
    bytes[mid..mid + 64].fill(0xff);
    std::fs::write(&img, bytes).expect("write image");
    img
}

/// `vbdfs info --json IMAGE` parsed.
pub fn info_json(image: &Path) -> serde_json::Value {
    let out = run(&["info", "--json", p(image)]);
    assert!(out.status.success(), "info failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("info --json prints JSON")
}

/// True if `info --json` says the image is clean.
pub fn is_clean(image: &Path) -> bool {
    let v = info_json(image);
    match (v.get("clean"), v.get("state"), v.get("dirty")) {
        (Some(c), _, _) => c.as_bool() == Some(true),
        (_, Some(s), _) => s.as_str() == Some("clean"),
        (_, _, Some(d)) => d.as_bool() == Some(false),
        _ => panic!("info --json has no clean/state/dirty field: {v}"),
    }
}

/// True if `dir` is a mount point right now.
pub fn is_mounted(dir: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.to_str().unwrap_or_default().replace(' ', "\\040");
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// True while process `pid` runs (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ").map(|(_, r)| &r[..1]),
            Some("Z") | None
        ),
        Err(_) => false,
    }
}

/// Waits up to `limit` for `cond`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A vbdfs mount; dropping it unmounts (lazily) and makes sure the daemon is gone.
#[derive(Debug)]
pub struct Mount {
    pub dir: PathBuf,
    pub image: PathBuf,
    pub pid: Option<u32>,
}

impl Mount {
    /// `vbdfs mount IMAGE DIR [-o OPTS]` (daemonized); panics with stderr on failure.
    pub fn new(image: &Path, dir: &Path, opts: Option<&str>) -> Mount {
        Self::try_new(image, dir, opts).unwrap_or_else(|e| panic!("mount failed: {e}"))
    }

    /// Like [`Mount::new`] but returns the error text.
    pub fn try_new(image: &Path, dir: &Path, opts: Option<&str>) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).expect("mkdir mount point");
        let mut args = vec!["mount", p(image), p(dir)];
        if let Some(o) = opts {
            args.extend_from_slice(&["-o", o]);
        }
        let out = run(&args);
        if !out.status.success() {
            return Err(stderr(&out));
        }
        Ok(Self::adopt(image, dir))
    }

    /// A guard for the mount of `image` at `dir` that a `vbdfs mount` run
    /// by the test just made (its daemon's pid read from `control`).
    pub fn adopt(image: &Path, dir: &Path) -> Mount {
        let mut m = Mount {
            dir: dir.to_path_buf(),
            image: image.to_path_buf(),
            pid: None,
        };
        m.pid = m.status_value("pid").and_then(|v| v.parse().ok());
        m
    }

    /// `DIR/disk`.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// `DIR/control`.
    pub fn control(&self) -> PathBuf {
        self.dir.join("control")
    }

    /// The value of `key` in the control file's status.
    pub fn status_value(&self, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.control()).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_string))
    }

    /// `vbdfs umount DIR`; panics on failure. The guard is then inert.
    pub fn umount(mut self) {
        let out = run(&["umount", p(&self.dir)]);
        assert!(
            out.status.success(),
            "vbdfs umount failed: {}",
            stderr(&out)
        );
        assert!(!is_mounted(&self.dir), "still mounted after vbdfs umount");
        if let Some(pid) = self.pid.take() {
            assert!(
                !alive(pid),
                "daemon {pid} still runs after vbdfs umount returned"
            );
        }
    }

    /// Waits until the daemon has exited (after an unmount by other means).
    pub fn wait_daemon_exit(&mut self) {
        if let Some(pid) = self.pid.take() {
            assert!(
                wait_for(Duration::from_secs(30), || !alive(pid)),
                "daemon {pid} did not exit"
            );
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        if let Some(pid) = self.pid.take() {
            if !wait_for(Duration::from_secs(10), || !alive(pid)) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// A loop device over a file; dropping it detaches the device.
#[derive(Debug)]
pub struct Loop {
    pub dev: String,
}

impl Loop {
    /// `losetup -f --show [--direct-io=on] FILE`.
    pub fn new(file: &Path, direct_io: bool) -> Loop {
        let mut args = vec!["-f", "--show"];
        if direct_io {
            args.push("--direct-io=on");
        }
        args.push(p(file));
        Loop {
            dev: sh("losetup", &args).trim().to_string(),
        }
    }

    /// A fresh ext4 of `size` bytes on a loop device over a sparse file
    /// `file`: a host file system for images that a test can mount as it
    /// needs (options, throttling).
    pub fn with_ext4(file: &Path, size: u64) -> Loop {
        Self::with_fs(file, size, "mkfs.ext4")
    }

    /// [`Loop::with_ext4`] with another `mkfs` (`mkfs.ext2`, ...).
    pub fn with_fs(file: &Path, size: u64, mkfs: &str) -> Loop {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        let lo = Loop::new(file, false);
        sh(mkfs, &["-q", "-F", &lo.dev]);
        lo
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A kernel file system mounted on a loop device; dropping unmounts it lazily.
#[derive(Debug)]
pub struct FsMount {
    pub dir: PathBuf,
}

impl FsMount {
    /// `mount DEV DIR`.
    pub fn new(dev: &str, dir: &Path) -> FsMount {
        Self::with_options(dev, dir, "defaults")
    }

    /// `mount -o OPTIONS DEV DIR`.
    pub fn with_options(dev: &str, dir: &Path, options: &str) -> FsMount {
        std::fs::create_dir_all(dir).expect("mkdir");
        sh("mount", &["-o", options, dev, p(dir)]);
        FsMount {
            dir: dir.to_path_buf(),
        }
    }

    /// `umount DIR` (not lazy: the test wants it to complete).
    pub fn umount(self) {
        sh("umount", &[p(&self.dir)]);
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A zeroed buffer of `len` bytes aligned to 4096 (for O_DIRECT).
#[derive(Debug)]
pub struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let off = raw.as_ptr().align_offset(4096);
        assert!(off < 4096);
        Aligned { raw, off, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Offsets of the DATA records of `block` in an image file's bytes, oldest
/// first (scanning for record headers: magic, kind 1 at 4, key at 40).
pub fn data_records_of(bytes: &[u8], block: u64) -> Vec<usize> {
    (0..bytes.len().saturating_sub(64))
        .step_by(16)
        .filter(|&at| {
            &bytes[at..at + 4] == b"VREC"
                && bytes[at + 4] == 1
                && u64::from_le_bytes(bytes[at + 40..at + 48].try_into().expect("8 bytes")) == block
        })
        .collect()
}

/// A small deterministic generator (xorshift) for seeded workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The log's moves into holes in the crash sweeps (engine `regions`): the
/// smallest hole images opened on this thread move into, and the moves of
/// those closed.
pub mod moves {
    use std::cell::Cell;

    thread_local! {
        static REGION_MIN: Cell<u64> = const { Cell::new(0) };
        static MOVES: Cell<u64> = const { Cell::new(0) };
        static EVACUATED: Cell<u64> = const { Cell::new(0) };
        static RECYCLED: Cell<u64> = const { Cell::new(0) };
    }

    /// Images this thread opens move into holes from `bytes` on (0: the
    /// default, which small test images never reach).
    pub fn set_region_min(bytes: u64) {
        REGION_MIN.set(bytes);
    }

    /// Applies [`set_region_min`] to a freshly opened image.
    pub fn tune(img: vbdfs::Image) -> vbdfs::Image {
        if REGION_MIN.get() > 0 {
            img.set_log_region_min(REGION_MIN.get());
        }
        img
    }

    /// Counts `img`'s moves, the dead bytes they overwrote and the
    /// evacuated ranges and hands it back (to close or drop).
    pub fn counted(img: vbdfs::Image) -> vbdfs::Image {
        MOVES.set(MOVES.get() + img.log_moves());
        RECYCLED.set(RECYCLED.get() + img.log_recycled());
        EVACUATED.set(EVACUATED.get() + img.evacuated().1);
        img
    }

    /// Ranges evacuated on this thread so far (engine `evacuate`).
    pub fn evacuated() -> u64 {
        EVACUATED.get()
    }

    /// Held dead bytes the moves on this thread overwrote so far.
    pub fn recycled() -> u64 {
        RECYCLED.get()
    }

    /// Moves counted on this thread so far.
    pub fn count() -> u64 {
        MOVES.get()
    }
}
