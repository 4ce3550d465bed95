//! Dead space waiting to be punched, and when to punch it.
//!
//! A checkpoint finds the records that died before it ([`super::reclaim`]);
//! their byte ranges come here instead of being punched on the spot. Under
//! random overwrites, punching record by record cannot keep up: each
//! `fallocate(PUNCH_HOLE)` costs ~0.1 ms on an idle ext4 file and 1–2 ms
//! while O_DIRECT log writes are in flight (the call drains them), while an
//! uncompressed image overwritten at 9k 4 KiB writes a second kills 9k
//! 64 KiB records a second. Punched one by one, the dead space grew by
//! ~450 MB/s (52 GB for 2 GB of data after two minutes). Held here, dead
//! ranges merge with their neighbours as those die too, so one punch frees
//! many records:
//!
//! - runs of at least [`BIG_RUN`] are kept for the log while no more than
//!   [`KEEP_FOR_LOG`] is held, then punched on their own: sequential
//!   overwrites die in long runs, and the log's next runs overwrite them
//!   ([`super::regions`]) instead of filling holes;
//! - beyond [`SOFT_LIMIT`] of held dead bytes, the longest short runs are
//!   punched first (most bytes per punch), in batches of at most 4 ms while the
//!   log's appends wait (the first punch drains the O_DIRECT writes in
//!   flight, the others then cost ~0.1 ms instead of 1–2 ms), each followed
//!   by a pause for the appends that shrinks to none at the hard limit;
//! - when no new dead space arrived for [`QUIET`], everything is punched;
//! - beyond [`HARD_LIMIT`], write-back punches the longest runs itself before
//!   appending: host space stays bounded at the price of write speed.
//!
//! A punch frees whole host pages only; the partly dead pages at a punched
//! run's two ends are kept as *crumbs*, so that the neighbour's range, when
//! it dies, merges with them and their page is punched then (without them,
//! every boundary between two runs punched apart kept a page: 1.2 GB after
//! two minutes of random overwrites).
//!
//! Holding a dead range longer is always safe: records are never rewritten
//! and a dead range lies below the committed log start, so nothing will
//! write there again. A crash only leaves the held ranges allocated until
//! `compact`.

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A byte range `[start, end)` of the image file.
pub(super) type Span = (u64, u64);

/// Runs at least this long are punched on their own, without waiting for
/// their neighbours, once more than [`KEEP_FOR_LOG`] is held.
pub(super) const BIG_RUN: u64 = 1 << 20;
/// Dead bytes held before long runs are punched: below it they wait for
/// the log, which moves into held dead space as into holes (`regions`).
/// Overwriting allocated pages is what the host file system does fastest
/// (ext4 here, 1 MiB O_DIRECT writes QD16 x2: 2.26 GB/s over written
/// blocks, 1.37 into holes, 1.18 into fallocated space, with writes held
/// up to 0.8 s by the allocations); a punch would also hold the log's
/// writes while it runs, the host's `discard` included. What waits is
/// punched when the load stops ([`QUIET`]).
pub(super) const KEEP_FOR_LOG: u64 = SOFT_LIMIT;
/// Dead bytes held before the longest runs are punched regardless of age.
/// The more is held, the longer the runs (neighbours die too) and the fewer
/// punches per byte: 4 KiB random overwrites of 2 GiB on an uncompressed
/// image, 40 s, held beyond the data / IOPS (unbounded before: 9.0k IOPS),
/// with untimed batches of 32 punches: 512 MiB: 1.0 GiB / 5.9k; 1 GiB:
/// 1.2 GiB / 6.5k; 2 GiB: 2.2 GiB / 7.8k. (With the timed batches kept,
/// 1 GiB: 2.2 GiB / 8.3k and a p99 half as long.)
pub(super) const SOFT_LIMIT: u64 = 1 << 30;
/// Dead bytes held before write-back helps punching (and so slows down): a
/// backstop should the reclaim thread fall behind.
pub(super) const HARD_LIMIT: u64 = 4 << 30;
/// Everything is punched once no dead space arrived for this long.
pub(super) const QUIET: Duration = Duration::from_secs(2);
/// Host page: the unit of punching.
pub(super) const PAGE: u64 = 4096;
/// Crumbs kept at most (beyond, a crumb's page stays allocated until
/// `compact`): ~9 MiB of memory.
const MAX_CRUMBS: usize = 1 << 18;
/// Runs held at most before the longest are punched regardless of age: the
/// memory bound (~9 MiB) where records are small (4 KiB blocks compress to
/// ~2 KiB records: a gigabyte of them would be half a million runs).
const MAX_RUNS: usize = 1 << 17;
/// Memory the held set can take at its bounds (measured: ~72 bytes per run
/// in the two B-trees, ~36 per crumb: 9 + 9 MiB), reserved out of the
/// `cache=` budget ([`super::threads_reserve`]).
pub(super) const BOOKKEEPING_BYTES: u64 = 20 << 20;

