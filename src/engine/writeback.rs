//! Write-back workers and the background checkpointer.
//!
//! Workers take up to [`WRITEBACK_BATCH`] dirty slots from the cache's queue,
//! share each block's bytes (under the slot lock, briefly), detect zeros,
//! compress and checksum (no lock held), take room for the records under the
//! log lock, write it without (O_DIRECT, in parallel with the other workers),
//! publish it into the map in the order rooms were taken ([`Turn`]), and tell
//! the cache which versions are now persisted. The checkpointer runs a checkpoint when the
//! log since the last one passes [`CHECKPOINT_BYTES`](super::CHECKPOINT_BYTES)
//! or [`CHECKPOINT_INTERVAL`](super::CHECKPOINT_INTERVAL) passes with changes.

use super::log::{LogTail, NewRecord};
use super::regions::Wish;
use super::{Inner, CHECKPOINT_BYTES, CHECKPOINT_INTERVAL};
use crate::cache::Slot;
use crate::codec;
use crate::error::{Error, Result};
use crate::format::{Codec, MapEntry, RecordKind};
use crate::io::AlignedBuf;
use parking_lot::MutexGuard;
use std::cell::RefCell;
use std::ops::Not;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Most blocks one worker appends with one write.
pub(super) const WRITEBACK_BATCH: usize = 8;

/// Starts `workers` write-back threads, the write-behind thread (queues
/// partly written blocks, [`crate::cache::WRITE_BEHIND`]), the reclaim
/// thread and the checkpointer.
pub(super) fn spawn(inner: &Arc<Inner>, workers: usize) -> Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(workers + 3);
    for i in 0..workers {
        let inner = inner.clone();
        let t = std::thread::Builder::new()
            .name(format!("vbd-writeback-{i}"))
            .spawn(move || worker(&inner))
            .map_err(|e| Error::io("start write-back thread", e))?;
        threads.push(t);
    }
    let behind = inner.clone();
    let t = std::thread::Builder::new()
        .name("vbd-writebehind".into())
        .spawn(move || behind.cache.run_write_behind())
        .map_err(|e| Error::io("start write-behind thread", e))?;
    threads.push(t);
    let reclaim = inner.clone();
    let t = std::thread::Builder::new()
        .name("vbd-reclaim".into())
        .spawn(move || reclaim.reclaimer())
        .map_err(|e| Error::io("start reclaim thread", e))?;
    threads.push(t);
    let inner = inner.clone();
    let t = std::thread::Builder::new()
        .name("vbd-checkpoint".into())
        .spawn(move || checkpointer(&inner))
        .map_err(|e| Error::io("start checkpoint thread", e))?;
    threads.push(t);
    Ok(threads)
}

fn worker(inner: &Inner) {
    let queue = inner.cache.queue().clone();
    loop {
        crossbeam_channel::select! {
            recv(queue) -> slot => match slot {
                Ok(slot) => {
                    // Whatever else is already queued goes in the same append,
                    // up to WRITEBACK_BATCH blocks: one lock and one write.
                    let mut batch = vec![slot];
                    while batch.len() < WRITEBACK_BATCH {
                        match queue.try_recv() {
                            Ok(slot) => batch.push(slot),
                            Err(_) => break,
                        }
                    }
                    inner.write_back(&batch);
                }
                Err(_) => return,
            },
            recv(inner.stop_rx) -> _ => return,
        }
    }
}

fn checkpointer(inner: &Inner) {
    let mut last = std::time::Instant::now();
    loop {
        crossbeam_channel::select! {
            recv(inner.kick_rx) -> _ => {},
            recv(inner.stop_rx) -> _ => return,
            default(Duration::from_secs(1)) => {},
        }
        if inner.failed_flag.load(Ordering::Acquire) {
            continue;
        }
        let pending = inner.log.lock().since_checkpoint;
        let due =
            pending >= CHECKPOINT_BYTES || (pending > 0 && last.elapsed() >= CHECKPOINT_INTERVAL);
        if due {
            // Also moves the log into a hole of the file when one is due.
            if let Err(e) = inner.commit_moving(false, None, Wish::Planned) {
                ::log::error!("background checkpoint failed: {e}");
            }
            last = std::time::Instant::now();
        } else if pending > 0 {
            // While the log grows at the end of the file, a hole may have
            // become big enough before the next checkpoint is due.
            if let Err(e) = inner.commit_moving(false, None, Wish::Probe) {
                ::log::error!("background checkpoint failed: {e}");
            }
        }
    }
}

