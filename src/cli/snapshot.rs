//! `vbdfs snapshot create|list|delete|rollback IMAGE [NAME]`, `vbdfs clone
//! IMAGE@SNAP NEW` and the backing part of `vbdfs create --backing`.
//!
//! Snapshot changes open the image read-write, so a mounted image (locked by
//! its daemon) is refused with a message that names the mount point and its
//! control file. `list` opens read-only and also works on a mounted image (it
//! shows the last committed state, which includes every snapshot taken).
//! A clone's base gets a hold on the snapshot: an unmounted base is opened
//! read-write for a moment; a mounted one gets the snapshot and the hold
//! through its control file (`snapshot`, `hold-snapshot`) and is read
//! read-only.

use crate::cli::output::say;
use std::path::{Path, PathBuf};

use super::create::with_path;
use super::mount::canonical_file;
use super::options::format_size;
use super::{mountinfo, CloneArgs, SnapshotArgs};
use crate::engine::{CloneOptions, SnapshotInfo, UtcTime};
use crate::{Error, ErrorKind, Image, OpenOptions, Result};

/// Cache for offline snapshot commands (they read little).
const CACHE: u64 = 32 << 20;

/// Opens the image; `online`: the mount's control file does what the
/// command does (for the message when the image is mounted).
fn open(path: &Path, read_only: bool, online: bool) -> Result<(PathBuf, Image)> {
    let canon = canonical_file(path)?;
    let opts = OpenOptions {
        read_only,
        cache_bytes: CACHE,
        ..OpenOptions::default()
    };
    let image = super::keys::open(&canon, &opts)
        .map_err(|e| mountinfo::explain_locked(&canon, e, online))
        .map_err(|e| with_path(e, path))?;
    Ok((canon, image))
}

/// `2024-05-01 12:00:00 UTC` for ns since the epoch.
pub fn format_time(ns: u64) -> String {
    let t = UtcTime::from_secs(ns / 1_000_000_000);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

fn name_of(args: &SnapshotArgs) -> Result<&str> {
    args.name.as_deref().ok_or_else(|| {
        Error::invalid(format!(
            "snapshot {}: a snapshot NAME is required",
            args.action
        ))
    })
}

/// Runs `vbdfs snapshot ACTION IMAGE [NAME]`.
pub fn run(args: &SnapshotArgs) -> Result<()> {
    let shown = args.image.display();
    if args.action == "list" {
        if let Some(name) = &args.name {
            return Err(Error::invalid(format!(
                "snapshot list takes no snapshot name ('{}')",
                crate::error::printable(name)
            )));
        }
    }
    if args.force && args.action != "delete" {
        return Err(Error::invalid(format!(
            "--force is for snapshot delete, not {}",
            args.action
        )));
    }
    match args.action.as_str() {
        "list" => list(args),
        "create" => {
            let name = name_of(args)?;
            let (_, image) = open(&args.image, false, true)?;
            let info = image
                .snapshot_create(name)
                .map_err(|e| with_path(e, &args.image))?;
            image.close().map_err(|e| with_path(e, &args.image))?;
            say!("created snapshot {name} of {shown} (id {})", info.id)?;
            Ok(())
        }
        "delete" => {
            let name = name_of(args)?;
            let (_, image) = open(&args.image, false, true)?;
            let deleted = if args.force {
                image.snapshot_delete_forced(name)
            } else {
                image.snapshot_delete(name)
            };
            deleted.map_err(|e| {
                let hint = if e.to_string().contains("clone(s)") {
                    " (--force deletes it anyway; its clones can then no longer be opened)"
                } else {
                    ""
                };
                with_path(Error::new(e.kind(), format!("{e}{hint}")), &args.image)
            })?;
            image.close().map_err(|e| with_path(e, &args.image))?;
            say!("deleted snapshot {name} of {shown}")?;
            Ok(())
        }
        "rollback" => {
            let name = name_of(args)?;
            let (_, mut image) = open(&args.image, false, false)?;
            image
                .snapshot_rollback(name)
                .map_err(|e| with_path(e, &args.image))?;
            image.close().map_err(|e| with_path(e, &args.image))?;
            say!("rolled {shown} back to snapshot {name}")?;
            Ok(())
        }
        other => Err(Error::invalid(format!(
            "unknown snapshot action '{other}' (expected create, list, delete or rollback)"
        ))),
    }
}

fn list(args: &SnapshotArgs) -> Result<()> {
    let (canon, image) = open(&args.image, true, true)?;
    if let Some(dir) = mountinfo::mount_points_of(&canon).first() {
        eprintln!(
            "note: {} is mounted at {}; listing its last committed state",
            canon.display(),
            dir.display()
        );
    }
    if let Some(why) = image.lost_snapshot_table() {
        return Err(with_path(Error::corrupt(why), &args.image));
    }
    // A snapshot whose map cannot be read leaves what each holds alone
    // unknown ("?"), not the list.
    let usage: Vec<(SnapshotInfo, Option<u64>)> = match image.snapshot_usage() {
        Ok(usage) => usage
            .into_iter()
            .map(|u| (u.info, Some(u.exclusive_bytes)))
            .collect(),
        Err(e) => {
            eprintln!("note: ONLY HERE is unknown: {}", with_path(e, &args.image));
            image
                .snapshot_list()
                .into_iter()
                .map(|s| (s, None))
                .collect()
        }
    };
    if usage.is_empty() {
        say!("no snapshots")?;
        return Ok(());
    }
    let width = usage
        .iter()
        .map(|(info, _)| info.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    say!(
        "{:<width$}  {:<23}  {:>10}  {:>12}  {:>12}  CLONES",
        "NAME",
        "CREATED",
        "DISK SIZE",
        "DATA",
        "ONLY HERE"
    )?;
    for (info, exclusive) in &usage {
        say!(
            "{:<width$}  {:<23}  {:>10}  {:>12}  {:>12}  {}",
            info.name,
            format_time(info.created_ns),
            format_size(info.virtual_size),
            format_size(info.allocated_bytes),
            exclusive.map_or("?".into(), format_size),
            info.holds
        )?;
    }
    Ok(())
}

/// Splits `IMAGE@SNAP` at the last `@` (None when there is no `@` or the whole
/// text names an existing file).
pub fn split_at_snapshot(spec: &str) -> (PathBuf, Option<String>) {
    if Path::new(spec).exists() {
        return (PathBuf::from(spec), None);
    }
    match spec.rsplit_once('@') {
        Some((img, snap)) if !img.is_empty() && !snap.contains('/') => {
            (PathBuf::from(img), Some(snap.to_string()))
        }
        _ => (PathBuf::from(spec), None),
    }
}

/// Writes one command to a mount's control file.
fn control(dir: &Path, cmd: &str) -> Result<()> {
    let path = dir.join("control");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EROFS) => Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "the base is mounted read-only at {}: it cannot take the clone's hold \
                     on its snapshot; unmount it first",
                    dir.display()
                ),
            ),
            _ => Error::io(path.display().to_string(), e),
        })?;
    std::io::Write::write_all(&mut file, cmd.as_bytes()).map_err(|e| {
        match (e.raw_os_error(), cmd.split_once(' ')) {
            (Some(libc::ENOENT), Some((_, name))) => Error::new(
                ErrorKind::NotFound,
                format!(
                    "no snapshot named '{name}' in the image mounted at {}",
                    dir.display()
                ),
            ),
            _ => Error::io(format!("{}: {cmd}", path.display()), e),
        }
    })
}

