//! The buffer cache: a bounded set of decoded blocks with write-back.
//!
//! Owns: which blocks are in memory, their dirty state, the memory budget
//! (capacity in blocks), the dirty limit that throttles writers, the queue of
//! blocks waiting for write-back (partly written blocks after a short delay,
//! [`delay`]), and hit/miss counters. It knows nothing of the format: the
//! engine loads blocks into slots and persists them.
//!
//! Thread model and lock order: the cache is split into shards (a mutex each,
//! holding an LRU of `Arc<Slot>`); each slot has its own mutex and condvar.
//! Shard locks are held only for map operations, never across I/O, and a shard
//! lock may be taken while a slot lock is NOT held (never the other way round).
//! The engine's log lock comes before any shard lock. Slots are evicted only
//! when ready, clean, not in flight and referenced by nobody but the cache.
//! The write-behind list's lock is taken under a slot lock, never the other
//! way round; so is the lock of the set of unwritten (dirty or in-flight)
//! slots that a flush reads.

mod delay;
mod slot;
mod throttle;

pub use delay::WRITE_BEHIND;
pub use slot::{Load, Slot, SlotState};

use crossbeam_channel::{Receiver, Sender};
use lru::LruCache;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

const SHARDS: usize = 16;

/// Counters exported by the cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheStats {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes held now.
    pub used: u64,
    /// Bytes not yet persisted.
    pub dirty: u64,
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that had to load.
    pub misses: u64,
}