/// Disjoint, non-touching dead runs, findable by position and by length.
#[derive(Debug, Default)]
struct Runs {
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    bytes: u64,
}

impl Runs {
    fn remove(&mut self, start: u64) -> Option<Span> {
        let end = self.by_start.remove(&start)?;
        self.by_len.remove(&(end - start, start));
        self.bytes -= end - start;
        Some((start, end))
    }

    /// Adds `span`, merging it with every run it overlaps or touches.
    fn add(&mut self, (mut start, mut end): Span) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.by_start.range(..=start).next_back() {
            if e >= start {
                self.remove(s);
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.by_start.range(start..).next() {
            if s > end {
                break;
            }
            self.remove(s);
            end = end.max(e);
        }
        self.by_start.insert(start, end);
        self.by_len.insert((end - start, start));
        self.bytes += end - start;
    }

    /// Removes `[start, end)` from the runs (parts outside it stay).
    fn cut(&mut self, (start, end): Span) {
        let first = self
            .by_start
            .range(..start)
            .next_back()
            .filter(|(_, &e)| e > start)
            .map(|(&s, _)| s);
        let inside: Vec<u64> = first
            .into_iter()
            .chain(self.by_start.range(start..end).map(|(&s, _)| s))
            .collect();
        for s in inside {
            let (s, e) = self.remove(s).expect("listed");
            for keep in [(s, start.min(e)), (end.max(s), e)] {
                if keep.0 < keep.1 {
                    self.add(keep);
                }
            }
        }
    }

    /// True if a run overlaps or touches `[start, end)`.
    fn touches(&self, (start, end): Span) -> bool {
        self.by_start
            .range(..=end)
            .next_back()
            .is_some_and(|(_, &e)| e >= start)
    }

    fn longest(&self) -> Option<Span> {
        self.by_len.last().map(|&(len, start)| (start, start + len))
    }
}

/// Dead ranges of one open image not punched yet.
#[derive(Debug)]
pub(super) struct DeadSpace {
    state: Mutex<State>,
    /// Held by whoever has taken runs out of the set and not finished
    /// punching them: "punch everything held" waits for those too.
    pub punching: Mutex<()>,
}

#[derive(Debug)]
struct State {
    runs: Runs,
    /// Dead pieces of pages whose other bytes were live when their run was
    /// punched: start -> end.
    crumbs: BTreeMap<u64, u64>,
    last_added: Instant,
}

impl State {
    /// `span` grown by the crumbs it touches (taken out of `crumbs`).
    fn with_crumbs(&mut self, (mut start, mut end): Span) -> Span {
        if let Some((&s, &e)) = self.crumbs.range(..=start).next_back() {
            if e >= start {
                self.crumbs.remove(&s);
                start = s;
                end = end.max(e);
            }
        }
        if let Some((&s, &e)) = self.crumbs.range(start..).next() {
            if s <= end {
                self.crumbs.remove(&s);
                end = end.max(e);
            }
        }
        (start, end)
    }
}

/// True if `run` is long enough to punch on its own and too much is held to
/// keep it for the log.
fn long_due(s: &State, (start, end): Span) -> bool {
    end - start >= BIG_RUN && s.runs.bytes > KEEP_FOR_LOG
}

impl Default for DeadSpace {
    fn default() -> Self {
        DeadSpace {
            state: Mutex::new(State {
                runs: Runs::default(),
                crumbs: BTreeMap::new(),
                last_added: Instant::now(),
            }),
            punching: Mutex::new(()),
        }
    }
}

impl DeadSpace {
    /// Adds dead ranges (each outside the committed replay window).
    pub fn add(&self, spans: impl IntoIterator<Item = Span>) {
        let mut s = self.state.lock();
        let before = s.runs.bytes;
        for span in spans {
            let span = s.with_crumbs(span);
            s.runs.add(span);
        }
        if s.runs.bytes != before {
            s.last_added = Instant::now();
        }
    }

