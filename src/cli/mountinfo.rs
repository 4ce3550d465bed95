//! Finding vbdfs mounts in `/proc/self/mountinfo`.
//!
//! Every vbdfs mount has the source (fsname) `<canonical image path>` and the
//! type `fuse.vbdfs` (the source is the path as fstab names it, so `mount -a`
//! sees the line mounted; mounts of earlier versions have the source
//! `vbdfs:<path>`, also under the type `fuse`), so
//! "where is this image mounted?" and "is this directory a vbdfs mount?" are
//! answered from the mount table alone, without talking to any daemon.

use std::path::{Path, PathBuf};

use crate::{Error, ErrorKind};

/// The fsname of a mount of `image` (a canonical path).
pub fn fs_name(image: &Path) -> String {
    image.display().to_string()
}

/// One line of the mount table, the fields vbdfs needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The file system type (`fuse.vbdfs`).
    pub fstype: String,
    /// The source (`/path/to/image.vbd`).
    pub source: String,
    /// The device, `major:minor`.
    pub device: String,
    /// The mount's options, then the file system's (super) options.
    pub options: Vec<String>,
}

impl MountEntry {
    /// The image path of a vbdfs mount, None for other mounts.
    pub fn image(&self) -> Option<PathBuf> {
        let earlier = self.source.strip_prefix("vbdfs:");
        match self.fstype.as_str() {
            "fuse.vbdfs" => Some(PathBuf::from(earlier.unwrap_or(&self.source))),
            "fuse" => earlier.map(PathBuf::from),
            _ => None,
        }
    }
}

/// Undoes the octal escapes (`\040` for space) of mountinfo fields.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(v as u8);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut left = left.split(' ');
            let device = left.nth(2)?;
            let mount_point = left.nth(1)?;
            let mount_options = left.next()?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let source = right.next()?;
            let super_options = right.next().unwrap_or_default();
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: unescape(fstype),
                source: unescape(source),
                device: device.to_string(),
                options: [mount_options, super_options]
                    .iter()
                    .flat_map(|o| o.split(','))
                    .map(unescape)
                    .collect(),
            })
        })
        .collect()
}

/// The current mount table (empty if it cannot be read).
pub fn read() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Where `image` (canonical path) is mounted.
pub fn mount_points_of(image: &Path) -> Vec<PathBuf> {
    // By path, and by file identity: a hard link names the same image.
    let id = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    };
    let own = id(image);
    read()
        .into_iter()
        .filter(|m| {
            m.image()
                .is_some_and(|path| path == image || (own.is_some() && id(&path) == own))
        })
        .map(|m| m.mount_point)
        .collect()
}

/// The vbdfs mount at `dir`, if any (the last one mounted there wins).
pub fn vbdfs_mount_at(dir: &Path) -> Option<MountEntry> {
    read()
        .into_iter()
        .rfind(|m| m.mount_point == dir)
        .filter(|m| m.image().is_some())
}

/// The mount point of the file system holding `path` if that is ext4
/// mounted with online `discard`. There every hole vbdfs punches to give dead
/// records' space back is discarded on the device inside the punch, while the
/// file's writes wait for it: ~0.2 ms per MiB freed on the machines of
/// `benches/RESULTS.md`, where it costs sequential overwrites a quarter of
/// their speed.
pub fn synchronous_discard(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let device = format!("{}:{}", libc::major(dev), libc::minor(dev));
    discarding_mount(&read(), &device).map(|m| m.mount_point.clone())
}

/// The first mount of `device` in `mounts` (bind mounts follow it and share
/// its file system's options), if it is ext4 (or ext3) with `discard`.
fn discarding_mount<'a>(mounts: &'a [MountEntry], device: &str) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .find(|m| m.device == device)
        .filter(|m| matches!(m.fstype.as_str(), "ext4" | "ext3"))
        .filter(|m| m.options.iter().any(|o| o == "discard"))
}