/// The buffer cache.
#[derive(Debug)]
pub struct BlockCache {
    shards: Vec<Mutex<LruCache<u64, Arc<Slot>>>>,
    /// Every dirty or in-flight slot, by block, sharded like `shards` (a
    /// flush looks here instead of at every cached block: with a full cache
    /// of 64 KiB blocks that scan cost 120 µs per fsync).
    unwritten: Vec<Mutex<HashMap<u64, Arc<Slot>>>>,
    block_size: usize,
    shard_capacity: usize,
    dirty_limit: usize,
    dirty: AtomicUsize,
    /// Writers waiting in [`BlockCache::throttle`], in arrival order.
    line: throttle::Line,
    /// Writers waiting in [`BlockCache::throttle_late`] (they do not queue).
    throttled: Mutex<usize>,
    /// Set once write-back cannot go on ([`BlockCache::fail`]).
    failed: AtomicBool,
    drained: Condvar,
    queue_tx: Sender<Arc<Slot>>,
    queue_rx: Receiver<Arc<Slot>>,
    delayed: delay::Delayed,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BlockCache {
    /// A cache of `capacity` bytes of `block_size` blocks. At least 4 blocks per
    /// shard are kept whatever the capacity, so tiny budgets still work.
    pub fn new(capacity: u64, block_size: usize) -> Self {
        let blocks = (capacity / block_size as u64).max((SHARDS * 4) as u64) as usize;
        let (queue_tx, queue_rx) = crossbeam_channel::unbounded();
        BlockCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::unbounded()))
                .collect(),
            unwritten: (0..SHARDS).map(|_| Mutex::default()).collect(),
            block_size,
            shard_capacity: blocks.div_ceil(SHARDS),
            dirty_limit: (blocks / 2).max(1),
            dirty: AtomicUsize::new(0),
            line: throttle::Line::default(),
            throttled: Mutex::new(0),
            failed: AtomicBool::new(false),
            drained: Condvar::new(),
            queue_tx,
            queue_rx,
            delayed: delay::Delayed::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, block: u64) -> &Mutex<LruCache<u64, Arc<Slot>>> {
        &self.shards[shard_of(block)]
    }

    /// Notes `slot` as dirty (its lock held by the caller).
    fn note_unwritten(&self, slot: &Arc<Slot>) {
        self.unwritten[shard_of(slot.block)]
            .lock()
            .insert(slot.block, slot.clone());
    }

    /// Forgets `slot` once it is neither dirty nor in flight (its lock held
    /// by the caller), unless another slot of its block took its place.
    fn note_written(&self, slot: &Arc<Slot>) {
        let mut unwritten = self.unwritten[shard_of(slot.block)].lock();
        if unwritten
            .get(&slot.block)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            unwritten.remove(&slot.block);
        }
    }

    /// The slot for `block` if cached (counts a hit).
    pub fn lookup(&self, block: u64) -> Option<Arc<Slot>> {
        let slot = self.shard(block).lock().get(&block).cloned();
        if slot.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        slot
    }

    /// True if `block` is cached and loaded (no hit counted, no LRU update).
    pub fn is_loaded(&self, block: u64) -> bool {
        let slot = self.shard(block).lock().peek(&block).cloned();
        slot.is_some_and(|slot| slot.lock().load == Load::Ready)
    }

    /// True if `block` is cached (no hit counted, no LRU update).
    pub fn peek(&self, block: u64) -> bool {
        self.shard(block).lock().contains(&block)
    }

    /// The slot for `block`, creating it in `Loading` state if absent. Returns
    /// `(slot, true)` when created: the caller must then fill it with
    /// [`BlockCache::finish_load`] or [`BlockCache::fail_load`].
    pub fn get_or_insert(&self, block: u64) -> (Arc<Slot>, bool) {
        let mut shard = self.shard(block).lock();
        if let Some(slot) = shard.get(&block) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return (slot.clone(), false);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::new(block));
        shard.put(block, slot.clone());
        if shard.len() > self.shard_capacity {
            Self::evict(&mut shard, self.shard_capacity);
        }
        (slot, true)
    }

    fn evict(shard: &mut LruCache<u64, Arc<Slot>>, keep: usize) {
        let mut victims = Vec::new();
        let excess = shard.len().saturating_sub(keep);
        for (block, slot) in shard.iter().rev() {
            if victims.len() >= excess {
                break;
            }
            if Arc::strong_count(slot) > 1 {
                continue;
            }
            if let Some(state) = slot.try_lock_clean() {
                drop(state);
                victims.push(*block);
            }
        }
        for block in victims {
            shard.pop(&block);
        }
    }

    /// Fills a slot created by `get_or_insert` with `data` (block size bytes).
    pub fn finish_load(&self, slot: &Slot, data: Vec<u8>) {
        let mut state = slot.lock();
        debug_assert_eq!(data.len(), self.block_size);
        state.data = Arc::new(data);
        state.load = Load::Ready;
        drop(state);
        slot.notify();
    }

    /// Marks a created slot failed and removes it, so the next access retries.
    pub fn fail_load(&self, slot: &Arc<Slot>, err: &crate::Error) {
        self.remove_if_same(slot);
        let mut state = slot.lock();
        state.load = Load::Failed(err.kind(), err.to_string());
        drop(state);
        slot.notify();
    }

    fn remove_if_same(&self, slot: &Arc<Slot>) {
        let mut shard = self.shard(slot.block).lock();
        if shard
            .peek(&slot.block)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            shard.pop(&slot.block);
        }
    }

    /// True if `slot` is still the cached slot for its block.
    pub fn is_current(&self, slot: &Arc<Slot>) -> bool {
        self.shard(slot.block)
            .lock()
            .peek(&slot.block)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    /// Records a modification of a ready slot whose state the caller holds:
    /// bumps the version and, if it was clean, queues the slot for
    /// write-back: at once if the write `completed` the block (covered it
    /// whole or reached its end), else after [`WRITE_BEHIND`].
    pub fn mark_dirty(&self, slot: &Arc<Slot>, state: &mut SlotState, completed: bool) {
        state.version += 1;
        if state.detached {
            // A discard removed the slot while the caller was writing into it:
            // the two overlapped, so the discard may win. A detached slot is
            // never written back, so counting it dirty would leak the count
            // (and, once leaks pass the dirty limit, stall every writer).
            state.written = state.version;
            return;
        }
        if !state.dirty {
            state.dirty = true;
            self.dirty.fetch_add(1, Ordering::Relaxed);
            self.note_unwritten(slot);
            state.behind = !state.in_flight && !completed;
            if state.in_flight {
                // finish_writeback requeues it.
            } else if completed {
                let _ = self.queue_tx.send(slot.clone());
            } else {
                self.delayed.push(slot.clone());
            }
        } else if completed && state.behind && !state.in_flight {
            // Completed while waiting in write-behind: queued now (its entry
            // there is skipped when it falls due).
            state.behind = false;
            let _ = self.queue_tx.send(slot.clone());
        }
    }

    /// Queues every block waiting in write-behind now (a flush, a snapshot
    /// or a throttled writer is waiting for them).
    fn expedite(&self) {
        self.queue_behind(self.delayed.take_all());
    }

    /// Queues the `slots` taken from write-behind that still wait there (a
    /// write that completed one queued it already).
    fn queue_behind(&self, slots: Vec<Arc<Slot>>) {
        for slot in slots {
            let mut state = slot.lock();
            if !std::mem::take(&mut state.behind) {
                continue;
            }
            drop(state);
            let _ = self.queue_tx.send(slot);
        }
    }

    /// The write-behind thread: queues partly written blocks as they fall
    /// due, until [`BlockCache::stop_write_behind`].
    pub fn run_write_behind(&self) {
        loop {
            let due = self.delayed.wait_due();
            if due.is_empty() {
                return;
            }
            self.queue_behind(due);
        }
    }

    /// Ends [`BlockCache::run_write_behind`]; blocks still waiting are queued.
    pub fn stop_write_behind(&self) {
        self.delayed.stop();
        self.expedite();
    }

    /// Dirty blocks now, and the limit beyond which writers wait.
    pub fn backlog(&self) -> (usize, usize) {
        (self.dirty.load(Ordering::Relaxed), self.dirty_limit)
    }

    /// Blocks the caller while dirty data is over the limit (write
    /// throttling), behind the writers already waiting ([`throttle`]).
    pub fn throttle(&self) {
        if self.dirty.load(Ordering::Relaxed) > self.dirty_limit {
            self.expedite();
        }
        self.line.wait(|| self.may_write());
    }

    /// Dirty data is at most the limit, or write-back failed for good.
    fn may_write(&self) -> bool {
        self.dirty.load(Ordering::Relaxed) <= self.dirty_limit
            || self.failed.load(Ordering::Acquire)
    }

    /// [`BlockCache::throttle`] for a writer that must not wait long (the
    /// last FUSE thread not already waiting): it waits only past the limit
    /// plus half as much again, which the cache still holds (the limit is
    /// half of it), and not in line. One that goes on while others wait in
    /// line lets the first of them go with it: it would otherwise pass
    /// them again and again, keeping the level over their limit (with two
    /// FUSE threads, one late writer kept nine in line for 0.2–0.4 s while
    /// requests behind them completed).
    pub fn throttle_late(&self) {
        let limit = self.dirty_limit + self.dirty_limit / 2;
        if self.dirty.load(Ordering::Relaxed) <= limit {
            self.line.release_first(|| true);
            return;
        }
        self.expedite();
        let mut waiting = self.throttled.lock();
        *waiting += 1;
        while self.dirty.load(Ordering::Relaxed) > limit && !self.failed.load(Ordering::Acquire) {
            // The timeout only guards against a bug; wake-ups come from
            // `finish_writeback` under this lock.
            self.drained
                .wait_for(&mut waiting, std::time::Duration::from_millis(50));
        }
        *waiting -= 1;
        drop(waiting);
        self.line.release_first(|| true);
    }

    /// Write-back has failed for good (the image failed): dirty blocks stay
    /// dirty from now on ([`BlockCache::abandon_writeback`]), so throttled
    /// writers are let go instead of waiting for them (their writes fail).
    pub fn fail(&self) {
        let waiting = self.throttled.lock();
        self.failed.store(true, Ordering::Release);
        self.drained.notify_all();
        drop(waiting);
        self.line.release_while(|| true);
    }

    /// The image left its failed state ([`crate::Image::resume`] after a
    /// full disk): write-back goes on.
    pub fn unfail(&self) {
        self.failed.store(false, Ordering::Release);
    }

    /// Gives every block whose write-back was abandoned
    /// ([`BlockCache::abandon_writeback`]) a version to wait for again: a
    /// flush then waits until it is written back, instead of going on.
    /// Returns those blocks, for [`BlockCache::requeue`] once write-back may
    /// take them (or `abandon_writeback` again if it may not after all).
    pub fn rearm_abandoned(&self) -> Vec<Arc<Slot>> {
        let mut out = Vec::new();
        for shard in &self.unwritten {
            let slots: Vec<Arc<Slot>> = shard.lock().values().cloned().collect();
            for slot in slots {
                let mut state = slot.lock();
                if state.dirty && !state.in_flight && state.written == u64::MAX {
                    state.written = 0;
                    drop(state);
                    out.push(slot);
                }
            }
        }
        out
    }

    /// Queues `slots` for write-back.
    pub fn requeue(&self, slots: &[Arc<Slot>]) {
        for slot in slots {
            let _ = self.queue_tx.send(slot.clone());
        }
    }

    /// Lets one throttled writer go (a block was persisted below the limit).
    /// One per persisted block: waking every writer at each completion made
    /// dozens of threads spin through the scheduler for every block.
    fn release_one_writer(&self) {
        self.line.release_first(|| self.may_write());
        let waiting = self.throttled.lock();
        if *waiting > 0 {
            self.drained.notify_one();
        }
    }

    /// The write-back queue (workers receive slots from it).
    pub fn queue(&self) -> &Receiver<Arc<Slot>> {
        &self.queue_rx
    }

    /// Called by a worker after persisting `version` of a slot (or deciding not
    /// to): marks it clean if nothing changed since, or requeues it.
    pub fn finish_writeback(&self, slot: &Arc<Slot>, version: u64) {
        let mut state = slot.lock();
        state.in_flight = false;
        state.written = state.written.max(version);
        let mut below_limit = false;
        if state.dirty && state.version == version {
            state.dirty = false;
            below_limit = self.dirty.fetch_sub(1, Ordering::Relaxed) <= self.dirty_limit + 1;
        } else if state.dirty {
            let _ = self.queue_tx.send(slot.clone());
        }
        if !state.dirty {
            self.note_written(slot);
        }
        drop(state);
        slot.notify();
        if below_limit {
            self.release_one_writer();
        }
    }

    /// Called by a worker whose write-back failed (the image is failed then,
    /// and nothing will be written back again): the slot stays dirty, so it
    /// is never evicted and reads keep getting what was written, not its
    /// older record; and every version of it counts as abandoned, so whoever
    /// waits for one — now or after a write that raced with the failure —
    /// goes on (a flush then reports the failure).
    ///
    /// If the image resumed meanwhile ([`BlockCache::unfail`]: the worker saw
    /// it failed just before), the slot is queued again instead: decided
    /// under the slot's lock, so a resume's [`BlockCache::rearm_abandoned`]
    /// (which runs after `unfail`) finds every slot abandoned before.
    pub fn abandon_writeback(&self, slot: &Arc<Slot>) {
        let mut state = slot.lock();
        state.in_flight = false;
        let failed = self.failed.load(Ordering::Acquire);
        if failed {
            state.written = u64::MAX;
        }
        drop(state);
        slot.notify();
        if !failed {
            // The image's own failed flag goes a moment after the cache's:
            // let the resume finish before this slot is tried again.
            std::thread::yield_now();
            let _ = self.queue_tx.send(slot.clone());
        }
    }

    /// Every dirty or in-flight slot with the version a flush must wait for;
    /// the ones waiting in write-behind are queued at once.
    pub fn dirty_slots(&self) -> Vec<(Arc<Slot>, u64)> {
        self.expedite();
        let mut out = Vec::new();
        for shard in &self.unwritten {
            let slots: Vec<Arc<Slot>> = shard.lock().values().cloned().collect();
            for slot in slots {
                let state = slot.lock();
                if state.dirty || state.in_flight {
                    let v = state.version;
                    drop(state);
                    out.push((slot, v));
                }
            }
        }
        out
    }

    /// The blocks in `[first, last]` that hold a change not yet written
    /// back, each with the version to wait for; those waiting in
    /// write-behind are queued now (a durable write waits for them).
    pub fn unwritten_in(&self, first: u64, last: u64) -> Vec<(Arc<Slot>, u64)> {
        let mut out = Vec::new();
        for block in first..=last {
            let Some(slot) = self.unwritten[shard_of(block)].lock().get(&block).cloned() else {
                continue;
            };
            let mut state = slot.lock();
            if !(state.dirty || state.in_flight) {
                continue;
            }
            let version = state.version;
            let queue_now = std::mem::take(&mut state.behind);
            drop(state);
            if queue_now {
                let _ = self.queue_tx.send(slot.clone());
            }
            out.push((slot, version));
        }
        out
    }

    /// Removes every cached block in `[first, last]` (discard): dirty data is
    /// dropped, and flush waiters are released.
    pub fn remove_range(&self, first: u64, last: u64) {
        // A range smaller than the cache: its blocks are looked up one by
        // one (a discard of a few blocks used to scan every cached block).
        let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); SHARDS];
        let small = last - first < (self.shard_capacity * SHARDS) as u64;
        if small {
            for b in first..=last {
                by_shard[shard_of(b)].push(b);
            }
        }
        for (shard, blocks) in self.shards.iter().zip(by_shard) {
            let victims: Vec<Arc<Slot>> = {
                let mut shard = shard.lock();
                let blocks = if small {
                    blocks
                } else {
                    shard
                        .iter()
                        .map(|(b, _)| *b)
                        .filter(|b| (first..=last).contains(b))
                        .collect()
                };
                blocks.iter().filter_map(|b| shard.pop(b)).collect()
            };
            for slot in victims {
                let mut state = slot.lock();
                state.detached = true;
                if state.dirty {
                    state.dirty = false;
                    self.dirty.fetch_sub(1, Ordering::Relaxed);
                }
                // Nothing waits for a detached slot (a flush neither).
                self.note_written(&slot);
                state.written = state.version;
                drop(state);
                slot.notify();
            }
        }
        let waiting = self.throttled.lock();
        self.drained.notify_all();
        drop(waiting);
        self.line.release_while(|| self.may_write());
    }

    /// True if `block` holds a change not yet written back (dirty or in
    /// flight): the map does not show it yet (SEEK_DATA / SEEK_HOLE).
    pub fn is_unwritten(&self, block: u64) -> bool {
        self.unwritten[shard_of(block)].lock().contains_key(&block)
    }

    /// How many blocks hold a change not yet written back (dirty or in flight).
    pub fn unwritten_count(&self) -> usize {
        self.unwritten.iter().map(|shard| shard.lock().len()).sum()
    }

    /// The first block at or after `first` that holds a change not yet
    /// written back.
    pub fn first_unwritten(&self, first: u64) -> Option<u64> {
        self.unwritten
            .iter()
            .filter_map(|shard| shard.lock().keys().copied().filter(|&b| b >= first).min())
            .min()
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let used: usize = self.shards.iter().map(|s| s.lock().len()).sum();
        let bs = self.block_size as u64;
        CacheStats {
            capacity: (self.shard_capacity * SHARDS) as u64 * bs,
            used: used as u64 * bs,
            dirty: self.dirty.load(Ordering::Relaxed) as u64 * bs,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

/// The shard of `block` (of the LRU and of the unwritten set alike).
fn shard_of(block: u64) -> usize {
    (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS
}

impl Slot {
    /// The state if it can be locked at once and the slot is evictable.
    fn try_lock_clean(&self) -> Option<parking_lot::MutexGuard<'_, SlotState>> {
        let state = self.try_lock()?;
        (state.load == Load::Ready && !state.dirty && !state.in_flight).then_some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_into_a_discarded_slot_leaves_nothing_dirty() {
        let cache = BlockCache::new(1 << 20, 4096);
        let (slot, created) = cache.get_or_insert(5);
        assert!(created);
        cache.finish_load(&slot, vec![0; 4096]);
        // A discard detaches the slot while a writer still holds it...
        cache.remove_range(5, 5);
        // ...and the writer then modifies it.
        let mut state = slot.wait_ready().unwrap();
        Arc::make_mut(&mut state.data)[0] = 1;
        cache.mark_dirty(&slot, &mut state, true);
        assert!(!state.dirty);
        drop(state);
        assert_eq!(cache.stats().dirty, 0, "dirty count leaked");
        assert!(cache.queue().try_recv().is_err(), "detached slot queued");
        slot.wait_written(1); // must not block
    }

    fn dirty(cache: &BlockCache, block: u64, completed: bool) -> Arc<Slot> {
        let (slot, _) = cache.get_or_insert(block);
        if slot.lock().load != Load::Ready {
            cache.finish_load(&slot, vec![0; 4096]);
        }
        let mut state = slot.lock();
        Arc::make_mut(&mut state.data)[0] += 1;
        cache.mark_dirty(&slot, &mut state, completed);
        drop(state);
        slot
    }

    #[test]
    fn a_partly_written_block_waits_until_completed_or_flushed() {
        let cache = BlockCache::new(64 * 4096, 4096);
        let queued = |cache: &BlockCache| -> Vec<u64> {
            cache.queue().try_iter().map(|s| s.block).collect()
        };
        dirty(&cache, 1, false);
        dirty(&cache, 1, false);
        assert!(queued(&cache).is_empty(), "queued before it was complete");
        dirty(&cache, 1, true);
        assert_eq!(queued(&cache), [1], "completed: queued at once");
        dirty(&cache, 2, true);
        assert_eq!(queued(&cache), [2], "a whole-block write is queued at once");
        dirty(&cache, 3, false);
        assert!(queued(&cache).is_empty());
        let waited: Vec<u64> = cache.dirty_slots().iter().map(|(s, _)| s.block).collect();
        assert!(waited.contains(&3), "{waited:?}");
        assert_eq!(queued(&cache), [3], "a flush takes it from write-behind");
    }

    #[test]
    fn the_write_behind_thread_queues_partly_written_blocks_after_the_delay() {
        let cache = Arc::new(BlockCache::new(64 * 4096, 4096));
        let thread = {
            let cache = cache.clone();
            std::thread::spawn(move || cache.run_write_behind())
        };
        dirty(&cache, 5, false);
        let got = cache.queue().recv_timeout(WRITE_BEHIND * 20).unwrap();
        assert_eq!(got.block, 5);
        dirty(&cache, 6, false);
        cache.stop_write_behind();
        thread.join().unwrap();
        assert_eq!(cache.queue().try_recv().unwrap().block, 6, "queued at stop");
    }

    /// A cache of 64 blocks (dirty limit 32) with blocks 0..40 dirty.
    fn forty_dirty_blocks() -> (Arc<BlockCache>, Vec<Arc<Slot>>) {
        let cache = Arc::new(BlockCache::new(64 * 4096, 4096));
        let mut slots = Vec::new();
        for b in 0..40 {
            let (slot, _) = cache.get_or_insert(b);
            cache.finish_load(&slot, vec![0; 4096]);
            let mut state = slot.lock();
            Arc::make_mut(&mut state.data)[0] = 1;
            cache.mark_dirty(&slot, &mut state, true);
            drop(state);
            slots.push(slot);
        }
        (cache, slots)
    }

    #[test]
    fn throttled_writers_wait_for_write_back_and_are_released_by_it() {
        let (cache, slots) = forty_dirty_blocks();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (cache, released) = (cache.clone(), released.clone());
            std::thread::spawn(move || {
                cache.throttle();
                released.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!released.load(Ordering::SeqCst), "writer not throttled");
        for slot in &slots[..8] {
            let version = slot.lock().version;
            cache.finish_writeback(slot, version);
        }
        writer.join().unwrap();
        assert!(released.load(Ordering::SeqCst));
        assert_eq!(cache.stats().dirty, 32 * 4096);
    }

    /// A late writer (the last free FUSE thread) goes on between the limit
    /// and half as much again, and lets the first writer in line go with
    /// it: it used to pass the line again and again while the level stayed
    /// over the line's limit.
    #[test]
    fn a_late_writer_lets_the_first_in_line_go_with_it() {
        let (cache, _slots) = forty_dirty_blocks();
        let waiter = |cache: &Arc<BlockCache>| {
            let cache = cache.clone();
            std::thread::spawn(move || cache.throttle())
        };
        let in_line = |n: usize| {
            let start = std::time::Instant::now();
            while cache.line.len() < n {
                assert!(start.elapsed() < std::time::Duration::from_secs(10));
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        let first = waiter(&cache);
        in_line(1);
        let second = waiter(&cache);
        in_line(2);
        let gone = |t: &std::thread::JoinHandle<()>| {
            let start = std::time::Instant::now();
            while !t.is_finished() && start.elapsed() < std::time::Duration::from_secs(2) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            t.is_finished()
        };
        cache.throttle_late(); // 40 dirty: under 48, goes on
        assert!(gone(&first), "the first in line still waits");
        assert_eq!(cache.line.len(), 1, "one let go per late writer");
        cache.throttle_late();
        assert!(gone(&second), "the second in line still waits");
        first.join().unwrap();
        second.join().unwrap();
        assert_eq!(cache.stats().dirty, 40 * 4096);
    }

    #[test]
    fn a_flush_waits_for_dirty_and_in_flight_slots_only_and_written_ones_can_go() {
        let cache = BlockCache::new(64 * 4096, 4096); // 4 blocks per shard
        let write = |b: u64, completed: bool| {
            let (slot, created) = cache.get_or_insert(b);
            if created {
                cache.finish_load(&slot, vec![0; 4096]);
            }
            let mut state = slot.lock();
            Arc::make_mut(&mut state.data)[0] = 1;
            cache.mark_dirty(&slot, &mut state, completed);
            drop(state);
            slot
        };
        let blocks = |c: &BlockCache| {
            let mut b: Vec<u64> = c.dirty_slots().iter().map(|(s, _)| s.block).collect();
            b.sort_unstable();
            b
        };
        for b in 100..160 {
            let (slot, _) = cache.get_or_insert(b);
            cache.finish_load(&slot, vec![0; 4096]);
        }
        let (a, b, c) = (write(1, true), write(2, false), write(3, true));
        assert_eq!(blocks(&cache), [1, 2, 3], "clean blocks are not waited for");
        // In flight and written again: still waited for until both are done.
        a.lock().in_flight = true;
        let v1 = a.lock().version;
        drop(write(1, true));
        cache.finish_writeback(&a, v1);
        assert_eq!(blocks(&cache), [1, 2, 3]);
        let v2 = a.lock().version;
        a.lock().in_flight = true;
        cache.finish_writeback(&a, v2);
        assert_eq!(blocks(&cache), [2, 3]);
        cache.remove_range(3, 3);
        assert_eq!(blocks(&cache), [2]);
        while cache.queue().try_recv().is_ok() {} // what workers would take
        assert_eq!(Arc::strong_count(&c), 1, "a discarded slot is still held");
        let v = b.lock().version;
        b.lock().in_flight = true;
        cache.finish_writeback(&b, v);
        assert!(blocks(&cache).is_empty());
        drop((a, b, c));
        while cache.queue().try_recv().is_ok() {} // what workers would take
                                                  // Written blocks are evictable again: nothing holds on to them.
        for b in 200..400 {
            let (slot, _) = cache.get_or_insert(b);
            cache.finish_load(&slot, vec![0; 4096]);
        }
        assert!(!cache.peek(1) && !cache.peek(2), "written blocks were kept");
        assert!(cache.stats().used <= 64 * 4096);
    }

    #[test]
    fn remove_range_removes_exactly_the_range_small_or_large() {
        let cache = BlockCache::new(256 * 4096, 4096); // 256 blocks
        let fill = |blocks: &mut dyn Iterator<Item = u64>| {
            for b in blocks {
                let (slot, _) = cache.get_or_insert(b);
                cache.finish_load(&slot, vec![0; 4096]);
            }
        };
        let cached =
            |c: &BlockCache| -> Vec<u64> { (0..2_000_000).filter(|&b| c.peek(b)).collect() };
        fill(&mut (0..100).chain(1_000_000..1_000_050));
        // Smaller than the cache: looked up block by block.
        cache.remove_range(10, 19);
        let want: Vec<u64> = (0..10).chain(20..100).chain(1_000_000..1_000_050).collect();
        assert_eq!(cached(&cache), want);
        // Larger than the cache: a scan.
        cache.remove_range(50, 1_000_009);
        let want: Vec<u64> = (0..10).chain(20..50).chain(1_000_010..1_000_050).collect();
        assert_eq!(cached(&cache), want);
        cache.remove_range(0, u64::MAX - 1);
        assert!(cached(&cache).is_empty());
    }
}