    /// Dead bytes held.
    pub fn bytes(&self) -> u64 {
        self.state.lock().runs.bytes
    }

    /// The next run to punch on its own by the background policy (module
    /// docs), taken out of the set: a run of [`BIG_RUN`] or more beyond
    /// [`KEEP_FOR_LOG`], or any when too many are held or none arrived for
    /// [`QUIET`]. `None` when nothing is due (short runs beyond
    /// [`SOFT_LIMIT`] are for [`DeadSpace::take_short_over`]).
    pub fn next_due(&self) -> Option<Span> {
        self.take_longest_if(|s, run| {
            long_due(s, run) || s.runs.by_start.len() > MAX_RUNS || s.last_added.elapsed() >= QUIET
        })
    }

    /// The longest run, taken out of the set, while more than `limit` bytes
    /// are held.
    pub fn take_longest_over(&self, limit: u64) -> Option<Span> {
        self.take_longest_if(|s, _| s.runs.bytes > limit)
    }

    /// The longest run if it is [`BIG_RUN`] or more and more than
    /// [`KEEP_FOR_LOG`] is held, taken out of the set.
    pub fn next_due_long(&self) -> Option<Span> {
        self.take_longest_if(long_due)
    }

    /// The length of the longest run held.
    pub fn longest_run(&self) -> u64 {
        self.state.lock().runs.longest().map_or(0, |(s, e)| e - s)
    }

    /// The first run of `long` bytes or more held that reaches into
    /// `[at, to)`, cut to it (shorter runs are passed over: in memory, no
    /// more than the runs held).
    pub fn first_long_run_in(&self, (at, to): Span, long: u64) -> Option<Span> {
        let s = self.state.lock();
        let from = s
            .runs
            .by_start
            .range(..=at)
            .next_back()
            .map_or(at, |(&a, _)| a);
        s.runs
            .by_start
            .range(from..to)
            .filter(|(&a, &b)| b - a >= long)
            .map(|(&a, &b)| (a.max(at), b.min(to)))
            .find(|(a, b)| a < b)
    }

    /// The longest run, taken out of the set if `due` says so.
    fn take_longest_if(&self, due: impl FnOnce(&State, Span) -> bool) -> Option<Span> {
        let mut s = self.state.lock();
        let run = s.runs.longest()?;
        if due(&s, run) {
            s.runs.remove(run.0)
        } else {
            None
        }
    }

    /// The longest run shorter than [`BIG_RUN`], taken out of the set, while
    /// more than `limit` bytes are held (a batch punched while appends wait
    /// must not meet a long run: that punch alone would hold them up).
    pub fn take_short_over(&self, limit: u64) -> Option<Span> {
        let mut s = self.state.lock();
        if s.runs.bytes <= limit {
            return None;
        }
        let &(len, start) = s.runs.by_len.range(..(BIG_RUN, 0)).next_back()?;
        debug_assert!(len < BIG_RUN);
        s.runs.remove(start)
    }

