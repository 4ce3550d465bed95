//! Concurrency stress: 8 threads on one `Arc<Image>`.
//!
//! Each thread owns a private region whose ends are NOT block-aligned, so
//! neighbours share a block at every boundary (read-modify-write of one block
//! by two threads must keep both halves). In it the thread does unaligned
//! writes, reads checked against its own model, partial discards and flushes.
//! All threads also hammer a shared region with whole-block writes tagged
//! (block, thread, seq) in every 8-byte word, whole-block discards and reads
//! that must see, per block, either zeros or one complete tag for that block,
//! never a mix. Threads also take snapshots while the others write: a
//! snapshot must hold the taking thread's region exactly as its model was and
//! only whole tags in the shared region (checked before it is deleted, after
//! the joins and after reopen). After the joins every shared block must hold
//! the last operation of one of the threads on it (per-block linearizability), the
//! private regions must equal the models, nothing may be left dirty after a
//! flush, and the same must hold after close + open. One run uses a
//! FaultStore (writes volatile until sync): as every thread's last operation
//! is a flush, every power-loss image taken after the joins must read exactly
//! as the image does, snapshots included. Thread 1 runs `check()` throughout
//! (nothing may ever look damaged) and thread 2 `compact()`.
//!
//! `VBDFS_STRESS_OPS` sets operations per thread (default 1500).
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use vbdfs::io::{FaultStore, MemStore};
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const THREADS: u64 = 8;
/// A run that takes longer than this is a hang (deadlock, lost wake-up,
/// leaked dirty count stalling the throttle).
const WATCHDOG: Duration = Duration::from_secs(180);

