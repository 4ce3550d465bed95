//! Batched loading for large reads: the blocks a request misses are read with
//! one read per run of records that lie back to back in the log (blocks
//! written sequentially are), instead of one per block; past the host page
//! cache ([`crate::io::Store::read_direct`]).
//!
//! It only fills cache slots ahead of the normal read path, which then finds
//! them ready; any block it cannot load is left for that path, which reports
//! the error.

use super::Inner;
use crate::cache::Slot;
use crate::codec;
use crate::format::{EntryKind, MapEntry};
use crate::io::AlignedBuf;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

/// Largest single read issued for a run of records.
const MAX_RUN_BYTES: u64 = 4 << 20;
/// Aligned buffers for reading runs: at most this many exist, reused (a run
/// read waits for one). Allocating one per read left the daemon's memory
/// fragmented: VmHWM 307–371 MiB at `cache=256M` after 8 s of 1 MiB
/// sequential reads of a compressed image, 263–265 MiB with these 16
/// (their memory reserved out of the cache), at the same read speed: 16 MiB
/// in flight keep the disk busy.
const RUN_BUFS: usize = 16;
/// Largest run buffer kept (a 1 MiB request's run with alignment slack);
/// one grown for a longer run is cut back when returned.
const RUN_BUF_KEEP: usize = (1 << 20) + (8 << 10);
/// Memory the run buffers hold at most, beyond a longer run in flight
/// ([`super::threads_reserve`]).
pub(super) const RUN_BUFS_BYTES: u64 = (RUN_BUFS * RUN_BUF_KEEP) as u64;

/// The run buffers: a fixed set passed around through a channel (they take
/// memory only once used).
#[derive(Debug)]
pub(super) struct RunBufs {
    tx: Sender<AlignedBuf>,
    rx: Receiver<AlignedBuf>,
}

impl Default for RunBufs {
    fn default() -> Self {
        RunBufs::new(RUN_BUFS)
    }
}

impl RunBufs {
    /// A set of `count` buffers (at least one).
    pub(super) fn new(count: usize) -> Self {
        let count = count.max(1);
        let (tx, rx) = crossbeam_channel::bounded(count);
        for _ in 0..count {
            let _ = tx.send(AlignedBuf::default());
        }
        RunBufs { tx, rx }
    }

    /// Waits for a free buffer; it returns to the set when dropped.
    pub(super) fn take(&self) -> RunBuf<'_> {
        let buf = self.rx.recv().unwrap_or_default();
        RunBuf { buf, bufs: self }
    }
}

/// A run buffer in use.
pub(super) struct RunBuf<'a> {
    pub(super) buf: AlignedBuf,
    bufs: &'a RunBufs,
}

impl Drop for RunBuf<'_> {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.as_slice().len() > RUN_BUF_KEEP {
            buf.shrink(RUN_BUF_KEEP);
        }
        let _ = self.bufs.tx.send(buf);
    }
}

impl Inner {
    /// Loads the missing DATA blocks of `[off, off+len)` into the cache.
    pub(super) fn load_many(&self, off: u64, len: u64) {
        let first = off >> self.block_shift;
        let last = (off + len - 1) >> self.block_shift;
        let mut missing: Vec<(Arc<Slot>, MapEntry)> = Vec::new();
        for block in first..=last {
            if self.cache.peek(block) {
                continue;
            }
            let entry = self.map.read().get(block);
            if entry.kind != EntryKind::Data {
                continue;
            }
            let (slot, created) = self.cache.get_or_insert(block);
            if created {
                // Re-read the entry now that the slot pins the block. A
                // discard may have unmapped it since the check above: then
                // it is no record to read in a run.
                let entry = self.map.read().get(block);
                if entry.kind == EntryKind::Data {
                    missing.push((slot.clone(), entry));
                } else {
                    let _ = self.load(&slot);
                }
            }
        }
        let mut start = 0;
        while start < missing.len() {
            let mut end = start + 1;
            while end < missing.len() {
                let (prev, next) = (&missing[end - 1].1, &missing[end].1);
                if !super::log::follows(prev, next)
                    || next.off + u64::from(next.len) - missing[start].1.off > MAX_RUN_BYTES
                {
                    break;
                }
                end += 1;
            }
            self.load_run(&missing[start..end]);
            start = end;
        }
    }

    /// Reads one run of back-to-back records and fills their slots.
    fn load_run(&self, run: &[(Arc<Slot>, MapEntry)]) {
        let base = run[0].1.off;
        let Some((_, last)) = run.last() else { return };
        let total = (last.off + u64::from(last.len) - base) as usize;
        let mut run_buf = self.run_bufs.take();
        let buf = &mut run_buf.buf;
        let read = self.store.read_direct(buf, base, total);
        let bs = self.block_size() as usize;
        for (slot, entry) in run {
            let result = match &read {
                Err(e) => Err(super::log::read_error(
                    base,
                    std::io::Error::new(e.kind(), e.to_string()),
                )),
                Ok(range) => {
                    let at = range.start + (entry.off - base) as usize;
                    let bytes = &buf.as_slice()[at..at + entry.len as usize];
                    super::log::check_len(entry.off, entry.len)
                        .and_then(|()| {
                            super::log::parse_record_in(
                                self.store.as_ref(),
                                bytes,
                                entry.off,
                                entry.len,
                            )
                        })
                        .and_then(|(h, payload)| {
                            self.check_data_record(slot.block, *entry, &h)?;
                            codec::decode_to_vec(h.codec, &payload, bs)
                        })
                }
            };
            match result {
                Ok(data) => self.cache.finish_load(slot, data),
                // Discarded or rewritten since the entry was read (its record
                // may be reclaimed): load what the map says now.
                Err(_) if self.map.read().get(slot.block) != *entry => {
                    let _ = self.load(slot);
                }
                Err(e) => {
                    ::log::error!("read of block {} failed: {e}", slot.block);
                    self.cache.fail_load(slot, &e);
                }
            }
        }
    }
}
