//! Mounting a [`VbdFs`] and running its FUSE session.
//!
//! As root, vbdfs mounts by itself: it opens `/dev/fuse`, calls `mount(2)` with
//! type `fuse.vbdfs`, source `<image>` and `default_permissions` (plus
//! `allow_other`, `ro` when asked), then hands the descriptor to fuser
//! (`Session::from_fd`). fuser therefore never unmounts anything itself: the
//! mount ends only by `umount` (plain or `vbdfs umount`) or by the daemon's
//! signal handler. Other users go through fuser's `Session::new`, which uses
//! `fusermount3`.
//!
//! The session uses one FUSE thread per core, each with its own cloned
//! `/dev/fuse` descriptor (`clone_fd`).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use fuser::{Config, MountOption, Session, SessionACL};

use super::VbdFs;
use crate::{sys, Error, Result};

/// What to mount where.
#[derive(Debug, Clone)]
pub struct MountParams<'a> {
    /// The (empty) directory to mount on.
    pub mountpoint: &'a Path,
    /// The source shown in the mount table (the image path).
    pub fs_name: &'a str,
    /// Mount read-only.
    pub read_only: bool,
    /// Let other users in (permission checks by mode/uid/gid).
    pub allow_other: bool,
}

/// Number of FUSE threads: one per core.
pub fn fuse_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

fn config(params: &MountParams<'_>) -> Config {
    let mut config = Config::default();
    config.n_threads = Some(fuse_threads());
    config.clone_fd = true;
    config.acl = if params.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config
}

/// Mounts `fs` and completes the FUSE handshake: on Ok the mount is ready and
/// requests queue until [`Session::run`] serves them.
pub fn mount(fs: VbdFs, params: &MountParams<'_>) -> Result<Session<VbdFs>> {
    let (uid, gid) = sys::effective_ids();
    let what = |e: std::io::Error| {
        Error::io(
            format!("cannot mount on {}", params.mountpoint.display()),
            e,
        )
    };
    if uid != 0 {
        let mut config = config(params);
        config.mount_options = vec![
            MountOption::FSName(params.fs_name.to_string()),
            MountOption::Subtype("vbdfs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        if params.read_only {
            config.mount_options.push(MountOption::RO);
        }
        return Session::new(fs, params.mountpoint, &config).map_err(what);
    }
    let dev: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| Error::io("cannot open /dev/fuse (is the fuse module loaded?)", e))?
        .into();
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if params.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if params.read_only {
        flags |= libc::MS_RDONLY;
    }
    sys::mount(
        params.fs_name,
        params.mountpoint,
        "fuse.vbdfs",
        flags,
        &data,
    )
    .map_err(what)?;
    let acl = config(params).acl;
    Session::from_fd(fs, dev, acl, config(params)).map_err(|e| {
        let _ = sys::unmount(params.mountpoint, true);
        Error::io(
            format!("FUSE handshake on {} failed", params.mountpoint.display()),
            e,
        )
    })
}
