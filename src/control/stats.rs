//! Request statistics of one mount: how many requests on `disk` of each kind,
//! their bytes and errors, and how long they took, shown in the control file
//! (`read-latency-us: p50=… p99=… max=…`). Stalls are the first thing users of
//! userspace block paths complain about; these make them visible in the
//! product, not only in a benchmark.
//!
//! A request's time runs from the moment a FUSE thread has read it to its
//! reply: it includes waiting for a worker, the engine's cache and disk I/O,
//! and a writer's throttling while write-back catches up; it does not include
//! the kernel's own queue before the daemon reads the request.
//!
//! Recording is a few relaxed atomic adds (no lock): the histogram has fixed
//! log-linear buckets, eight per power of two, so a percentile is exact to
//! 12.5 % and reported as its bucket's upper edge (never below the truth).
//! A request that takes [`SLOW`] or longer is also logged (at most one line
//! per [`SLOW_LOG_EVERY`]) and counted.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A request that takes this long is logged and counted as slow.
pub const SLOW: Duration = Duration::from_secs(1);
/// At most one slow-request log line per this interval.
pub const SLOW_LOG_EVERY: Duration = Duration::from_secs(10);

/// The kinds of request on `disk` that are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `fsync`/`fdatasync`.
    Flush,
    /// `fallocate` PUNCH_HOLE or ZERO_RANGE.
    Discard,
}

impl Op {
    const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Flush, Op::Discard];

    /// The name used in the control file's keys.
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
        }
    }
}

/// Sub-buckets per power of two (2^SUB_BITS).
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Largest value kept apart, in µs (2^40 µs ≈ 12.7 days); longer ones share
/// the last bucket.
const TOP_BIT: u32 = 40;
const BUCKETS: usize = ((TOP_BIT + 1 - SUB_BITS) as usize + 1) * SUB as usize;

/// The bucket of a value: values below `SUB` have their own; above, each
/// power of two is split into `SUB` equal parts.
fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let top = (63 - v.leading_zeros()).min(TOP_BIT);
    if top == TOP_BIT && v >> TOP_BIT > 1 {
        return BUCKETS - 1;
    }
    let sub = (v >> (top - SUB_BITS)) & (SUB - 1);
    ((top - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The largest value that falls into bucket `i`.
fn upper_edge(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let top = (i / SUB - 1) as u32 + SUB_BITS;
    let sub = i % SUB;
    ((SUB + sub + 1) << (top - SUB_BITS)) - 1
}

/// A concurrent latency histogram in microseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Counts one value.
    pub fn record(&self, micros: u64) {
        self.buckets[bucket(micros)].fetch_add(1, Relaxed);
        self.max.fetch_max(micros, Relaxed);
    }

    /// The values at each of `fractions` (0 < f ≤ 1, ascending) and the
    /// largest; None when nothing was recorded.
    pub fn summary(&self, fractions: &[f64]) -> Option<(Vec<u64>, u64)> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let max = self.max.load(Relaxed);
        let mut values = Vec::with_capacity(fractions.len());
        let (mut seen, mut i) = (0u64, 0usize);
        for &f in fractions {
            let rank = ((f * total as f64 - 1e-9).ceil() as u64).clamp(1, total);
            while seen + counts[i] < rank {
                seen += counts[i];
                i += 1;
            }
            values.push(upper_edge(i).min(max));
        }
        Some((values, max))
    }

    fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Relaxed);
        }
        self.max.store(0, Relaxed);
    }
}

/// Counters of one kind of request.
#[derive(Debug, Default)]
struct OpStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

/// The request statistics of one mount (see the module docs).
#[derive(Debug)]
pub struct RequestStats {
    ops: [OpStats; 4],
    slow: AtomicU64,
    /// When the counters were last reset (the mount or `reset-stats`).
    since: Mutex<Instant>,
    /// Milliseconds after `created` of the last slow-request log line.
    last_slow_log_ms: AtomicU64,
    created: Instant,
}

impl Default for RequestStats {
    fn default() -> Self {
        let now = Instant::now();
        RequestStats {
            ops: Default::default(),
            slow: AtomicU64::new(0),
            since: Mutex::new(now),
            last_slow_log_ms: AtomicU64::new(0),
            created: now,
        }
    }
}

/// Percentiles shown for each kind of request.
const SHOWN: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

impl RequestStats {
    /// Counts one finished request of `op` that moved `bytes` and took
    /// `started.elapsed()`; `at` is its offset on `disk` (for the slow log).
    pub fn finish(&self, op: Op, started: Instant, bytes: u64, at: u64, ok: bool) {
        let took = started.elapsed();
        let s = &self.ops[op as usize];
        s.requests.fetch_add(1, Relaxed);
        if ok {
            s.bytes.fetch_add(bytes, Relaxed);
        } else {
            s.errors.fetch_add(1, Relaxed);
        }
        s.latency
            .record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        if took >= SLOW {
            self.slow(op, took, bytes, at);
        }
    }

