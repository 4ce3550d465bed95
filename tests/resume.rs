//! Resuming after a full host disk (`Image::resume`): the host fails every
//! write from event `k` on (for every `k` a workload reaches), then has room
//! again. The image, failed with ENOSPC, resumes without a reopen: every
//! write it took reads back, a flush then succeeds, and the image as the
//! host holds it after that flush — also cut at any later point, or with its
//! unsynced writes lost — opens without repair, passes `check` and holds
//! every acknowledged write. No flush succeeds while the image is failed.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use vbdfs::io::{FaultStore, MemStore};
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

const BS: usize = 4096;
const BLOCKS: usize = 64;

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 256 * 1024,
        workers: 2,
        ..OpenOptions::default()
    }
}

/// Incompressible bytes for block `b` of round `r`.
fn block(b: usize, r: u8) -> Vec<u8> {
    common::pattern(BS, (b as u64) << 8 | u64::from(r))
}

fn create(codec: Codec) -> (Arc<FaultStore>, Image) {
    let store = Arc::new(FaultStore::new());
    let c = CreateOptions {
        size: (BLOCKS * BS) as u64,
        block_size: BS as u64,
        codec,
    };
    let img = Image::create_on(store.clone(), &c, &opts()).unwrap();
    (store, img)
}

/// Round `r` writes every `step`-th block from `first`; returns the model.
fn round(img: &Image, model: &mut [Vec<u8>], r: u8, first: usize, step: usize) -> bool {
    for b in (first..BLOCKS).step_by(step) {
        let data = block(b, r);
        if img.write_at(&data, (b * BS) as u64).is_err() {
            return false;
        }
        model[b] = data;
    }
    true
}

fn read_all(img: &Image) -> Vec<Vec<u8>> {
    (0..BLOCKS)
        .map(|b| {
            let mut got = vec![0u8; BS];
            img.read_at(&mut got, (b * BS) as u64).unwrap();
            got
        })
        .collect()
}

#[test]
fn a_full_disk_resumes_without_a_reopen_at_every_event() {
    let (mut checked, mut refused) = (0, 0);
    for codec in [Codec::None, Codec::Zstd(1)] {
        // How many events the rounds below take when nothing fails.
        let (full, img) = create(codec);
        let base = full.events();
        let mut model = vec![vec![0u8; BS]; BLOCKS];
        round(&img, &mut model, 1, 0, 1);
        img.flush().unwrap();
        round(&img, &mut model, 2, 0, 3);
        img.checkpoint().unwrap();
        round(&img, &mut model, 3, 1, 2);
        img.flush().unwrap();
        let total = full.events() - base;
        drop(img);
        for k in 0..total + 1 {
            let (store, img) = create(codec);
            let mut model = vec![vec![0u8; BS]; BLOCKS];
            store.fail_from(store.events() + k, libc::ENOSPC);
            // The workload until the disk is full: writes may be refused
            // (the image failed), flushes and checkpoints may fail.
            let mut failed = false;
            for step in 0..5 {
                let ok = match step {
                    0 => round(&img, &mut model, 1, 0, 1),
                    1 | 4 => img.flush().is_ok(),
                    2 => round(&img, &mut model, 2, 0, 3),
                    _ => img.checkpoint().is_ok() && round(&img, &mut model, 3, 1, 2),
                };
                if !ok {
                    failed = true;
                    break;
                }
            }
            let what = format!("{codec:?}, full from event {k}");
            if failed {
                let e = img.flush().unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Failed, "{what}: {e}");
                // Still full: resuming fails, and leaves it failed.
                assert!(img.resume().is_err(), "{what}: resumed on a full disk");
                assert!(img.flush().is_err(), "{what}: flushed on a full disk");
                if !img.failed_for_space() {
                    // A sync failed: what was written since the last good
                    // one may be lost, so only a reopen is safe.
                    store.fail_from(u64::MAX, libc::ENOSPC);
                    let e = img.resume().unwrap_err();
                    assert!(e.to_string().contains("reopen"), "{what}: {e}");
                    assert!(img.flush().is_err(), "{what}: flushed after a failed sync");
                    refused += 1;
                    continue;
                }
            }
            // Room again.
            store.fail_from(u64::MAX, libc::ENOSPC);
            img.resume()
                .unwrap_or_else(|e| panic!("{what}: resume: {e}"));
            assert!(!img.failed_for_space());
            assert!(read_all(&img) == model, "{what}: reads after resume");
            round(&img, &mut model, 4, 2, 5);
            img.flush()
                .unwrap_or_else(|e| panic!("{what}: flush after resume: {e}"));
            // Every acknowledged write is what the host holds durably.
            let durable = store.crash_now().with(|_| false);
            let after = Image::open_on(Arc::new(MemStore::from_bytes(durable)), &opts())
                .unwrap_or_else(|e| panic!("{what}: open after resume: {e}"));
            let got = read_all(&after);
            let bad: Vec<usize> = (0..BLOCKS).filter(|&b| got[b] != model[b]).collect();
            assert!(
                bad.is_empty(),
                "{what}: durable after resume: blocks {bad:?} differ"
            );
            assert!(after.check().unwrap().is_ok(), "{what}: check");
            drop(after);
            // And it goes on: a checkpoint, more writes, a clean close.
            img.checkpoint().unwrap();
            round(&img, &mut model, 5, 3, 7);
            img.close().unwrap();
            let img =
                Image::open_on(Arc::new(MemStore::from_bytes(store.current())), &opts()).unwrap();
            assert!(read_all(&img) == model, "{what}: after close and open");
            assert!(img.check().unwrap().is_ok(), "{what}: check after close");
            checked += 1;
        }
    }
    eprintln!("{checked} resumed, {refused} refused after a failed sync");
    assert!(
        checked > 40,
        "only {checked} cases resumed ({refused} refused)"
    );
}

