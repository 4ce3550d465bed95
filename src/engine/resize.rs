//! Changing the disk's size, with the image used exclusively (offline).
//!
//! The size is a superblock field, so one checkpoint commits it together
//! with the map: a crash leaves the old size with the old map or the new
//! size with the new map, never a mix. Snapshots keep the size they were
//! taken at (each table entry records its own).
//!
//! Shrinking unmaps the blocks past the new end (their records are
//! reclaimed like overwritten ones unless a snapshot holds them); once the
//! new size is committed, the bytes past the new end inside its last block
//! are zeroed (out of view, they would keep dropped data). Growing zeroes
//! them again before they come into view (a crash may have come between, a
//! clone's unwritten last block shows its base there), so a disk grown
//! again reads zeros past the old end, as a raw file would.

use super::open::check_disk_size;
use super::Image;
use crate::error::{Error, ErrorKind, Result};
use crate::format::MapEntry;
use std::sync::atomic::Ordering;

impl Image {
    /// Changes the disk's size to `size` bytes (a positive multiple of 512,
    /// at most 64 TiB). Needs exclusive use of the image (`&mut`): offline.
    /// Shrinking drops the data past `size`; the caller asks before.
    pub fn resize(&mut self, size: u64) -> Result<()> {
        let inner = &self.inner;
        if inner.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "image is open read-only"));
        }
        check_disk_size(size)?;
        let old = inner.virtual_size();
        if size == old {
            return Ok(());
        }
        let bs = inner.block_size();
        if size > old && !old.is_multiple_of(bs) {
            // The unseen bytes past the old end of its last block.
            let tail = old.next_multiple_of(bs).min(size) - old;
            inner.write_cached(&vec![0u8; tail as usize], old)?;
        }
        inner.flush()?;
        {
            // Under the checkpoint lock: a checkpoint commits the new size
            // with the map that goes with it, or neither.
            let _one = inner.checkpoint_lock.lock();
            let _log = inner.log.lock();
            let (old_blocks, new_blocks) = (inner.nblocks(), inner.blocks_of(size));
            if new_blocks < old_blocks {
                let count = old_blocks - new_blocks;
                inner
                    .map
                    .write()
                    .set_range(new_blocks, count, MapEntry::default());
                inner.cache.remove_range(new_blocks, old_blocks - 1);
            } else if new_blocks > old_blocks {
                super::backing::set_holes(
                    &mut inner.map.write(),
                    inner.base(),
                    old_blocks,
                    new_blocks - old_blocks,
                    inner.block_shift,
                );
            }
            inner.disk_size.store(size, Ordering::Release);
        }
        inner.checkpoint(false)?;
        if size < old && !size.is_multiple_of(bs) {
            let tail = size.next_multiple_of(bs) - size;
            inner.write_cached(&vec![0u8; tail as usize], size)?;
            inner.flush()?;
            inner.checkpoint(false)?;
        }
        ::log::info!("disk resized from {old} to {size} bytes");
        Ok(())
    }
}
