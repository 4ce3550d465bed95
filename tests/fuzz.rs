//! A short fuzzing run in `cargo test` (fuzz/harness.rs has the targets):
//! replays every saved input under `fuzz/regressions/`, then fuzzes "open
//! arbitrary bytes and use them" and "operation sequences with injected
//! crashes" for a few seconds each with a fixed seed.
//!
//! Environment: `VBDFS_FUZZ_SEED`, `VBDFS_FUZZ_ITERS`, `VBDFS_FUZZ_SECS`
//! (longer runs), `VBDFS_FUZZ_OUT` (where failing inputs go, default
//! `$TMPDIR/vbdfs-fuzz`), `VBDFS_FUZZ_REPLAY=FILE` (replay one input).
//! Long campaigns: the ignored test `fuzz_long` (docs/testing.md):
//! `VBDFS_FUZZ_SECS=3600 VBDFS_FUZZ_JOBS=2 cargo test --release --test fuzz \
//!  fuzz_long -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

#[test]
fn replay_saved_inputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        paths.sort();
        for p in paths {
            eprintln!("replaying {}", p.display());
            harness::replay(&p);
            n += 1;
        }
    }
    if let Some(p) = std::env::var_os("VBDFS_FUZZ_REPLAY") {
        harness::replay(Path::new(&p));
        n += 1;
    }
    eprintln!("{n} saved inputs replayed");
}

#[test]
fn fuzz_open_short() {
    let run = harness::Run::from_env(Some(0x5EED_0001), 1_000_000, 8);
    let r = harness::fuzz_open(&run);
    eprintln!("fuzz open: {} executions, seed {}", r.executions, run.seed);
    assert!(r.executions > 50, "too few executions: {r:?}");
}

#[test]
fn fuzz_crash_short() {
    let run = harness::Run::from_env(Some(0x5EED_0002), 1_000_000, 6);
    let r = harness::fuzz_crash(&run);
    eprintln!("fuzz crash: {} executions, seed {}", r.executions, run.seed);
    assert!(r.executions > 5, "too few executions: {r:?}");
}

/// A long campaign: both targets, alternating in 30 s slices, on
/// `VBDFS_FUZZ_JOBS` threads (default 2) for `VBDFS_FUZZ_SECS` (default 600),
/// each job with its own seed. A failing input is saved (see the message) and
/// belongs in `fuzz/regressions/` once fixed.
#[test]
#[ignore = "long run: VBDFS_FUZZ_SECS=N cargo test --release --test fuzz fuzz_long -- --ignored"]
fn fuzz_long() {
    let base = harness::Run::from_env(None, u64::MAX, 600);
    let jobs: u64 = std::env::var("VBDFS_FUZZ_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let start = std::time::Instant::now();
    let handles: Vec<_> = (0..jobs.max(1))
        .map(|j| {
            let base = base.clone();
            std::thread::spawn(move || {
                let end = std::time::Instant::now() + base.time;
                let (mut open, mut crash, mut n) = (0u64, 0u64, 0u64);
                while std::time::Instant::now() < end {
                    let mut r = base.clone();
                    r.seed = base.seed.wrapping_add(j << 32).wrapping_add(n);
                    r.time = std::time::Duration::from_secs(30)
                        .min(end.saturating_duration_since(std::time::Instant::now()));
                    n += 1;
                    open += harness::fuzz_open(&r).executions;
                    crash += harness::fuzz_crash(&r).executions;
                }
                (open, crash)
            })
        })
        .collect();
    let (mut open, mut crash) = (0, 0);
    for h in handles {
        let (o, c) = h.join().unwrap();
        open += o;
        crash += c;
    }
    eprintln!(
        "fuzz_long: seed {}, {jobs} jobs, {:?}: {open} open and {crash} crash executions, \
         no failure",
        base.seed,
        start.elapsed()
    );
}
