//! Write-back workers and the background checkpointer.
//!
//! Workers take dirty slots from the cache's queue, copy the block out (under
//! the slot lock, briefly), detect zeros and compress (no lock held), then
//! append the record and update the map under the log lock, and tell the cache
//! which version is now persisted. The checkpointer runs a checkpoint when the
//! log since the last one passes [`CHECKPOINT_BYTES`](super::CHECKPOINT_BYTES)
//! or [`CHECKPOINT_INTERVAL`](super::CHECKPOINT_INTERVAL) passes with changes.

use super::{Inner, CHECKPOINT_BYTES, CHECKPOINT_INTERVAL};
use crate::cache::Slot;
use crate::codec;
use crate::error::{Error, Result};
use crate::format::{EntryKind, MapEntry, RecordKind};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Starts `workers` write-back threads and the checkpointer.
pub(super) fn spawn(inner: &Arc<Inner>, workers: usize) -> Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(workers + 1);
    for i in 0..workers {
        let inner = inner.clone();
        let t = std::thread::Builder::new()
            .name(format!("vbd-writeback-{i}"))
            .spawn(move || worker(&inner))
            .map_err(|e| Error::io("start write-back thread", e))?;
        threads.push(t);
    }
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
                Ok(slot) => inner.write_back(&slot),
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
            if let Err(e) = inner.checkpoint(false) {
                ::log::error!("background checkpoint failed: {e}");
            }
            last = std::time::Instant::now();
        }
    }
}

impl Inner {
    /// Persists one dirty slot (one pass; the cache requeues it if it changed).
    pub(super) fn write_back(&self, slot: &Arc<Slot>) {
        let (data, version) = {
            let mut state = slot.lock();
            if !state.dirty || state.in_flight || state.detached {
                return;
            }
            state.in_flight = true;
            (Arc::clone(&state.data), state.version)
        };
        if let Err(e) = self.persist(slot, &data) {
            ::log::error!("write-back of block {} failed: {e}", slot.block);
        }
        self.cache.finish_writeback(slot, version);
    }

    fn persist(&self, slot: &Arc<Slot>, data: &[u8]) -> Result<()> {
        self.check_failed()?;
        let encoded = (!codec::is_zero(data)).then(|| codec::encode(data, self.codec));
        let block = slot.block;
        let mut log = self.log.lock();
        if !self.cache.is_current(slot) {
            return Ok(()); // discarded meanwhile: the discard record supersedes it
        }
        let store = self.store.as_ref();
        let entry = match &encoded {
            None => {
                let mut payload = block.to_le_bytes().to_vec();
                payload.extend_from_slice(&1u64.to_le_bytes());
                log.append(store, RecordKind::Zero, block, 0, 0, &payload)
                    .map_err(|e| self.fail(e))?;
                self.hole_entry(block)
            }
            Some((stored, payload)) => {
                let raw_len = data.len() as u32;
                let w = log
                    .append(store, RecordKind::Data, block, *stored, raw_len, payload)
                    .map_err(|e| self.fail(e))?;
                let birth = u32::try_from(log.gen)
                    .map_err(|_| self.fail(Error::invalid("generation overflow")))?;
                MapEntry {
                    kind: EntryKind::Data,
                    off: w.off,
                    len: w.len,
                    birth,
                }
            }
        };
        self.map.write().set(block, entry);
        if log.since_checkpoint >= CHECKPOINT_BYTES {
            let _ = self.kick.try_send(());
        }
        let hint = log.take_writeback();
        drop(log);
        if let Some(hint) = hint {
            // Outside the log lock: waiting for the older window paces this
            // worker to the disk instead of letting the host page cache fill.
            self.store.writeback_hint(hint.start.0, hint.start.1, false);
            if let Some((off, len)) = hint.settle {
                self.store.writeback_hint(off, len, true);
            }
        }
        Ok(())
    }
}
