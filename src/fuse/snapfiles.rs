//! `snapshots/NAME`: each snapshot of the image as a read-only flat raw file.
//!
//! A snapshot file's inode is [`SNAP_INO_BASE`] + the snapshot's id (ids are
//! never reused, so an inode never changes meaning). Entries and attributes
//! are given with a zero TTL: a snapshot created through `control` is visible
//! at once and a deleted one is gone at once, without kernel invalidations.
//!
//! Opening a snapshot file opens an engine [`SnapshotReader`] (shared by all
//! open handles of that snapshot), which pins the snapshot: deleting it fails
//! with EBUSY while any handle is open. Reads go to the worker pool like reads
//! of `disk` (`FOPEN_DIRECT_IO`: O_DIRECT and buffered reads both reach the
//! engine, nothing is cached twice). Opening for writing fails with EROFS;
//! truncate, fallocate and attribute changes fail with EROFS/EPERM.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyLseek, ReplyOpen,
};

use super::inodes::Inodes;
use super::{errno, VbdFs, SNAPSHOTS};
use crate::engine::SnapshotReader;
use crate::{Error, ErrorKind, Image};
use parking_lot::Mutex;
use std::collections::HashMap;

/// Inode of the snapshot with id 0 (ids start at 1).
pub const SNAP_INO_BASE: u64 = 1 << 32;

/// Snapshot entries and attributes are never cached by the kernel.
const SNAP_TTL: Duration = Duration::ZERO;

/// True if `ino` is a snapshot file.
pub fn is_snapshot(ino: INodeNo) -> bool {
    ino.0 > SNAP_INO_BASE
}

/// Open snapshot readers by file handle.
pub type SnapHandles = Mutex<HashMap<u64, Arc<SnapshotReader>>>;

/// A reader of snapshot `id`: shared with an open handle, or newly opened.
fn open_reader(
    image: &Image,
    handles: &SnapHandles,
    id: u64,
) -> Result<Arc<SnapshotReader>, Error> {
    let shared = handles.lock().values().find(|r| r.info().id == id).cloned();
    if let Some(reader) = shared {
        return Ok(reader);
    }
    let name = image
        .snapshot_list()
        .into_iter()
        .find(|s| s.id == id)
        .map(|s| s.name)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no snapshot {id}")))?;
    let reader = image.open_snapshot(&name)?;
    if reader.info().id != id {
        return Err(Error::new(ErrorKind::NotFound, "snapshot replaced"));
    }
    for lost in reader.lost_leaves() {
        log::warn!("snapshot '{name}': {lost}");
    }
    Ok(Arc::new(reader))
}

impl VbdFs {
    /// The attributes of snapshot file `ino`, if that snapshot exists.
    fn snap_attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let id = ino.0.checked_sub(SNAP_INO_BASE)?;
        let info = self
            .image
            .snapshot_list()
            .into_iter()
            .find(|s| s.id == id)?;
        // A clone's snapshot also shows its base's blocks: counted whole,
        // as `disk`'s are.
        let allocated = match self.image.backing_chain().is_empty() {
            true => info.allocated_bytes,
            false => info.virtual_size,
        };
        Some(
            self.inodes
                .snapshot_attr(ino, info.virtual_size, allocated, info.created_ns),
        )
    }

    /// `lookup` in `snapshots/`.
    pub(super) fn snap_lookup(&self, name: &OsStr, reply: ReplyEntry) {
        let found = name
            .to_str()
            .and_then(|n| self.image.snapshot(n).ok())
            .and_then(|info| self.snap_attr(INodeNo(SNAP_INO_BASE + info.id)));
        match found {
            Some(attr) => reply.entry(&SNAP_TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// `getattr` of a snapshot file.
    pub(super) fn snap_getattr(&self, ino: INodeNo, reply: ReplyAttr) {
        match self.snap_attr(ino) {
            Some(attr) => reply.attr(&SNAP_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// `setattr` of a snapshot file: nothing may change.
    pub(super) fn snap_setattr(&self, ino: INodeNo, size: Option<u64>, reply: ReplyAttr) {
        match self.snap_attr(ino) {
            None => reply.error(Errno::ENOENT),
            Some(attr) if size.is_some_and(|s| s != attr.size) => reply.error(Errno::EPERM),
            Some(_) => reply.error(Errno::EROFS),
        }
    }

    /// `readdir` of `snapshots/`.
    pub(super) fn snap_readdir(&self, offset: u64, mut reply: ReplyDirectory) {
        let mut entries: Vec<(INodeNo, FileType, String)> = Inodes::dir_entries(SNAPSHOTS)
            .unwrap_or_default()
            .into_iter()
            .map(|(ino, kind, name)| (ino, kind, name.to_string()))
            .collect();
        entries.extend(
            self.image
                .snapshot_list()
                .into_iter()
                .map(|s| (INodeNo(SNAP_INO_BASE + s.id), FileType::RegularFile, s.name)),
        );
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// `open` of a snapshot file: read-only, pins the snapshot. Loading the
    /// snapshot's map reads the file, so it runs on the worker pool; handles
    /// of one snapshot share one reader.
    pub(super) fn snap_open(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(id) = ino.0.checked_sub(SNAP_INO_BASE) else {
            return reply.error(Errno::ENOENT);
        };
        let fh = self.new_fh();
        let (image, handles) = (self.image.clone(), self.snap_handles.clone());
        self.pool
            .submit(Box::new(move || match open_reader(&image, &handles, id) {
                Ok(reader) => {
                    handles.lock().insert(fh, reader);
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
                }
                Err(e) => reply.error(errno(&e)),
            }));
    }

    /// `release` of a snapshot file: the last handle unpins the snapshot.
    pub(super) fn snap_release(&self, fh: FileHandle) {
        let reader = self.snap_handles.lock().remove(&fh.0);
        drop(reader);
    }

    /// `read` of a snapshot file (on the worker pool).
    pub(super) fn snap_read(&self, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        let Some(reader) = self.snap_handles.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let len = reader.len();
        if offset >= len {
            return reply.data(&[]);
        }
        let n = u64::from(size).min(len - offset) as usize;
        let (control, bufs) = (self.control.clone(), self.bufs.clone());
        self.pool.submit(Box::new(move || {
            let mut buf = bufs.get(n);
            match reader.read_at(&mut buf[..n], offset) {
                Ok(()) => reply.data(&buf[..n]),
                Err(e) => reply.error(super::failed(&control, "read snapshot", &e)),
            }
            bufs.put(buf);
        }));
    }

    /// `lseek` SEEK_DATA/SEEK_HOLE in a snapshot file.
    pub(super) fn snap_lseek(&self, fh: FileHandle, off: u64, whence: i32, reply: ReplyLseek) {
        let Some(reader) = self.snap_handles.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        if off >= reader.len() {
            return reply.error(Errno::ENXIO);
        }
        let found = match whence {
            libc::SEEK_DATA => reader.next_data(off),
            libc::SEEK_HOLE => Some(reader.next_hole(off)),
            _ => return reply.error(Errno::EINVAL),
        };
        match found.and_then(|o| i64::try_from(o).ok()) {
            Some(o) => reply.offset(o),
            None => reply.error(Errno::ENXIO),
        }
    }
}
