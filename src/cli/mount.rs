//! `vbdfs mount`: checks the arguments, then either serves in the foreground
//! (`-f`) or forks a daemon and waits on a socket pair until the daemon reports
//! "mounted" (exit 0) or its error (printed, exit non-zero).

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::daemon::{self, Job, Ready};
use super::options::MountOptions;
use super::{logger, mountinfo, MountArgs};
use crate::sys::{self, Forked};
use crate::{Error, ErrorKind, Result};

/// Runs `vbdfs mount`.
pub fn run(args: &MountArgs) -> Result<()> {
    let options = MountOptions::parse(&args.options)?;
    // Read before the daemon forks: relative paths work, errors show here.
    super::keys::set(options.key_file.as_deref())?;
    let image = canonical_file(&args.image)?;
    let mountpoint = canonical_dir(&args.mountpoint)?;
    if image.starts_with(&mountpoint) {
        return Err(Error::invalid(format!(
            "{} lies inside the mount point {}: the mount would hide it from its own \
             daemon; choose a mount point outside the image's directory",
            image.display(),
            mountpoint.display()
        )));
    }
    // Held until the mount is ready or has failed: two mounts started at
    // once on one mount point cannot both pass the check below.
    let lock = lock_dir(&mountpoint)?;
    if let Some(dir) = mountinfo::mount_points_of(&image).first() {
        if mountinfo::is_dead(dir) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{} is still mounted at {}, a dead mount (its daemon is gone): run \
                     `vbdfs umount {}` first",
                    image.display(),
                    dir.display(),
                    dir.display()
                ),
            ));
        }
        return Err(Error::new(
            ErrorKind::Locked,
            format!(
                "{} is already mounted at {}",
                image.display(),
                dir.display()
            ),
        ));
    }
    if let Some(m) = mountinfo::vbdfs_mount_at(&mountpoint) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{} is already a vbdfs mount point (of {})",
                mountpoint.display(),
                m.image().unwrap_or_default().display()
            ),
        ));
    }
    let job = Job {
        image,
        mountpoint,
        options,
    };
    if !args.foreground {
        logger::check_log_file()?;
    }
    if args.foreground {
        logger::init_foreground();
        return daemon::serve(&job, &mut Ready::foreground(lock));
    }
    daemonize(&job, lock)
}

/// Takes the exclusive `flock` of directory `dir` (waits for another `vbdfs
/// mount` of it to be ready or fail). None where the file system has no
/// such locks.
fn lock_dir(dir: &Path) -> Result<Option<File>> {
    let file = File::open(dir).map_err(|e| match e.raw_os_error() {
        // The dead mount's cached attributes expired after the checks.
        Some(libc::ENOTCONN) => dead_mount(dir),
        _ => Error::io(format!("mount point {}", dir.display()), e),
    })?;
    match file.lock() {
        Ok(()) => Ok(Some(file)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) => {
            log::debug!("mount point {} cannot be locked: {e}", dir.display());
            Ok(None)
        }
        Err(e) => Err(Error::io(
            format!("locking mount point {}", dir.display()),
            e,
        )),
    }
}

/// The canonical path of an existing regular file.
pub fn canonical_file(path: &Path) -> Result<PathBuf> {
    let canon = path
        .canonicalize()
        .map_err(|e| Error::io(format!("cannot open image {}", path.display()), e))?;
    if !canon.is_file() {
        return Err(Error::invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(canon)
}

/// The error for a mount point whose daemon is gone.
fn dead_mount(dir: &Path) -> Error {
    Error::new(
        ErrorKind::Busy,
        format!(
            "{} is a dead mount (its daemon is gone): run `vbdfs umount {}` first",
            dir.display(),
            dir.display()
        ),
    )
}

fn canonical_dir(path: &Path) -> Result<PathBuf> {
    let canon = match path.canonicalize() {
        Ok(canon) => canon,
        // Once the kernel's cached attributes of a dead mount expire, even
        // resolving its path fails.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(dead_mount(
                &std::path::absolute(path).unwrap_or(path.to_path_buf()),
            ))
        }
        Err(e) => return Err(Error::io(format!("mount point {}", path.display()), e)),
    };
    if mountinfo::is_dead(&canon) {
        return Err(dead_mount(&canon));
    }
    match std::fs::metadata(&canon) {
        Ok(meta) if meta.is_dir() => Ok(canon),
        Ok(_) => Err(Error::invalid(format!(
            "mount point {} is not a directory",
            path.display()
        ))),
        // The attributes can expire between the checks above and this one.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(dead_mount(&canon)),
        Err(e) => Err(Error::io(format!("mount point {}", path.display()), e)),
    }
}

/// Forks the daemon and waits for its verdict on a pipe.
/// The parent holds `lock` until the verdict; the daemon closes its copy
/// (the lock lasts while any copy is open).
fn daemonize(job: &Job, lock: Option<File>) -> Result<()> {
    let (mut reader, writer) =
        UnixStream::pair().map_err(|e| Error::io("cannot create a socket pair", e))?;
    match sys::fork_process().map_err(|e| Error::io("cannot start the mount daemon", e))? {
        Forked::Parent(pid) => {
            drop(writer);
            let mut msg = String::new();
            let _ = reader.read_to_string(&mut msg);
            drop(lock);
            if msg.starts_with("OK") {
                let image_warnings = msg.lines().filter_map(|l| l.strip_prefix("WARN "));
                for warning in image_warnings
                    .map(str::to_string)
                    .chain(daemon::warnings(job))
                {
                    eprintln!("vbdfs: warning: {warning}");
                }
                return Ok(());
            }
            match msg.strip_prefix("ERR ") {
                Some(err) => Err(Error::new(ErrorKind::Io, err.trim_end().to_string())),
                None => Err(Error::new(
                    ErrorKind::Io,
                    format!("the mount daemon (pid {pid}) exited before the mount was ready"),
                )),
            }
        }
        Forked::Child => {
            drop(reader);
            drop(lock);
            // The key was read before the fork: nothing inherited is needed.
            if let Err(e) = sys::close_inherited_fds(&writer) {
                log::debug!("closing inherited descriptors: {e}");
            }
            let mut ready = Ready::pipe(writer);
            let code = match detach() {
                Ok(()) => match daemon::serve(job, &mut ready) {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("{e}");
                        ready.fail(&e);
                        1
                    }
                },
                Err(e) => {
                    ready.fail(&e);
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

/// Leaves the caller's session, terminal and directory; stdio goes to /dev/null.
fn detach() -> Result<()> {
    sys::new_session().map_err(|e| Error::io("setsid", e))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("/dev/null", e))?;
    sys::redirect_stdio(&null).map_err(|e| Error::io("redirecting stdio", e))?;
    std::env::set_current_dir("/").map_err(|e| Error::io("chdir /", e))?;
    logger::init_daemon();
    Ok(())
}
