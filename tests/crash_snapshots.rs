//! Crash safety of snapshots at every write boundary.
//!
//! A seeded workload of writes, discards, flushes, snapshot creations and
//! deletions and reopens runs on a [`FaultStore`] that crashes at event `k`,
//! for every `k` the workload reaches. In every crash image variant:
//! - a snapshot whose creation returned success exists, with exactly the disk
//!   content at its creation;
//! - a snapshot whose creation was cut short is either absent or complete
//!   (exactly that content);
//! - a snapshot whose deletion returned success is gone; one cut short is
//!   either gone or intact;
//! - the head holds, per block, a value it had since the last acknowledged
//!   flush (as in `tests/crash.rs`), and `check` passes.
//!
//! `VBDFS_CRASH_SEEDS=N` runs N seeds (default 3).
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::{moves, pattern, Rng};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use vbdfs::io::{FaultStore, MemStore, Store};
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const BS: usize = 4096;
const BLOCKS: usize = 32;
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
    /// The whole disk, incompressible (its records fill their pages).
    Scramble(u64),
    Discard {
        off: usize,
        len: usize,
    },
    Flush,
    Snap(String),
    Delete(String),
    Checkpoint,
    Reopen,
}

fn open(store: Arc<FaultStore>) -> vbdfs::Result<Image> {
    Image::open_on(store, &open_opts()).map(moves::tune)
}

fn workload(seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut made: Vec<String> = Vec::new();
    let mut ops = Vec::new();
    for i in 0..24 {
        let op = match rng.below(12) {
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
            6 => Op::Flush,
            7..=9 => {
                made.push(format!("s{i}"));
                Op::Snap(format!("s{i}"))
            }
            10 if !made.is_empty() => {
                let n = rng.below(made.len() as u64) as usize;
                Op::Delete(made.remove(n))
            }
            _ => Op::Reopen,
        };
        ops.push(op);
    }
    ops
}

/// What a crash may leave of one snapshot.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    /// Must exist with this content.
    Exists(Vec<u8>),
    /// Either absent or this content.
    Maybe(Vec<u8>),
    /// Must be absent.
    Gone,
}

struct Oracle {
    model: Vec<u8>,
    allowed: Vec<HashSet<Vec<u8>>>,
    snaps: BTreeMap<String, Fate>,
}

impl Oracle {
    fn new() -> Self {
        let model = vec![0u8; DISK];
        let allowed = (0..BLOCKS)
            .map(|_| HashSet::from([vec![0u8; BS]]))
            .collect();
        Oracle {
            model,
            allowed,
            snaps: BTreeMap::new(),
        }
    }
    fn apply(&mut self, off: usize, data: &[u8]) {
        self.model[off..off + data.len()].copy_from_slice(data);
        for b in off / BS..=(off + data.len() - 1) / BS {
            let v = self.model[b * BS..(b + 1) * BS].to_vec();
            self.allowed[b].insert(v);
        }
    }
    fn acked(&mut self) {
        for b in 0..BLOCKS {
            self.allowed[b] = HashSet::from([self.model[b * BS..(b + 1) * BS].to_vec()]);
        }
    }
    fn verify(&self, img: &Image, what: &str) {
        let mut got = vec![0u8; DISK];
        img.read_at(&mut got, 0).unwrap();
        for b in 0..BLOCKS {
            assert!(
                self.allowed[b].contains(&got[b * BS..(b + 1) * BS]),
                "{what}: head block {b} holds a value it never had since the last flush"
            );
        }
        let present: HashSet<String> = img.snapshot_list().into_iter().map(|s| s.name).collect();
        for (name, fate) in &self.snaps {
            let content = match (fate, present.contains(name)) {
                (Fate::Gone, true) => panic!("{what}: deleted snapshot {name} is back"),
                (Fate::Exists(_), false) => panic!("{what}: acknowledged snapshot {name} is lost"),
                (Fate::Exists(c) | Fate::Maybe(c), true) => c,
                _ => continue,
            };
            let r = img.open_snapshot(name).unwrap();
            let mut buf = vec![0u8; DISK];
            r.read_at(&mut buf, 0).unwrap();
            assert!(&buf == content, "{what}: snapshot {name} has other content");
        }
        for name in &present {
            assert!(
                self.snaps.contains_key(name),
                "{what}: unknown snapshot {name}"
            );
        }
    }
}

fn create_store() -> Arc<FaultStore> {
    let store = Arc::new(FaultStore::new());
    let c = CreateOptions {
        size: DISK as u64,
        block_size: BS as u64,
        codec: Codec::Zstd(1),
    };
    Image::create_on(store.clone(), &c, &open_opts())
        .unwrap()
        .close()
        .unwrap();
    store.sync().unwrap();
    store
}

