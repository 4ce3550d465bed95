//! The only module with `unsafe`: thin wrappers over libc calls that std does not
//! offer. Each block carries a `// SAFETY:` note; everything else in the crate is
//! safe code (`unsafe_code` is denied at the crate root and allowed only here).
#![allow(unsafe_code)]

pub mod uring;

use std::io;
use std::os::fd::AsRawFd;

/// Deallocates `len` bytes at `off` in `file` (`FALLOC_FL_PUNCH_HOLE |
/// FALLOC_FL_KEEP_SIZE`): the range reads back as zeros and stops costing space.
pub fn punch_hole(file: &impl AsRawFd, off: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for the
    // lifetime of `file`, which the caller borrows for the duration of the call.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Allocates `[off, off+len)` in `file` and extends its size to cover it
/// (`fallocate` mode 0): later writes there are overwrites of allocated
/// blocks, which ext4 lets run in parallel under O_DIRECT.
pub fn allocate(file: &impl AsRawFd, off: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for the
    // lifetime of `file`, which the caller borrows for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Tells the kernel that the cached pages of `file` in `[off, off+len)` are not
/// needed again (`POSIX_FADV_DONTNEED`), so the host page cache does not hold a
/// second copy of data the engine caches itself. Advisory: errors are ignored.
fn drop_page_cache(file: &impl AsRawFd, off: u64, len: u64) {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its integer arguments and the fd, which is
    // valid while `file` is borrowed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED);
    }
}

/// `lseek(SEEK_DATA)`: the first offset `>= off` inside a data region of `file`,
/// or `None` when only a hole (or EOF) follows. The fd's file position moves;
/// callers use positional I/O only, so it does not matter.
pub fn seek_data(file: &impl AsRawFd, off: u64) -> io::Result<Option<u64>> {
    seek(file, off, libc::SEEK_DATA)
}

/// `lseek(SEEK_HOLE)`: the first offset `>= off` inside a hole of `file` (the end
/// of file counts as a hole), or `None` when `off` is at or past the end.
pub fn seek_hole(file: &impl AsRawFd, off: u64) -> io::Result<Option<u64>> {
    seek(file, off, libc::SEEK_HOLE)
}

fn seek(file: &impl AsRawFd, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek only reads its integer arguments; the fd is valid while
    // `file` is borrowed, and no memory is passed to the kernel.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc >= 0 {
        return Ok(u64::try_from(rc).ok());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

// ---- process, mount and signal wrappers used by the CLI and the FUSE daemon ----

/// `prctl(PR_SET_IO_FLUSHER)` is 57 on Linux (the libc crate lacks the constant).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cstring(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Number of threads in this process (from `/proc/self/status`).
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// Result of [`fork_process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent; the child's pid.
    Parent(u32),
    /// In the child.
    Child,
}

/// `fork(2)`, refused unless the process has exactly one thread (a fork of a
/// multi-threaded process may leave locks held by threads that do not exist in
/// the child).
pub fn fork_process() -> io::Result<Forked> {
    if thread_count()? != 1 {
        return Err(io::Error::other(
            "fork refused: the process already runs threads",
        ));
    }
    // SAFETY: the process is single-threaded (checked above), so the child
    // inherits no lock held by another thread; fork takes no pointers.
    let pid = cvt(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid as u32)
    })
}

/// `setsid(2)`: detach from the controlling terminal and process group.
pub fn new_session() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and touches no memory of ours.
    cvt(unsafe { libc::setsid() }).map(|_| ())
}

