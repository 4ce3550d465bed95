//! The log reuses the holes of the image file (engine `regions`): under
//! endless overwrites the file's length stops growing, and every byte
//! written reads back, also after a reopen.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::{pattern, Rng};
use std::sync::Arc;
use vbdfs::io::{MemStore, Store};
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const DISK: u64 = 8 << 20;

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 4 << 20,
        workers: 2,
        ..OpenOptions::default()
    }
}

/// Overwrites random 64 KiB pieces of the disk `rounds` times (a checkpoint
/// every 16), keeping `model` in step; returns the file's length after half
/// the rounds and the longest it was after.
fn overwrite(
    img: &Image,
    store: &dyn Store,
    model: &mut [u8],
    rounds: u64,
    seed: u64,
) -> (u64, u64) {
    let mut rng = Rng(seed | 1);
    let (mut half, mut longest) = (0, 0);
    for i in 0..rounds {
        let off = rng.below(DISK / 65536) * 65536;
        let data = pattern(65536, seed ^ i);
        img.write_at(&data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        if i % 16 == 15 {
            img.checkpoint().unwrap();
        }
        if i == rounds / 2 {
            half = store.len().unwrap();
        }
        longest = longest.max(store.len().unwrap());
    }
    (half, longest)
}

/// The log moved more than `moves` times, and the file stayed under
/// `limit` bytes, growing by at most twice the disk in the second half
/// (where without the moves it grows by half of everything written: 200
/// MiB; how far the reclaim has got varies with the machine's load).
fn assert_settled(img: &Image, (half, longest): (u64, u64), moves: u64, limit: u64) {
    assert!(
        img.log_moves() > moves,
        "the log moved {} times",
        img.log_moves()
    );
    assert!(
        longest <= limit && longest - half <= 2 * DISK,
        "the file grew to {longest} bytes for a {DISK}-byte disk ({half} halfway)"
    );
}

/// The test disk: [`DISK`] bytes of 4 KiB blocks.
fn disk(codec: Codec) -> CreateOptions {
    CreateOptions {
        size: DISK,
        block_size: 4096,
        codec,
    }
}

/// A new image on `store` whose log moves into holes from 1 MiB on.
fn moving_image(store: &Arc<MemStore>, c: &CreateOptions) -> Image {
    let img = Image::create_on(store.clone(), c, &opts()).unwrap();
    img.set_log_region_min(1 << 20);
    img
}

/// Closes `img`, reopens its store and requires every byte of `model`
/// and a clean `check`.
fn close_reopen_check(img: Image, store: &Arc<MemStore>, model: &[u8]) {
    img.close().unwrap();
    let img = Image::open_on(store.clone(), &opts()).unwrap();
    verify(&img, model, "reopened");
    let report = img.check().unwrap();
    assert!(report.is_ok(), "check: {:?}", report.bad);
}

fn verify(img: &Image, model: &[u8], what: &str) {
    let mut got = vec![0u8; model.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "{what}: the disk differs from what was written"
    );
}

#[test]
fn endless_overwrites_keep_the_file_length_bounded() {
    let store = Arc::new(MemStore::new());
    let c = disk(Codec::None);
    let img = moving_image(&store, &c);
    let mut model = vec![0u8; DISK as usize];
    // 6,400 × 64 KiB = 400 MiB written over an 8 MiB disk: without reuse
    // the file would be 400 MiB long.
    let grown = overwrite(&img, store.as_ref(), &mut model, 6400, 7);
    verify(&img, &model, "open");
    assert_settled(&img, grown, 10, 6 * DISK);
    close_reopen_check(img, &store, &model);
}

/// Whole-disk sequential overwrites with background checkpoints (which
/// hold the dead records instead of punching them): the dead runs are long,
/// kept for the log, and its runs overwrite them, no punch and no hole in
/// between; every byte reads back, also after a reopen, and the close gives
/// back what is still held.
#[test]
fn sequential_overwrites_are_written_over_dead_records_not_into_holes() {
    let store = Arc::new(MemStore::new());
    let c = disk(Codec::None);
    let img = moving_image(&store, &c);
    let mut model = vec![0u8; DISK as usize];
    let (mut half, mut longest) = (0, 0);
    let passes = 16u64;
    for pass in 0..passes {
        for piece in 0..DISK >> 20 {
            let data = pattern(1 << 20, pass << 8 | piece);
            let off = piece << 20;
            img.write_at(&data, off).unwrap();
            model[off as usize..][..data.len()].copy_from_slice(&data);
        }
        img.background_checkpoint().unwrap();
        // Time for the reclaim thread to punch what is due.
        std::thread::sleep(std::time::Duration::from_millis(300));
        if pass == passes / 2 {
            half = store.len().unwrap();
        }
        longest = longest.max(store.len().unwrap());
    }
    verify(&img, &model, "open");
    // Written: 16 disks. Without dead space kept for the log, the runs
    // went into the holes its punches left (nothing was overwritten):
    // with dead runs punched as they came, 0.
    assert!(
        img.log_recycled() >= passes / 2 * DISK,
        "the log overwrote {} dead bytes of {} written",
        img.log_recycled(),
        passes * DISK
    );
    assert_settled(&img, (half, longest), 10, 6 * DISK);
    img.close().unwrap();
    assert!(
        store.allocated().unwrap() < 2 * DISK,
        "{} bytes held after the close",
        store.allocated().unwrap()
    );
    let img = Image::open_on(store.clone(), &opts()).unwrap();
    close_reopen_check(img, &store, &model);
}

/// The same on a real file: the host file system reports the holes
/// (`SEEK_HOLE`), also the log's preallocated range, which must not be
/// taken for one.
#[test]
fn a_real_file_stops_growing_and_reads_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reuse.vbd");
    let c = disk(Codec::None);
    let img = Image::create(&path, &c, &opts()).unwrap();
    img.set_log_region_min(1 << 20);
    let file = std::fs::File::open(&path).unwrap();
    let store = vbdfs::io::FileStore::new(file);
    let mut model = vec![0u8; DISK as usize];
    let grown = overwrite(&img, &store, &mut model, 6400, 11);
    verify(&img, &model, "open");
    assert_settled(&img, grown, 10, 6 * DISK);
    img.close().unwrap();
    assert!(common::written_bytes(&path) < 3 * DISK);
    let img = Image::open(&path, &opts()).unwrap();
    verify(&img, &model, "reopened");
    let report = img.check().unwrap();
    assert!(report.is_ok(), "check: {:?}", report.bad);
    // The reopened session (its run at the end of the file) moves too.
    img.set_log_region_min(1 << 20);
    let grown = overwrite(&img, &store, &mut model, 6400, 12);
    assert_settled(&img, grown, 10, 10 * DISK);
    img.close().unwrap();
    let img = Image::open(&path, &opts()).unwrap();
    verify(&img, &model, "reopened again");
}