fn ops_per_thread() -> u64 {
    std::env::var("VBDFS_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Clone, Copy)]
struct Layout {
    bs: u64,
    /// Private region length per thread (not a block multiple).
    private: u64,
    /// First byte of the shared region (block-aligned).
    shared_off: u64,
    shared_blocks: u64,
    size: u64,
}

impl Layout {
    fn new(bs: u64, shared_blocks: u64) -> Layout {
        let private = 16 * bs + bs / 3 + 7;
        let shared_off = (THREADS * private).div_ceil(bs) * bs;
        Layout {
            bs,
            private,
            shared_off,
            shared_blocks,
            size: shared_off + shared_blocks * bs,
        }
    }
}

fn tag(block: u64, thread: u64, seq: u64) -> u64 {
    (block << 40) | (thread << 32) | (seq & 0xFFFF_FFFF) | 1 << 63
}

fn tagged_block(bs: u64, t: u64) -> Vec<u8> {
    t.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(bs as usize)
        .collect()
}

/// The tag a shared block holds (0 for zeros); panics on a mix.
fn read_tag(data: &[u8], block: u64, what: &str) -> u64 {
    let first = u64::from_le_bytes(data[..8].try_into().unwrap());
    for (i, w) in data.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(w.try_into().unwrap());
        assert_eq!(
            w, first,
            "{what}: shared block {block} is torn at word {i}: {w:#x} vs {first:#x}"
        );
    }
    assert!(
        first == 0 || first >> 40 & 0x7F_FFFF == block,
        "{what}: shared block {block} holds the tag of another block: {first:#x}"
    );
    first
}

/// The last operation of a thread on each shared block: a tag, or 0 (discard).
type LastOps = HashMap<u64, u64>;

/// Snapshots a thread took: name and its private region at that moment.
type Snaps = Vec<(String, Vec<u8>)>;

/// A snapshot holds every write completed before it was taken: the taking
/// thread's private region exactly as its model was, and in the shared region
/// whole tags only.
fn verify_snapshot(img: &Image, lay: Layout, t: u64, name: &str, model: &[u8], when: &str) {
    let snap = img
        .open_snapshot(name)
        .unwrap_or_else(|e| panic!("{when}: snapshot {name}: {e}"));
    let mut buf = vec![0u8; model.len()];
    snap.read_at(&mut buf, t * lay.private).unwrap();
    if buf != model {
        let i = buf.iter().zip(model).position(|(a, b)| a != b).unwrap();
        panic!("{when}: snapshot {name}: thread {t}'s region differs at +{i}");
    }
    let bs = lay.bs as usize;
    let mut shared = vec![0u8; bs * lay.shared_blocks as usize];
    snap.read_at(&mut shared, lay.shared_off).unwrap();
    for (b, chunk) in shared.chunks(bs).enumerate() {
        read_tag(chunk, b as u64, &format!("{when}: snapshot {name}"));
    }
}

fn worker(img: &Image, lay: Layout, t: u64, ops: u64) -> (Vec<u8>, LastOps, Snaps) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t + 1) * 0x1234_5678_9ABC_DEF1));
    let base = t * lay.private;
    let mut model = vec![0u8; lay.private as usize];
    let mut last = LastOps::new();
    let mut snaps = Snaps::new();
    let bs = lay.bs;
    for seq in 0..ops {
        match rng.below(100) {
            // Private: unaligned write.
            0..=29 => {
                let len = 1 + rng.below((lay.private / 3).min(200_000));
                let off = rng.below(lay.private - len + 1);
                let byte = (rng.next() as u8) | 1;
                let data: Vec<u8> = (0..len)
                    .map(|i| byte.wrapping_add((i % 251) as u8))
                    .collect();
                img.write_at(&data, base + off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            // Private: read and compare.
            30..=44 => {
                let len = 1 + rng.below(lay.private.min(300_000));
                let off = rng.below(lay.private - len + 1);
                let mut buf = vec![0xEEu8; len as usize];
                img.read_at(&mut buf, base + off).unwrap();
                let want = &model[off as usize..(off + len) as usize];
                if buf != want {
                    let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "thread {t}: private read {off}+{len} differs at +{i} (disk byte {})",
                        base + off + i as u64
                    );
                }
            }
            // Private: partial discard or write_zeroes.
            45..=51 => {
                let len = 1 + rng.below(lay.private / 2);
                let off = rng.below(lay.private - len + 1);
                if rng.below(2) == 0 {
                    img.discard(base + off, len).unwrap();
                } else {
                    img.write_zeroes(base + off, len).unwrap();
                }
                model[off as usize..(off + len) as usize].fill(0);
            }
            // Shared: tagged whole-block writes (1..4 blocks).
            52..=74 => {
                let n = 1 + rng.below(4.min(lay.shared_blocks));
                let first = rng.below(lay.shared_blocks - n + 1);
                let mut buf = Vec::with_capacity((n * bs) as usize);
                for b in first..first + n {
                    let tg = tag(b, t, seq);
                    buf.extend_from_slice(&tagged_block(bs, tg));
                    last.insert(b, tg);
                }
                img.write_at(&buf, lay.shared_off + first * bs).unwrap();
            }
            // Shared: whole-block discards.
            75..=81 => {
                let n = 1 + rng.below(3.min(lay.shared_blocks));
                let first = rng.below(lay.shared_blocks - n + 1);
                img.discard(lay.shared_off + first * bs, n * bs).unwrap();
                for b in first..first + n {
                    last.insert(b, 0);
                }
            }
            // Shared: reads must see whole tags.
            82..=94 => {
                let n = 1 + rng.below(6.min(lay.shared_blocks));
                let first = rng.below(lay.shared_blocks - n + 1);
                let mut buf = vec![0u8; (n * bs) as usize];
                img.read_at(&mut buf, lay.shared_off + first * bs).unwrap();
                for (i, chunk) in buf.chunks(bs as usize).enumerate() {
                    read_tag(chunk, first + i as u64, "concurrent read");
                }
            }
            95..=97 => img.flush().unwrap(),
            // Snapshots, taken while the other threads write; a thread keeps
            // at most 3, checking and deleting the oldest.
            98 => {
                let name = format!("t{t}-{seq}");
                img.snapshot_create(&name).unwrap();
                snaps.push((name, model.clone()));
                if snaps.len() > 3 {
                    let (name, m) = snaps.remove(0);
                    verify_snapshot(img, lay, t, &name, &m, "while running");
                    img.snapshot_delete(&name).unwrap();
                }
            }
            _ => match t {
                0 => img.checkpoint().unwrap(),
                // Space reclaim while everything moves.
                2 => {
                    img.compact().unwrap();
                }
                // check() while everything moves: nothing is ever damaged.
                1 => {
                    let report = img.check().unwrap();
                    assert!(
                        report.is_ok(),
                        "check() while running: {:?} {:?}",
                        report.bad,
                        report.errors
                    );
                    let _ = img.stats();
                }
                _ => img.flush().unwrap(),
            },
        }
    }
    // Every write of this thread is durable once this returns.
    img.flush().unwrap();
    (model, last, snaps)
}