/// Closes every descriptor above stderr except `keep`: a daemon must not
/// hold what its caller passed down (a `flock`ed file would stay locked for
/// the life of the mount, a pipe would never see its end).
pub fn close_inherited_fds(keep: &impl AsRawFd) -> io::Result<()> {
    let keep = keep.as_raw_fd();
    let close = |first: libc::c_int, last: libc::c_uint| -> io::Result<()> {
        if first as libc::c_uint > last {
            return Ok(());
        }
        // SAFETY: close_range only takes integers and closes descriptors in
        // that range; nothing of ours is in it but what the caller gave up
        // (no other thread runs in a freshly forked child).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                last,
                0 as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    close(3, (keep - 1) as libc::c_uint)?;
    close(keep + 1, libc::c_uint::MAX)
}

/// Points stdin, stdout and stderr at `fd` (`dup2` onto 0, 1 and 2).
pub fn redirect_stdio(fd: &impl AsRawFd) -> io::Result<()> {
    for target in 0..3 {
        // SAFETY: dup2 only reads two integers; `fd` is open while borrowed and
        // 0..3 are the standard descriptors, which std never closes.
        cvt(unsafe { libc::dup2(fd.as_raw_fd(), target) })?;
    }
    Ok(())
}

fn sigset(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; an all-zero value is a valid (if
    // unspecified) set that sigemptyset then initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    cvt(unsafe { libc::sigemptyset(&mut set) })?;
    for &sig in signals {
        // SAFETY: as above; sigaddset validates `sig` and fails with EINVAL.
        cvt(unsafe { libc::sigaddset(&mut set, sig) })?;
    }
    Ok(set)
}

/// Ignores `SIGXFSZ` for the whole process: a write past the file-size limit
/// (`ulimit -f`, systemd `LimitFSIZE=`) then fails with `EFBIG`, which is
/// reported, instead of killing the process (a daemon killed so leaves a
/// dead mount).
pub fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: SIG_IGN is a valid disposition for SIGXFSZ; no handler code
    // runs, so nothing async-signal-unsafe can happen.
    let old = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if old == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Blocks `signals` in the calling thread; threads spawned afterwards inherit
/// the mask, so only [`wait_signal`] receives them.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals)?;
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits for one of `signals` (which must be blocked) and returns it.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals)?;
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out-pointer for the call.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc == 0 {
        Ok(sig)
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// `mount(2)` with a source, a file system type, flags and a data string.
pub fn mount(
    source: &str,
    target: &std::path::Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let bad = |_| io::Error::new(io::ErrorKind::InvalidInput, "mount argument contains NUL");
    let source = std::ffi::CString::new(source).map_err(bad)?;
    let fstype = std::ffi::CString::new(fstype).map_err(bad)?;
    let data = std::ffi::CString::new(data).map_err(bad)?;
    let target = cstring(target)?;
    // SAFETY: every pointer is a NUL-terminated string that lives until the call
    // returns; the kernel copies them.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
    .map(|_| ())
}

/// `umount2(2)`; `lazy` adds `MNT_DETACH`.
pub fn unmount(target: &std::path::Path, lazy: bool) -> io::Result<()> {
    let target = cstring(target)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `target` is a NUL-terminated string alive for the call.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) }).map(|_| ())
}

/// `prctl(PR_SET_IO_FLUSHER, 1)`: memory reclaim will not wait on this process's
/// own I/O (the FUSE daemon case). Needs CAP_SYS_RESOURCE; best effort.
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    cvt(unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) }).map(|_| ())
}

/// The host's physical memory (`sysconf`), None if unknown.
pub fn memory_bytes() -> Option<u64> {
    // SAFETY: sysconf takes an integer name and reads system configuration.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page > 0).then(|| pages as u64 * page as u64)
}

/// Size and room of a file system, as `statvfs` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Fragment size: the unit of `blocks`, `free` and `available`.
    pub unit: u64,
    pub blocks: u64,
    pub free: u64,
    /// Free to unprivileged users.
    pub available: u64,
    pub files: u64,
    pub free_files: u64,
}

/// The space of the file system that holds `file` (`fstatvfs`).
pub fn fs_space(file: &impl AsRawFd) -> io::Result<FsSpace> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: fstatvfs writes one `statvfs` into the buffer we own; the fd is
    // valid while `file` is borrowed.
    cvt(unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: zero-initialised, then filled by the successful call above.
    let st = unsafe { st.assume_init() };
    Ok(FsSpace {
        unit: st.f_frsize,
        blocks: st.f_blocks,
        free: st.f_bfree,
        available: st.f_bavail,
        files: st.f_files,
        free_files: st.f_ffree,
    })
}

/// The effective user and group ids of this process.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail and take no arguments.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Starts writeback of `[off, off+len)` of `file` to the disk without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), and, when `wait` is set, waits
/// for it and drops the range from the page cache. Used to keep the host's
/// dirty pages of an image bounded (no writeback storm, no double caching).
/// Advisory: errors are ignored; durability still comes from fdatasync.
pub fn writeback_hint(file: &impl AsRawFd, off: u64, len: u64, wait: bool) {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: sync_file_range only reads its integer arguments and the fd, which
    // is valid while `file` is borrowed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, len, flags);
    }
    if wait {
        drop_page_cache(file, off as u64, len as u64);
    }
}

