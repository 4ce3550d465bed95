//! The fixed inode table of a mount: `/`, `disk`, `control` and the
//! `snapshots/` directory, with their attributes (the snapshot files inside
//! are `snapfiles.rs`'s; their attributes are built here from `disk`'s).
//!
//! Ownership and permission bits live here (set from `uid=`, `gid=`, `mode=`,
//! changeable with chmod/chown while mounted, not persisted). Sizes come from
//! the image. `disk`'s modification time starts at the image file's and
//! moves with every write (backup tools that compare times see a change);
//! `touch` sets it for the mount. The other times are the mount time.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use parking_lot::Mutex;

/// The root directory.
pub const ROOT: INodeNo = INodeNo::ROOT;
/// The flat raw disk file.
pub const DISK: INodeNo = INodeNo(2);
/// The control file.
pub const CONTROL: INodeNo = INodeNo(3);
/// The `snapshots/` directory.
pub const SNAPSHOTS: INodeNo = INodeNo(4);

/// How long the kernel may cache attributes and entries: nothing here changes
/// behind the kernel's back (the disk size is fixed; chmod goes through us).
pub const TTL: Duration = Duration::from_secs(3600);

/// Names in the root directory, with their inode and type.
pub const ROOT_ENTRIES: [(&str, INodeNo, FileType); 3] = [
    ("disk", DISK, FileType::RegularFile),
    ("control", CONTROL, FileType::RegularFile),
    ("snapshots", SNAPSHOTS, FileType::Directory),
];

#[derive(Debug, Clone, Copy)]
struct Meta {
    perm: u16,
    uid: u32,
    gid: u32,
}

/// Attributes of the four inodes.
#[derive(Debug)]
pub struct Inodes {
    meta: Mutex<[Meta; 4]>,
    disk_size: u64,
    blksize: u32,
    time: SystemTime,
    /// `disk`'s atime, mtime and ctime in ns since the epoch (a write moves
    /// two of them without a lock).
    disk_times: [AtomicU64; 3],
}

const ATIME: usize = 0;
const MTIME: usize = 1;
const CTIME: usize = 2;

fn to_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn from_ns(ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
}

impl Inodes {
    /// A table for a disk of `disk_size` bytes, owned by `uid:gid` with
    /// `disk_mode`, last modified at `modified` (the image file's mtime).
    pub fn new(
        disk_size: u64,
        blksize: u32,
        uid: u32,
        gid: u32,
        disk_mode: u32,
        modified: SystemTime,
    ) -> Inodes {
        let perm = |m: u32| (m & 0o7777) as u16;
        let meta = [
            Meta {
                perm: 0o755,
                uid,
                gid,
            },
            Meta {
                perm: perm(disk_mode),
                uid,
                gid,
            },
            Meta {
                perm: 0o600,
                uid,
                gid,
            },
            Meta {
                perm: 0o755,
                uid,
                gid,
            },
        ];
        let now = SystemTime::now();
        Inodes {
            meta: Mutex::new(meta),
            disk_size,
            blksize,
            time: now,
            disk_times: [
                AtomicU64::new(to_ns(now)),
                AtomicU64::new(to_ns(modified)),
                AtomicU64::new(to_ns(modified)),
            ],
        }
    }

    /// `disk` was written: its mtime and ctime become now.
    pub fn disk_written(&self) {
        let now = to_ns(SystemTime::now());
        self.disk_times[MTIME].store(now, Ordering::Relaxed);
        self.disk_times[CTIME].store(now, Ordering::Relaxed);
    }

