//! Files built under a hidden temporary name beside their target and moved
//! into place only when complete (`import`, `export`): a failed command
//! leaves nothing behind, and neither does one interrupted by SIGINT,
//! SIGTERM or SIGHUP ([`remove_on_signals`]). That matters most for an
//! export of an encrypted image, whose unfinished file holds plaintext.

use crate::{sys, Error, ErrorKind, Result};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};

/// The temporary files of this process not yet moved into place.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The signals that interrupt a command from a terminal or a service manager.
const INTERRUPTS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// From now on, an interrupting signal removes this process's temporary
/// files, says so in one line and ends the process with status 128 + the
/// signal (as a shell reports an interrupted command). Call before any
/// other thread starts: threads inherit the blocked signals, and a thread
/// without them blocked would be killed by the signal instead.
pub fn remove_on_signals() -> Result<()> {
    sys::block_signals(&INTERRUPTS).map_err(|e| Error::io("blocking signals", e))?;
    std::thread::Builder::new()
        .name("vbdfs-signals".into())
        .spawn(|| {
            let Ok(sig) = sys::wait_signal(&INTERRUPTS) else {
                return;
            };
            let pending = PENDING.lock();
            for path in pending.iter() {
                if std::fs::remove_file(path).is_ok() {
                    eprintln!(
                        "vbdfs: interrupted: removed the unfinished {}",
                        path.display()
                    );
                }
            }
            std::process::exit(128 + sig);
        })
        .map_err(|e| Error::io("starting the signal thread", e))?;
    Ok(())
}

/// A file under a hidden temporary name, removed on drop unless committed.
#[derive(Debug)]
pub struct TempImage {
    /// The temporary path.
    pub path: PathBuf,
    done: bool,
}

impl TempImage {
    /// A temporary name in `target`'s directory.
    pub fn new(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{}: not a file name", target.display())))?;
        let dir = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{}: no directory {}", target.display(), dir.display()),
            ));
        }
        let tmp_name = format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id());
        let path = target.with_file_name(tmp_name);
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(format!("{}: remove stale file", path.display()), e))?;
        }
        PENDING.lock().push(path.clone());
        Ok(TempImage { path, done: false })
    }

    /// Moves the file to `target`, refusing to replace a file that appeared
    /// meanwhile, and makes the new name durable.
    pub fn commit(mut self, target: &Path) -> Result<()> {
        // An interrupting signal waits (its handler takes this lock) until
        // the file has its final name or has failed to get it.
        let mut pending = PENDING.lock();
        let ctx = |e| Error::io(format!("{}: rename into place", target.display()), e);
        let appeared = || {
            Error::new(
                ErrorKind::Exists,
                format!(
                    "{}: appeared while converting; not replaced",
                    target.display()
                ),
            )
        };
        match std::fs::hard_link(&self.path, target) {
            Ok(()) => {
                std::fs::remove_file(&self.path).map_err(ctx)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(appeared()),
            // File systems without hard links: check, then rename.
            Err(_) => {
                if target.exists() {
                    return Err(appeared());
                }
                std::fs::rename(&self.path, target).map_err(ctx)?;
            }
        }
        self.done = true;
        pending.retain(|p| p != &self.path);
        drop(pending);
        let dir = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all()
                .map_err(|e| Error::io(format!("{}: sync", dir.display()), e))?;
        }
        Ok(())
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.done {
            let mut pending = PENDING.lock();
            let _ = std::fs::remove_file(&self.path);
            pending.retain(|p| p != &self.path);
        }
    }
}
