//! One cached block: its bytes, its load state and its write-back state.

use crate::error::{Error, ErrorKind};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::sync::Arc;

/// Where a slot's contents stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// The creator is filling it; others wait.
    Loading,
    /// `data` holds the block.
    Ready,
    /// Loading failed; the slot was removed from the cache. Waiters get this
    /// error kind and message and retry or report.
    Failed(ErrorKind, String),
}

/// The mutable part of a slot, behind its mutex.
#[derive(Debug)]
pub struct SlotState {
    /// The block's bytes (block size long once ready). Shared with a
    /// write-back worker while in flight; writers copy on write then.
    pub data: Arc<Vec<u8>>,
    /// Load state.
    pub load: Load,
    /// True while the cache holds changes not yet persisted.
    pub dirty: bool,
    /// Bumped on every modification.
    pub version: u64,
    /// The highest version persisted (or abandoned because the slot was removed).
    pub written: u64,
    /// A write-back worker holds a copy of this slot's data.
    pub in_flight: bool,
    /// Removed from the cache (discarded); write-back must not persist it.
    pub detached: bool,
    /// Became dirty by a write into its middle and was put into write-behind
    /// (the cache's `delay`): a write that completes it queues it at once.
    pub behind: bool,
}

/// A cached block shared between the cache, readers, writers and workers.
#[derive(Debug)]
pub struct Slot {
    /// Block index.
    pub block: u64,
    state: Mutex<SlotState>,
    changed: Condvar,
}

impl Slot {
    pub(super) fn new(block: u64) -> Self {
        Slot {
            block,
            state: Mutex::new(SlotState {
                data: Arc::new(Vec::new()),
                load: Load::Loading,
                dirty: false,
                version: 0,
                written: 0,
                in_flight: false,
                detached: false,
                behind: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock()
    }

    /// Locks the state if it is free right now.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, SlotState>> {
        self.state.try_lock()
    }

    /// Wakes everyone waiting on this slot.
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Waits until the slot is loaded; returns the locked state, or the load error.
    pub fn wait_ready(&self) -> Result<MutexGuard<'_, SlotState>, Error> {
        let mut state = self.state.lock();
        loop {
            match &state.load {
                Load::Ready => return Ok(state),
                Load::Failed(kind, msg) => return Err(Error::new(*kind, msg.clone())),
                Load::Loading => self.changed.wait(&mut state),
            }
        }
    }

    /// Waits until version `v` is persisted (or abandoned).
    pub fn wait_written(&self, v: u64) {
        let mut state = self.state.lock();
        while state.written < v && !state.detached {
            self.changed.wait(&mut state);
        }
    }
}
