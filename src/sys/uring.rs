//! Several positional reads submitted together through `io_uring`, waited
//! for with one system call: a request whose blocks' records lie apart in the
//! log costs one sleep instead of one per record (`benches/RESULTS.md`,
//! session 10). Each thread keeps its own small ring, made on first use.

use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Reads submitted at once at most; more are done in several rounds.
const RING_ENTRIES: usize = 64;

enum Ring {
    Unset,
    /// The kernel or a sandbox refused `io_uring`: the caller reads one by one.
    Refused,
    Ready(Box<IoUring>),
}

thread_local! {
    static RING: RefCell<Ring> = const { RefCell::new(Ring::Unset) };
}

/// Whether this process has said once that it reads without `io_uring`.
static REFUSAL_LOGGED: AtomicBool = AtomicBool::new(false);

/// Reads `dst.len()` bytes at `off` from `file` for every `(off, dst)`, all
/// submitted together: each result is the number of bytes read (short only
/// at the end of the file) or the read's error. `None` when `io_uring` is
/// not available to this thread: nothing is being read then, and the caller
/// reads one by one (reads have no side effects, so reading again what a
/// failed ring read is harmless).
pub fn read_many(
    file: &impl AsRawFd,
    reads: &mut [(u64, &mut [u8])],
) -> Option<Vec<io::Result<usize>>> {
    RING.with(|cell| {
        let mut ring = cell.borrow_mut();
        if matches!(*ring, Ring::Unset) {
            *ring = match IoUring::new(RING_ENTRIES as u32) {
                Ok(r) => Ring::Ready(Box::new(r)),
                Err(e) => {
                    if REFUSAL_LOGGED.swap(true, Ordering::Relaxed) {
                        ::log::debug!("no io_uring, records are read one by one: {e}");
                    } else {
                        ::log::info!(
                            "io_uring is not available ({e}): records that lie apart are read one by one"
                        );
                    }
                    Ring::Refused
                }
            };
        }
        let Ring::Ready(uring) = &mut *ring else {
            return None;
        };
        let mut results = Vec::with_capacity(reads.len());
        for chunk in reads.chunks_mut(RING_ENTRIES) {
            match submit_and_reap(uring, file, chunk) {
                Ok(done) => results.extend(done),
                Err(e) => {
                    ::log::warn!("io_uring failed, records are read one by one from now on: {e}");
                    *ring = Ring::Refused; // drops the ring: nothing of it is in flight
                    return None;
                }
            }
        }
        Some(results)
    })
}

/// Makes this thread read without `io_uring` from now on, as where the
/// kernel refuses it (for tests of the one-by-one path).
#[cfg(test)]
pub fn refuse_on_this_thread() {
    RING.with(|cell| *cell.borrow_mut() = Ring::Refused);
}

/// Submits `reads` (at most [`RING_ENTRIES`]) and waits for every one that
/// the kernel took. `Err` only when the ring itself failed. Whatever the
/// outcome, no read is in flight when this returns: the kernel never writes
/// into a buffer after its borrow ends.
fn submit_and_reap(
    uring: &mut IoUring,
    file: &impl AsRawFd,
    reads: &mut [(u64, &mut [u8])],
) -> io::Result<Vec<io::Result<usize>>> {
    let count = reads.len();
    if count > RING_ENTRIES
        || reads
            .iter()
            .any(|(_, dst)| u32::try_from(dst.len()).is_err())
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let fd = types::Fd(file.as_raw_fd());
    let mut queued = 0;
    for (i, (off, dst)) in reads.iter_mut().enumerate() {
        let read = opcode::Read::new(fd, dst.as_mut_ptr(), dst.len() as u32)
            .offset(*off)
            .build()
            .user_data(i as u64);
        // SAFETY: `dst` is borrowed mutably for this whole call, and the call
        // does not return before every read the kernel took has completed
        // (the loop below; a ring that fails is polled until then, and reads
        // it never took are dropped with it unexecuted). So the kernel writes
        // only into live memory that nothing else touches meanwhile, and the
        // fd stays open (borrowed through `file`).
        if unsafe { uring.submission().push(&read) }.is_err() {
            break; // cannot happen: the queue is empty between calls
        }
        queued += 1;
    }
    let mut results: Vec<Option<io::Result<usize>>> = (0..count).map(|_| None).collect();
    let mut reaped = 0;
    let mut failure = (queued < count).then(|| io::Error::other("io_uring queue full"));
    loop {
        let taken = queued - uring.submission().len();
        if failure.is_some() {
            if taken == reaped {
                break;
            }
            // The kernel completes the reads it took on its own; the sleep
            // lets it deliver them to this thread.
            std::thread::sleep(std::time::Duration::from_millis(1));
        } else if reaped == queued {
            break;
        } else {
            // Waiting for every read is safe even while some are still
            // queued: the kernel waits only if it took them all.
            match uring.submit_and_wait(queued - reaped) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // EAGAIN (no kernel memory) included: the reads still to do
                // are done one by one by the caller instead of spinning here.
                Err(e) => failure = Some(e),
            }
        }
        for cqe in uring.completion() {
            let res = cqe.result();
            let slot = results.get_mut(cqe.user_data() as usize);
            if let Some(slot @ None) = slot {
                *slot = Some(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                });
                reaped += 1;
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("io_uring lost a read"))))
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn uring_allowed() -> bool {
        std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map_or(true, |v| v.trim() == "0")
    }

    #[test]
    fn reads_land_in_their_own_buffers_with_their_own_results() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().write_all_at(&bytes, 0).unwrap();
        // 100 reads: two rounds of the ring; one ends past the file's end.
        let mut bufs: Vec<Vec<u8>> = (0..100).map(|i| vec![0u8; 500 + i * 10]).collect();
        let offs: Vec<u64> = (0..100u64).map(|i| (i * 997) % 99_000).collect();
        let mut reads: Vec<(u64, &mut [u8])> = offs
            .iter()
            .copied()
            .zip(bufs.iter_mut().map(|b| &mut b[..]))
            .collect();
        reads[7].0 = 99_800;
        let Some(results) = read_many(tmp.as_file(), &mut reads) else {
            assert!(
                !uring_allowed(),
                "io_uring is allowed here but was not used"
            );
            return;
        };
        for (i, result) in results.into_iter().enumerate() {
            let off = if i == 7 { 99_800 } else { offs[i] as usize };
            let want = (bytes.len() - off).min(bufs[i].len());
            assert_eq!(result.unwrap(), want, "read {i}");
            assert!(bufs[i][..want] == bytes[off..off + want], "read {i}");
        }
        // Errors are per read: a descriptor open for writing only fails each.
        let wo = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap();
        let mut one = [0u8; 16];
        let mut reads: Vec<(u64, &mut [u8])> = vec![(0, &mut one[..])];
        let results = read_many(&wo, &mut reads).unwrap();
        assert_eq!(
            results[0].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
    }
}