/// True if `dir` is a FUSE mount whose daemon is gone ("transport endpoint
/// is not connected").
pub fn is_dead(dir: &Path) -> bool {
    // Not stat: the kernel may answer that from its attribute cache.
    std::fs::read_dir(dir).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

/// True if the vbdfs mount at `dir` says it is read-only.
fn mounted_read_only(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("control"))
        .is_ok_and(|status| status.lines().any(|l| l == "read-only: yes"))
}

/// Replaces an engine [`ErrorKind::Locked`] error on `image` with one that says
/// where the image is mounted (and, when the mount's control file does what
/// was asked, `online`, and the mount is read-write, to use that); other
/// errors pass through.
pub fn explain_locked(image: &Path, err: Error, online: bool) -> Error {
    if err.kind() != ErrorKind::Locked {
        return err;
    }
    let dirs = mount_points_of(image);
    match dirs.first() {
        Some(dir) => {
            // A read-only mount's control file takes no such command.
            let control = if online && !mounted_read_only(dir) {
                format!("use {}/control while it is mounted, or ", dir.display())
            } else {
                String::new()
            };
            Error::new(
                ErrorKind::Locked,
                format!(
                    "{} is mounted at {}: {control}unmount it first (vbdfs umount {})",
                    image.display(),
                    dir.display(),
                    dir.display()
                ),
            )
        }
        None => Error::new(
            ErrorKind::Locked,
            format!(
                "{} is in use by another process (it is not mounted)",
                image.display()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:50 / /run/vbd/vm\\0401 rw,nosuid,nodev,relatime shared:20 - fuse.vbdfs vbdfs:/srv/my\\040img.vbd rw,user_id=0,group_id=0
41 22 0:51 / /mnt/other rw,nosuid,nodev - fuse sshfs#x rw
42 22 0:52 / /mnt/old rw - fuse vbdfs:/srv/b.vbd rw
garbage line
";

    #[test]
    fn parses_and_unescapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, PathBuf::from("/run/vbd/vm 1"));
        assert_eq!(m[1].image(), Some(PathBuf::from("/srv/my img.vbd")));
        assert_eq!(m[2].image(), None);
        assert_eq!(m[3].image(), Some(PathBuf::from("/srv/b.vbd")));
        assert_eq!(m[0].image(), None);
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(m[0].device, "8:1");
        assert_eq!(m[0].options, ["rw", "relatime", "rw"]);
    }

    #[test]
    fn finds_ext4_mounted_with_discard() {
        let table = parse(
            "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,discard,errors=remount-ro
23 1 8:2 / /srv rw - ext4 /dev/vda2 rw,nodiscard
24 1 8:3 / /xfs rw - xfs /dev/vda3 rw,discard
25 22 8:1 /srv/images /images rw - ext4 /dev/vda1 rw,discard,errors=remount-ro
",
        );
        let found = |dev| discarding_mount(&table, dev).map(|m| m.mount_point.clone());
        assert_eq!(found("8:1"), Some(PathBuf::from("/")), "not its bind mount");
        assert_eq!(found("8:2"), None, "nodiscard");
        assert_eq!(found("8:3"), None, "not ext4: not measured");
        assert_eq!(found("8:9"), None, "not in the table");
    }

    #[test]
    fn fs_name_round_trips() {
        let src = fs_name(Path::new("/x/y.vbd"));
        let e = MountEntry {
            mount_point: "/m".into(),
            fstype: "fuse.vbdfs".into(),
            source: src,
            device: "0:50".into(),
            options: vec![],
        };
        assert_eq!(e.image(), Some(PathBuf::from("/x/y.vbd")));
        // A mount of an earlier version, and another FUSE file system.
        let earlier = MountEntry {
            fstype: "fuse".into(),
            source: "vbdfs:/x/z.vbd".into(),
            ..e.clone()
        };
        assert_eq!(earlier.image(), Some(PathBuf::from("/x/z.vbd")));
        let other = MountEntry {
            fstype: "fuse.sshfs".into(),
            source: "/x/y.vbd".into(),
            ..e
        };
        assert_eq!(other.image(), None);
    }
}
