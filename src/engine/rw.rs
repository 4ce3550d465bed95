//! The data path: read, write, discard and flush of an open image.

use super::Inner;
use crate::cache::Slot;
use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{EntryKind, MapEntry, RecordHeader, RecordKind, RECORD_HEADER_LEN};
use std::sync::Arc;

impl Inner {
    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.virtual_size() => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {off}+{len} is outside the disk ({} bytes)",
                self.virtual_size()
            ))),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "image is open read-only"));
        }
        self.check_failed()
    }

    /// Calls `f(block, offset in block, range in buffer)` for each block piece.
    fn pieces(
        &self,
        off: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size();
        let mut done = 0usize;
        while done < len {
            let pos = off + done as u64;
            let in_block = (pos & (bs - 1)) as usize;
            let n = (bs as usize - in_block).min(len - done);
            f(pos >> self.block_shift, in_block, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    /// Reads and decodes the stored content of `block` as `entry` says.
    pub(super) fn decode_block(&self, block: u64, entry: MapEntry) -> Result<Vec<u8>> {
        if entry == super::map::LOST {
            return Err(super::map::lost_block(block));
        }
        if entry.kind != EntryKind::Data {
            let mut data = vec![0u8; self.block_size() as usize];
            if entry.kind == EntryKind::Unmapped && self.backing.is_some() {
                self.read_base_block(block, &mut data)?; // a clone: the base's block
            }
            return Ok(data);
        }
        let (h, payload) = super::log::read_record(self.store.as_ref(), entry.off, entry.len)?;
        self.check_data_record(block, entry, &h)?;
        codec::decode_owned(h.codec, payload, self.block_size() as usize)
            .map_err(|e| e.context(format!("block {block}")))
    }

    /// Checks that a verified record is the DATA record `entry` names for `block`.
    pub(super) fn check_data_record(
        &self,
        block: u64,
        entry: MapEntry,
        h: &RecordHeader,
    ) -> Result<()> {
        if h.kind != RecordKind::Data || h.key != block || h.birth != u64::from(entry.birth) {
            return Err(Error::corrupt(format!(
                "block {block}: record at {} belongs to {:?} {} (birth {})",
                entry.off, h.kind, h.key, h.birth
            )));
        }
        if u64::from(h.raw_len) != self.block_size() {
            return Err(Error::corrupt(format!(
                "block {block}: record has raw length {}",
                h.raw_len
            )));
        }
        Ok(())
    }

    /// [`Inner::decode_block`], judged against the map as it is when the read
    /// fails: a discard drops the cache slot that pins a block while it loads
    /// (and a check works from a copy of the map), so the record read may have
    /// been superseded and reclaimed meanwhile. While the entry keeps
    /// changing, the current one is read; an error on an unchanged entry is
    /// real.
    pub(super) fn decode_current(&self, block: u64, mut entry: MapEntry) -> Result<Vec<u8>> {
        let mut tries = 0;
        loop {
            let err = match self.decode_block(block, entry) {
                Ok(data) => return Ok(data),
                Err(e) => e,
            };
            let now = self.map.read().get(block);
            if now == entry || tries == 8 {
                return Err(err);
            }
            entry = now;
            tries += 1;
        }
    }

    /// Fills a freshly created slot from the map; on error removes it.
    pub(super) fn load(&self, slot: &Arc<Slot>) -> Result<()> {
        let entry = self.map.read().get(slot.block);
        match self.decode_current(slot.block, entry) {
            Ok(data) => {
                self.cache.finish_load(slot, data);
                Ok(())
            }
            Err(e) => {
                ::log::error!("read of block {} failed: {e}", slot.block);
                self.cache.fail_load(slot, &e);
                Err(e)
            }
        }
    }

    /// True if serving `len` bytes at `off` (a write if `writing`) would
    /// read the disk: some block it touches is neither cached and loaded, nor
    /// without stored content, nor (writing) covered whole. False for a range
    /// outside the disk too: the request fails without I/O.
    pub(super) fn reads_disk(&self, off: u64, len: u64, writing: bool) -> bool {
        if self.check_range(off, len).is_err() || len == 0 {
            return false;
        }
        let bs = self.block_size();
        let (first, last) = (off >> self.block_shift, (off + len - 1) >> self.block_shift);
        (first..=last).any(|block| {
            let start = (block << self.block_shift).max(off);
            let end = ((block + 1) << self.block_shift).min(off + len);
            let whole = writing && end - start == bs;
            !(whole
                || self.cache.is_loaded(block)
                || !self.has_content(self.map.read().get(block).kind))
        })
    }

    pub(super) fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.read_ahead(off, buf.len() as u64);
        if buf.len() as u64 > self.block_size() {
            self.load_many(off, buf.len() as u64);
        }
        self.pieces(off, buf.len(), |block, in_block, range| {
            let out = &mut buf[range];
            let slot = match self.cache.lookup(block) {
                Some(slot) => slot,
                None => {
                    if !self.has_content(self.map.read().get(block).kind) {
                        out.fill(0);
                        return Ok(());
                    }
                    let (slot, created) = self.cache.get_or_insert(block);
                    if created {
                        self.load(&slot)?;
                    }
                    slot
                }
            };
            let state = slot.wait_ready()?;
            out.copy_from_slice(&state.data[in_block..in_block + out.len()]);
            Ok(())
        })
    }

    pub(super) fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.write_unthrottled(buf, off)?;
        self.cache.throttle();
        Ok(())
    }

    /// [`Inner::write_at`] without waiting for write-back afterwards: the
    /// caller throttles ([`BlockCache::throttle`] or `throttle_late`).
    pub(super) fn write_unthrottled(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        self.write_cached(buf, off)
    }

    /// Puts `buf` into the cached blocks at `off` (dirty); the caller checked
    /// that the image is writable and the blocks exist.
    pub(super) fn write_cached(&self, buf: &[u8], off: u64) -> Result<()> {
        let bs = self.block_size() as usize;
        self.pieces(off, buf.len(), |block, in_block, range| {
            let src = &buf[range];
            // A write that fills the block or reaches its end is written back
            // at once; one in its middle waits for the pieces that follow.
            let completes = in_block + src.len() == bs;
            let (slot, created) = self.cache.get_or_insert(block);
            if created {
                let data = if src.len() == bs {
                    src.to_vec()
                } else {
                    let entry = self.map.read().get(block);
                    match self.decode_current(block, entry) {
                        Ok(mut data) => {
                            data[in_block..in_block + src.len()].copy_from_slice(src);
                            data
                        }
                        Err(e) => {
                            self.cache.fail_load(&slot, &e);
                            return Err(e);
                        }
                    }
                };
                self.cache.finish_load(&slot, data);
                let mut state = slot.lock();
                self.cache.mark_dirty(&slot, &mut state, completes);
            } else {
                let mut state = slot.wait_ready()?;
                if src.len() == bs {
                    // A whole-block overwrite replaces the buffer: no copy of
                    // the old one even if a write-back worker still holds it.
                    state.data = Arc::new(src.to_vec());
                } else {
                    Arc::make_mut(&mut state.data)[in_block..in_block + src.len()]
                        .copy_from_slice(src);
                }
                self.cache.mark_dirty(&slot, &mut state, completes);
            }
            Ok(())
        })
    }

    /// Marks `block` dirty with its own content, so that write-back stores
    /// it anew ([`super::evacuate`]); nothing if the map no longer gives it
    /// `entry` (written or discarded meanwhile).
    pub(super) fn rewrite_block(&self, block: u64, entry: MapEntry) -> Result<()> {
        self.check_writable()?;
        let (slot, created) = self.cache.get_or_insert(block);
        if created {
            self.load(&slot)?;
        }
        let mut state = slot.wait_ready()?;
        if self.map.read().get(block) == entry {
            self.cache.mark_dirty(&slot, &mut state, true);
        }
        Ok(())
    }

    pub(super) fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let bs = self.block_size();
        let first_full = off.div_ceil(bs);
        let end_full = (off + len) / bs;
        if first_full >= end_full {
            return self.write_zero_bytes(off, len);
        }
        self.write_zero_bytes(off, first_full * bs - off)?;
        self.write_zero_bytes(end_full * bs, off + len - end_full * bs)?;
        let count = end_full - first_full;
        let mut log = self.log.lock();
        // A record of this run, after the rooms a snapshot or a move of the
        // log holds off; leaving a checkpoint's room (`regions`).
        loop {
            while log.rooms_held {
                self.rooms_cv.wait(&mut log);
            }
            if log.fits(RECORD_HEADER_LEN as u64 + 16, self.checkpoint_room()) {
                break;
            }
            self.wait_for_move(&mut log)?;
        }
        // Map first, then cache, then record: a block loaded after this point
        // reads zeros, and a write-back of older data (checked under the log
        // lock) sees its slot detached and drops it.
        super::backing::set_holes(
            &mut self.map.write(),
            self.base(),
            first_full,
            count,
            self.block_shift,
        );
        self.cache.remove_range(first_full, end_full - 1);
        let mut payload = first_full.to_le_bytes().to_vec();
        payload.extend_from_slice(&count.to_le_bytes());
        log.append(
            self.store.as_ref(),
            RecordKind::Zero,
            first_full,
            0,
            0,
            &payload,
        )
        .map(|_| ())
        .map_err(|e| self.fail(e))
    }

    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.write_at(&vec![0u8; len as usize], off)
    }

    pub(super) fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_failed()?;
        self.make_durable(self.cache.dirty_slots())
    }

    /// Makes what was written to `[off, off + len)` durable: waits for the
    /// write-back of those blocks only, then syncs (an `O_DSYNC` write).
    pub(super) fn flush_range(&self, off: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_failed()?;
        self.check_range(off, len)?;
        let unwritten = match len {
            0 => Vec::new(),
            _ => self
                .cache
                .unwritten_in(off >> self.block_shift, (off + len - 1) >> self.block_shift),
        };
        self.make_durable(unwritten)
    }

    /// Waits until each slot has written its version, then syncs the log.
    fn make_durable(&self, unwritten: Vec<(Arc<Slot>, u64)>) -> Result<()> {
        for (slot, version) in unwritten {
            slot.wait_written(version);
        }
        self.check_failed()?;
        let _sync = self.sync_lock.lock();
        self.sync_log("sync image")?;
        self.check_failed()
    }

    /// Syncs the image file; the records written before the sync started
    /// are then durable, which later records say in their header (recovery
    /// tells damage to them from a torn tail by it: format.md §5).
    pub(super) fn sync_log(&self, what: &str) -> Result<()> {
        // A failed append latches the failure under the log lock before its
        // room leaves `replay_start`: checked under it, every record below is
        // written.
        let written_below = {
            let log = self.log.lock();
            self.check_failed()?;
            log.replay_start().1
        };
        self.store.sync().map_err(|e| {
            self.sync_failed
                .store(true, std::sync::atomic::Ordering::Release);
            self.fail(Error::io(what, e))
        })?;
        self.log.lock().mark_synced(written_below);
        Ok(())
    }
}