    /// Notes that the whole pages of `run` were punched: its partly dead
    /// end pages are kept as crumbs.
    pub fn punched(&self, (start, end): Span) {
        let (first, last) = (start.next_multiple_of(PAGE), end & !(PAGE - 1));
        let edges = if first < last {
            [(start, first), (last, end)]
        } else {
            [(start, end), (end, end)] // no whole page: all of it waits
        };
        let mut s = self.state.lock();
        for (a, b) in edges {
            if a >= b {
                continue;
            }
            if s.runs.touches((a, b)) {
                // A neighbour died while this run was being punched.
                s.runs.add((a, b));
                continue;
            }
            // The crumb of a neighbour punched before (runs apart, taken
            // in one batch) may complete the page: then it is due.
            let (a, b) = s.with_crumbs((a, b));
            if a.next_multiple_of(PAGE) < b & !(PAGE - 1) {
                s.runs.add((a, b));
            } else if s.crumbs.len() < MAX_CRUMBS {
                s.crumbs.insert(a, b);
            }
        }
    }

    /// True if the runs and crumbs held cover every byte of `[start, end)`
    /// (an empty range is covered).
    pub fn covers(&self, (start, end): Span) -> bool {
        let s = self.state.lock();
        let mut pos = start;
        while pos < end {
            let reach = |m: &BTreeMap<u64, u64>| {
                m.range(..=pos)
                    .next_back()
                    .filter(|(_, &e)| e > pos)
                    .map(|(_, &e)| e)
            };
            match reach(&s.runs.by_start).or_else(|| reach(&s.crumbs)) {
                Some(e) => pos = e,
                None => return false,
            }
        }
        true
    }

    /// The parts of `[start, end)` that the runs and crumbs held do not
    /// cover, in order.
    pub fn uncovered(&self, (start, end): Span) -> Vec<Span> {
        let s = self.state.lock();
        let mut held: Vec<Span> = [&s.runs.by_start, &s.crumbs]
            .iter()
            .flat_map(|m| {
                let first = m.range(..=start).next_back().map_or(start, |(&a, _)| a);
                m.range(first..end).map(|(&a, &b)| (a, b))
            })
            .collect();
        held.sort_unstable();
        let (mut out, mut pos) = (Vec::new(), start);
        for (a, b) in held {
            if a > pos {
                out.push((pos, a.min(end)));
            }
            pos = pos.max(b);
            if pos >= end {
                return out;
            }
        }
        out.push((pos, end));
        out
    }

