//! The `fuser::Filesystem` implementation: one handler per FUSE request.
//! Metadata requests are answered inline. Data requests on `disk` that the
//! engine serves from memory (cached blocks; writes that need no read of old
//! data) run inline too; the others, and command writes on `control`, are
//! queued to the worker pool, which replies. Requests
//! on `snapshots/` and the files in it go to `snapfiles.rs`.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use super::inodes::{Inodes, TTL};
use super::snapfiles::is_snapshot;
use super::{errno, failed, ino_name, VbdFs, CONTROL, DISK, SNAPSHOTS};
use crate::control::{Control, Op};

impl VbdFs {
    /// The attributes of `ino`; `disk`'s blocks count what its blocks hold
    /// (written back), as a sparse raw file's would (`cp`, `du` and
    /// `qemu-img info` see the holes).
    fn attr(&self, ino: INodeNo) -> Option<fuser::FileAttr> {
        let mut attr = self.inodes.attr(ino)?;
        if ino == DISK {
            attr.blocks = self.image.allocated_bytes().div_ceil(512);
        }
        Some(attr)
    }

    /// Clamps `[off, off+len)` to the disk; None if `off` is at or past the end.
    fn clamp(&self, off: u64, len: u64) -> Option<u64> {
        let size = self.image.len();
        (off < size).then(|| len.min(size - off))
    }
}

/// A request on `disk` from the moment a FUSE thread has it, for the statistics.
struct Timed {
    op: Op,
    started: Instant,
    offset: u64,
}

impl Timed {
    fn start(op: Op, offset: u64) -> Timed {
        let started = Instant::now();
        Timed {
            op,
            started,
            offset,
        }
    }

    /// Counts the request as replied to, having moved `bytes` if `ok`.
    /// Called just before the reply is sent: a caller that reads `control`
    /// once its request has returned finds it counted.
    fn done(self, control: &Control, bytes: u64, ok: bool) {
        let stats = control.stats();
        stats.finish(self.op, self.started, bytes, self.offset, ok);
    }
}

/// Replies to a write on `disk` of `len` bytes and counts it.
fn reply_written(
    control: &Control,
    result: crate::Result<()>,
    len: usize,
    timed: Timed,
    reply: ReplyWrite,
) {
    timed.done(control, len as u64, result.is_ok());
    match result {
        Ok(()) => reply.written(len as u32),
        Err(e) => reply.error(failed(control, "write disk", &e)),
    }
}

/// Replies to a flush or a discard of `bytes` on `disk` (`what` names it in
/// errors) and counts it.
fn reply_empty(
    control: &Control,
    what: &str,
    result: crate::Result<()>,
    bytes: u64,
    timed: Timed,
    reply: ReplyEmpty,
) {
    timed.done(control, bytes, result.is_ok());
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(failed(control, what, &e)),
    }
}

