//! Crash safety at every write boundary.
//!
//! A seeded workload (unaligned writes, discards, flushes, checkpoints,
//! compactions, reopens) runs on a [`FaultStore`] that crashes at event `k`, for every `k`
//! the workload reaches. Each crash image variant (nothing pending, all, every
//! prefix, random subsets, torn last writes) must then open without repair,
//! pass `check`, and read, for every block, a value that block held at some
//! point since the last acknowledged flush: never an older one, never a mix.
//! Each recovered image then takes more writes and is reopened (second-level
//! crash safety of the new log epoch).
//!
//! The same sweep runs on an encrypted image.
//!
//! `VBDFS_CRASH_SEEDS=N` runs N seeds (default 3; 2 encrypted) for a longer sweep.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::{moves, pattern, Rng};

use std::collections::HashSet;
use std::sync::Arc;
use vbdfs::crypto::{KdfParams, KeyMaterial};
use vbdfs::io::{FaultStore, MemStore, Store};
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const BS: usize = 4096;
const BLOCKS: usize = 48;
const DISK: usize = BS * BLOCKS;

fn open_opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 64 * 1024,
        workers: 2,
        ..OpenOptions::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: usize,
        len: usize,
        fill: u8,
    },
    Discard {
        off: usize,
        len: usize,
    },
    Flush,
    Checkpoint,
    /// A checkpoint that holds the dead space it finds (as the background
    /// one does), so the log's moves overwrite it.
    BackgroundCheckpoint,
    Compact,
    Reopen,
    Evacuate,
}

fn workload(seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..28)
        .map(|_| match rng.below(10) {
            0..=4 => {
                let off = rng.below(DISK as u64 - 1) as usize;
                let len = (1 + rng.below(3 * BS as u64) as usize).min(DISK - off);
                Op::Write {
                    off,
                    len,
                    fill: 1 + rng.below(250) as u8,
                }
            }
            5 => {
                let off = rng.below(DISK as u64 - 1) as usize;
                let len = (1 + rng.below(4 * BS as u64) as usize).min(DISK - off);
                Op::Discard { off, len }
            }
            6 | 7 => Op::Flush,
            8 => Op::Checkpoint,
            9 if rng.below(2) == 0 => Op::Compact,
            _ => Op::Reopen,
        })
        .collect()
}

/// Per-block sets of acceptable contents after a crash.
struct Oracle {
    model: Vec<u8>,
    allowed: Vec<HashSet<Vec<u8>>>,
}

impl Oracle {
    fn new() -> Self {
        let model = vec![0u8; DISK];
        let allowed = (0..BLOCKS)
            .map(|b| HashSet::from([model[b * BS..(b + 1) * BS].to_vec()]))
            .collect();
        Oracle { model, allowed }
    }
    fn block(&self, b: usize) -> Vec<u8> {
        self.model[b * BS..(b + 1) * BS].to_vec()
    }
    fn apply(&mut self, off: usize, data: &[u8]) {
        self.model[off..off + data.len()].copy_from_slice(data);
        for b in off / BS..=(off + data.len() - 1) / BS {
            let v = self.block(b);
            self.allowed[b].insert(v);
        }
    }
    fn acked(&mut self) {
        for b in 0..BLOCKS {
            self.allowed[b] = HashSet::from([self.block(b)]);
        }
    }
    fn verify(&self, img: &Image, what: &str) {
        let mut got = vec![0u8; DISK];
        img.read_at(&mut got, 0)
            .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
        for b in 0..BLOCKS {
            let blk = &got[b * BS..(b + 1) * BS];
            assert!(
                self.allowed[b].contains(blk),
                "{what}: block {b} holds a value it never had since the last flush (first bytes {:?})",
                &blk[..8]
            );
        }
    }
}

fn create_store() -> Arc<FaultStore> {
    create_store_keyed(None)
}

/// A fresh image on a [`FaultStore`], encrypted with `key` if given.
fn create_store_keyed(key: Option<&KeyMaterial>) -> Arc<FaultStore> {
    let store = Arc::new(FaultStore::new());
    let c = CreateOptions {
        size: DISK as u64,
        block_size: BS as u64,
        codec: Codec::Zstd(1),
    };
    match key {
        Some(k) => Image::create_on_encrypted(store.clone(), &c, &open_opts(), k),
        None => Image::create_on(store.clone(), &c, &open_opts()),
    }
    .unwrap()
    .close()
    .unwrap();
    store.sync().unwrap();
    store
}

fn open(store: Arc<dyn Store>, key: Option<&KeyMaterial>) -> vbdfs::Result<Image> {
    Image::open_on_with_key(store, &open_opts(), key).map(moves::tune)
}

