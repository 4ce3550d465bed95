//! Batched loading for large reads: the blocks a request misses are read with
//! one `pread` per run of records that lie back to back in the log (blocks
//! written sequentially are), instead of one `pread` per block.
//!
//! It only fills cache slots ahead of the normal read path, which then finds
//! them ready; any block it cannot load is left for that path, which reports
//! the error.

use super::Inner;
use crate::cache::Slot;
use crate::codec;
use crate::format::{EntryKind, MapEntry};
use std::sync::Arc;

/// Largest single read issued for a run of records.
const MAX_RUN_BYTES: u64 = 4 << 20;

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
        let mut buf = vec![0u8; total];
        let read = self.store.read_at(&mut buf, base);
        let bs = self.block_size() as usize;
        for (slot, entry) in run {
            let result = match &read {
                Err(e) => Err(super::log::read_error(
                    base,
                    std::io::Error::new(e.kind(), e.to_string()),
                )),
                Ok(()) => {
                    let at = (entry.off - base) as usize;
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