/// Snapshots taken, deleted, compacted and rolled back to while the log
/// keeps moving: every snapshot reads what the disk held when it was taken,
/// the head what was written since, also after a reopen; `check` is clean.
#[test]
fn snapshots_rollback_and_compaction_while_the_log_moves() {
    let store = Arc::new(MemStore::new());
    let c = disk(Codec::Zstd(1));
    let mut img = moving_image(&store, &c);
    let mut model = vec![0u8; DISK as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    for phase in 0..10u64 {
        overwrite(&img, store.as_ref(), &mut model, 400, 100 + phase);
        let name = format!("s{phase}");
        img.snapshot_create(&name).unwrap();
        snaps.push((name, model.clone()));
        if phase % 3 == 2 {
            let (oldest, _) = snaps.remove(0);
            img.snapshot_delete(&oldest).unwrap();
        }
        if phase == 6 {
            img.compact().unwrap();
        }
    }
    assert!(
        img.log_moves() > 10,
        "the log moved {} times",
        img.log_moves()
    );
    let verify_snapshots = |img: &Image, snaps: &[(String, Vec<u8>)], what: &str| {
        for (name, want) in snaps {
            let reader = img.open_snapshot(name).unwrap();
            let mut got = vec![0u8; want.len()];
            reader.read_at(&mut got, 0).unwrap();
            assert!(&got == want, "{what}: snapshot {name} differs");
        }
    };
    verify_snapshots(&img, &snaps, "open");
    // Back to the second newest, and on writing (the log moving on).
    let (name, was) = snaps[snaps.len() - 2].clone();
    img.snapshot_rollback(&name).unwrap();
    model = was;
    verify(&img, &model, "rolled back");
    overwrite(&img, store.as_ref(), &mut model, 800, 999);
    verify(&img, &model, "written after the rollback");
    img.close().unwrap();
    let img = Image::open_on(store.clone(), &opts()).unwrap();
    verify(&img, &model, "reopened");
    verify_snapshots(&img, &snaps, "reopened");
    let report = img.check().unwrap();
    assert!(report.is_ok(), "check: {:?}", report.bad);
}

/// Session after session (each reopened with the smallest hole set, as a
/// mount's `log-region=` does), the file's length stays within a few times
/// what one long session leaves (each session forgets the partly dead
/// pages its reclaim held: their holes stay split until a compaction, which
/// the log's moves ask for when they find no hole); an idle open/close
/// cycle adds at most its checkpoints' records.
#[test]
fn sessions_do_not_lengthen_the_file() {
    let store = Arc::new(MemStore::new());
    let c = disk(Codec::None);
    let region = OpenOptions {
        log_region_min: Some(1 << 20),
        ..opts()
    };
    Image::create_on(store.clone(), &c, &region)
        .unwrap()
        .close()
        .unwrap();
    let mut model = vec![0u8; DISK as usize];
    let mut lengths = Vec::new();
    for session in 0..16 {
        let img = Image::open_on(store.clone(), &region).unwrap();
        overwrite(&img, store.as_ref(), &mut model, 400, 500 + session);
        // Room for the reclaim thread's tick: a compaction the moves want
        // (the holes the session before left are split) runs there.
        std::thread::sleep(std::time::Duration::from_millis(600));
        overwrite(&img, store.as_ref(), &mut model, 400, 600 + session);
        img.close().unwrap();
        lengths.push(store.len().unwrap());
    }
    // 800 MiB written in 16 sessions: ~450 MB long without the compactions
    // (25-30 MB more each session), 100-140 MB with them (these sessions
    // last a second: the compactions the moves ask for run late).
    assert!(
        lengths[15] <= 24 * DISK,
        "the file's length after each session: {lengths:?}"
    );
    for _ in 0..20 {
        Image::open_on(store.clone(), &region)
            .unwrap()
            .close()
            .unwrap();
    }
    // Each adds at most its checkpoints' records (at the end of the file
    // when no hole is big enough), no preallocated room.
    let idle = store.len().unwrap();
    assert!(
        idle <= lengths[15] + 20 * (64 << 10),
        "20 idle sessions: {} -> {idle}",
        lengths[15]
    );
    let img = Image::open_on(store.clone(), &region).unwrap();
    verify(&img, &model, "after the sessions");
}

/// Compactions one after another beside writes whose checkpoints move the
/// log: a compaction punches without the checkpoint lock while the log
/// moves on (into holes too: the ranges those moves took are left out);
/// nothing written is lost, also after a reopen.
#[test]
fn compactions_beside_writes_that_move_the_log() {
    let store = Arc::new(MemStore::new());
    let c = disk(Codec::None);
    let img = Arc::new(moving_image(&store, &c));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                img.compact().unwrap();
                n += 1;
            }
            n
        })
    };
    let mut model = vec![0u8; DISK as usize];
    overwrite(&img, store.as_ref(), &mut model, 4800, 21);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let compactions = compactor.join().unwrap();
    verify(&img, &model, "open");
    assert!(compactions > 5, "only {compactions} compactions ran");
    assert!(img.log_moves() > 0, "the log never moved");
    Arc::try_unwrap(img).unwrap().close().unwrap();
    let img = Image::open_on(store.clone(), &opts()).unwrap();
    verify(&img, &model, "reopened");
    let report = img.check().unwrap();
    assert!(report.is_ok(), "check: {:?}", report.bad);
}