/// Per block, every value a crash may leave: those written since the last
/// flush that succeeded.
struct Allowed(Vec<HashSet<Vec<u8>>>);

impl Allowed {
    fn new(model: &[Vec<u8>]) -> Self {
        Allowed(model.iter().map(|b| HashSet::from([b.clone()])).collect())
    }
    fn wrote(&mut self, model: &[Vec<u8>]) {
        for (set, b) in self.0.iter_mut().zip(model) {
            set.insert(b.clone());
        }
    }
    fn flushed(&mut self, model: &[Vec<u8>]) {
        *self = Allowed::new(model);
    }
}

/// An image resumed after a full disk: its store, the image, the model and
/// what a crash may leave.
struct Resumed {
    store: Arc<FaultStore>,
    img: Image,
    model: Vec<Vec<u8>>,
    allowed: Allowed,
}

/// Runs the workload with the host full from event `k` on (as the test
/// above), frees the space and resumes. None if a sync failed (no resume).
fn full_then_resumed(codec: Codec, k: u64) -> Option<Resumed> {
    let (store, img) = create(codec);
    let mut model = vec![vec![0u8; BS]; BLOCKS];
    let mut allowed = Allowed::new(&model);
    store.fail_from(store.events() + k, libc::ENOSPC);
    for step in 0..5 {
        let ok = match step {
            0 => round(&img, &mut model, 1, 0, 1),
            2 => round(&img, &mut model, 2, 0, 3),
            3 => img.checkpoint().is_ok() && round(&img, &mut model, 3, 1, 2),
            _ => img.flush().is_ok(),
        };
        allowed.wrote(&model);
        if !ok {
            break;
        }
        if step == 1 || step == 4 {
            allowed.flushed(&model);
        }
    }
    store.fail_from(u64::MAX, libc::ENOSPC);
    img.resume().ok()?;
    Some(Resumed {
        store,
        img,
        model,
        allowed,
    })
}

/// A crash at every event after the resume (its write-back into the new
/// run, the next writes, the flush): every crash image opens without repair,
/// passes `check`, and holds in each block a value written since the last
/// flush that succeeded — never older, never a mix.
#[test]
fn a_crash_at_every_event_after_a_resume_keeps_what_was_acknowledged() {
    let mut checked = 0;
    for codec in [Codec::None, Codec::Zstd(1)] {
        for k in (0..40).step_by(3) {
            // Events after the resume, counted on a run without a crash.
            let Some(Resumed {
                store,
                img,
                mut model,
                ..
            }) = full_then_resumed(codec, k)
            else {
                continue;
            };
            let base = store.events();
            round(&img, &mut model, 4, 2, 5);
            img.flush().unwrap();
            let post = store.events() - base;
            drop(img);
            for j in 0..post + 1 {
                // Thread timing may make a sync fail in this run: no resume.
                let Some(Resumed {
                    store,
                    img,
                    mut model,
                    mut allowed,
                }) = full_then_resumed(codec, k)
                else {
                    continue;
                };
                store.crash_at(store.events() + j);
                round(&img, &mut model, 4, 2, 5);
                allowed.wrote(&model);
                let _ = img.flush();
                drop(img);
                let Some(image) = store.crashed() else {
                    continue;
                };
                for (name, bytes) in image.variants(k * 1000 + j, 4) {
                    let what = format!("{codec:?}, full from {k}, crash {j} after resume, {name}");
                    let img = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &opts())
                        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
                    let got = read_all(&img);
                    for (b, (set, have)) in allowed.0.iter().zip(&got).enumerate() {
                        assert!(set.contains(have), "{what}: block {b}");
                    }
                    let report = img.check().unwrap();
                    assert!(report.is_ok(), "{what}: check found {:?}", report.bad);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 200, "only {checked} crash images checked");
    eprintln!("checked {checked} crash images after a resume");
}