    fn slow(&self, op: Op, took: Duration, bytes: u64, at: u64) {
        let count = self.slow.fetch_add(1, Relaxed) + 1;
        let now_ms = self.created.elapsed().as_millis() as u64 + 1;
        let last = self.last_slow_log_ms.load(Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= SLOW_LOG_EVERY.as_millis() as u64;
        if due
            && self
                .last_slow_log_ms
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
        {
            log::warn!(
                "slow request: {} of {bytes} bytes at {at} took {:.2} s \
                 ({count} requests over {} s since the statistics were reset)",
                op.name(),
                took.as_secs_f64(),
                SLOW.as_secs()
            );
        }
    }

    /// Starts the counters again from zero (`reset-stats`).
    pub fn reset(&self) {
        let mut since = self.since.lock();
        for s in &self.ops {
            s.requests.store(0, Relaxed);
            s.bytes.store(0, Relaxed);
            s.errors.store(0, Relaxed);
            s.latency.reset();
        }
        self.slow.store(0, Relaxed);
        *since = Instant::now();
    }

    /// The control file's lines for the statistics, as (key, value).
    pub fn lines(&self) -> Vec<(String, String)> {
        let seconds = self.since.lock().elapsed().as_secs_f64();
        let mut lines = vec![("stats-seconds".to_string(), format!("{seconds:.1}"))];
        for op in Op::ALL {
            let s = &self.ops[op as usize];
            let mut counts = format!("requests={}", s.requests.load(Relaxed));
            if op != Op::Flush {
                counts += &format!(" bytes={}", s.bytes.load(Relaxed));
            }
            counts += &format!(" errors={}", s.errors.load(Relaxed));
            lines.push((op.name().to_string(), counts));
            let fractions: Vec<f64> = SHOWN.iter().map(|&(_, f)| f).collect();
            let latency = match s.latency.summary(&fractions) {
                None => "none".to_string(),
                Some((values, max)) => {
                    let mut text: Vec<String> = SHOWN
                        .iter()
                        .zip(values)
                        .map(|((name, _), v)| format!("{name}={v}"))
                        .collect();
                    text.push(format!("max={max}"));
                    text.join(" ")
                }
            };
            lines.push((format!("{}-latency-us", op.name()), latency));
        }
        lines.push(("slow-requests".into(), self.slow.load(Relaxed).to_string()));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lies_in_its_bucket_and_buckets_are_ordered() {
        let mut values: Vec<u64> = (0..5000).collect();
        for shift in 0..63 {
            for delta in [0u64, 1, 3] {
                values.push((1u64 << shift).saturating_add(delta));
                values.push((1u64 << shift).saturating_sub(1 + delta));
            }
        }
        values.push(u64::MAX);
        values.sort_unstable();
        let mut last = 0;
        for v in values {
            let i = bucket(v);
            assert!(i < BUCKETS, "{v}");
            assert!(i >= last, "{v}: bucket {i} after {last}");
            last = i;
            if i < BUCKETS - 1 {
                assert!(v <= upper_edge(i), "{v} above bucket {i}'s edge");
                assert!(i == 0 || v > upper_edge(i - 1), "{v} fits bucket {}", i - 1);
                // 12.5 %: the edge is never more than an eighth above the value.
                assert!(upper_edge(i) - v <= v / 8, "{v}: edge {}", upper_edge(i));
            }
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let h = Histogram::default();
        assert!(h.summary(&[0.5]).is_none());
        // 990 requests of 100 µs, 9 of 5 ms, one of 2 s.
        for _ in 0..990 {
            h.record(100);
        }
        for _ in 0..9 {
            h.record(5_000);
        }
        h.record(2_000_000);
        let (v, max) = h.summary(&[0.5, 0.99, 0.995, 0.999, 1.0]).expect("data");
        assert_eq!(max, 2_000_000);
        assert!((100..=112).contains(&v[0]), "{v:?}");
        assert!((100..=112).contains(&v[1]), "{v:?}");
        assert!((5_000..=5_625).contains(&v[2]), "{v:?}");
        assert!((5_000..=5_625).contains(&v[3]), "{v:?}");
        assert_eq!(v[4], 2_000_000, "the top percentile is capped at the max");
        h.reset();
        assert!(h.summary(&[0.5]).is_none());
    }

    #[test]
    fn counts_bytes_errors_and_resets() {
        let stats = RequestStats::default();
        let t = Instant::now();
        stats.finish(Op::Write, t, 4096, 0, true);
        stats.finish(Op::Write, t, 8192, 4096, true);
        stats.finish(Op::Write, t, 4096, 0, false);
        stats.finish(Op::Flush, t, 0, 0, true);
        let lines = stats.lines();
        let get = |k: &str| {
            lines
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get("write").as_deref(),
            Some("requests=3 bytes=12288 errors=1")
        );
        assert_eq!(get("flush").as_deref(), Some("requests=1 errors=0"));
        assert_eq!(get("read").as_deref(), Some("requests=0 bytes=0 errors=0"));
        assert_eq!(get("read-latency-us").as_deref(), Some("none"));
        assert!(get("write-latency-us").is_some_and(|v| v.starts_with("p50=")));
        assert_eq!(get("slow-requests").as_deref(), Some("0"));

        let slow = Instant::now() - SLOW;
        stats.finish(Op::Read, slow, 512, 7, true);
        stats.finish(Op::Read, slow, 512, 7, true);
        let lines = stats.lines();
        let slow_count = lines.iter().find(|(k, _)| k == "slow-requests");
        assert_eq!(slow_count.map(|(_, v)| v.as_str()), Some("2"));

        stats.reset();
        let lines = stats.lines();
        assert!(lines
            .iter()
            .filter(|(k, _)| k.ends_with("-latency-us"))
            .all(|(_, v)| v == "none"));
        assert!(lines
            .iter()
            .filter(|(k, _)| Op::ALL.iter().any(|op| op.name() == k))
            .all(|(_, v)| v.starts_with("requests=0 ")));
    }
}