/// Writes `writes` 4 KiB blocks (patterns of `seed`), the `i`th to block `pick(i)`, keeping
/// `model` in step, with a flush and a checkpoint every 64 (and an evacuation before
/// it if `evacuate`); returns the file's length (MiB) every 10,000 writes.
fn write_blocks(
    img: &Image,
    store: &dyn Store,
    model: &mut [u8],
    writes: u64,
    mut pick: impl FnMut(u64) -> u64,
    evacuate: bool,
    seed: u64,
) -> Vec<u64> {
    let mut lengths = Vec::new();
    for i in 0..writes {
        let off = pick(i) * 4096;
        let data = pattern(4096, seed << 40 ^ i << 20 ^ off);
        img.write_at(&data, off).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        if i % 64 == 63 {
            // Written back first: what died is judged at the checkpoint
            // however far behind write-back is on a loaded machine.
            img.flush().unwrap();
            if evacuate {
                img.evacuate().unwrap();
            }
            img.checkpoint().unwrap();
        }
        if i % 10_000 == 9_999 {
            lengths.push(store.len().unwrap() >> 20);
        }
    }
    lengths
}

/// [`write_blocks`] with evacuations, 15 of 16 writes into the first eighth
/// of the disk, the others anywhere.
fn hot_and_cold(
    img: &Image,
    store: &dyn Store,
    model: &mut [u8],
    writes: u64,
    seed: u64,
) -> Vec<u64> {
    let blocks = DISK / 4096;
    let mut rng = Rng(seed);
    let pick = move |_| match rng.below(16) {
        0 => rng.below(blocks),
        _ => rng.below(blocks / 8),
    };
    write_blocks(img, store, model, writes, pick, true, seed)
}