/// Runs `ops` until the first error; returns the oracle.
fn run(store: &Arc<FaultStore>, ops: &[Op], key: Option<&KeyMaterial>) -> Oracle {
    let mut oracle = Oracle::new();
    let Ok(mut img) = open(store.clone(), key) else {
        return oracle;
    };
    for op in ops {
        let ok = match op {
            Op::Write { off, len, fill } => {
                // Incompressible bytes: records fill whole pages, so
                // reclaim and compaction really punch holes next to them.
                let data = pattern(*len, u64::from(*fill) ^ *off as u64);
                oracle.apply(*off, &data);
                img.write_at(&data, *off as u64).is_ok()
            }
            Op::Discard { off, len } => {
                oracle.apply(*off, &vec![0u8; *len]);
                img.discard(*off as u64, *len as u64).is_ok()
            }
            Op::Flush => {
                let ok = img.flush().is_ok();
                if ok {
                    oracle.acked();
                }
                ok
            }
            Op::Checkpoint => img.checkpoint().is_ok(),
            Op::BackgroundCheckpoint => img.background_checkpoint().is_ok(),
            Op::Compact => img.compact().is_ok(),
            Op::Evacuate => img.evacuate().is_ok(),
            Op::Reopen => {
                let ok = moves::counted(img).close().is_ok();
                if ok {
                    oracle.acked();
                }
                match open(store.clone(), key) {
                    Ok(next) if ok => {
                        img = next;
                        true
                    }
                    _ => return oracle,
                }
            }
        };
        if !ok {
            break;
        }
    }
    drop(moves::counted(img));
    oracle
}

fn check_recovered(bytes: Vec<u8>, oracle: &Oracle, what: &str, key: Option<&KeyMaterial>) {
    let store = Arc::new(MemStore::from_bytes(bytes));
    let img = open(store.clone(), key).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    oracle.verify(&img, what);
    let report = img.check().unwrap();
    assert!(report.is_ok(), "{what}: check found {:?}", report.bad);
    // Second level: the recovered image keeps working across another reopen.
    let data = vec![0xEEu8; BS + 10];
    img.write_at(&data, 3 * BS as u64 - 5).unwrap();
    img.close().unwrap();
    let img = open(store, key).unwrap();
    let mut got = vec![0u8; data.len()];
    img.read_at(&mut got, 3 * BS as u64 - 5).unwrap();
    assert_eq!(got, data, "{what}: write after recovery lost");
}

/// Runs each seed's workload crashing at every event it reaches and checks
/// `variants` crash images of each; returns how many were checked.
fn sweep(key: Option<&KeyMaterial>, default_seeds: u64, variants: usize) -> usize {
    sweep_of(workload, key, default_seeds, variants)
}