impl Inner {
    /// Persists dirty slots (one pass each; the cache requeues a slot that
    /// changed meanwhile).
    pub(super) fn write_back(&self, slots: &[Arc<Slot>]) {
        let mut taken = Vec::with_capacity(slots.len());
        for slot in slots {
            let mut state = slot.lock();
            if !state.dirty || state.in_flight || state.detached {
                continue;
            }
            state.in_flight = true;
            taken.push((slot, Arc::clone(&state.data), state.version));
        }
        if taken.is_empty() {
            return;
        }
        let blocks: Vec<(&Arc<Slot>, &[u8])> = taken
            .iter()
            .map(|(slot, data, _)| (*slot, &data[..]))
            .collect();
        let persisted = self.persist(&blocks);
        if let Err(e) = &persisted {
            ::log::error!(
                "write-back of {} block(s) from {} failed: {e}",
                blocks.len(),
                blocks[0].0.block
            );
        }
        for (slot, _, version) in &taken {
            match persisted {
                Ok(()) => self.cache.finish_writeback(slot, *version),
                // Not on disk: the cache keeps the data (the image failed).
                Err(_) => self.cache.abandon_writeback(slot),
            }
        }
    }

    /// The codec for the next batch: the image's, or a faster level while
    /// write-back is behind ([`super::adapt`]).
    fn write_codec(&self) -> Codec {
        match &self.adapt {
            Some(adapt) => {
                let (dirty, limit) = self.cache.backlog();
                Codec::Zstd(adapt.level(dirty, limit))
            }
            None => self.codec,
        }
    }

    /// Encodes `blocks` (no lock held), takes room for their records under
    /// the log lock, writes it without, and publishes it into the map in
    /// turn ([`Turn`]).
    fn persist(&self, blocks: &[(&Arc<Slot>, &[u8])]) -> Result<()> {
        self.check_failed()?;
        self.punch_over_hard_limit();
        let sealed = self.store.sealer().is_some();
        let codec = self.write_codec();
        let encoded: Vec<_> = blocks
            .iter()
            .map(|(slot, data)| {
                if codec::is_zero(data) {
                    Encoded::Zero(zero_payload(slot.block))
                } else {
                    let (stored, payload) = codec::encode(data, codec);
                    // Checksummed here, in parallel, not under the log lock
                    // (a sealed payload is checksummed after sealing there).
                    let crc = sealed.not().then(|| crc32c::crc32c(&payload));
                    Encoded::Data(stored, payload, crc)
                }
            })
            .collect();
        if let (Some(adapt), Codec::Zstd(level)) = (&self.adapt, codec) {
            let compressed = encoded.iter().filter(|e| matches!(e, Encoded::Data(..)));
            adapt.record(level, compressed.count() as u64);
        }
        let store = self.store.as_ref();
        let mut log = self.log.lock();
        let (room, records, kept) = loop {
            while log.rooms_held {
                self.rooms_cv.wait(&mut log);
            }
            let mut records = Vec::with_capacity(blocks.len());
            let mut kept = Vec::with_capacity(blocks.len());
            for ((slot, data), enc) in blocks.iter().zip(&encoded) {
                if !self.cache.is_current(slot) {
                    continue; // discarded meanwhile: the discard record supersedes it
                }
                let (kind, codec, raw_len, payload, payload_crc) = match enc {
                    Encoded::Zero(p) => (RecordKind::Zero, 0, 0, &p[..], None),
                    Encoded::Data(stored, p, crc) => {
                        (RecordKind::Data, *stored, data.len() as u32, &p[..], *crc)
                    }
                };
                records.push(NewRecord {
                    kind,
                    key: slot.block,
                    codec,
                    raw_len,
                    payload,
                    payload_crc,
                    flags: 0,
                });
                kept.push(*slot);
            }
            if records.is_empty() {
                return Ok(());
            }
            let room = log.reserve(store, &records, self.checkpoint_room());
            if let Some(room) = room.map_err(|e| self.fail(e))? {
                break (room, records, kept);
            }
            // The run (in a hole of the file) is full: a checkpoint moves
            // the log (run here, the log lock released).
            self.wait_for_move(&mut log)?;
        };
        let mut turn = Turn {
            inner: self,
            ticket: room.ticket,
            done: false,
        };
        drop(log);
        // Written without the log lock: workers write their batches in parallel.
        let keep = super::log::batch_staging_bytes(self.block_size());
        let written = STAGING.with(|s| room.write(store, &records, &mut s.borrow_mut(), keep));
        let (mut published, mut log) = turn.wait();
        turn.done = true;
        let birth = u32::try_from(room.gen);
        let result = match (written, birth) {
            (Ok(written), Ok(birth)) => {
                let mut map = self.map.write();
                let last = records.len() - 1;
                for (i, ((slot, record), w)) in kept.iter().zip(&records).zip(&written).enumerate()
                {
                    if !self.cache.is_current(slot) {
                        continue; // discarded while being written
                    }
                    let entry = match record.kind {
                        RecordKind::Data => MapEntry::data(w.off, w.len, birth),
                        _ => self.hole_entry(slot.block),
                    };
                    map.set_record(slot.block, entry, i == last);
                }
                Ok(())
            }
            (Err(e), _) => Err(self.fail(e)),
            (_, Err(_)) => Err(self.fail(Error::invalid("generation overflow"))),
        };
        log.published();
        if log.since_checkpoint >= CHECKPOINT_BYTES {
            let _ = self.kick.try_send(());
        }
        let hint = log.take_writeback();
        drop(log);
        *published += 1;
        drop(published);
        self.publish_cv.notify_all();
        if let Some(hint) = hint {
            // Outside the log lock: waiting for the older window paces this
            // worker to the disk instead of letting the host page cache fill.
            self.store.writeback_hint(hint.start.0, hint.start.1, false);
            if let Some((off, len)) = hint.settle {
                self.store.writeback_hint(off, len, true);
            }
        }
        result
    }
}