impl Filesystem for VbdFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        Self::configure(config);
        Ok(())
    }

    fn destroy(&mut self) {
        self.stop();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == SNAPSHOTS {
            return self.snap_lookup(name, reply);
        }
        match Inodes::lookup(parent, name).and_then(|ino| self.attr(ino)) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if is_snapshot(ino) {
            return self.snap_getattr(ino, reply);
        }
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk has a fixed size (O_TRUNC or truncate to another size is
        // refused); the control file ignores truncation (`echo cmd > control`).
        if is_snapshot(ino) {
            return self.snap_setattr(ino, size, reply);
        }
        if ino == DISK && size.is_some_and(|s| s != self.image.len()) {
            return reply.error(Errno::EPERM);
        }
        if !self.inodes.set_owner_mode(ino, mode, uid, gid) {
            return reply.error(Errno::ENOENT);
        }
        self.inodes.set_times(ino, atime, mtime);
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match ino {
            DISK if writing && self.image.is_read_only() => reply.error(Errno::EROFS),
            DISK => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            CONTROL => reply.opened(FileHandle(self.new_fh()), FopenFlags::FOPEN_DIRECT_IO),
            _ if is_snapshot(ino) => self.snap_open(ino, flags, reply),
            _ if self.inodes.attr(ino).is_some() => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match ino {
            DISK => {
                let timed = Timed::start(Op::Read, offset);
                let Some(len) = self.clamp(offset, u64::from(size)) else {
                    timed.done(&self.control, 0, true);
                    return reply.data(&[]);
                };
                let in_memory = !self.image.reads_disk(offset, len, false);
                let (image, control, bufs) =
                    (self.image.clone(), self.control.clone(), self.bufs.clone());
                let job = move || {
                    let mut buf = bufs.get(len as usize);
                    let result = image.read_at(&mut buf[..len as usize], offset);
                    timed.done(&control, len, result.is_ok());
                    match &result {
                        Ok(()) => reply.data(&buf[..len as usize]),
                        Err(e) => reply.error(failed(&control, "read disk", e)),
                    }
                    bufs.put(buf);
                };
                if in_memory {
                    job(); // cached: answered here, no hand-off to a worker
                } else {
                    self.pool.submit(Box::new(job));
                }
            }
            CONTROL => {
                let text = {
                    let mut map = self.status.lock();
                    if offset == 0 || !map.contains_key(&fh.0) {
                        map.insert(fh.0, self.control.status().into_bytes().into());
                    }
                    map.get(&fh.0).cloned().unwrap_or_default()
                };
                let start = (offset as usize).min(text.len());
                let end = start.saturating_add(size as usize).min(text.len());
                reply.data(&text[start..end]);
            }
            _ if is_snapshot(ino) => self.snap_read(fh, offset, size, reply),
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match ino {
            DISK => {
                let timed = Timed::start(Op::Write, offset);
                if self.image.is_read_only() {
                    return reply.error(Errno::EROFS);
                }
                self.control.resume_if_room();
                let Some(len) = self.clamp(offset, data.len() as u64) else {
                    timed.done(&self.control, 0, false);
                    return reply.error(Errno::ENOSPC);
                };
                let len = len as usize;
                self.inodes.disk_written();
                // O_DSYNC or O_SYNC on the file, or RWF_DSYNC on this write
                // (the kernel sends all as O_DSYNC and, for a direct-I/O
                // file, no fsync after): durable before the reply.
                let durable = flags.0 & libc::O_DSYNC != 0;
                let from_memory = !durable && !self.image.reads_disk(offset, len as u64, true);
                let held = from_memory && self.image.write_waits(len as u64);
                let inline = from_memory && (!held || self.hold_inline());
                if inline {
                    // No read-modify-write from disk: written here, straight
                    // from the request (no copy into a buffer, no hand-off).
                    // The last FUSE thread not in a write waits for
                    // write-back only well past the limit (a guess that the
                    // write would not wait can be stale).
                    let busy = self.inline_writes.fetch_add(1, Ordering::AcqRel) + 1;
                    let result = if busy < self.fuse_threads {
                        self.image.write_at(&data[..len], offset)
                    } else {
                        self.image.write_at_late_throttle(&data[..len], offset)
                    };
                    self.inline_writes.fetch_sub(1, Ordering::AcqRel);
                    if held {
                        self.held_inline.fetch_sub(1, Ordering::AcqRel);
                    }
                    return reply_written(&self.control, result, len, timed, reply);
                }
                if held {
                    // Served from memory, but its reply waits for write-back
                    // (`hold_inline` counted it in `held_handed_off`): the
                    // bytes go into the cache here, straight from the request,
                    // and a worker waits and replies. Copied into a buffer
                    // for the worker, 1 MiB writes of a zstd image went 6 %
                    // slower once the held writes were let go in turn.
                    let count = self.held_handed_off.clone();
                    if let Err(e) = self.image.write_unthrottled(&data[..len], offset) {
                        count.fetch_sub(1, Ordering::AcqRel);
                        return reply_written(&self.control, Err(e), len, timed, reply);
                    }
                    let (image, control) = (self.image.clone(), self.control.clone());
                    self.pool.submit(Box::new(move || {
                        image.throttle();
                        count.fetch_sub(1, Ordering::AcqRel);
                        reply_written(&control, Ok(()), len, timed, reply);
                    }));
                    return;
                }
                let mut buf = self.bufs.get(len);
                buf[..len].copy_from_slice(&data[..len]);
                let (image, control, bufs) =
                    (self.image.clone(), self.control.clone(), self.bufs.clone());
                self.pool.submit(Box::new(move || {
                    let mut result = image.write_at(&buf[..len], offset);
                    bufs.put(buf);
                    if durable && result.is_ok() {
                        result = image.flush_range(offset, len as u64);
                    }
                    reply_written(&control, result, len, timed, reply);
                }));
            }
            CONTROL => {
                let data = data.to_vec();
                let control = self.control.clone();
                self.pool
                    .submit(Box::new(move || match control.execute(&data) {
                        Ok(()) => reply.written(data.len() as u32),
                        Err(e) => reply.error(errno(&e)),
                    }));
            }
            _ if is_snapshot(ino) => reply.error(Errno::EROFS),
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): cheap. Only a failed image (a lost write or sync) is reported.
        if ino == DISK && self.control.has_failed() {
            reply.error(Errno::EIO)
        } else {
            reply.ok()
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino == CONTROL {
            self.status.lock().remove(&fh.0);
        } else if is_snapshot(ino) {
            self.snap_release(fh);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != DISK {
            return reply.ok();
        }
        let timed = Timed::start(Op::Flush, 0);
        let (image, control) = (self.image.clone(), self.control.clone());
        self.pool.submit(Box::new(move || {
            control.resume_if_room();
            let result = image.flush();
            reply_empty(&control, "fsync disk", result, 0, timed, reply);
        }));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if is_snapshot(ino) {
            return reply.error(Errno::EROFS);
        }
        if ino != DISK {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if self.image.is_read_only() {
            return reply.error(Errno::EROFS);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let end = offset.saturating_add(length);
        if end > self.image.len() && !keep_size && op != libc::FALLOC_FL_PUNCH_HOLE {
            return reply.error(Errno::EFBIG); // the size is fixed: no growing
        }
        let Some(len) = self.clamp(offset, length) else {
            return reply.ok(); // wholly past the end with KEEP_SIZE: nothing to do
        };
        let zero = match op {
            0 => return reply.ok(), // plain allocation inside the disk: always allocated
            libc::FALLOC_FL_PUNCH_HOLE => false,
            libc::FALLOC_FL_ZERO_RANGE => true,
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        self.inodes.disk_written();
        let timed = Timed::start(Op::Discard, offset);
        let (image, control) = (self.image.clone(), self.control.clone());
        self.pool.submit(Box::new(move || {
            let result = if zero {
                image.write_zeroes(offset, len)
            } else {
                image.discard(offset, len)
            };
            reply_empty(&control, "fallocate disk", result, len, timed, reply);
        }));
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if is_snapshot(ino) {
            let Ok(off) = u64::try_from(offset) else {
                return reply.error(Errno::ENXIO);
            };
            return self.snap_lseek(fh, off, whence, reply);
        }
        if ino != DISK {
            return reply.error(Errno::EINVAL);
        }
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        if off >= self.image.len() {
            return reply.error(Errno::ENXIO);
        }
        let found = match whence {
            libc::SEEK_DATA => self.image.next_data(off),
            libc::SEEK_HOLE => Some(self.image.next_hole(off)),
            _ => return reply.error(Errno::EINVAL),
        };
        match found.and_then(|o| i64::try_from(o).ok()) {
            Some(o) => reply.offset(o),
            None => reply.error(Errno::ENXIO),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino == SNAPSHOTS {
            return self.snap_readdir(offset, reply);
        }
        let Some(entries) = Inodes::dir_entries(ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(child, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// The host file system's size and room (`df DIR`): what the image can
    /// still grow into, the figure to watch (a full host disk fails writes).
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match crate::sys::fs_space(&self.host_file) {
            Ok(s) => {
                let unit = u32::try_from(s.unit).unwrap_or(4096);
                reply.statfs(
                    s.blocks,
                    s.free,
                    s.available,
                    s.files,
                    s.free_files,
                    unit,
                    255,
                    unit,
                );
            }
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS); // the kernel remembers: no more xattr calls
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // The mount's names are fixed: creating, removing, renaming or linking
    // anything is not permitted (fuser's defaults say ENOSYS and log a
    // warning each time).
    fn mknod(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    #[rustfmt::skip]
    fn create(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: i32, reply: ReplyCreate) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn symlink(&self, _: &Request, _: INodeNo, _: &OsStr, _: &Path, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    #[rustfmt::skip]
    fn rename(&self, _: &Request, _: INodeNo, _: &OsStr, _: INodeNo, _: &OsStr, _: RenameFlags, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn link(&self, _: &Request, _: INodeNo, _: INodeNo, _: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        log::trace!("access {}", ino_name(ino));
        reply.ok(); // permission checks are the kernel's (default_permissions)
    }
}