fn verify(img: &Image, lay: Layout, models: &[Vec<u8>], lasts: &[LastOps], when: &str) {
    for (t, model) in models.iter().enumerate() {
        let mut buf = vec![0u8; model.len()];
        img.read_at(&mut buf, t as u64 * lay.private).unwrap();
        if &buf != model {
            let i = buf.iter().zip(model).position(|(a, b)| a != b).unwrap();
            panic!("{when}: private region of thread {t} differs at +{i}");
        }
    }
    let bs = lay.bs as usize;
    let mut buf = vec![0u8; bs * lay.shared_blocks as usize];
    img.read_at(&mut buf, lay.shared_off).unwrap();
    for (b, chunk) in buf.chunks(bs).enumerate() {
        let b = b as u64;
        let got = read_tag(chunk, b, when);
        let candidates: Vec<u64> = lasts.iter().filter_map(|l| l.get(&b).copied()).collect();
        let ok = if candidates.is_empty() {
            got == 0
        } else {
            candidates.contains(&got)
        };
        assert!(
            ok,
            "{when}: shared block {b} holds {got:#x}, not the last operation of any \
             thread on it ({candidates:x?})"
        );
    }
    let report = img.check().unwrap();
    assert!(report.is_ok(), "{when}: check found {:?}", report.bad);
}

