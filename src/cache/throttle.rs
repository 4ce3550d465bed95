//! Write throttling in arrival order.
//!
//! A writer puts its blocks into the cache and then, while dirty data is
//! over the limit, waits for write-back before it replies. Writers wait in
//! line and go in the order they came: one is let go per block persisted
//! below the limit, and a writer that finds others waiting queues behind
//! them even if the level just dropped. Before, any waiter woken by a
//! persisted block could find the level raised again by a newcomer that
//! never waited (each writer's blocks are in before it throttles) and went
//! back to the end of the condition variable's queue: under a sustained
//! 1 MiB write, requests completed steadily (the longest time without any
//! completion 51–151 ms) while single ones waited 0.6–0.9 s
//! (`benches/RESULTS.md`, session 22).

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Duration;

/// How long a waiter sleeps before it looks again on its own: wake-ups come
/// from write-back; this only covers a level that dropped with nothing left
/// in flight to report it.
const RECHECK: Duration = Duration::from_millis(20);

/// Writers waiting for write-back, first come first out.
#[derive(Debug, Default)]
pub(super) struct Line {
    waiters: Mutex<VecDeque<Arc<Waiter>>>,
    /// How many are in `waiters` (read without its lock by the fast path).
    len: AtomicUsize,
}

#[derive(Debug)]
struct Waiter {
    released: AtomicBool,
    thread: Thread,
}

impl Line {
    /// Returns once `may_go` holds for the caller at the head of the line
    /// (at once if nobody waits and it holds now).
    pub(super) fn wait(&self, may_go: impl Fn() -> bool) {
        if self.len.load(Ordering::Acquire) == 0 && may_go() {
            return;
        }
        let me = Arc::new(Waiter {
            released: AtomicBool::new(false),
            thread: std::thread::current(),
        });
        {
            let mut waiters = self.waiters.lock();
            waiters.push_back(me.clone());
            self.len.fetch_add(1, Ordering::AcqRel);
        }
        loop {
            self.release_first(&may_go);
            if me.released.load(Ordering::Acquire) {
                return;
            }
            std::thread::park_timeout(RECHECK);
        }
    }

    /// Lets the first waiter go if `may_go` holds (checked under the
    /// line's lock, so a level that drops is never missed).
    pub(super) fn release_first(&self, may_go: impl Fn() -> bool) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut waiters = self.waiters.lock();
        if !may_go() {
            return;
        }
        if let Some(first) = waiters.pop_front() {
            self.len.fetch_sub(1, Ordering::AcqRel);
            release(&first);
        }
    }

    /// Lets every waiter go for which `may_go` holds, in order.
    pub(super) fn release_while(&self, may_go: impl Fn() -> bool) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut waiters = self.waiters.lock();
        while may_go() {
            let Some(first) = waiters.pop_front() else {
                break;
            };
            self.len.fetch_sub(1, Ordering::AcqRel);
            release(&first);
        }
    }

    /// Writers in line now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

fn release(waiter: &Waiter) {
    waiter.released.store(true, Ordering::Release);
    waiter.thread.unpark();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for_len(line: &Line, n: usize) {
        let start = std::time::Instant::now();
        while line.len() != n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "line never reached {n}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waiters go in the order they came, one per release, and a newcomer
    /// queues behind them even when the level is low as it arrives.
    #[test]
    fn waiters_go_in_arrival_order_and_newcomers_do_not_pass() {
        let line = Arc::new(Line::default());
        // One token per writer that may go (taken under the line's lock).
        let tokens = Arc::new(AtomicUsize::new(0));
        let gone = Arc::new(Mutex::new(Vec::new()));
        let spawn = |id: usize| {
            let (line, tokens, gone) = (line.clone(), tokens.clone(), gone.clone());
            std::thread::spawn(move || {
                line.wait(|| take(&tokens));
                gone.lock().push(id);
            })
        };
        let mut threads: Vec<_> = (0..8)
            .map(|i| {
                let t = spawn(i);
                wait_for_len(&line, i + 1);
                t
            })
            .collect();
        // The level drops just as a newcomer arrives: it does not pass.
        tokens.store(1, Ordering::SeqCst);
        threads.push(spawn(100));
        for (n, expected) in (0..8).chain([100]).enumerate() {
            if n > 0 {
                tokens.store(1, Ordering::SeqCst);
            }
            let start = std::time::Instant::now();
            while gone.lock().len() <= n {
                assert!(start.elapsed() < Duration::from_secs(10), "nobody went");
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(gone.lock()[n], expected, "order: {:?}", gone.lock());
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(line.len(), 0);
    }

    fn take(tokens: &AtomicUsize) -> bool {
        tokens
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| t.checked_sub(1))
            .is_ok()
    }

    /// A waiter whose level dropped with nobody left to report it goes on
    /// by itself.
    #[test]
    fn a_waiter_goes_on_its_own_once_the_level_is_low() {
        let line = Arc::new(Line::default());
        let open = Arc::new(AtomicBool::new(false));
        let t = {
            let (line, open) = (line.clone(), open.clone());
            std::thread::spawn(move || line.wait(|| open.load(Ordering::SeqCst)))
        };
        wait_for_len(&line, 1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "went while the level was high");
        open.store(true, Ordering::SeqCst);
        t.join().unwrap();
        assert_eq!(line.len(), 0);
    }

    #[test]
    fn release_while_lets_go_as_many_as_may() {
        let line = Arc::new(Line::default());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let t = std::thread::spawn({
                    let line = line.clone();
                    move || line.wait(|| false)
                });
                wait_for_len(&line, i + 1);
                t
            })
            .collect();
        let tokens = AtomicUsize::new(3);
        line.release_while(|| take(&tokens));
        assert_eq!(line.len(), 1);
        line.release_while(|| true);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(line.len(), 0);
    }
}
