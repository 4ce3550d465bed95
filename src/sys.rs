//! The only module with `unsafe`: thin wrappers over libc calls that std does not
//! offer. Each block carries a `// SAFETY:` note; everything else in the crate is
//! safe code (`unsafe_code` is denied at the crate root and allowed only here).
#![allow(unsafe_code)]

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

/// Tells the kernel that the cached pages of `file` in `[off, off+len)` are not
/// needed again (`POSIX_FADV_DONTNEED`), so the host page cache does not hold a
/// second copy of data the engine caches itself. Advisory: errors are ignored.
pub fn drop_page_cache(file: &impl AsRawFd, off: u64, len: u64) {
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