/// The bytes a `preadv`/`pwritev` returning `n` transferred: `None` to retry
/// after EINTR, `Err(none)` when nothing was transferred (end of file, or a
/// write that made no progress).
fn transferred(n: isize, none: io::ErrorKind) -> io::Result<Option<usize>> {
    match n {
        0 => Err(io::Error::from(none)),
        n if n > 0 => Ok(Some(n as usize)),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

/// Writes the concatenation of `bufs` at `off` with `pwritev`, retrying short
/// writes and EINTR until everything is written.
pub fn pwritev_all(file: &impl AsRawFd, bufs: &[&[u8]], off: u64) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
    let mut off = off;
    while !parts.is_empty() {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let at = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into a slice borrowed for this whole call
        // (`parts` outlives the syscall); pwritev only reads from them. The fd
        // is valid while `file` is borrowed.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), count, at) };
        let Some(mut n) = transferred(n, io::ErrorKind::WriteZero)? else {
            continue;
        };
        off += n as u64;
        while let Some(first) = parts.first_mut() {
            if n >= first.len() {
                n -= first.len();
                parts.remove(0);
            } else {
                *first = &first[n..];
                break;
            }
        }
    }
    Ok(())
}

/// Reads `head.len() + body_len` bytes at `off` with `preadv`: the first
/// bytes into `head`, the rest appended to `body` without zero-filling it
/// first (a 64 KiB record read into a zeroed buffer spent as much time in
/// memset as in the copy from the page cache). Retries short reads and EINTR;
/// the end of the file before everything is read is `UnexpectedEof`.
pub fn preadv_head_and_body(
    file: &impl AsRawFd,
    head: &mut [u8],
    body: &mut Vec<u8>,
    body_len: usize,
    off: u64,
) -> io::Result<()> {
    body.clear();
    body.reserve_exact(body_len);
    let mut head_done = 0usize;
    while head_done < head.len() || body.len() < body_len {
        let left = body_len - body.len();
        let spare = &mut body.spare_capacity_mut()[..left];
        let iov = [
            libc::iovec {
                iov_base: head[head_done..].as_mut_ptr().cast(),
                iov_len: head.len() - head_done,
            },
            libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            },
        ];
        let at = off + (head_done + body.len()) as u64;
        let at = i64::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: both iovecs point into memory borrowed mutably for this
        // call: the unread rest of `head` and the spare capacity of `body`
        // (`MaybeUninit<u8>`, which preadv may write freely). The fd is valid
        // while `file` is borrowed.
        let n = unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), 2, at) };
        let Some(n) = transferred(n, io::ErrorKind::UnexpectedEof)? else {
            continue;
        };
        let to_head = n.min(head.len() - head_done);
        head_done += to_head;
        let to_body = n - to_head;
        // SAFETY: preadv wrote `to_body` bytes at the start of the spare
        // capacity (the head iovec is filled first), so they are initialised;
        // `to_body <= spare.len()` keeps the length within the reservation.
        unsafe { body.set_len(body.len() + to_body) };
    }
    Ok(())
}

/// Bounds how much freed memory glibc's allocator keeps: one arena instead of
/// eight per core, and a fixed mmap threshold of 256 KiB so that large request
/// buffers go back to the kernel when freed (glibc otherwise raises the
/// threshold after the first free and keeps them, per thread arena). With
/// dozens of FUSE and write-back threads a block freed in one arena was not
/// reused by a thread allocating from the other: under sustained 1 MiB writes
/// at `cache=256M` a second arena left the daemon at 365–383 MiB resident
/// with 236 MiB in use (`malloc_stats`: the main arena 176 MiB from the
/// system, 13 MiB in use), one arena 196–205 MiB at the same speed and
/// 4 KiB random I/O (`benches/RESULTS.md`, session 22).
pub fn limit_malloc_retention() {
    // SAFETY: mallopt only adjusts allocator parameters; it is called before
    // the daemon starts its threads and takes integer arguments only.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}