/// Blocks rarely written keep the runs they lie in from ever dying whole:
/// the file's holes stay split and the log grows at the end. Evacuation
/// (engine `evacuate`) stores those few records elsewhere, so their ranges
/// join holes the log moves into; every block reads back, also reopened.
#[test]
fn evacuation_frees_ranges_that_cold_blocks_pin() {
    let store = Arc::new(MemStore::new());
    let img = moving_image(&store, &disk(Codec::None));
    let mut model = vec![0u8; DISK as usize];
    let writes = 60_000u64;
    let lengths = hot_and_cold(&img, store.as_ref(), &mut model, writes, 99);
    // 234 MiB written (and ~60 MiB of checkpoints): 328 MiB long without
    // the evacuations, ~32 MiB with them.
    let (moved, ranges) = img.evacuated();
    assert!(
        store.len().unwrap() <= 8 * DISK && ranges > 100,
        "{ranges} ranges evacuated; the file's length (MiB) every 10,000 writes: {lengths:?}"
    );
    // What moves is a fraction of what is written (~1/3 here: each range
    // moves at most a quarter of what it frees, and the log fills what is
    // freed).
    assert!(
        moved < writes * 4096 / 2,
        "{moved} bytes moved; {ranges} ranges, lengths {lengths:?}"
    );
    verify(&img, &model, "open");
    close_reopen_check(img, &store, &model);
}

/// Evacuations beside a snapshot: the records it holds stay (a head block
/// born before it is not stored anew: that would leave the snapshot alone
/// holding the old record), the snapshot reads what it held, the head what
/// was written; once it is deleted, the cold blocks move too.
#[test]
fn evacuation_leaves_what_a_snapshot_holds() {
    let store = Arc::new(MemStore::new());
    let img = moving_image(&store, &disk(Codec::None));
    let mut model = vec![0u8; DISK as usize];
    let blocks = DISK / 4096;
    // The second half of the disk written once, one block in 64 writes,
    // the others into the first eighth: each cold record lies alone among
    // dead ones. Then a snapshot holds them.
    let mut rng = Rng(40);
    let spread = move |i: u64| match i % 64 {
        0 => blocks / 2 + i / 64,
        _ => rng.below(blocks / 8),
    };
    write_blocks(
        &img,
        store.as_ref(),
        &mut model,
        blocks / 2 * 64,
        spread,
        false,
        40,
    );
    let held = model.clone();
    img.snapshot_create("mid").unwrap();
    let mut rng = Rng(41);
    let hot = move |_| rng.below(blocks / 8);
    write_blocks(&img, store.as_ref(), &mut model, 20_000, hot, true, 41);
    let (moved_under_snapshot, _) = img.evacuated();
    // What the snapshot alone holds: the blocks written since, no more.
    let changed = held
        .chunks(4096)
        .zip(model.chunks(4096))
        .filter(|(a, b)| a != b)
        .count() as u64;
    let usage = img.snapshot_usage().unwrap();
    assert!(
        usage[0].exclusive_bytes <= changed * (4096 + 64),
        "the snapshot alone holds {} bytes; {changed} blocks were written since",
        usage[0].exclusive_bytes
    );
    let snap = img.open_snapshot("mid").unwrap();
    let mut got = vec![0u8; DISK as usize];
    snap.read_at(&mut got, 0).unwrap();
    assert!(got == held, "the snapshot differs from what it held");
    drop(snap);
    verify(&img, &model, "under the snapshot");
    img.snapshot_delete("mid").unwrap();
    hot_and_cold(&img, store.as_ref(), &mut model, 20_000, 42);
    let (moved, ranges) = img.evacuated();
    assert!(
        ranges > 10 && moved > moved_under_snapshot,
        "{ranges} ranges, {moved} bytes moved ({moved_under_snapshot} under the snapshot)"
    );
    verify(&img, &model, "after the deletion");
    close_reopen_check(img, &store, &model);
}