    /// `touch`/`utimensat` and any other change of `disk`'s attributes
    /// (its ctime becomes now); the other inodes keep the mount time.
    pub fn set_times(&self, ino: INodeNo, atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>) {
        if ino != DISK {
            return;
        }
        let now = SystemTime::now();
        let at = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => to_ns(t),
            TimeOrNow::Now => to_ns(now),
        };
        if let Some(t) = atime {
            self.disk_times[ATIME].store(at(t), Ordering::Relaxed);
        }
        if let Some(t) = mtime {
            self.disk_times[MTIME].store(at(t), Ordering::Relaxed);
        }
        self.disk_times[CTIME].store(to_ns(now), Ordering::Relaxed);
    }

    fn index(ino: INodeNo) -> Option<usize> {
        match ino.0 {
            1..=4 => Some(ino.0 as usize - 1),
            _ => None,
        }
    }

    /// Looks up `name` in directory `parent`.
    pub fn lookup(parent: INodeNo, name: &OsStr) -> Option<INodeNo> {
        if parent != ROOT {
            return None;
        }
        ROOT_ENTRIES
            .iter()
            .find(|(n, _, _)| OsStr::new(n) == name)
            .map(|&(_, ino, _)| ino)
    }

    /// The entries of directory `ino` including `.` and `..`, or None if not a directory.
    pub fn dir_entries(ino: INodeNo) -> Option<Vec<(INodeNo, FileType, &'static str)>> {
        let mut out = vec![
            (ino, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        match ino {
            ROOT => out.extend(ROOT_ENTRIES.iter().map(|&(n, i, k)| (i, k, n))),
            SNAPSHOTS => {}
            _ => return None,
        }
        Some(out)
    }

    /// The attributes of `ino`, or None if there is no such inode.
    pub fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let meta = self.meta.lock()[Self::index(ino)?];
        let (kind, size, nlink) = match ino {
            DISK => (FileType::RegularFile, self.disk_size, 1),
            CONTROL => (FileType::RegularFile, 0, 1),
            ROOT => (FileType::Directory, 0, 3),
            _ => (FileType::Directory, 0, 2),
        };
        let [atime, mtime, ctime] = match ino {
            DISK => self
                .disk_times
                .each_ref()
                .map(|t| from_ns(t.load(Ordering::Relaxed))),
            _ => [self.time; 3],
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime,
            mtime,
            ctime,
            crtime: self.time,
            kind,
            perm: meta.perm,
            nlink,
            uid: meta.uid,
            gid: meta.gid,
            rdev: 0,
            blksize: self.blksize,
            flags: 0,
        })
    }

    /// The attributes of a snapshot file `ino`: owned like `disk`, its
    /// permission bits without any write bit, times = the snapshot's creation,
    /// blocks = what it holds (`allocated` bytes), as a sparse file's.
    pub fn snapshot_attr(
        &self,
        ino: INodeNo,
        size: u64,
        allocated: u64,
        created_ns: u64,
    ) -> FileAttr {
        let disk = self.meta.lock()[1];
        let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(created_ns);
        FileAttr {
            ino,
            size,
            blocks: allocated.min(size).div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind: FileType::RegularFile,
            perm: disk.perm & 0o5555,
            nlink: 1,
            uid: disk.uid,
            gid: disk.gid,
            rdev: 0,
            blksize: self.blksize,
            flags: 0,
        }
    }

    /// Applies chmod/chown; returns false if there is no such inode.
    pub fn set_owner_mode(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> bool {
        let Some(i) = Self::index(ino) else {
            return false;
        };
        let mut meta = self.meta.lock();
        if let Some(mode) = mode {
            meta[i].perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            meta[i].uid = uid;
        }
        if let Some(gid) = gid {
            meta[i].gid = gid;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let t = Inodes::new(1 << 30, 65536, 7, 8, 0o640, SystemTime::UNIX_EPOCH);
        let disk = t.attr(DISK).map(|a| (a.size, a.perm, a.uid, a.gid, a.kind));
        assert_eq!(disk, Some((1 << 30, 0o640, 7, 8, FileType::RegularFile)));
        assert_eq!(t.attr(CONTROL).map(|a| a.perm), Some(0o600));
        assert!(t.attr(INodeNo(5)).is_none());
        assert_eq!(Inodes::lookup(ROOT, OsStr::new("disk")), Some(DISK));
        assert_eq!(Inodes::lookup(SNAPSHOTS, OsStr::new("disk")), None);
        assert_eq!(Inodes::lookup(ROOT, OsStr::new("nope")), None);
        assert_eq!(Inodes::dir_entries(ROOT).map(|e| e.len()), Some(5));
        assert_eq!(Inodes::dir_entries(SNAPSHOTS).map(|e| e.len()), Some(2));
        assert!(Inodes::dir_entries(DISK).is_none());
        assert!(t.set_owner_mode(DISK, Some(0o100644), Some(1), None));
        assert_eq!(
            t.attr(DISK).map(|a| (a.perm, a.uid, a.gid)),
            Some((0o644, 1, 8))
        );
    }

    #[test]
    fn disk_times_follow_writes_and_touch() {
        let t = Inodes::new(1 << 20, 4096, 0, 0, 0o600, SystemTime::UNIX_EPOCH);
        let mtime = |t: &Inodes| t.attr(DISK).map(|a| a.mtime);
        assert_eq!(mtime(&t), Some(SystemTime::UNIX_EPOCH));
        t.disk_written();
        assert!(mtime(&t) > Some(SystemTime::now() - Duration::from_secs(60)));
        let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        t.set_times(DISK, None, Some(TimeOrNow::SpecificTime(then)));
        assert_eq!(mtime(&t), Some(then));
        let ctime = t.attr(DISK).map(|a| a.ctime);
        assert!(ctime > Some(then), "a touch moves the ctime to now");
        t.set_times(CONTROL, None, Some(TimeOrNow::SpecificTime(then)));
        assert_ne!(t.attr(CONTROL).map(|a| a.mtime), Some(then));
    }
}