#[allow(clippy::needless_update)] // future fields keep their defaults
fn opts(cache: u64) -> OpenOptions {
    OpenOptions {
        read_only: false,
        cache_bytes: cache,
        workers: 2,
        ..OpenOptions::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Mem,
    File,
    /// Writes stay volatile until a sync: after the joins (every thread's
    /// last operation is a flush) every power-loss image must hold it all.
    Fault,
}

enum Where {
    Mem(Arc<MemStore>),
    Fault(Arc<FaultStore>),
    /// The directory is kept alive (deleted on drop) with the path in it.
    File(PathBuf, #[allow(dead_code)] tempfile::TempDir),
}

fn run(bs: u64, codec: Codec, cache: u64, backend: Backend) {
    // Compressed images write back with adaptive compression: levels switch
    // under the workers' feet while every guarantee below must still hold.
    let opts = |cache| OpenOptions {
        adapt_floor: matches!(codec, Codec::Zstd(_)).then_some(-5),
        ..opts(cache)
    };
    let lay = Layout::new(bs, 48);
    let create = CreateOptions {
        size: lay.size,
        block_size: bs,
        codec,
    };
    let (place, img) = match backend {
        Backend::File => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.vbd");
            let img = Image::create(&path, &create, &opts(cache)).unwrap();
            (Where::File(path, dir), img)
        }
        Backend::Mem => {
            let store = Arc::new(MemStore::new());
            let img = Image::create_on(store.clone(), &create, &opts(cache)).unwrap();
            (Where::Mem(store), img)
        }
        Backend::Fault => {
            let store = Arc::new(FaultStore::new());
            let img = Image::create_on(store.clone(), &create, &opts(cache)).unwrap();
            (Where::Fault(store), img)
        }
    };
    let img = Arc::new(img);
    let ops = ops_per_thread();
    let (tx, rx) = mpsc::channel();
    for t in 0..THREADS {
        let img = img.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                worker(&img, lay, t, ops)
            }));
            // Release this thread's handle before reporting, so the main
            // thread can take the image back with Arc::into_inner.
            drop(img);
            let _ = tx.send((t, r));
        });
    }
    drop(tx);
    let mut results: Vec<Option<(Vec<u8>, LastOps, Snaps)>> = vec![None; THREADS as usize];
    for _ in 0..THREADS {
        let (t, r) = rx.recv_timeout(WATCHDOG).unwrap_or_else(|_| {
            panic!(
                "stress bs={bs} {codec}: threads still running after {WATCHDOG:?} \
                 (hang); stats: {:?}",
                img.stats()
            )
        });
        match r {
            Ok(v) => results[t as usize] = Some(v),
            Err(e) => std::panic::resume_unwind(e),
        }
    }
    let mut models = Vec::new();
    let mut lasts = Vec::new();
    let mut snaps = Vec::new();
    for r in results {
        let (m, l, s) = r.unwrap();
        models.push(m);
        lasts.push(l);
        snaps.push(s);
    }
    let check_snaps = |img: &Image, when: &str| {
        let mut names: Vec<String> = img.snapshot_list().into_iter().map(|s| s.name).collect();
        let mut want: Vec<String> = snaps.iter().flatten().map(|(n, _)| n.clone()).collect();
        names.sort();
        want.sort();
        assert_eq!(names, want, "{when}: snapshot list");
        for (t, list) in snaps.iter().enumerate() {
            for (name, m) in list {
                verify_snapshot(img, lay, t as u64, name, m, when);
            }
        }
    };
    let what = format!("bs={bs} {codec} cache={cache} {backend:?}");
    verify(
        &img,
        lay,
        &models,
        &lasts,
        &format!("{what}, after the joins"),
    );
    check_snaps(&img, &format!("{what}, after the joins"));
    if let Where::Fault(store) = &place {
        // Every thread flushed last: whatever a power loss leaves now must
        // read exactly as the image does.
        let mut shared = vec![0u8; (lay.shared_blocks * bs) as usize];
        img.read_at(&mut shared, lay.shared_off).unwrap();
        for (name, bytes) in store.crash_now().variants(7, 3) {
            let when = format!("{what}, power loss after the joins ({name})");
            let copy = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &opts(cache))
                .unwrap_or_else(|e| panic!("{when}: open: {e}"));
            verify(&copy, lay, &models, &lasts, &when);
            let mut got = vec![0u8; shared.len()];
            copy.read_at(&mut got, lay.shared_off).unwrap();
            assert!(
                got == shared,
                "{when}: the shared region lost flushed writes"
            );
            check_snaps(&copy, &when);
            copy.close().unwrap();
        }
    }
    img.flush().unwrap();
    let stats = img.stats();
    assert_eq!(
        stats.dirty_bytes, 0,
        "{what}: dirty bytes left after a flush with no writer running: {stats:?}"
    );
    let img = Arc::into_inner(img).unwrap();
    img.close().unwrap();
    let img = match &place {
        Where::Mem(store) => Image::open_on(store.clone(), &opts(cache)).unwrap(),
        Where::Fault(store) => Image::open_on(store.clone(), &opts(cache)).unwrap(),
        Where::File(path, _) => Image::open(path, &opts(cache)).unwrap(),
    };
    verify(&img, lay, &models, &lasts, &format!("{what}, after reopen"));
    check_snaps(&img, &format!("{what}, after reopen"));
    img.close().unwrap();
}

#[test]
fn stress_4k_zstd_mem_tiny_cache() {
    run(4096, Codec::Zstd(1), 256 << 10, Backend::Mem);
}

#[test]
fn stress_64k_none_file() {
    run(65536, Codec::None, 4 << 20, Backend::File);
}

#[test]
fn stress_64k_zstd_mem() {
    run(65536, Codec::Zstd(1), 1 << 20, Backend::Mem);
}

