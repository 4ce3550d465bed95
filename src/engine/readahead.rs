//! Sequential readahead. A read that starts where an earlier one ended (one
//! of a few tracked streams) gets the blocks ahead of it loaded into the
//! cache by background threads, in a window that doubles with every
//! sequential read. A reader with one request in flight at a time — `dd`, a
//! guest booting, ext4 on a loop device — then finds its next blocks cached
//! instead of waiting for each record read in turn. Random reads never match
//! a stream and cost one short lock.

use super::Inner;
use crate::error::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Sequential streams tracked at once (e.g. two jobs reading two regions).
const STREAMS: usize = 4;
/// First window of a stream that turned sequential.
const MIN_WINDOW: u64 = 256 << 10;
/// Largest window (further capped at a sixteenth of the cache).
const MAX_WINDOW: u64 = 2 << 20;
/// Load requests queued for the threads; more are dropped (the reader then
/// loads those blocks itself).
const QUEUE: usize = 8;
/// Most bytes one thread loads at a time.
const PIECE: u64 = 512 << 10;
/// Readahead threads.
pub(super) const THREADS: usize = 2;

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// Where the stream's next read is expected to start.
    next: u64,
    /// Current window (0 until the stream has been sequential once).
    window: u64,
    /// End of what has been requested ahead so far.
    ahead: u64,
    /// Last use, for replacing the least recently used stream.
    used: u64,
}

#[derive(Debug, Default)]
struct Streams {
    list: [Stream; STREAMS],
    clock: u64,
}

/// Stream detection and the queue of ranges to load.
#[derive(Debug)]
pub(super) struct Readahead {
    streams: Mutex<Streams>,
    max_window: u64,
    tx: Sender<(u64, u64)>,
    rx: Receiver<(u64, u64)>,
}

impl Readahead {
    /// Readahead for a block cache of `cache_bytes` (off if it is under 4 MiB).
    pub(super) fn new(cache_bytes: u64) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let max_window = (cache_bytes / 16).min(MAX_WINDOW);
        Readahead {
            streams: Mutex::default(),
            max_window: if max_window < MIN_WINDOW {
                0
            } else {
                max_window
            },
            tx,
            rx,
        }
    }

    /// Notes a read of `[off, off+len)` of a disk of `size` bytes; returns
    /// the range to load ahead of it, if any.
    fn note(&self, off: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        if self.max_window == 0 {
            return None;
        }
        let end = off + len;
        let mut streams = self.streams.lock();
        streams.clock += 1;
        let now = streams.clock;
        let found = streams.list.iter().position(|s| s.next == off && off > 0);
        let Some(i) = found else {
            let lru = (0..STREAMS)
                .min_by_key(|&i| streams.list[i].used)
                .unwrap_or(0);
            streams.list[lru] = Stream {
                next: end,
                used: now,
                ..Stream::default()
            };
            return None;
        };
        let s = &mut streams.list[i];
        s.window = (s.window * 2).clamp(MIN_WINDOW, self.max_window);
        s.next = end;
        s.used = now;
        if s.ahead >= end + s.window / 2 {
            return None; // at least half a window is still ahead
        }
        let from = s.ahead.max(end);
        let to = (end + s.window).min(size);
        s.ahead = to;
        (to > from).then_some((from, to - from))
    }
}

impl Inner {
    /// Queues the readahead a read of `[off, off+len)` calls for.
    pub(super) fn read_ahead(&self, off: u64, len: u64) {
        if let Some((mut from, len)) = self.readahead.note(off, len, self.virtual_size()) {
            // In pieces, so that the threads load them in parallel.
            let end = from + len;
            while from < end {
                let n = (end - from).min(PIECE);
                if self.readahead.tx.try_send((from, n)).is_err() {
                    return;
                }
                from += n;
            }
        }
    }
}

/// Starts one readahead thread.
pub(super) fn spawn(inner: &Arc<Inner>) -> Result<JoinHandle<()>> {
    let inner = inner.clone();
    std::thread::Builder::new()
        .name("vbd-readahead".into())
        .spawn(move || loop {
            crossbeam_channel::select! {
                recv(inner.readahead.rx) -> range => match range {
                    Ok((off, len)) => inner.load_many(off, len),
                    Err(_) => return,
                },
                recv(inner.stop_rx) -> _ => return,
            }
        })
        .map_err(|e| Error::io("start readahead thread", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_reads_get_a_growing_window_and_random_reads_none() {
        let ra = Readahead::new(256 << 20);
        let size = 1 << 30;
        assert_eq!(ra.note(0, 4096, size), None, "offset 0 starts no stream");
        assert_eq!(
            ra.note(1 << 20, 128 << 10, size),
            None,
            "first read of a stream"
        );
        let first = ra.note((1 << 20) + (128 << 10), 128 << 10, size);
        assert_eq!(first, Some(((1 << 20) + (256 << 10), MIN_WINDOW)));
        // The window doubles up to MAX_WINDOW, what is asked for continues
        // where the last request ended, and nothing is asked for while at
        // least half a window is still ahead.
        let mut at = (1 << 20) + (256 << 10);
        let mut ahead = (1 << 20) + (512 << 10);
        let (mut largest, mut idle) = (0, 0);
        for _ in 0..64 {
            match ra.note(at, 128 << 10, size) {
                Some((from, len)) => {
                    assert_eq!(from, ahead, "readahead continues without gaps");
                    ahead = from + len;
                    largest = largest.max(ahead - (at + (128 << 10)));
                }
                None => {
                    assert!(ahead - (at + (128 << 10)) >= MAX_WINDOW / 2);
                    idle += 1;
                }
            }
            at += 128 << 10;
        }
        assert_eq!(largest, MAX_WINDOW);
        assert!(idle > 32, "{idle} requests asked for nothing");
        // A random read elsewhere matches no stream.
        assert_eq!(ra.note(777 << 20, 4096, size), None);
        // The window never runs past the disk.
        let near_end = size - (128 << 10);
        ra.note(near_end - (128 << 10), 128 << 10, size);
        let tail = ra.note(near_end, 64 << 10, size);
        assert_eq!(tail, Some((near_end + (64 << 10), (64 << 10))));
    }

    #[test]
    fn a_small_cache_gets_no_readahead() {
        let ra = Readahead::new(2 << 20);
        ra.note(4096, 4096, 1 << 30);
        assert_eq!(ra.note(8192, 4096, 1 << 30), None);
    }
}