/// [`sweep`] of the workloads `workload` makes.
fn sweep_of(
    workload: fn(u64) -> Vec<Op>,
    key: Option<&KeyMaterial>,
    default_seeds: u64,
    variants: usize,
) -> usize {
    let seeds: u64 = std::env::var("VBDFS_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seeds);
    let mut checked = 0usize;
    for seed in 1..=seeds {
        let ops = workload(seed);
        let full = create_store_keyed(key);
        let base = full.events();
        run(&full, &ops, key);
        let total = full.events() - base;
        assert!(total > 20, "workload too small: {total} events");
        for k in 0..total + 2 {
            let store = create_store_keyed(key);
            store.crash_at(store.events() + k);
            let oracle = run(&store, &ops, key);
            let Some(image) = store.crashed() else {
                continue;
            };
            for (name, bytes) in image.variants(seed * 1000 + k, variants) {
                let what = format!("seed {seed} event {k} variant {name}");
                check_recovered(bytes, &oracle, &what, key);
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn crash_at_every_write_boundary() {
    let checked = sweep(None, 3, 6);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images");
}

/// Checkpoints and sessions with nothing new between them name the index
/// they have (only the superblock is written); a discard that empties the
/// disk's one leaf drops it from the index.
fn idle_workload(_seed: u64) -> Vec<Op> {
    let write = |fill| Op::Write {
        off: BS / 2,
        len: DISK - BS,
        fill,
    };
    let all = Op::Discard { off: 0, len: DISK };
    use Op::{Checkpoint, Compact, Flush, Reopen};
    vec![
        write(1),
        Flush,
        Checkpoint,
        Checkpoint,
        Reopen,
        Reopen,
        Checkpoint,
        all.clone(),
        Checkpoint,
        Checkpoint,
        Reopen,
        Checkpoint,
        write(2),
        Flush,
        Reopen,
        Reopen,
        Compact,
        Reopen,
        all,
        Reopen,
        Checkpoint,
        write(3),
        Checkpoint,
        Reopen,
    ]
}

#[test]
fn crash_at_every_write_boundary_of_sessions_with_nothing_new() {
    let checked = sweep_of(idle_workload, None, 1, 6);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images, idle sessions");
}

/// Overwrites of the whole disk with checkpoints between them: the dead
/// records' holes grow big enough for the log to move into (regions.rs),
/// out again when full, to the end of the file for a compaction, and a
/// reopen starts a run at the end again.
fn moving_workload(seed: u64) -> Vec<Op> {
    overwriting_workload(seed, Op::Checkpoint)
}

/// [`moving_workload`] with checkpoints that hold the dead records instead
/// of punching them: the log's runs overwrite them, no hole in between.
fn recycling_workload(seed: u64) -> Vec<Op> {
    overwriting_workload(seed, Op::BackgroundCheckpoint)
}

/// Whole-disk overwrites, each followed by `checkpoint` and a few small
/// writes, discards and flushes; a reopen and a compaction on the way.
fn overwriting_workload(seed: u64, checkpoint: Op) -> Vec<Op> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut ops = Vec::new();
    for round in 0..14u8 {
        ops.push(Op::Write {
            off: 0,
            len: DISK,
            fill: round + 1,
        });
        ops.push(checkpoint.clone());
        for _ in 0..3 {
            let off = rng.below(DISK as u64 - 1) as usize;
            let len = (1 + rng.below(3 * BS as u64) as usize).min(DISK - off);
            ops.push(match rng.below(4) {
                0 => Op::Discard { off, len },
                1 => Op::Flush,
                _ => Op::Write {
                    off,
                    len,
                    fill: 1 + rng.below(250) as u8,
                },
            });
        }
        match round {
            6 => ops.push(Op::Reopen),
            10 => ops.push(Op::Compact),
            _ => ops.push(Op::Flush),
        }
    }
    ops
}

#[test]
fn crash_at_every_write_boundary_while_the_log_moves_into_holes() {
    moves::set_region_min(64 << 10);
    let store = create_store();
    run(&store, &moving_workload(1), None);
    assert!(
        moves::count() >= 3,
        "the log moved {} times",
        moves::count()
    );
    let checked = sweep_of(moving_workload, None, 1, 4);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images, the log moving");
}

#[test]
fn crash_at_every_write_boundary_while_the_log_overwrites_dead_records() {
    moves::set_region_min(64 << 10);
    let store = create_store();
    run(&store, &recycling_workload(1), None);
    assert!(
        moves::count() >= 3 && moves::recycled() >= 4 * DISK as u64,
        "the log moved {} times over {} dead bytes",
        moves::count(),
        moves::recycled()
    );
    let checked = sweep_of(recycling_workload, None, 1, 4);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images, the log overwriting dead records");
}

#[test]
fn crash_at_every_write_boundary_while_the_log_moves_encrypted() {
    // The superblock's MAC then covers the run's limit.
    let key = KeyMaterial::from_bytes(b"crash")
        .unwrap()
        .with_kdf(KdfParams::insecure_for_tests());
    moves::set_region_min(64 << 10);
    let store = create_store_keyed(Some(&key));
    run(&store, &moving_workload(2), Some(&key));
    assert!(
        moves::count() >= 2,
        "the log moved {} times",
        moves::count()
    );
    let checked = sweep_of(moving_workload, Some(&key), 1, 2);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} encrypted crash images, the log moving");
}

#[test]
fn crash_at_every_write_boundary_encrypted() {
    let key = KeyMaterial::from_bytes(b"crash")
        .unwrap()
        .with_kdf(KdfParams::insecure_for_tests());
    let checked = sweep(Some(&key), 2, 4);
    assert!(checked > 50, "only {checked} crash images checked");
    eprintln!("checked {checked} encrypted crash images");
}

#[test]
fn failed_sync_is_never_reported_as_success() {
    for k in 0..12 {
        let store = create_store();
        let img = Image::open_on(store.clone(), &open_opts()).unwrap();
        img.write_at(&vec![7u8; 3 * BS], 100).unwrap();
        store.fail_at(store.events() + k, libc::EIO);
        let first = img.flush();
        let second = img.flush();
        if first.is_err() {
            assert!(
                second.is_err(),
                "event {k}: flush succeeded after a failed one"
            );
            assert!(
                img.write_at(&[1], 0).is_err(),
                "event {k}: write accepted after failure"
            );
        }
        drop(img);
        // Whatever happened, the durable state opens and holds the old or new data.
        let bytes = store.crash_now().with(|_| false);
        let img = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &open_opts()).unwrap();
        let mut got = vec![0u8; 3 * BS];
        img.read_at(&mut got, 100).unwrap();
        assert!(got.iter().all(|&b| b == 7) || got.iter().all(|&b| b == 0) || first.is_err());
    }
}

/// Several threads write and flush their own blocks at once, so write-back
/// batches are taken and written in parallel and finish out of order, while
/// checkpoints run; a crash at every event must keep each thread's last
/// acknowledged round (a record is never acknowledged while an earlier one is
/// unwritten, and a checkpoint never starts replay past a batch in flight).
#[test]
fn concurrent_flushes_survive_a_crash_at_every_event() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 3;
    const ROUNDS: u64 = 16;
    fn block_data(thread: u64, round: u64) -> Vec<u8> {
        let mut data = vec![(thread * 16 + round) as u8; BS];
        data[..8].copy_from_slice(&round.to_le_bytes());
        data
    }
    fn workload(store: &Arc<FaultStore>) -> Vec<u64> {
        let img = match Image::open_on(store.clone(), &open_opts()) {
            Ok(img) => Arc::new(img),
            Err(_) => return vec![0; THREADS as usize],
        };
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || {
                    let mut acked = 0;
                    for round in 1..=ROUNDS {
                        for k in 0..PER_THREAD {
                            let block = t * PER_THREAD + k;
                            if img
                                .write_at(&block_data(t, round), block * BS as u64)
                                .is_err()
                            {
                                return acked;
                            }
                        }
                        if img.flush().is_err() {
                            return acked;
                        }
                        acked = round;
                    }
                    acked
                })
            })
            .collect();
        // Checkpoints race the batches: replay must start before any batch
        // still in flight when a checkpoint captures the map.
        let checkpointer = {
            let img = img.clone();
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    if img.checkpoint().is_err() {
                        return;
                    }
                    std::thread::yield_now();
                }
            })
        };
        let acked = handles.into_iter().map(|h| h.join().unwrap()).collect();
        checkpointer.join().unwrap();
        acked
    }
    let full = create_store();
    let base = full.events();
    workload(&full);
    let total = full.events() - base;
    let mut checked = 0;
    // Three sweeps: thread interleavings differ from run to run.
    for k in (0..3).flat_map(|_| 0..total + 2) {
        let store = create_store();
        store.crash_at(store.events() + k);
        store.set_jitter(200); // writes of parallel batches land out of order
        let acked = workload(&store);
        let Some(image) = store.crashed() else {
            continue;
        };
        for (name, bytes) in image.variants(k, 4) {
            let what = format!("event {k} variant {name}");
            let img = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &open_opts())
                .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            for t in 0..THREADS {
                for k in 0..PER_THREAD {
                    let block = t * PER_THREAD + k;
                    let mut got = vec![0u8; BS];
                    img.read_at(&mut got, block * BS as u64).unwrap();
                    let round = u64::from_le_bytes(got[..8].try_into().unwrap());
                    assert!(
                        round >= acked[t as usize] && round <= ROUNDS,
                        "{what}: thread {t} block {block} holds round {round}, acked {}",
                        acked[t as usize]
                    );
                    if round > 0 {
                        assert_eq!(got, block_data(t, round), "{what}: block {block} mixed");
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images of {total} events");
}

/// The disk's first eighth written over and over (the log moving into the
/// holes the dead records leave), the rest a block at a time between
/// them, with an evacuation after each round: the cold blocks' records,
/// alone among dead ones, are stored anew and their ranges of the file
/// join holes (engine `evacuate`).
fn evacuating_workload(seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut ops = Vec::new();
    for round in 0..16u8 {
        for i in 0..4 {
            ops.push(Op::Write {
                off: rng.below(5 * BS as u64) as usize,
                len: BS + rng.below(BS as u64) as usize,
                fill: 2 + rng.below(250) as u8,
            });
            if i % 2 == 1 {
                let cold = 6 + (2 * round as usize + i / 2) % (BLOCKS - 6);
                ops.push(Op::Write {
                    off: cold * BS,
                    len: BS,
                    fill: 2 + rng.below(250) as u8,
                });
            }
            ops.push(Op::Checkpoint);
        }
        ops.push(Op::Evacuate);
        match round {
            8 => ops.push(Op::Reopen),
            12 => ops.push(Op::Compact),
            _ => ops.push(Op::Flush),
        }
    }
    ops
}

#[test]
fn crash_at_every_write_boundary_while_cold_blocks_are_evacuated() {
    moves::set_region_min(64 << 10);
    let store = create_store();
    run(&store, &evacuating_workload(1), None);
    assert!(
        moves::evacuated() >= 2,
        "{} ranges evacuated",
        moves::evacuated()
    );
    let checked = sweep_of(evacuating_workload, None, 1, 4);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images, cold blocks evacuated");
}