#[test]
fn stress_4k_zstd_faultstore_flush_is_durable() {
    run(4096, Codec::Zstd(1), 1 << 20, Backend::Fault);
}

/// Readers and `check()` race a writer that rewrites the same few blocks and
/// checkpoints after each write (every checkpoint may reclaim the space of
/// the records it made dead): a read must never fail or see a torn block,
/// and `check()` must never report damage, on a healthy image.
#[test]
fn reads_and_check_race_rewrites_and_checkpoints() {
    let store = Arc::new(MemStore::new());
    let img = Image::create_on(store, &race_create(), &opts(256 << 10)).unwrap();
    race_rewrites(img, 1);
}

/// The same on a real file with reads of 8 blocks: their records, scattered
/// by the rewrites, are read together (io_uring) while reclaim punches the
/// ones that die.
#[test]
fn large_reads_of_a_file_race_rewrites_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::create(
        &dir.path().join("race.vbd"),
        &race_create(),
        &opts(256 << 10),
    )
    .unwrap();
    race_rewrites(img, 8);
}

const RACE_BS: u64 = 4096;
const RACE_BLOCKS: u64 = 1024;

fn race_create() -> CreateOptions {
    CreateOptions {
        // Many more blocks than the cache holds, so most reads go to the file.
        size: RACE_BLOCKS * RACE_BS,
        block_size: RACE_BS,
        // Uncompressed: records span whole host pages, which reclaim punches.
        codec: Codec::None,
    }
}

/// Runs the race on `img` with reads of `read_blocks` blocks.
fn race_rewrites(img: Image, read_blocks: u64) {
    let (bs, blocks) = (RACE_BS, RACE_BLOCKS);
    let img = Arc::new(img);
    for b in 0..blocks {
        img.write_at(&tagged_block(bs, tag(b, 0, 0)), b * bs)
            .unwrap();
    }
    img.flush().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let duration = Duration::from_millis(2000 + ops_per_thread());
    let mut handles = Vec::new();
    {
        let (img, stop) = (img.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut seq = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let b = (seq * 7919) % blocks;
                img.write_at(&tagged_block(bs, tag(b, 1, seq)), b * bs)
                    .unwrap();
                if seq % 16 == 0 {
                    img.checkpoint().unwrap();
                } else {
                    img.flush().unwrap();
                }
                seq += 1;
            }
        }));
    }
    for r in 0..3u64 {
        let (img, stop) = (img.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; (read_blocks * bs) as usize];
            let mut n = r;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let first = (n * 104_729) % (blocks - read_blocks + 1);
                img.read_at(&mut buf, first * bs)
                    .unwrap_or_else(|e| panic!("read of healthy blocks from {first}: {e}"));
                for (i, block) in buf.chunks(bs as usize).enumerate() {
                    assert_ne!(read_tag(block, first + i as u64, "racing read"), 0);
                }
                n += 1;
            }
        }));
    }
    {
        let (img, stop) = (img.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let report = img.check().unwrap();
                assert!(
                    report.is_ok(),
                    "check() on a healthy image: {:?} {:?}",
                    report.bad,
                    report.errors
                );
            }
        }));
    }
    std::thread::sleep(duration);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }
}

/// A store whose reads take a while (as a disk's do): the data is copied at
/// the end of the read, so a concurrent punch of the range is seen.
#[derive(Debug)]
struct SlowReads(MemStore, std::sync::atomic::AtomicU64);

impl vbdfs::io::Store for SlowReads {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let n = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(3) {
            std::thread::sleep(Duration::from_millis(1 + n % 7));
        }
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.0.punch_hole(off, len)
    }
}