    /// Forgets what is held in `[start, end)`, runs and crumbs (the log
    /// moves into that hole: `super::regions`); returns the bytes of runs
    /// forgotten.
    pub fn forget(&self, (start, end): Span) -> u64 {
        let mut s = self.state.lock();
        let before = s.runs.bytes;
        s.runs.cut((start, end));
        let forgotten = before - s.runs.bytes;
        let crumbs: Vec<u64> = s
            .crumbs
            .range(..end)
            .filter(|(_, &e)| e > start)
            .map(|(&a, _)| a)
            .collect();
        for a in crumbs {
            s.crumbs.remove(&a);
        }
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(r: &Runs) -> Vec<Span> {
        r.by_start.iter().map(|(&s, &e)| (s, e)).collect()
    }

    #[test]
    fn forgetting_a_range_keeps_what_lies_outside_it() {
        let d = DeadSpace::default();
        d.add([(0, 100), (200, 300), (400, 500)]);
        d.punched((1000, 1100)); // a crumb inside, no whole page
        d.forget((50, 450));
        assert_eq!(runs(&d.state.lock().runs), vec![(0, 50), (450, 500)]);
        assert_eq!(d.bytes(), 100);
        d.forget((900, 1200));
        assert!(d.state.lock().crumbs.is_empty());
    }

    #[test]
    fn crumbs_that_complete_a_page_are_punched() {
        let d = DeadSpace::default();
        // Two runs that end and start in the page 12288..16384, punched
        // apart: their crumbs meet and the page is due.
        d.punched((8192 - 64, 12288 + 100));
        assert!(d.next_due().is_none() || d.bytes() == 0);
        d.punched((12288 + 100, 20480 + 50));
        assert_eq!(d.take_longest_over(0), Some((12288, 16384)));
        assert!(d.covers((8128, 8192)) && d.covers((20480, 20530)));
    }

    #[test]
    fn uncovered_parts_are_what_nothing_holds() {
        let d = DeadSpace::default();
        assert_eq!(d.uncovered((100, 200)), vec![(100, 200)]);
        d.add([(120, 140), (160, 170)]);
        assert_eq!(
            d.uncovered((100, 200)),
            vec![(100, 120), (140, 160), (170, 200)]
        );
        assert_eq!(d.uncovered((130, 165)), vec![(140, 160)]);
        assert!(d.uncovered((125, 135)).is_empty());
        assert_eq!(d.uncovered((0, 50)), vec![(0, 50)]);
    }

    #[test]
    fn coverage_needs_every_byte_held() {
        let d = DeadSpace::default();
        d.add([(0, 100), (200, 300)]);
        d.punched((5000, 5100)); // a crumb
        d.add([(5100, 5200)]);
        assert!(d.covers((10, 90)) && d.covers((0, 100)) && d.covers((50, 50)));
        assert!(!d.covers((50, 150)) && !d.covers((150, 250)));
        assert!(d.covers((5000, 5200)), "a crumb and a run side by side");
        assert!(!d.covers((4999, 5200)));
    }

    #[test]
    fn touching_and_overlapping_ranges_merge_into_one_run() {
        let mut r = Runs::default();
        r.add((100, 200));
        r.add((300, 400));
        r.add((500, 600));
        assert_eq!(runs(&r), [(100, 200), (300, 400), (500, 600)]);
        assert_eq!(r.bytes, 300);
        r.add((200, 300)); // touches both neighbours
        assert_eq!(runs(&r), [(100, 400), (500, 600)]);
        r.add((350, 550)); // overlaps both
        assert_eq!(runs(&r), [(100, 600)]);
        assert_eq!(r.bytes, 500);
        r.add((0, 50));
        r.add((120, 130)); // inside
        r.add((7, 7)); // empty
        assert_eq!(runs(&r), [(0, 50), (100, 600)]);
        assert_eq!(r.bytes, 550);
        assert_eq!(r.longest(), Some((100, 600)));
        assert_eq!(r.by_len.len(), 2);
    }

    #[test]
    fn the_partly_dead_pages_of_a_punched_run_join_their_neighbours_later() {
        let dead = DeadSpace::default();
        // Records at [1000, 9000) and [9000, 20000): the first dies alone.
        dead.add([(1000, 9000)]);
        let run = dead.take_longest_over(0).unwrap();
        dead.punched(run); // pages [4096, 8192) punched
        assert_eq!(dead.bytes(), 0);
        // The second dies: its run takes the crumb [8192, 9000), so the page
        // [8192, 12288) is punched with it.
        dead.add([(9000, 20000)]);
        assert_eq!(dead.take_longest_over(0), Some((8192, 20000)));
        // A run inside one page is kept whole.
        dead.punched((30000, 30100));
        dead.add([(30100, 40000)]);
        assert_eq!(dead.take_longest_over(0), Some((30000, 40000)));
        // The crumb before the first record's start waits for its neighbour.
        dead.add([(0, 1000)]);
        assert_eq!(dead.take_longest_over(0), Some((0, 4096)));
        // A neighbour that died while its run was being punched takes the
        // crumb at once.
        dead.add([(50000, 60000)]);
        let run = dead.take_longest_over(0).unwrap();
        dead.add([(60000, 70000)]);
        dead.punched(run);
        assert_eq!(dead.take_longest_over(0), Some((57344, 70000)));
    }

    #[test]
    fn runs_wait_for_the_log_and_long_ones_go_first_beyond_its_share() {
        let dead = DeadSpace::default();
        let long = (10 << 20, (10 << 20) + BIG_RUN);
        dead.add([(0, 4096), long]);
        assert_eq!(dead.next_due(), None, "both wait for the log");
        assert_eq!(dead.next_due_long(), None);
        assert_eq!(dead.longest_run(), BIG_RUN);
        let first_long = |span| dead.first_long_run_in(span, BIG_RUN);
        assert_eq!(first_long((0, u64::MAX)), Some(long));
        assert_eq!(first_long((0, 8192)), None, "short: passed over");
        assert_eq!(dead.first_long_run_in((0, 8192), 4096), Some((0, 4096)));
        let inside = (long.0 + 100, long.1 - 100);
        assert_eq!(first_long(inside), Some(inside));
        assert_eq!(first_long((long.1, u64::MAX)), None);
        // Beyond the log's share, the long run goes on its own.
        let far = 1 << 40;
        dead.add([(far, far + KEEP_FOR_LOG)]);
        assert_eq!(dead.next_due_long(), Some((far, far + KEEP_FOR_LOG)));
        dead.add([(far, far + KEEP_FOR_LOG)]);
        assert_eq!(dead.next_due(), Some((far, far + KEEP_FOR_LOG)));
        assert_eq!(dead.next_due(), None, "back within the share");
        assert_eq!(dead.bytes(), 4096 + BIG_RUN);
        dead.state.lock().last_added = Instant::now() - QUIET;
        assert_eq!(dead.next_due(), Some(long), "quiet: punched");
        assert_eq!(dead.next_due(), Some((0, 4096)));
        assert_eq!(dead.bytes(), 0);
    }

    #[test]
    fn too_many_runs_are_due_however_short() {
        let dead = DeadSpace::default();
        let n = MAX_RUNS as u64 + 2;
        dead.add((0..n).map(|i| (i * 8192, i * 8192 + 100)));
        assert!(dead.next_due().is_some());
        assert!(dead.next_due().is_some());
        assert_eq!(dead.next_due(), None, "back at the bound");
        assert_eq!(dead.bytes(), 100 * MAX_RUNS as u64);
    }

    #[test]
    fn over_the_soft_limit_the_longest_runs_go_first() {
        let dead = DeadSpace::default();
        // Runs of 64 KiB and one of 128 KiB, 2 MiB apart, past the limit,
        // and a long one.
        let n = SOFT_LIMIT / (1 << 16) + 1;
        dead.add((0..n).map(|i| (i << 21, (i << 21) + (1 << 16))));
        dead.add([(n << 21, (n << 21) + (2 << 16))]);
        let long = ((n + 1) << 21, ((n + 1) << 21) + BIG_RUN);
        dead.add([long]);
        assert_eq!(
            dead.take_short_over(SOFT_LIMIT),
            Some((n << 21, (n << 21) + (2 << 16))),
            "the longest short run"
        );
        assert_eq!(dead.next_due(), Some(long), "long runs go on their own");
        assert_eq!(dead.next_due(), None, "short ones are not due");
        assert!(dead.take_short_over(SOFT_LIMIT).is_some(), "still over");
        assert_eq!(dead.bytes(), SOFT_LIMIT, "now at the limit");
        assert_eq!(dead.take_short_over(SOFT_LIMIT), None);
        assert_eq!(dead.take_longest_over(SOFT_LIMIT), None);
        assert!(dead.take_longest_over(SOFT_LIMIT - 1).is_some());
        dead.forget((0, u64::MAX));
        assert_eq!(dead.bytes(), 0);
    }
}