/// A clone of a mounted base: the snapshot (if asked) and the hold go
/// through the mount's control file, the base is read read-only.
fn clone_mounted(
    new: &Path,
    base: &Path,
    mount: &Path,
    snap: Option<&str>,
    opts: &CloneOptions,
    open: &OpenOptions,
) -> Result<Image> {
    let ro = OpenOptions {
        read_only: true,
        ..open.clone()
    };
    let name = match snap {
        Some(name) => name.to_string(),
        None => {
            let name = super::keys::open(base, &ro)?.clone_base_name();
            control(mount, &format!("snapshot {name}"))?;
            name
        }
    };
    if let Err(e) = control(mount, &format!("hold-snapshot {name}")) {
        if snap.is_none() {
            let _ = control(mount, &format!("delete-snapshot {name}"));
        }
        return Err(e);
    }
    let made = super::keys::open(base, &ro)
        .and_then(|img| img.base_snapshot(&name))
        .and_then(|b| Image::create_clone_from(new, base, &b, opts, open));
    if made.is_err() {
        // The base is left as it was: the hold goes, and so does the
        // snapshot taken for this clone.
        let mut undo = control(mount, &format!("release-snapshot {name}"));
        if undo.is_ok() && snap.is_none() {
            undo = control(mount, &format!("delete-snapshot {name}"));
        }
        if let Err(e) = undo {
            eprintln!("vbdfs: could not release the hold on {name}: {e}");
        }
    }
    made
}

/// Creates `new` as a clone of `base` (at snapshot `snap`, or a new snapshot
/// of the base's current state), prints what was made. A mounted base is
/// handled through its control file.
pub fn make_clone(new: &Path, base: &Path, snap: Option<&str>, opts: &CloneOptions) -> Result<()> {
    let canon = canonical_file(base)?;
    let open = OpenOptions {
        cache_bytes: CACHE,
        ..OpenOptions::default()
    };
    // A clone of an encrypted base is encrypted under the base's key.
    let keys = super::keys::get();
    let image = match mountinfo::mount_points_of(&canon).first() {
        Some(mount) => clone_mounted(new, &canon, mount, snap, opts, &open),
        None => Image::create_clone_with_key(new, &canon, snap, opts, &open, keys.as_ref())
            .map_err(|e| mountinfo::explain_locked(&canon, e, true)),
    }
    .map_err(|e| with_path(e, new))?;
    let link = image.backing_chain().into_iter().next();
    let size = image.len();
    image.close().map_err(|e| with_path(e, new))?;
    let used = link.map(|l| l.snapshot).unwrap_or_default();
    if snap.is_none() {
        say!("took snapshot {used} of {}", base.display())?;
    }
    say!(
        "created {}: {}, copy-on-write clone of {}@{used}",
        new.display(),
        format_size(size),
        base.display()
    )?;
    Ok(())
}

/// Runs `vbdfs clone IMAGE@SNAP NEW`.
pub fn clone(args: &CloneArgs) -> Result<()> {
    let (base, snap) = split_at_snapshot(&args.source);
    let snap = snap.ok_or_else(|| {
        Error::invalid(format!(
            "clone: '{}' must be IMAGE@SNAPSHOT (vbdfs create NEW --backing IMAGE \
             snapshots the base first)",
            args.source
        ))
    })?;
    make_clone(&args.new, &base, Some(&snap), &CloneOptions::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_specs() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            format_time(1_709_210_096_000_000_000),
            "2024-02-29 12:34:56 UTC"
        );
        assert_eq!(
            split_at_snapshot("/nope/a.vbd@s1"),
            (PathBuf::from("/nope/a.vbd"), Some("s1".into()))
        );
        assert_eq!(split_at_snapshot("/nope/a.vbd").1, None);
        assert_eq!(split_at_snapshot("@x").1, None);
    }
}