/// Reads of blocks being rewritten and discarded, with slow reads and a
/// checkpoint after every few changes (each may reclaim the records it made
/// dead): a read must never fail on a healthy image.
#[test]
fn slow_reads_race_rewrites_and_reclaim() {
    let bs = 4096u64;
    let blocks = 512u64;
    let store = Arc::new(SlowReads(MemStore::new(), Default::default()));
    let create = CreateOptions {
        size: blocks * bs,
        block_size: bs,
        codec: Codec::None,
    };
    let img = Arc::new(Image::create_on(store, &create, &opts(256 << 10)).unwrap());
    for b in 0..blocks {
        img.write_at(&tagged_block(bs, tag(b, 0, 0)), b * bs)
            .unwrap();
    }
    img.flush().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    {
        let (img, stop) = (img.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut seq = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let b = (seq * 7919) % blocks;
                if seq % 3 == 0 {
                    img.discard(b * bs, bs).unwrap();
                } else {
                    img.write_at(&tagged_block(bs, tag(b, 1, seq)), b * bs)
                        .unwrap();
                }
                if seq % 8 == 0 {
                    img.checkpoint().unwrap();
                }
                seq += 1;
            }
        }));
    }
    for r in 0..6u64 {
        let (img, stop) = (img.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; bs as usize];
            let mut n = r * 1000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let b = (n * 104_729) % blocks;
                img.read_at(&mut buf, b * bs)
                    .unwrap_or_else(|e| panic!("read of healthy block {b}: {e}"));
                read_tag(&buf, b, "racing read");
                n += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }
}

/// Multi-block reads (which load runs of back-to-back records in one go)
/// race discards and rewrites of the blocks they cover: every block must read
/// as zeros or one whole tag, never an error.
#[test]
fn multi_block_reads_race_discards() {
    let bs = 4096u64;
    let blocks = 256u64;
    let store = Arc::new(MemStore::new());
    let create = CreateOptions {
        size: blocks * bs,
        block_size: bs,
        codec: Codec::Zstd(1),
    };
    let img = Arc::new(Image::create_on(store, &create, &opts(256 << 10)).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..3u64 {
        let (img, stop) = (img.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(0xD15C_A4D5 + w);
            let mut seq = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = 1 + rng.below(8);
                let first = rng.below(blocks - n + 1);
                if rng.below(2) == 0 {
                    img.discard(first * bs, n * bs).unwrap();
                } else {
                    let mut buf = Vec::new();
                    for b in first..first + n {
                        buf.extend_from_slice(&tagged_block(bs, tag(b, w, seq)));
                    }
                    img.write_at(&buf, first * bs).unwrap();
                }
                if rng.below(16) == 0 {
                    img.checkpoint().unwrap();
                }
                seq += 1;
            }
        }));
    }
    for r in 0..4u64 {
        let (img, stop) = (img.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(0x5EAD + r);
            let mut buf = vec![0u8; (32 * bs) as usize];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = 2 + rng.below(31);
                let first = rng.below(blocks - n + 1);
                let buf = &mut buf[..(n * bs) as usize];
                img.read_at(buf, first * bs)
                    .unwrap_or_else(|e| panic!("read of blocks {first}+{n}: {e}"));
                for (i, chunk) in buf.chunks(bs as usize).enumerate() {
                    read_tag(chunk, first + i as u64, "multi-block read");
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }
}

/// SEEK_DATA and SEEK_HOLE of a block written a moment ago, while write-back
/// moves blocks from the cache to the map (a flusher in a loop): a block
/// whose write has returned is always data. Asking the map before the cache
/// missed a block written back in between.
#[test]
fn seek_finds_a_just_written_block_while_it_is_written_back() {
    let img = Arc::new(
        Image::create_on(
            Arc::new(MemStore::new()),
            &CreateOptions {
                size: 8192 * 4096,
                block_size: 4096,
                codec: Codec::None,
            },
            &opts(64 << 20),
        )
        .unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                img.flush().unwrap();
            }
        })
    };
    let block = vec![7u8; 4096];
    for b in 0..4096u64 {
        let off = b * 4096;
        img.write_at(&block, off).unwrap();
        // Asked again and again while the block is written back.
        for _ in 0..100 {
            assert_eq!(img.next_data(off), Some(off), "SEEK_DATA missed block {b}");
            assert!(img.next_hole(off) > off, "SEEK_HOLE at written block {b}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().unwrap();
}