impl Inner {
    /// Moves the log out of the run `log` is in, which has no room for an
    /// append (the log lock is released meanwhile); Ok once the run is
    /// another, or an error if the image failed.
    pub(super) fn wait_for_move(&self, log: &mut MutexGuard<'_, LogTail>) -> Result<()> {
        let run = log.run_extent();
        // A move that fails fails the image (the writes waiting for it must
        // not be retried forever).
        MutexGuard::unlocked(log, || {
            self.commit_moving(false, None, Wish::OutOf(run))
                .map_err(|e| self.fail(e))
        })
    }
}

thread_local! {
    /// Each write-back worker stages its batches in its own aligned buffer.
    static STAGING: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

/// A write-back batch's turn to publish its records into the map. Rooms are
/// published in the order they were taken, so the map (and a flush that
/// waited for some blocks) never covers a record while an earlier one is
/// still unwritten: replay after a crash stops at the first unwritten room.
/// Dropped without being published (a panic), it publishes nothing and
/// fails the image, so later batches are not left waiting.
struct Turn<'a> {
    inner: &'a Inner,
    ticket: u64,
    /// Set once the turn came: the owner publishes.
    done: bool,
}

impl<'a> Turn<'a> {
    /// Waits until every earlier room is published; returns the turn
    /// counter and the log, both locked.
    fn wait(&self) -> (MutexGuard<'a, u64>, MutexGuard<'a, LogTail>) {
        let mut published = self.inner.publish_turn.lock();
        while *published != self.ticket {
            self.inner.publish_cv.wait(&mut published);
        }
        (published, self.inner.log.lock())
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (mut published, mut log) = self.wait();
        self.inner
            .fail(Error::invalid("a write-back worker stopped mid-batch"));
        log.published();
        drop(log);
        *published += 1;
        drop(published);
        self.inner.publish_cv.notify_all();
    }
}

/// A block ready to append.
enum Encoded<'a> {
    /// All zeros: a ZERO record of one block with this payload.
    Zero([u8; 16]),
    /// A DATA record: codec id, stored bytes and their crc32c (None when
    /// the image is encrypted: the sealed bytes are checksummed).
    Data(u8, std::borrow::Cow<'a, [u8]>, Option<u32>),
}

/// The payload of a ZERO record for one block.
fn zero_payload(block: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&block.to_le_bytes());
    p[8..].copy_from_slice(&1u64.to_le_bytes());
    p
}
