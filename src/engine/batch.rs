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
use crate::io::{direct_span_bytes, AlignedBuf};
use crossbeam_channel::{Receiver, Sender};
use std::ops::Range;
use std::sync::Arc;

/// Largest single read issued for a run of records: a 1 MiB request's
/// blocks with room for the padding between appends (16 records of 64 KiB
/// blocks span up to 1088 KiB when each is an append of its own). Runs no
/// longer than this fit a run buffer as it is kept, so a buffer is never
/// grown and cut back: that cost a reallocation, page faults and zeroing of
/// up to 4 MiB per read (40 % of the daemon's CPU in 1 MiB sequential reads
/// of an uncompressed image, `benches/RESULTS.md` session 9).
pub(super) const MAX_RUN_BYTES: u64 = (1 << 20) + (128 << 10);
/// Aligned buffers for reading runs: at most this many exist, reused (a run
/// read waits for one). Allocating one per read left the daemon's memory
/// fragmented: VmHWM 307–371 MiB at `cache=256M` after 8 s of 1 MiB
/// sequential reads of a compressed image, 263–265 MiB with these 16
/// (their memory reserved out of the cache), at the same read speed: 16 MiB
/// in flight keep the disk busy.
const RUN_BUFS: usize = 16;
/// Largest run buffer kept: the longest run plus a direct read's alignment
/// slack (under 4 KiB before and after); one grown for a longer run (a
/// single record larger than a run, which block sizes up to 1 MiB do not
/// make) is cut back when returned.
const RUN_BUF_KEEP: usize = MAX_RUN_BYTES as usize + (8 << 10);
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

