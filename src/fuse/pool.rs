//! A bounded pool of I/O worker threads. FUSE handlers queue every request
//! that would read the disk (or flush) as a job here; the job does the engine
//! call and sends the reply itself (fuser `Reply*` are `Send`), so the few
//! FUSE threads never wait on a disk read and many requests are in flight at
//! once.
//!
//! The queue is bounded ([`QUEUE_PER_WORKER`] jobs per worker): when it is full
//! the FUSE thread waits, which pushes back on the kernel instead of buffering
//! without limit (each queued write holds its data, up to 1 MiB).

use std::io;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};
use parking_lot::Mutex;

/// A unit of work: do the I/O and reply.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Queue slots per worker thread.
pub const QUEUE_PER_WORKER: usize = 2;

/// Worker threads fed through a bounded channel.
#[derive(Debug)]
pub struct Pool {
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers (at least one) named `{name}-{i}`.
    pub fn new(n: usize, name: &str) -> io::Result<Pool> {
        let n = n.max(1);
        let (tx, rx) = bounded::<Job>(n * QUEUE_PER_WORKER);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })?;
            workers.push(handle);
        }
        Ok(Pool {
            tx: Some(tx),
            workers,
        })
    }

    /// Queues `job`; runs it on the calling thread if the pool is shut down.
    pub fn submit(&self, job: Job) {
        match &self.tx {
            Some(tx) => {
                if let Err(err) = tx.send(job) {
                    (err.into_inner())();
                }
            }
            None => job(),
        }
    }

    /// Lets the queued jobs finish and joins the workers.
    pub fn shutdown(&mut self) {
        self.tx = None;
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                log::error!("an I/O worker thread panicked");
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Request buffers kept for reuse by one mount, so the data path does not
/// allocate (and zero) a fresh buffer per request. At most `keep` buffers are
/// kept (up to [`BufPool::KEEP`], one per default I/O worker): under load
/// every in-flight request finds a buffer (fewer made the allocator map and
/// zero fresh pages for each 1 MiB request: 14 % of the daemon's CPU); the
/// pool only grows to the queue depth the mount has actually seen. The mount
/// counts the kept buffers in its `cache=` budget ([`BufPool::budget`]).
#[derive(Debug)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool::with_keep(Self::KEEP)
    }
}

impl BufPool {
    /// Buffers kept at most by default.
    pub const KEEP: usize = 32;

    /// A pool that keeps at most `keep` buffers.
    pub fn with_keep(keep: usize) -> Self {
        BufPool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// How to split a mount's memory budget of `cache_bytes`: (buffers to
    /// keep, bytes left for the engine's block cache). The pool takes an
    /// eighth of the budget in 1 MiB buffers, at least 4 and at most
    /// [`BufPool::KEEP`].
    pub fn budget(cache_bytes: u64) -> (usize, u64) {
        let keep = ((cache_bytes >> 20) / 8).clamp(4, Self::KEEP as u64);
        (keep as usize, cache_bytes.saturating_sub(keep << 20))
    }

    /// A buffer of at least `len` bytes (contents unspecified; use `[..len]`).
    pub fn get(&self, len: usize) -> Vec<u8> {
        let mut buf = self.free.lock().pop().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, buf: Vec<u8>) {
        let mut free = self.free.lock();
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runs_every_job_before_shutdown_returns() {
        let mut pool = Pool::new(4, "t").expect("pool");
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let done = done.clone();
            pool.submit(Box::new(move || {
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        pool.shutdown();
        assert_eq!(done.load(Ordering::SeqCst), 100);
        pool.submit(Box::new(|| {}));
    }

    #[test]
    fn buffers_are_reused_and_bounded() {
        let bufs = BufPool::default();
        let a = bufs.get(100);
        assert!(a.len() >= 100);
        bufs.put(a);
        assert!(bufs.get(10).len() >= 100);
        for _ in 0..BufPool::KEEP + 5 {
            bufs.put(vec![0; 4]);
        }
        assert_eq!(bufs.free.lock().len(), BufPool::KEEP);
    }

    #[test]
    fn the_budget_is_split_between_buffers_and_cache() {
        assert_eq!(BufPool::budget(256 << 20), (32, 224 << 20));
        assert_eq!(BufPool::budget(64 << 20), (8, 56 << 20));
        assert_eq!(BufPool::budget(8 << 20), (4, 4 << 20));
        assert_eq!(BufPool::budget(1 << 20), (4, 0));
    }
}
