//! `vbdfs umount DIR`: flush through the control file, unmount, then wait until
//! the daemon has closed the image (written its clean state) and exited.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{mountinfo, UmountArgs};
use crate::{sys, Error, ErrorKind, Image, OpenOptions, Result};

/// After this long, tell the user what we are waiting for.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a busy mount point is retried before `umount` gives up.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Runs `vbdfs umount`.
pub fn run(args: &UmountArgs) -> Result<()> {
    let dir = mount_point_path(&args.mountpoint)?;
    let Some(entry) = mountinfo::vbdfs_mount_at(&dir) else {
        return Err(Error::invalid(format!(
            "{} is not a vbdfs mount point",
            dir.display()
        )));
    };
    let control = dir.join("control");
    let status = std::fs::read_to_string(&control).unwrap_or_default();
    // Where the daemon has the image now (it may have been moved while
    // mounted), else where mountinfo says it was mounted from.
    let image = status_value(&status, "image")
        .map(PathBuf::from)
        .unwrap_or_else(|| entry.image().unwrap_or_default());
    let pid: Option<u32> = status_value(&status, "pid").and_then(|v| v.parse().ok());
    let read_only = status_value(&status, "read-only") == Some("yes");
    // A read-only mount has nothing to flush (and refuses writes to control).
    let flushed = if read_only {
        Ok(())
    } else {
        std::fs::write(&control, b"flush\n")
    };
    match unmount_patiently(&dir) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{} is busy: something still has a file of it open (disk: a loop \
                     device? see `losetup -j {}/disk`; or control, or a snapshot file); \
                     detach or close it first",
                    dir.display(),
                    dir.display()
                ),
            ));
        }
        Err(e) => return Err(Error::io(format!("cannot unmount {}", dir.display()), e)),
    }
    let Some(pid) = pid else {
        // A dead mount (its daemon gone): what was asked is done; the image
        // was not closed clean, and its next read-write open recovers it.
        eprintln!(
            "vbdfs: warning: {} unmounted, but its daemon did not answer (gone?); {} was not \
             closed clean: the next mount recovers it",
            dir.display(),
            image.display()
        );
        return Ok(());
    };
    wait_exit(pid, &image);
    if let Err(e) = flushed {
        let msg = format!(
            "{} unmounted, but the flush before it failed",
            dir.display()
        );
        return Err(Error::io(msg, e));
    }
    if read_only {
        return Ok(());
    }
    let shown = image.to_string_lossy().into_owned();
    if let Some(path) = shown
        .strip_suffix(" (deleted)")
        .or((!image.exists()).then_some(&shown))
    {
        eprintln!("vbdfs: note: {path} was deleted while mounted: its state was not checked");
        return Ok(());
    }
    verify_clean(&image)
}

/// After the daemon exited, the image must be marked clean.
fn verify_clean(image: &Path) -> Result<()> {
    let opts = OpenOptions {
        read_only: true,
        cache_bytes: 1 << 20,
        ..OpenOptions::default()
    };
    // An encrypted image cannot be opened without its key: its superblock
    // (readable without it) says whether it was closed clean.
    let header = super::keys::read_header(image)?;
    let clean = if header.crypto != 0 {
        header.flags & crate::format::SB_FLAG_DIRTY == 0
    } else {
        Image::open(image, &opts)?.stats().clean
    };
    if clean {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "the daemon did not close {} cleanly (see its log); the next read-write open \
             recovers it",
            image.display()
        ),
    ))
}

/// `umount2(dir)` (or `fusermount3 -u` for a mount of another user), retrying
/// `EBUSY` for up to [`BUSY_RETRY`]: a process that has just closed `disk` (or
/// a forked child that has not yet exec'd) may still hold it for a moment.
fn unmount_patiently(dir: &Path) -> std::io::Result<()> {
    let start = Instant::now();
    loop {
        let result = match sys::unmount(dir, false) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && sys::effective_ids().0 != 0 => {
                fusermount_u(dir)
            }
            other => other,
        };
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < BUSY_RETRY => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// `fusermount3 -u DIR` for unprivileged users; a failure reads as EBUSY if
/// fusermount says so.
fn fusermount_u(dir: &Path) -> std::io::Result<()> {
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(dir)
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if err.contains("busy") {
        return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(std::io::Error::other(format!("fusermount3 -u: {err}")))
}

/// The absolute path of `dir` as the mount table spells it; works even when
/// the mount is dead ("transport endpoint is not connected").
fn mount_point_path(dir: &Path) -> Result<PathBuf> {
    if let Ok(canon) = dir.canonicalize() {
        return Ok(canon);
    }
    let abs = std::path::absolute(dir)
        .map_err(|e| Error::io(format!("mount point {}", dir.display()), e))?;
    let parent = abs.parent().and_then(|p| p.canonicalize().ok());
    Ok(match (parent, abs.file_name()) {
        (Some(p), Some(name)) => p.join(name),
        _ => abs,
    })
}

/// The value of `key` in the control file's status text.
fn status_value<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// True while `pid` runs (a zombie counts as exited).
fn alive(pid: u32) -> bool {
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

fn wait_exit(pid: u32, image: &Path) {
    let start = Instant::now();
    let mut told = false;
    while alive(pid) {
        if !told && start.elapsed() > PATIENCE {
            eprintln!(
                "vbdfs: waiting for the daemon (pid {pid}) to finish writing {}",
                image.display()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pid_from_status() {
        assert_eq!(
            status_value("state: mounted\npid: 42\nsize: 1\n", "pid"),
            Some("42")
        );
        assert_eq!(status_value("state: mounted\n", "pid"), None);
        assert_eq!(status_value("pids: 1\n", "pid"), None);
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