/// A compaction punches the whole pages of the dead ranges it finds and
/// keeps what it knows of the pages it cannot punch (shared with a live
/// record): once that record dies too, the page is punched. (Forgotten,
/// every such page stayed allocated for good, splitting the holes the log
/// moves into.)
#[test]
fn pages_a_compaction_shares_with_live_records_are_punched_when_those_die() {
    let store = Arc::new(MemStore::new());
    let img = Image::create_on(store.clone(), &disk(Codec::None), &opts()).unwrap();
    let blocks = DISK / 4096;
    // Records of 4 KiB blocks and their headers: every page is shared.
    for b in 0..blocks {
        img.write_at(&pattern(4096, b), b * 4096).unwrap();
    }
    img.checkpoint().unwrap();
    let fill_end = store.len().unwrap();
    // Every other block dies, and a compaction punches its pages.
    for b in (1..blocks).step_by(2) {
        img.write_at(&pattern(4096, b + 7), b * 4096).unwrap();
    }
    img.flush().unwrap(); // written back: dead at the checkpoint
    img.checkpoint().unwrap();
    img.compact().unwrap();
    // Then the others, and the reclaim punches what is held.
    for b in (0..blocks).step_by(2) {
        img.write_at(&pattern(4096, b + 7), b * 4096).unwrap();
    }
    img.flush().unwrap();
    img.checkpoint().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let allocated = loop {
        let (mut at, mut holes) = (65536, 0);
        while let Some((a, b)) = store.find_hole(at, fill_end, 1).unwrap() {
            holes += b - a;
            at = b;
        }
        let allocated = fill_end - 65536 - holes;
        if allocated < DISK / 64 || std::time::Instant::now() > deadline {
            break allocated;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        allocated < DISK / 64,
        "{allocated} bytes of the first {fill_end} stay allocated, all of it dead"
    );
    img.close().unwrap();
}

/// Offline, the end of the file is emptied into the holes below it and
/// cut (`vbdfs compact`): a file grown long under overwrites shrinks to a
/// small multiple of its data; every block reads back, and `check` is
/// clean.
/// What `vbdfs compact` does, on the closed image in `store`: compaction,
/// then the end of the file emptied into the holes below it and cut (in a
/// thread: a shortening that goes round for ever fails the test). Returns
/// the file's length before and after, and the bytes of records moved.
fn compact_offline(store: &Arc<MemStore>) -> (u64, u64, u64) {
    let long = store.len().unwrap();
    let region = OpenOptions {
        log_region_min: Some(1 << 20),
        ..opts()
    };
    let img = Image::open_on(store.clone(), &region).unwrap();
    img.compact().unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let shortening = std::thread::spawn(move || {
        let moved = img.evacuate_tail().unwrap();
        img.close().unwrap();
        done.send(moved).unwrap();
    });
    let moved = finished
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the shortening did not end");
    shortening.join().unwrap();
    let short = store.len().unwrap();
    eprintln!("{long} -> {short}, moved {moved}");
    (long, short, moved)
}

#[test]
fn the_end_of_the_file_is_emptied_into_holes_below_and_cut() {
    let store = Arc::new(MemStore::new());
    let img = Image::create_on(store.clone(), &disk(Codec::None), &opts()).unwrap();
    let mut model = vec![0u8; DISK as usize];
    let blocks = DISK / 4096;
    let mut rng = Rng(77);
    let pick = move |_| match rng.below(16) {
        0 => rng.below(blocks),
        _ => rng.below(blocks / 8),
    };
    write_blocks(&img, store.as_ref(), &mut model, 20_000, pick, false, 77);
    img.close().unwrap();
    let (long, short, moved) = compact_offline(&store);
    assert!(
        short < 3 * DISK && moved < DISK * 2,
        "the file: {long} -> {short} bytes, {moved} bytes moved"
    );
    let img = Image::open_on(store.clone(), &opts()).unwrap();
    verify(&img, &model, "shrunk");
    let report = img.check().unwrap();
    assert!(report.is_ok(), "check: {:?}", report.bad);
}

/// The snapshot table, the last record of the file (a snapshot deleted
/// last), is written anew below: the end of the file is emptied past it.
/// It used to stop the shortening there; with checkpoints that name the
/// records they have, the shortening then went round for ever (the
/// helper's time limit fails it).
#[test]
fn the_end_of_the_file_is_emptied_past_the_snapshot_table() {
    let store = Arc::new(MemStore::new());
    let img = Image::create_on(store.clone(), &disk(Codec::None), &opts()).unwrap();
    let mut model = vec![0u8; DISK as usize];
    let blocks = DISK / 4096;
    let mut rng = Rng(78);
    write_blocks(
        &img,
        store.as_ref(),
        &mut model,
        4_000,
        |_| rng.below(blocks),
        false,
        78,
    );
    img.snapshot_create("keep").unwrap();
    let kept = model.clone();
    write_blocks(
        &img,
        store.as_ref(),
        &mut model,
        16_000,
        |_| rng.below(blocks),
        false,
        79,
    );
    img.snapshot_create("gone").unwrap();
    img.snapshot_delete("gone").unwrap();
    img.close().unwrap();
    let (long, short, moved) = compact_offline(&store);
    assert!(
        short < long / 2,
        "the file: {long} -> {short} bytes, {moved} bytes moved"
    );
    let img = Image::open_on(store.clone(), &opts()).unwrap();
    verify(&img, &model, "shrunk");
    let mut got = vec![0u8; DISK as usize];
    img.open_snapshot("keep")
        .unwrap()
        .read_at(&mut got, 0)
        .unwrap();
    assert!(
        got == kept,
        "the snapshot differs from the disk it was taken of"
    );
    let report = img.check().unwrap();
    assert!(report.is_ok(), "check: {:?}", report.bad);
}

/// An open that finds far more host space than the head's data (what a
/// crash left held, what earlier sessions could not punch, a copy that
/// filled the holes) compacts it away in the background, unasked.
#[test]
fn an_open_over_much_dead_space_compacts_it() {
    let store = Arc::new(MemStore::new());
    let img = Image::create_on(store.clone(), &disk(Codec::None), &opts()).unwrap();
    let mut rng = Rng(5);
    for i in 0..30_000u64 {
        let off = rng.below(DISK / 4096) * 4096;
        img.write_at(&pattern(4096, i), off).unwrap();
    }
    img.close().unwrap();
    // Copied without its holes: every byte allocated, ~125 MB for 8 MiB.
    let copied = Arc::new(MemStore::from_bytes(store.to_bytes()));
    let before = copied.allocated().unwrap();
    assert!(before > 100 << 20, "{before} bytes allocated");
    // Holes the log can move into (several: the last one would ask for a
    // compaction on its own), as earlier punches leave them.
    let len = copied.len().unwrap();
    for i in 0..4 {
        let at = len + i * (9 << 20);
        copied.write_at(&[1u8; 4096], at + (8 << 20)).unwrap();
        copied.punch_hole(at, 8 << 20).unwrap();
    }
    let region = OpenOptions {
        log_region_min: Some(1 << 20),
        ..opts()
    };
    let img = Image::open_on(copied.clone(), &region).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while copied.allocated().unwrap() > 4 * DISK && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let after = copied.allocated().unwrap();
    assert!(after <= 4 * DISK, "{before} -> {after} bytes allocated");
    img.close().unwrap();
}