/// Runs `ops` until the first error; returns the oracle.
fn run(store: &Arc<FaultStore>, ops: &[Op]) -> Oracle {
    let mut o = Oracle::new();
    let Ok(mut img) = open(store.clone()) else {
        return o;
    };
    for op in ops {
        let ok = match op {
            Op::Write { off, len, fill } => {
                let data: Vec<u8> = (0..*len)
                    .map(|i| fill.wrapping_add((i / 512) as u8))
                    .collect();
                o.apply(*off, &data);
                img.write_at(&data, *off as u64).is_ok()
            }
            Op::Scramble(seed) => {
                let data = pattern(DISK, *seed);
                o.apply(0, &data);
                img.write_at(&data, 0).is_ok()
            }
            Op::Discard { off, len } => {
                o.apply(*off, &vec![0u8; *len]);
                img.discard(*off as u64, *len as u64).is_ok()
            }
            Op::Flush => {
                let ok = img.flush().is_ok();
                if ok {
                    o.acked();
                }
                ok
            }
            Op::Snap(name) => {
                o.snaps.insert(name.clone(), Fate::Maybe(o.model.clone()));
                let ok = img.snapshot_create(name).is_ok();
                if ok {
                    o.snaps.insert(name.clone(), Fate::Exists(o.model.clone()));
                    o.acked();
                }
                ok
            }
            Op::Delete(name) => {
                let before = o.snaps.get(name).cloned();
                if let Some(Fate::Exists(c) | Fate::Maybe(c)) = before {
                    o.snaps.insert(name.clone(), Fate::Maybe(c));
                }
                let ok = img.snapshot_delete(name).is_ok();
                if ok {
                    o.snaps.insert(name.clone(), Fate::Gone);
                }
                ok
            }
            Op::Checkpoint => img.checkpoint().is_ok(),
            Op::Reopen => {
                let ok = moves::counted(img).close().is_ok();
                if ok {
                    o.acked();
                }
                match open(store.clone()) {
                    Ok(next) if ok => {
                        img = next;
                        true
                    }
                    _ => return o,
                }
            }
        };
        if !ok {
            break;
        }
    }
    drop(moves::counted(img));
    o
}

fn check_recovered(bytes: Vec<u8>, oracle: &Oracle, what: &str) {
    let store = Arc::new(MemStore::from_bytes(bytes));
    let img = Image::open_on(store.clone(), &open_opts())
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    oracle.verify(&img, what);
    let report = img.check().unwrap();
    assert!(report.is_ok(), "{what}: check found {report:?}");
    // The recovered image keeps taking snapshots, and they survive a reopen.
    img.write_at(&[0xEE; 100], 7).unwrap();
    img.snapshot_create("after").unwrap();
    img.close().unwrap();
    let img = Image::open_on(store, &open_opts()).unwrap();
    let r = img.open_snapshot("after").unwrap();
    let mut got = vec![0u8; 100];
    r.read_at(&mut got, 7).unwrap();
    assert_eq!(got, vec![0xEE; 100], "{what}: snapshot after recovery lost");
}

#[test]
fn snapshot_create_and_delete_at_every_write_boundary() {
    let checked = sweep(workload, 3);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images");
}

/// Whole-disk overwrites with checkpoints, snapshots taken and deleted: the
/// log moves into the holes the dead records and deleted snapshots leave
/// (regions.rs) while snapshot commits run.
fn moving_workload(seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut ops = Vec::new();
    let mut made: Vec<String> = Vec::new();
    for round in 0..16usize {
        for half in 0..2 {
            ops.push(Op::Scramble(seed * 100 + (2 * round + half) as u64));
        }
        ops.push(Op::Checkpoint);
        let off = rng.below(DISK as u64 - 1) as usize;
        ops.push(Op::Write {
            off,
            len: (1 + rng.below(2 * BS as u64) as usize).min(DISK - off),
            fill: 100 + round as u8,
        });
        if round % 3 == 1 {
            made.push(format!("m{round}"));
            ops.push(Op::Snap(format!("m{round}")));
        }
        if round % 4 == 3 && !made.is_empty() {
            ops.push(Op::Delete(made.remove(0)));
        }
        ops.push(if round == 9 { Op::Reopen } else { Op::Flush });
    }
    ops
}

#[test]
fn snapshots_at_every_write_boundary_while_the_log_moves() {
    moves::set_region_min(64 << 10);
    run(&create_store(), &moving_workload(1));
    assert!(
        moves::count() >= 2,
        "the log moved {} times",
        moves::count()
    );
    let checked = sweep(moving_workload, 1);
    assert!(checked > 100, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images, the log moving");
}

/// Runs each seed's workload crashing at every event it reaches and checks
/// the crash images of each; returns how many were checked.
fn sweep(workload: fn(u64) -> Vec<Op>, default_seeds: u64) -> usize {
    let seeds: u64 = std::env::var("VBDFS_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seeds);
    let mut checked = 0usize;
    for seed in 1..=seeds {
        let ops = workload(seed);
        assert!(ops.iter().any(|o| matches!(o, Op::Snap(_))));
        let full = create_store();
        let base = full.events();
        run(&full, &ops);
        let total = full.events() - base;
        for k in 0..total + 2 {
            let store = create_store();
            store.crash_at(store.events() + k);
            let oracle = run(&store, &ops);
            let Some(image) = store.crashed() else {
                continue;
            };
            for (name, bytes) in image.variants(seed * 1000 + k, 6) {
                check_recovered(
                    bytes,
                    &oracle,
                    &format!("seed {seed} event {k} variant {name}"),
                );
                checked += 1;
            }
        }
    }
    checked
}
