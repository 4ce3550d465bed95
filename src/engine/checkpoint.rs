//! Checkpoints: write the dirty map leaves and an index, then flip the superblock.
//!
//! Protocol (see `docs/format.md`): under the log and map locks, take the dirty
//! leaves and note the log position `start` — the map now reflects exactly the
//! records before `start`. Then, without those locks, append LEAF records and
//! one INDEX record, `sync`, write the superblock (seq+1, into the other slot)
//! naming the index and `start`, and `sync` again. A crash anywhere before the
//! second sync leaves the previous superblock in charge; its roll-forward simply
//! skips the new LEAF/INDEX records.

use super::Inner;
use crate::codec;
use crate::error::{Error, Result};
use crate::format::{
    encode_index, encode_leaf, Codec, LeafPtr, RecPtr, RecordKind, SB_FLAG_DIRTY, SB_SLOT_SIZE,
};

impl Inner {
    /// Writes a checkpoint; `clean` marks the image cleanly closed.
    pub(super) fn checkpoint(&self, clean: bool) -> Result<()> {
        let _one = self.checkpoint_lock.lock();
        self.check_failed()?;
        let (dirty, start_off, start_lsn, epoch, gen) = {
            let mut log = self.log.lock();
            let dirty = self.map.write().take_dirty();
            let gen = log.gen;
            log.gen += 1;
            log.since_checkpoint = 0;
            (dirty, log.off, log.lsn, log.epoch, gen)
        };
        let store = self.store.as_ref();
        let mut written = Vec::with_capacity(dirty.len());
        for (leaf, entries) in dirty {
            let raw = encode_leaf(&entries);
            let (stored, payload) = codec::encode(&raw, Codec::Zstd(1));
            let w = self
                .log
                .lock()
                .append(
                    store,
                    RecordKind::Leaf,
                    leaf,
                    stored,
                    raw.len() as u32,
                    &payload,
                )
                .map_err(|e| self.fail(e))?;
            written.push(LeafPtr {
                leaf,
                off: w.off,
                len: w.len,
                crc: w.crc,
            });
        }
        let ptrs: Vec<LeafPtr> = {
            let mut map = self.map.write();
            for p in written {
                map.ptrs.insert(p.leaf, p);
            }
            map.ptrs.values().copied().collect()
        };
        let raw = encode_index(&ptrs);
        let (stored, payload) = codec::encode(&raw, Codec::Zstd(1));
        let (index, tail) = {
            let mut log = self.log.lock();
            let w = log
                .append(
                    store,
                    RecordKind::Index,
                    ptrs.len() as u64,
                    stored,
                    raw.len() as u32,
                    &payload,
                )
                .map_err(|e| self.fail(e))?;
            (
                RecPtr {
                    off: w.off,
                    len: w.len,
                    crc: w.crc,
                },
                log.off,
            )
        };
        store
            .sync()
            .map_err(|e| self.fail(Error::io("sync checkpoint", e)))?;
        let mut sb = self.sb.lock();
        let mut next = sb.clone();
        next.seq += 1;
        next.gen = gen;
        next.flags = if clean { 0 } else { SB_FLAG_DIRTY };
        next.log_start_off = start_off;
        next.log_start_lsn = start_lsn;
        next.log_epoch = epoch;
        next.log_tail = tail;
        next.index = index;
        let slot = next.seq % 2;
        store
            .write_at(&next.encode(slot as u8), slot * SB_SLOT_SIZE)
            .map_err(|e| self.fail(Error::io("write superblock", e)))?;
        store
            .sync()
            .map_err(|e| self.fail(Error::io("sync superblock", e)))?;
        *sb = next;
        Ok(())
    }
}