/// Splits DATA entries (of blocks in order) into runs of records that lie
/// back to back in the log ([`super::log::follows`]), each spanning at most
/// [`MAX_RUN_BYTES`] unless it is a single record: the index ranges, in order.
pub(super) fn runs(entries: &[MapEntry]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut end = start + 1;
        while let Some(next) = entries.get(end) {
            if !super::log::follows(&entries[end - 1], next)
                || next.off + u64::from(next.len) - entries[start].off > MAX_RUN_BYTES
            {
                break;
            }
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

impl Inner {
    /// Loads the missing DATA blocks of `[off, off+len)` into the cache.
    pub(super) fn load_many(&self, off: u64, len: u64) {
        let first = off >> self.block_shift;
        let last = (off + len - 1) >> self.block_shift;
        let mut missing: Vec<(Arc<Slot>, MapEntry)> = Vec::new();
        // A clone's blocks that show its base: read from the base in ranges.
        let mut backed: Vec<Arc<Slot>> = Vec::new();
        for block in first..=last {
            if self.cache.peek(block) {
                continue;
            }
            let entry = self.map.read().get(block);
            // A lost block is no record to read in a run: the read path
            // reports its error.
            if !self.has_content(entry.kind) || entry == super::map::LOST {
                continue;
            }
            let (slot, created) = self.cache.get_or_insert(block);
            if created {
                // Re-read the entry now that the slot pins the block. A
                // discard may have unmapped it since the check above: then
                // it is no record to read in a run.
                let entry = self.map.read().get(block);
                if entry.kind == EntryKind::Data && entry != super::map::LOST {
                    missing.push((slot.clone(), entry));
                } else if self.has_content(entry.kind) {
                    backed.push(slot.clone());
                } else {
                    let _ = self.load(&slot);
                }
            }
        }
        self.load_backed(&backed);
        let entries: Vec<MapEntry> = missing.iter().map(|(_, e)| *e).collect();
        let runs = runs(&entries);
        let spans: Vec<(u64, usize)> = runs
            .iter()
            .map(|run| run_span(&entries[run.clone()]))
            .collect();
        for group in read_groups(&spans) {
            self.load_runs(&missing, &runs[group.clone()], &spans[group]);
        }
    }

    /// Fills the slots of a clone's blocks that show its base (in block
    /// order): each range of consecutive blocks with one read of the base,
    /// which reads its records in runs like [`Inner::load_many`]. A block
    /// whose range fails is loaded on its own, which reports the error.
    fn load_backed(&self, slots: &[Arc<Slot>]) {
        let bs = self.block_size() as usize;
        let mut start = 0;
        while start < slots.len() {
            let mut end = start + 1;
            while end < slots.len()
                && slots[end].block == slots[end - 1].block + 1
                && (end - start + 1) * bs <= MAX_RUN_BYTES as usize
            {
                end += 1;
            }
            let range = &slots[start..end];
            let mut data = vec![0u8; range.len() * bs];
            let read = self.read_base_block(range[0].block, &mut data);
            for (slot, block) in range.iter().zip(data.chunks(bs)) {
                match &read {
                    Ok(()) => self.cache.finish_load(slot, block.to_vec()),
                    Err(_) => {
                        let _ = self.load(slot);
                    }
                }
            }
            start = end;
        }
    }

    /// Reads runs of back-to-back records, all at once into one run buffer,
    /// and fills their slots.
    fn load_runs(
        &self,
        missing: &[(Arc<Slot>, MapEntry)],
        runs: &[Range<usize>],
        spans: &[(u64, usize)],
    ) {
        let mut run_buf = self.run_bufs.take();
        let reads = self.store.read_direct_spans(&mut run_buf.buf, spans);
        for ((run, read), &(base, _)) in runs.iter().zip(reads).zip(spans) {
            self.fill_run(&missing[run.clone()], base, read, run_buf.buf.as_slice());
        }
    }

    /// Fills the slots of one run of records read at `base` (`read`: where
    /// in `buf`).
    fn fill_run(
        &self,
        run: &[(Arc<Slot>, MapEntry)],
        base: u64,
        read: std::io::Result<Range<usize>>,
        buf: &[u8],
    ) {
        let bs = self.block_size() as usize;
        for (slot, entry) in run {
            let result = match &read {
                Err(e) => Err(super::log::read_error(
                    base,
                    std::io::Error::new(e.kind(), e.to_string()),
                )),
                Ok(range) => {
                    let at = range.start + (entry.off - base) as usize;
                    let bytes = &buf[at..at + entry.len as usize];
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

/// The file span of a run of records (non-empty): its first record's offset
/// and the bytes up to the end of its last.
pub(super) fn run_span(run: &[MapEntry]) -> (u64, usize) {
    let base = run[0].off;
    let end = run.last().map_or(base, |e| e.off + u64::from(e.len));
    (base, (end - base) as usize)
}

/// Groups consecutive spans of runs (index ranges into `spans`) whose direct
/// reads fit one run buffer as it is kept; a group holds at least one span.
pub(super) fn read_groups(spans: &[(u64, usize)]) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &(off, len)) in spans.iter().enumerate() {
        let span = direct_span_bytes(off, len);
        if i > start && bytes + span > RUN_BUF_KEEP {
            groups.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += span;
    }
    if start < spans.len() {
        groups.push(start..spans.len());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{LOG_START, LOG_UNIT};

    fn data(off: u64, len: u32) -> MapEntry {
        MapEntry::data(off, len, 1)
    }

    /// What a direct read of the run needs: its span plus alignment slack.
    fn buffer_needed(entries: &[MapEntry], run: &Range<usize>) -> usize {
        let (first, last) = (entries[run.start], entries[run.end - 1]);
        let span = last.off + u64::from(last.len) - first.off;
        let lead = first.off % LOG_UNIT;
        (lead + span).div_ceil(LOG_UNIT) as usize * LOG_UNIT as usize
    }

    /// Records of `len` bytes, each an append of its own (the most padding).
    fn own_appends(n: u64, len: u32) -> Vec<MapEntry> {
        let step = u64::from(len).div_ceil(LOG_UNIT) * LOG_UNIT;
        (0..n).map(|i| data(LOG_START + i * step, len)).collect()
    }

    #[test]
    fn a_1_mib_request_is_one_run_that_fits_a_kept_buffer() {
        // 16 blocks of 64 KiB, uncompressed (header + payload), each record
        // in an append of its own: one read, no growing of the buffer.
        let entries = own_appends(16, 65536 + 64);
        let one_run = |e: &[MapEntry]| matches!(runs(e).as_slice(), [r] if *r == (0..e.len()));
        assert!(one_run(&entries), "{:?}", runs(&entries));
        assert!(buffer_needed(&entries, &(0..16)) <= RUN_BUF_KEEP);
        // Back to back in one append, starting anywhere in a page.
        let packed: Vec<MapEntry> = (0..16)
            .map(|i| data(LOG_START + 4000 + i * 65600, 65600))
            .collect();
        assert!(one_run(&packed), "{:?}", runs(&packed));
        assert!(buffer_needed(&packed, &(0..16)) <= RUN_BUF_KEEP);
    }

    #[test]
    fn every_run_fits_a_kept_buffer_and_breaks_only_where_it_must() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for shift in 12..=20u32 {
            let block = 1u64 << shift;
            for _ in 0..200 {
                // Records of the block size or compressed smaller (plus an
                // encrypted record's overhead), back to back or in appends
                // of their own, sometimes with a gap (another block's record).
                let mut off = LOG_START + next(LOG_UNIT) / 16 * 16;
                let entries: Vec<MapEntry> = (0..1 + next(64))
                    .map(|_| {
                        let len = (64 + 1 + next(block + 56)) as u32;
                        let e = data(off, len);
                        off = crate::format::align_up(off + u64::from(len), 16);
                        match next(4) {
                            0 => off = crate::format::align_up(off, LOG_UNIT),
                            1 => off += 65536,
                            _ => {}
                        }
                        e
                    })
                    .collect();
                let runs = runs(&entries);
                let mut expect_start = 0;
                for run in &runs {
                    assert_eq!(run.start, expect_start);
                    assert!(run.end > run.start);
                    expect_start = run.end;
                    assert!(
                        buffer_needed(&entries, run) <= RUN_BUF_KEEP,
                        "block {block}: run {run:?} needs {}",
                        buffer_needed(&entries, run)
                    );
                    for i in run.start + 1..run.end {
                        assert!(super::super::log::follows(&entries[i - 1], &entries[i]));
                    }
                    if run.end < entries.len() {
                        let (first, after) = (entries[run.start], entries[run.end]);
                        let longer = after.off + u64::from(after.len) - first.off;
                        assert!(
                            !super::super::log::follows(&entries[run.end - 1], &after)
                                || longer > MAX_RUN_BYTES,
                            "block {block}: run {run:?} ended early"
                        );
                    }
                }
                assert_eq!(expect_start, entries.len());
            }
        }
    }

    #[test]
    fn read_groups_fill_a_kept_buffer_and_keep_the_order() {
        // A 1 MiB request of 64 KiB blocks scattered one record per span
        // is one group: one submission, one wait.
        let scattered: Vec<(u64, usize)> = (0..16u64)
            .map(|i| (LOG_START + i * 10 * LOG_UNIT, 65600))
            .collect();
        assert_eq!(read_groups(&scattered), vec![0..16usize]);
        // Spans of every size: groups cover them in order, each fits the
        // buffer (or is one span), and none could have taken the next.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..500 {
            let spans: Vec<(u64, usize)> = (0..1 + x % 40)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (
                        LOG_START + i * (4 << 20) + x % 4096,
                        1 + (x >> 20) as usize % (MAX_RUN_BYTES as usize),
                    )
                })
                .collect();
            let bytes = |r: &Range<usize>| {
                spans[r.clone()]
                    .iter()
                    .map(|&(o, l)| direct_span_bytes(o, l))
                    .sum::<usize>()
            };
            let groups = read_groups(&spans);
            let mut next = 0;
            for g in &groups {
                assert_eq!(g.start, next);
                assert!(g.end > g.start);
                assert!(
                    bytes(g) <= RUN_BUF_KEEP || g.len() == 1,
                    "{g:?}: {} bytes",
                    bytes(g)
                );
                if g.end < spans.len() {
                    assert!(
                        bytes(&(g.start..g.end + 1)) > RUN_BUF_KEEP,
                        "{g:?} stopped early"
                    );
                }
                next = g.end;
            }
            assert_eq!(next, spans.len());
        }
    }
}
