//! Write-behind for partly written blocks.
//!
//! A block written in pieces (4 KiB writes into a 64 KiB block: a guest's
//! journal, a log file, `dd bs=4k`) would be written back after its first
//! piece, again after the pieces that arrived while that was in flight, and
//! so on: each write-back is a whole block's record. Measured before this
//! existed: sequential 4 KiB writes made the daemon write 1.9–7x their bytes
//! to the disk (`benches/RESULTS.md`, session 8). So a block that became
//! dirty by a write that neither covers it whole nor ends at its end waits
//! here for [`WRITE_BEHIND`] before it joins the write-back queue, and the
//! pieces that follow in that time are written back with it. A flush, a
//! snapshot, throttled writers and shutdown take every waiting block at once
//! ([`Delayed::take_all`]).

use super::Slot;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a partly written block waits before write-back.
pub const WRITE_BEHIND: Duration = Duration::from_millis(50);

/// Blocks waiting for write-back, oldest first (all wait the same time, so
/// they fall due in order).
#[derive(Debug, Default)]
pub(super) struct Delayed {
    state: Mutex<DelayedState>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct DelayedState {
    waiting: VecDeque<(Instant, Arc<Slot>)>,
    stopped: bool,
}

impl Delayed {
    /// Adds a block that just became dirty. Takes only this list's lock, so
    /// the caller may hold the slot's.
    pub(super) fn push(&self, slot: Arc<Slot>) {
        let mut state = self.state.lock();
        state
            .waiting
            .push_back((Instant::now() + WRITE_BEHIND, slot));
        if state.waiting.len() == 1 {
            self.arrived.notify_one();
        }
    }

    /// Every waiting block, due or not.
    pub(super) fn take_all(&self) -> Vec<Arc<Slot>> {
        let mut state = self.state.lock();
        state.waiting.drain(..).map(|(_, slot)| slot).collect()
    }

    /// Waits until at least one block is due and takes the due ones; empty
    /// once [`Delayed::stop`] was called.
    pub(super) fn wait_due(&self) -> Vec<Arc<Slot>> {
        let mut state = self.state.lock();
        loop {
            if state.stopped {
                return Vec::new();
            }
            let now = Instant::now();
            match state.waiting.front() {
                Some((due, _)) if *due <= now => {
                    let n = state.waiting.iter().take_while(|(d, _)| *d <= now).count();
                    return state.waiting.drain(..n).map(|(_, slot)| slot).collect();
                }
                Some((due, _)) => {
                    let due = *due;
                    self.arrived.wait_until(&mut state, due);
                }
                None => self.arrived.wait(&mut state),
            }
        }
    }

    /// Ends [`Delayed::wait_due`] for good.
    pub(super) fn stop(&self) {
        self.state.lock().stopped = true;
        self.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fall_due_after_the_delay_in_order() {
        let delayed = Arc::new(Delayed::default());
        let start = Instant::now();
        delayed.push(Arc::new(Slot::new(1)));
        delayed.push(Arc::new(Slot::new(2)));
        // Pushed a moment apart, the two can fall due in two takes (a
        // thread descheduled between the pushes: seen once in CI).
        let mut blocks: Vec<u64> = Vec::new();
        while blocks.len() < 2 {
            let due = delayed.wait_due();
            assert!(start.elapsed() >= WRITE_BEHIND, "{:?}", start.elapsed());
            assert!(!due.is_empty());
            blocks.extend(due.iter().map(|s| s.block));
        }
        assert_eq!(blocks, [1, 2]);
        assert!(delayed.take_all().is_empty());
    }

    #[test]
    fn take_all_does_not_wait_and_stop_ends_the_waiter() {
        let delayed = Arc::new(Delayed::default());
        delayed.push(Arc::new(Slot::new(7)));
        let taken = delayed.take_all();
        assert_eq!(taken.len(), 1);
        let waiter = {
            let delayed = delayed.clone();
            std::thread::spawn(move || delayed.wait_due())
        };
        std::thread::sleep(Duration::from_millis(20));
        delayed.stop();
        assert!(waiter.join().unwrap().is_empty());
    }
}
