//! Adaptive compression (`OpenOptions::adapt_floor`, mount option `adapt`):
//! when write-back falls behind, blocks are compressed at faster zstd levels
//! instead of holding writers up.
//!
//! On two cores zstd is what bounds sustained writes to a compressed image
//! (`benches/RESULTS.md`, "What bounds the rest"). A fixed fast level
//! (`--compress zstd:-3`) buys speed with space on every write; adapting
//! spends the space only while writes arrive faster than level 1 can keep up.
//!
//! The signal is the cache's dirty data against its dirty limit (where
//! writers start to wait): below [`CALM`] of it, the image's level; from there
//! to [`BUSY`], one step faster per equal share of the ladder; at or beyond
//! [`BUSY`], the floor. The level only changes how a block is compressed:
//! records of every level decode the same way (format.md §4), so nothing on
//! disk says which was used.

use crate::error::{Error, Result};
use crate::format::{zstd_level_ok, Codec, ZSTD_LEVELS_TEXT};
use std::sync::atomic::{AtomicU64, Ordering};

/// Dirty share of the limit below which blocks get the image's level.
const CALM: f64 = 0.25;
/// Dirty share of the limit from which blocks get the floor level.
const BUSY: f64 = 0.75;

/// The levels write-back may use, slowest first, and how often it used a
/// faster one than the image's.
#[derive(Debug)]
pub(crate) struct Adapt {
    /// From the image's level down to the floor (zstd has no level 0).
    ladder: Vec<i32>,
    faster_blocks: AtomicU64,
}

impl Adapt {
    /// The ladder from `codec`'s level down to `floor`; an error if the image
    /// is not compressed or `floor` is not a faster level than its own.
    pub fn new(codec: Codec, floor: i32) -> Result<Adapt> {
        let Codec::Zstd(level) = codec else {
            return Err(Error::invalid(
                "adaptive compression needs a compressed image (this one is 'none')",
            ));
        };
        if !zstd_level_ok(floor) {
            return Err(Error::invalid(format!(
                "adaptive compression floor {floor}: expected a zstd level {ZSTD_LEVELS_TEXT}"
            )));
        }
        if floor >= level {
            return Err(Error::invalid(format!(
                "adaptive compression floor zstd:{floor} is not faster than the image's \
                 zstd:{level}"
            )));
        }
        let ladder = (floor..=level).rev().filter(|&l| l != 0).collect();
        Ok(Adapt {
            ladder,
            faster_blocks: AtomicU64::new(0),
        })
    }

    /// The level for the next batch when `dirty` of `limit` blocks wait.
    pub fn level(&self, dirty: usize, limit: usize) -> i32 {
        let share = dirty as f64 / limit.max(1) as f64;
        let steps = self.ladder.len() - 1;
        let step = ((share - CALM) / (BUSY - CALM) * steps as f64).ceil();
        self.ladder[(step.max(0.0) as usize).min(steps)]
    }

    /// Notes that `blocks` were compressed at `level`.
    pub fn record(&self, level: i32, blocks: u64) {
        if level != self.ladder[0] {
            self.faster_blocks.fetch_add(blocks, Ordering::Relaxed);
        }
    }

    /// The fastest level it may use.
    pub fn floor(&self) -> i32 {
        self.ladder[self.ladder.len() - 1]
    }

    /// Blocks compressed at a faster level than the image's since the open.
    pub fn faster_blocks(&self) -> u64 {
        self.faster_blocks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_falls_with_the_backlog_and_skips_zero() {
        let a = Adapt::new(Codec::Zstd(1), -3).unwrap();
        assert_eq!(a.ladder, [1, -1, -2, -3]);
        assert_eq!(a.floor(), -3);
        let levels: Vec<i32> = [0, 25, 26, 41, 42, 58, 59, 75, 100, 400]
            .iter()
            .map(|&d| a.level(d, 100))
            .collect();
        assert_eq!(levels, [1, 1, -1, -1, -2, -2, -3, -3, -3, -3]);
        let a = Adapt::new(Codec::Zstd(3), 1).unwrap();
        assert_eq!(a.ladder, [3, 2, 1]);
        assert_eq!(a.level(0, 0), 3);
        assert_eq!(a.level(1, 0), 1);
    }

    #[test]
    fn only_faster_levels_are_counted() {
        let a = Adapt::new(Codec::Zstd(1), -1).unwrap();
        a.record(1, 5);
        a.record(-1, 3);
        assert_eq!(a.faster_blocks(), 3);
    }

    #[test]
    fn a_floor_that_is_not_faster_or_not_a_level_is_refused() {
        let msg = |codec, floor| Adapt::new(codec, floor).unwrap_err().to_string();
        assert!(msg(Codec::None, -3).contains("needs a compressed image"));
        assert!(msg(Codec::Zstd(1), 1).contains("not faster than the image's zstd:1"));
        assert!(msg(Codec::Zstd(-3), -2).contains("not faster"));
        assert!(msg(Codec::Zstd(1), 0).contains("expected a zstd level"));
        assert!(msg(Codec::Zstd(1), -8).contains("expected a zstd level"));
    }
}
