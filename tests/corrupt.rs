//! Hostile image files: empty, garbage, truncated, every-byte bit flips, and
//! hand-made images whose checksums are right but whose contents lie
//! (records pointing outside the file or at the wrong record, zstd bombs,
//! absurd superblock fields, counters that would overflow).
//!
//! The rule everywhere: `open` gives Ok or a typed error, never a panic, a
//! hang or a huge allocation; when it gives Ok, every block reads either its
//! true contents or an error of kind Corrupt/Io — never wrong data — and
//! `check()` lists exactly the blocks that fail to read. Every case runs
//! under a time bound.
//!
//! The bit-flip sweep flips one bit in every byte of small images (4 KiB
//! blocks, zstd and none, built in two sessions, cleanly closed) and opens
//! each read-only, plus read-write for a sample (every 61st log byte and 8th
//! superblock byte). The reserved zero bytes between the superblocks and the
//! log are sampled every 64th byte. `VBDFS_BITFLIP_FULL=1` flips all 8 bits of
//! every byte and opens every one read-write too (long run, docs/testing.md).
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vbdfs::format::{
    encode_index, encode_leaf, EntryKind, LeafPtr, MapEntry, RecPtr, RecordHeader, RecordKind,
    Superblock, LOG_START, RECORD_ALIGN, RECORD_HEADER_LEN, SB_SLOT_SIZE,
};
use vbdfs::io::MemStore;
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

const BS: u64 = 4096;
/// Crafted images: 1040 blocks of 4 KiB, two map leaves (1024 entries each).
const VSIZE: u64 = 1040 * BS;
/// Images for the sweeps: 64 blocks (one leaf), cheap to compare in full after
/// each of ~200k bit flips.
const SMALL: u64 = 64 * BS;

#[allow(clippy::needless_update)] // future fields keep their defaults
fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        cache_bytes: 256 << 10,
        workers: 1,
        ..OpenOptions::default()
    }
}

/// Runs `f` on another thread and fails if it takes longer than `secs`.
fn bounded<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => {
            eprintln!("{what}: panicked");
            std::panic::resume_unwind(panic)
        }
        Err(_) => panic!("{what}: still running after {secs} s (hang)"),
    }
}

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut r = xorshift(seed);
    (0..len).map(|_| (r() >> 32) as u8).collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 13) as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

fn allowed_error(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Corrupt | ErrorKind::Io | ErrorKind::Unsupported
    )
}

/// What a damaged image is compared against.
#[derive(Clone)]
struct Expect {
    /// The true contents of the whole disk.
    content: Arc<Vec<u8>>,
}

impl Expect {
    fn block(&self, b: u64) -> &[u8] {
        &self.content[(b * BS) as usize..((b + 1) * BS) as usize]
    }
}

/// Reads every block of an opened (possibly damaged) image: each must be
/// correct or a Corrupt/Io error; `check()` must name exactly the failures,
/// and every block in `must_fail` must fail. Returns the failing blocks.
fn verify_blocks(
    img: &Image,
    expect: &Expect,
    must_fail: &BTreeSet<u64>,
    what: &str,
) -> BTreeSet<u64> {
    assert_eq!(img.len(), expect.content.len() as u64, "{what}: size");
    let mut failed = BTreeSet::new();
    // Fast path: one read of the whole disk.
    let mut all = vec![0xEEu8; expect.content.len()];
    if img.read_at(&mut all, 0).is_ok() && must_fail.is_empty() {
        assert!(
            all == *expect.content,
            "{what}: WRONG DATA at byte {:?} without an error",
            all.iter()
                .zip(expect.content.iter())
                .position(|(a, b)| a != b)
        );
        let report = img.check().unwrap();
        // A damaged copy of a map record is reported too (the other served).
        assert!(
            report.bad.is_empty() && report.errors.is_empty(),
            "{what}: check() reports {report:?} but every block reads"
        );
        return failed;
    }
    let mut buf = vec![0u8; BS as usize];
    for b in 0..img.len() / BS {
        match img.read_at(&mut buf, b * BS) {
            Ok(()) => assert!(
                buf == expect.block(b),
                "{what}: block {b} reads WRONG DATA without an error"
            ),
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io),
                    "{what}: block {b} read error of kind {:?}: {e}",
                    e.kind()
                );
                failed.insert(b);
            }
        }
    }
    for b in must_fail {
        assert!(
            failed.contains(b),
            "{what}: block {b}'s record is damaged but it read without an error"
        );
    }
    let report = img.check().unwrap();
    let bad: BTreeSet<u64> = report.bad.iter().map(|b| b.block).collect();
    assert_eq!(
        bad, failed,
        "{what}: check() must list exactly the unreadable blocks"
    );
    failed
}

/// Opens `bytes` read-only and (if `rw`) read-write; checks the rule above.
/// Returns the error kind if open failed.
fn try_image(
    bytes: Vec<u8>,
    expect: &Expect,
    must_fail: &BTreeSet<u64>,
    rw: bool,
    what: &str,
) -> Option<ErrorKind> {
    let mut result = None;
    for read_only in [true, false] {
        if !read_only && !rw {
            continue;
        }
        let store = Arc::new(MemStore::from_bytes(bytes.clone()));
        match Image::open_on(store, &opts(read_only)) {
            Ok(img) => {
                let what = format!("{what} ({})", if read_only { "ro" } else { "rw" });
                verify_blocks(&img, expect, must_fail, &what);
                if let Err(e) = img.close() {
                    assert!(allowed_error(e.kind()), "{what}: close: {e}");
                }
            }
            Err(e) => {
                assert!(
                    allowed_error(e.kind()),
                    "{what}: open failed with kind {:?}: {e}",
                    e.kind()
                );
                result = Some(e.kind());
            }
        }
    }
    result
}

/// A record found in an image file.
#[derive(Debug, Clone, Copy)]
struct Found {
    off: u64,
    end: u64,
    header: RecordHeader,
}

/// Every record with a valid header and checksum, in file order.
fn records(bytes: &[u8]) -> Vec<Found> {
    let mut out = Vec::new();
    let mut off = LOG_START;
    while off + RECORD_HEADER_LEN as u64 <= bytes.len() as u64 {
        let at = off as usize;
        if let Ok(h) = RecordHeader::decode(&bytes[at..], off) {
            let end = off + h.total_len();
            if end <= bytes.len() as u64
                && h.verify(&bytes[at..], &bytes[at + RECORD_HEADER_LEN..end as usize])
                    .is_ok()
            {
                out.push(Found {
                    off,
                    end,
                    header: h,
                });
                off = vbdfs::format::align_up(end, RECORD_ALIGN);
                continue;
            }
        }
        off += RECORD_ALIGN;
    }
    out
}

/// For each block, the byte range of its live DATA record (the last one in
/// the file: the test images never discard).
fn live_ranges(bytes: &[u8]) -> Vec<(u64, u64, u64)> {
    let mut live = std::collections::BTreeMap::new();
    for r in records(bytes) {
        if r.header.kind == RecordKind::Data {
            live.insert(r.header.key, (r.off, r.end));
        }
    }
    live.into_iter().map(|(b, (s, e))| (b, s, e)).collect()
}

/// A small image written through the engine in two sessions: raw and
/// compressible blocks, partial blocks, a zero block and the last block, one
/// overwritten in the second session; closed cleanly unless `unclean`.
fn small_image(codec: Codec, unclean: bool) -> (Vec<u8>, Expect) {
    let store = Arc::new(MemStore::new());
    let create = CreateOptions {
        size: SMALL,
        block_size: BS,
        codec,
    };
    let mut content = vec![0u8; SMALL as usize];
    let mut put = |img: &Image, data: &[u8], off: u64| {
        img.write_at(data, off).unwrap();
        content[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    let img = Image::create_on(store.clone(), &create, &opts(false)).unwrap();
    put(&img, &random_bytes(4096, 1), 0);
    put(&img, &pattern(4096, 3), 4096);
    put(&img, &random_bytes(1000, 2), 2 * 4096 + 100);
    put(&img, &[0u8; 4096], 5 * 4096);
    put(&img, &pattern(4096, 7), 40 * 4096);
    put(&img, &pattern(100, 8), 41 * 4096 + 4000);
    put(&img, &random_bytes(4096, 9), SMALL - 4096);
    img.close().unwrap();
    let img = Image::open_on(store.clone(), &opts(false)).unwrap();
    put(&img, &pattern(4096, 11), 4096);
    put(&img, &random_bytes(5000, 4), 7 * 4096 - 10);
    img.flush().unwrap();
    let bytes = if unclean {
        let bytes = store.to_bytes();
        drop(img);
        bytes
    } else {
        img.close().unwrap();
        store.to_bytes()
    };
    (
        bytes,
        Expect {
            content: Arc::new(content),
        },
    )
}

#[test]
fn empty_and_tiny_files_are_refused() {
    let expect = Expect {
        content: Arc::new(Vec::new()),
    };
    for len in [0usize, 1, 511, 512, 4096, 8191, 65535] {
        let kind = bounded("tiny", 10, {
            let expect = expect.clone();
            move || try_image(vec![0u8; len], &expect, &BTreeSet::new(), true, "zeros")
        });
        assert_eq!(kind, Some(ErrorKind::Corrupt), "{len} zero bytes");
    }
    // The same through a real file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.vbd");
    std::fs::write(&path, b"").unwrap();
    for read_only in [true, false] {
        let err = Image::open(&path, &opts(read_only)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    }
}

#[test]
fn garbage_is_refused() {
    let expect = Expect {
        content: Arc::new(Vec::new()),
    };
    for (i, len) in [100usize, 4096, 65536, 65537, 200_000, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let bytes = random_bytes(len, 77 + i as u64);
        let kind = bounded("garbage", 10, {
            let expect = expect.clone();
            move || try_image(bytes, &expect, &BTreeSet::new(), true, "garbage")
        });
        assert_eq!(kind, Some(ErrorKind::Corrupt), "{len} random bytes");
    }
    // A real superblock over a log of garbage.
    let (good, expect) = small_image(Codec::Zstd(1), false);
    let mut bytes = good.clone();
    let noise = random_bytes(bytes.len() - LOG_START as usize, 5);
    bytes[LOG_START as usize..].copy_from_slice(&noise);
    let kind = bounded("garbage log", 10, {
        let expect = expect.clone();
        move || try_image(bytes, &expect, &BTreeSet::new(), true, "garbage log")
    });
    assert_eq!(kind, Some(ErrorKind::Corrupt));
    // Garbage appended after a good image (a torn tail) changes nothing.
    let mut bytes = good;
    bytes.extend_from_slice(&random_bytes(100_000, 6));
    let kind = bounded("garbage tail", 10, move || {
        try_image(bytes, &expect, &BTreeSet::new(), true, "garbage tail")
    });
    assert_eq!(kind, None, "garbage after the log must not stop the open");
}

#[test]
fn truncation_anywhere() {
    for (codec, unclean) in [
        (Codec::Zstd(1), false),
        (Codec::None, false),
        (Codec::Zstd(1), true),
    ] {
        let (bytes, expect) = small_image(codec, unclean);
        let mut cuts: Vec<usize> = (0..bytes.len()).step_by(4096).collect();
        let mut r = xorshift(99);
        cuts.extend((0..64).map(|_| (r() % bytes.len() as u64) as usize));
        cuts.push(bytes.len() - 1);
        let what = format!("truncation {codec} unclean={unclean}");
        let n = bounded(&what, 120, move || {
            let mut opened = 0;
            for cut in cuts {
                let what = format!("{codec} unclean={unclean} cut at {cut}");
                let t = Instant::now();
                // An unclean image's roll-forward data may be cut off: with it
                // every later block legitimately reads its older value, so
                // only clean images are held to "correct or error".
                if unclean {
                    let store = Arc::new(MemStore::from_bytes(bytes[..cut].to_vec()));
                    match Image::open_on(store, &opts(true)) {
                        Ok(img) => {
                            opened += 1;
                            let mut buf = vec![0u8; SMALL as usize];
                            if let Err(e) = img.read_at(&mut buf, 0) {
                                assert!(allowed_error(e.kind()), "{what}: read: {e}");
                            }
                            img.check().unwrap();
                        }
                        Err(e) => assert!(allowed_error(e.kind()), "{what}: {e}"),
                    }
                } else if try_image(
                    bytes[..cut].to_vec(),
                    &expect,
                    &BTreeSet::new(),
                    true,
                    &what,
                )
                .is_none()
                {
                    opened += 1;
                }
                assert!(t.elapsed() < Duration::from_secs(5), "{what}: too slow");
            }
            opened
        });
        eprintln!("{codec} unclean={unclean}: {n} truncated images opened");
    }
}

/// Read-write opens (which write a recovery checkpoint and start threads, and
/// take ~0.1 s to close) are done for every `RW_STRIDE`-th byte of the log and
/// every 8th byte of the superblock headers; read-only opens for every byte.
const RW_STRIDE: usize = 61;

/// The byte ranges of the committed index and leaf records and of their
/// second copies (format.md §4): one flipped bit in any of them must cost
/// nothing.
fn committed_map_records(bytes: &[u8]) -> Vec<(u64, u64)> {
    let sb = (0..2)
        .filter_map(|slot| {
            let at = slot as usize * SB_SLOT_SIZE as usize;
            Superblock::decode(&bytes[at..at + 512], slot).ok()
        })
        .max_by_key(|sb| sb.seq)
        .unwrap();
    let record = |off: u64, len: u32| {
        let second = vbdfs::format::align_up(off + u64::from(len), vbdfs::format::LOG_UNIT);
        [
            (off, off + u64::from(len)),
            (second, second + u64::from(len)),
        ]
    };
    let at = (sb.index.off as usize) + RECORD_HEADER_LEN;
    let header = RecordHeader::decode(&bytes[sb.index.off as usize..], sb.index.off).unwrap();
    assert_eq!(header.codec, 0, "a one-leaf index is stored raw");
    let raw = &bytes[at..at + header.payload_len as usize];
    let leaves = vbdfs::format::decode_index(raw, 1).unwrap();
    let mut out = record(sb.index.off, sb.index.len).to_vec();
    for leaf in leaves {
        out.extend(record(leaf.off, leaf.len));
    }
    out
}

fn bitflip_sweep(codec: Codec) {
    let (bytes, expect) = small_image(codec, false);
    let live = live_ranges(&bytes);
    let map_records = committed_map_records(&bytes);
    assert!(
        live.len() >= 7,
        "expected the test blocks' records: {live:?}"
    );
    let full = std::env::var("VBDFS_BITFLIP_FULL").is_ok_and(|v| v == "1");
    let len = bytes.len();
    let reserved =
        |p: usize| (512..4096).contains(&p) || (4096 + 512..LOG_START as usize).contains(&p);
    let header = |p: usize| p < 512 || (4096..4096 + 512).contains(&p);
    // (position, xor mask, also open read-write)
    let mut flips: Vec<(usize, u8, bool)> = Vec::new();
    for p in 0..len {
        // The reserved zero bytes between the superblocks and the log are
        // never decoded: sample them (every byte in the full run).
        if !full && reserved(p) && p % 64 != 0 {
            continue;
        }
        let rw = !reserved(p)
            && (full || (header(p) && p % 8 == 0) || (!header(p) && p % RW_STRIDE == 0));
        if full {
            flips.extend((0..8).map(|bit| (p, 1u8 << bit, rw)));
        } else {
            flips.push((p, 1 << (p % 8), rw));
        }
    }
    let total = flips.len();
    let rw_count = flips.iter().filter(|f| f.2).count();
    let what = format!("bit flips {codec}");
    let secs = if full { 3600 * 4 } else { 300 };
    let map_bytes: u64 = map_records.iter().map(|(s, e)| e - s).sum();
    assert!(map_bytes > 4 * RECORD_HEADER_LEN as u64, "{map_records:?}");
    let map_records = Arc::new(map_records);
    let (failed_open, damaged) = bounded(&what, secs, move || {
        let bytes = Arc::new(bytes);
        let flips = Arc::new(flips);
        let live = Arc::new(live);
        let failed_open = Arc::new(AtomicU64::new(0));
        let damaged = Arc::new(AtomicU64::new(0));
        const THREADS: usize = 8;
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (bytes, flips, live, expect) =
                    (bytes.clone(), flips.clone(), live.clone(), expect.clone());
                let map_records = map_records.clone();
                let (failed_open, damaged) = (failed_open.clone(), damaged.clone());
                std::thread::spawn(move || {
                    for &(p, mask, rw) in flips.iter().skip(i).step_by(THREADS) {
                        let mut b = (*bytes).clone();
                        b[p] ^= mask;
                        let must_fail: BTreeSet<u64> = live
                            .iter()
                            .filter(|(_, s, e)| (*s..*e).contains(&(p as u64)))
                            .map(|(blk, _, _)| *blk)
                            .collect();
                        let what = format!("{codec}: byte {p} ^ {mask:#04x}");
                        let t = Instant::now();
                        let in_map = map_records
                            .iter()
                            .any(|(s, e)| (*s..*e).contains(&(p as u64)));
                        match try_image(b, &expect, &must_fail, rw, &what) {
                            Some(kind) if in_map => {
                                panic!(
                                    "{what}: a damaged map record copy refused the open ({kind:?})"
                                )
                            }
                            Some(_) => failed_open.fetch_add(1, Ordering::Relaxed),
                            None => damaged.fetch_add(must_fail.len() as u64, Ordering::Relaxed),
                        };
                        assert!(t.elapsed() < Duration::from_secs(10), "{what}: too slow");
                    }
                })
            })
            .collect();
        for h in handles {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
        (
            failed_open.load(Ordering::Relaxed),
            damaged.load(Ordering::Relaxed),
        )
    });
    eprintln!(
        "{codec}: {total} flips ({rw_count} also read-write) over a {len}-byte image: \
         {failed_open} refused at open, {damaged} opened with the damaged block reported"
    );
    assert!(
        damaged > 0 && failed_open > 0,
        "the sweep must hit records and metadata"
    );
}

#[test]
fn bit_flip_every_byte_zstd() {
    bitflip_sweep(Codec::Zstd(1));
}

#[test]
fn bit_flip_every_byte_none() {
    bitflip_sweep(Codec::None);
}

// ---------------------------------------------------------------------------
// Hand-made images: valid checksums, lying contents.

/// Builds an image record by record.
struct Craft {
    bytes: Vec<u8>,
    lsn: u64,
    epoch: u64,
}

const EPOCH: u64 = 0xE90C_E90C_0001;

impl Craft {
    fn new() -> Craft {
        Craft {
            bytes: vec![0; LOG_START as usize],
            lsn: 1,
            epoch: EPOCH,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        kind: RecordKind,
        key: u64,
        codec: u8,
        raw_len: u32,
        payload: &[u8],
        birth: u64,
        epoch: u64,
        lsn: u64,
    ) -> (u64, u32, u32) {
        let off = self.bytes.len() as u64;
        let mut h = RecordHeader {
            kind,
            codec,
            flags: 0,
            payload_len: payload.len() as u32,
            raw_len,
            lsn,
            epoch,
            self_off: off,
            key,
            birth,
            crc: 0,
            synced: 0,
        };
        self.bytes.extend_from_slice(&h.encode(payload));
        (off, h.total_len() as u32, h.crc)
    }

    fn append(
        &mut self,
        kind: RecordKind,
        key: u64,
        codec: u8,
        raw_len: u32,
        payload: &[u8],
    ) -> (u64, u32, u32) {
        let lsn = self.lsn;
        self.lsn += 1;
        self.record(kind, key, codec, raw_len, payload, 1, self.epoch, lsn)
    }

    fn data(&mut self, block: u64, data: &[u8]) -> MapEntry {
        let (off, len, _) = self.append(RecordKind::Data, block, 0, data.len() as u32, data);
        MapEntry {
            kind: EntryKind::Data,
            off,
            len,
            birth: 1,
        }
    }

    fn leaf(&mut self, leaf: u64, entries: &[MapEntry]) -> LeafPtr {
        let raw = encode_leaf(entries);
        let (stored, payload) = vbdfs::codec::encode(&raw, Codec::Zstd(1));
        let (off, len, crc) =
            self.append(RecordKind::Leaf, leaf, stored, raw.len() as u32, &payload);
        LeafPtr {
            leaf,
            off,
            len,
            crc,
        }
    }

    fn index(&mut self, ptrs: &[LeafPtr]) -> RecPtr {
        let raw = encode_index(ptrs);
        let (off, len, crc) = self.append(
            RecordKind::Index,
            ptrs.len() as u64,
            0,
            raw.len() as u32,
            &raw,
        );
        RecPtr { off, len, crc }
    }

    /// A superblock naming `index`, with the log starting here.
    fn superblock(&self, index: RecPtr) -> Superblock {
        Superblock {
            flags: 0,
            image_uuid: [0x42; 16],
            seq: 2,
            gen: 1,
            block_shift: 12,
            codec: Codec::None,
            virtual_size: VSIZE,
            log_start_off: self.bytes.len() as u64,
            log_start_lsn: self.lsn,
            log_epoch: self.epoch,
            log_tail: self.bytes.len() as u64,
            index,
            snap_table: RecPtr::default(),
            config: RecPtr::default(),
            created_ns: 1,
            log_limit: 0,
            crypto: 0,
        }
    }

    fn put_superblock(&mut self, sb: &Superblock) {
        let slot = sb.seq % 2;
        let at = (slot * SB_SLOT_SIZE) as usize;
        self.bytes[at..at + SB_SLOT_SIZE as usize].copy_from_slice(&sb.encode(slot as u8));
    }
}

fn block_bytes(b: u64) -> Vec<u8> {
    random_bytes(BS as usize, 1000 + b)
}

/// Blocks 0, 1 and 3 hold data; the map is one leaf.
fn base() -> (Craft, Vec<MapEntry>) {
    let mut c = Craft::new();
    let mut e = vec![MapEntry::default(); 1024];
    for b in [0u64, 1, 3] {
        e[b as usize] = c.data(b, &block_bytes(b));
    }
    (c, e)
}

fn base_expect() -> Expect {
    let mut content = vec![0u8; VSIZE as usize];
    for b in [0u64, 1, 3] {
        content[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&block_bytes(b));
    }
    Expect {
        content: Arc::new(content),
    }
}

/// Finishes a crafted image: leaf 0, index, superblock (edited by `sb_edit`).
fn finish(
    mut c: Craft,
    entries: &[MapEntry],
    sb_edit: impl FnOnce(&mut Superblock),
) -> (Craft, Vec<u8>) {
    let lp = c.leaf(0, entries);
    let ip = c.index(&[lp]);
    let mut sb = c.superblock(ip);
    sb_edit(&mut sb);
    c.put_superblock(&sb);
    let bytes = c.bytes.clone();
    (c, bytes)
}

/// Patches raw superblock bytes in slot `slot` and fixes its checksum.
fn patch_sb(bytes: &mut [u8], slot: usize, edit: impl FnOnce(&mut [u8])) {
    let sb = &mut bytes[slot * 4096..slot * 4096 + 512];
    edit(sb);
    let crc = crc32c::crc32c(&sb[..508]);
    sb[508..512].copy_from_slice(&crc.to_le_bytes());
}

/// A read-only image with lost map leaves: some blocks fail (exactly those
/// `check` names), every other one reads right.
fn only_lost_blocks_fail(img: &Image, expect: &Expect, what: &str) {
    let blocks = (expect.content.len() as u64 / BS).min(img.len() / BS);
    let mut buf = vec![0u8; BS as usize];
    let failed: BTreeSet<u64> = (0..img.len().div_ceil(BS))
        .filter(|&b| match img.read_at(&mut buf, b * BS) {
            Ok(()) => {
                assert!(
                    b >= blocks || buf == expect.block(b),
                    "{what}: block {b} reads WRONG DATA without an error"
                );
                false
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: block {b}: {e}");
                true
            }
        })
        .collect();
    assert!(
        !failed.is_empty(),
        "{what}: a lost leaf, yet every block reads"
    );
    let report = img.check().unwrap();
    let bad: BTreeSet<u64> = report.bad.iter().map(|b| b.block).collect();
    assert_eq!(bad, failed, "{what}: check names other blocks than fail");
}

enum Want {
    /// Open (ro and rw) fails with this kind (Corrupt: read-only, it may
    /// open with lost map leaves whose blocks fail instead).
    Refused(ErrorKind),
    /// Opens; exactly these blocks fail to read.
    Damaged(&'static [u64]),
}

fn expect_case(name: &str, bytes: Vec<u8>, expect: Expect, want: Want) {
    let name = name.to_string();
    bounded(&name.clone(), 20, move || {
        let must_fail: BTreeSet<u64> = match &want {
            Want::Damaged(b) => b.iter().copied().collect(),
            Want::Refused(_) => BTreeSet::new(),
        };
        for read_only in [true, false] {
            let store = Arc::new(MemStore::from_bytes(bytes.clone()));
            let what = format!("{name} ({})", if read_only { "ro" } else { "rw" });
            match (Image::open_on(store, &opts(read_only)), &want) {
                (Err(e), Want::Refused(kind)) => {
                    assert_eq!(e.kind(), *kind, "{what}: {e}");
                }
                (Ok(img), Want::Damaged(_)) => {
                    let failed = verify_blocks(&img, &expect, &must_fail, &what);
                    assert_eq!(failed, must_fail, "{what}: unreadable blocks");
                    if !read_only {
                        // The image stays usable: a full-block write over a
                        // damaged block replaces it.
                        let data = vec![0x5A; BS as usize];
                        for &b in &must_fail {
                            img.write_at(&data, b * BS).unwrap();
                        }
                        img.flush().unwrap();
                        let mut buf = vec![0; BS as usize];
                        for &b in &must_fail {
                            img.read_at(&mut buf, b * BS).unwrap();
                            assert!(buf == data, "{what}: rewritten block {b}");
                        }
                    }
                    img.close().unwrap();
                }
                // Read-only, a leaf that cannot be read costs its blocks.
                (Ok(img), Want::Refused(ErrorKind::Corrupt))
                    if read_only && !img.lost_leaves().is_empty() =>
                {
                    only_lost_blocks_fail(&img, &expect, &what);
                    img.close().unwrap();
                }
                (Ok(_), Want::Refused(kind)) => panic!("{what}: opened, expected {kind:?}"),
                (Err(e), Want::Damaged(_)) => panic!("{what}: refused: {e}"),
            }
        }
    });
}

#[test]
fn crafted_valid_image_opens() {
    // The builder itself is right: the hostile variants below differ from
    // this one in a single lie.
    let (c, e) = base();
    let (_, bytes) = finish(c, &e, |_| {});
    expect_case("crafted valid", bytes, base_expect(), Want::Damaged(&[]));
}

#[test]
fn superblock_pointers_that_lie() {
    type Edit = fn(&mut Superblock, u64);
    let cases: Vec<(&str, Edit, Want)> = vec![
        (
            "index past EOF",
            |sb, len| sb.index.off = len + 4096,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "index len 4 GiB",
            |sb, _| sb.index.len = u32::MAX,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "index len 10",
            |sb, _| sb.index.len = 10,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "index crc wrong",
            |sb, _| sb.index.crc ^= 1,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "index in the header area",
            |sb, _| sb.index.off = 100,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "index at a data record",
            |sb, _| sb.index.off = LOG_START,
            Want::Refused(ErrorKind::Corrupt),
        ),
        // Regression: the next append went to the log start, 64 PiB out
        // (a MemStore aborted allocating it; a file grew sparse to it).
        (
            "log start 2^56",
            |sb, _| sb.log_start_off = (1 << 56) - 16,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "log start past EOF",
            |sb, len| sb.log_start_off = len + 16,
            Want::Refused(ErrorKind::Corrupt),
        ),
        // Regression: seq + 1, gen + 1 and lsn + 1 overflowed (a panic in
        // debug builds, inside Drop: an abort).
        (
            "seq near u64::MAX",
            |sb, _| sb.seq = u64::MAX - 1,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "gen u64::MAX",
            |sb, _| sb.gen = u64::MAX,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "gen u32::MAX",
            |sb, _| sb.gen = u64::from(u32::MAX),
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "lsn u64::MAX",
            |sb, _| sb.log_start_lsn = u64::MAX,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "virtual size 64 TiB + 512",
            |sb, _| sb.virtual_size = (64 << 40) + 512,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "virtual size u64::MAX",
            |sb, _| sb.virtual_size = !511,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "virtual size 1000",
            |sb, _| sb.virtual_size = 1000,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "block shift 40",
            |sb, _| sb.block_shift = 40,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "block shift 11",
            |sb, _| sb.block_shift = 11,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "zstd level 100",
            |sb, _| sb.codec = Codec::Zstd(100),
            Want::Refused(ErrorKind::Corrupt),
        ),
        // Blocks 0..3 now lie beyond the 4 KiB disk: the leaf is refused.
        (
            "virtual size one block",
            |sb, _| sb.virtual_size = 4096,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "flags all ones",
            |sb, _| sb.flags = u32::MAX,
            Want::Damaged(&[]),
        ),
    ];
    for (name, edit, want) in cases {
        let (c, e) = base();
        let len_before = {
            let (mut c2, e2) = base();
            let lp = c2.leaf(0, &e2);
            c2.index(&[lp]);
            c2.bytes.len() as u64
        };
        let (_, bytes) = finish(c, &e, |sb| edit(sb, len_before));
        expect_case(name, bytes, base_expect(), want);
    }
}

#[test]
fn superblock_raw_fields_that_lie() {
    // Offsets inside the 512-byte superblock (docs/format.md).
    type Patch = fn(&mut [u8]);
    let cases: Vec<(&str, Patch, ErrorKind)> = vec![
        ("version 2", |b| b[8] = 2, ErrorKind::Unsupported),
        (
            "header length 256",
            |b| b[10..12].copy_from_slice(&256u16.to_le_bytes()),
            ErrorKind::Unsupported,
        ),
        (
            "unknown incompat feature",
            |b| b[16] = 1,
            ErrorKind::Unsupported,
        ),
        (
            "unknown ro_compat feature",
            |b| b[24] = 1,
            ErrorKind::Unsupported,
        ),
        ("names the other slot", |b| b[72] = 1, ErrorKind::Corrupt),
        ("codec 9", |b| b[74] = 9, ErrorKind::Corrupt),
        ("encrypted", |b| b[75] = 1, ErrorKind::Unsupported),
    ];
    for (name, edit, kind) in cases {
        let (c, e) = base();
        let (_, mut bytes) = finish(c, &e, |_| {});
        patch_sb(&mut bytes, 0, edit);
        expect_case(name, bytes, base_expect(), Want::Refused(kind));
    }
}

#[test]
fn huge_claimed_virtual_size_is_sparse_not_allocated() {
    let (c, e) = base();
    let (_, bytes) = finish(c, &e, |sb| sb.virtual_size = 64 << 40);
    bounded("64 TiB claim", 20, move || {
        for read_only in [true, false] {
            let img = Image::open_on(
                Arc::new(MemStore::from_bytes(bytes.clone())),
                &opts(read_only),
            )
            .unwrap();
            assert_eq!(img.len(), 64 << 40);
            let mut buf = vec![1u8; 8192];
            img.read_at(&mut buf, (64 << 40) - 8192).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
            img.read_at(&mut buf[..4096], 0).unwrap();
            assert!(buf[..4096] == block_bytes(0)[..]);
            assert_eq!(img.next_data(4 * BS), None);
            assert_eq!(img.next_hole(0), 2 * BS);
            assert!(img.check().unwrap().is_ok());
            if !read_only {
                img.discard(0, 64 << 40).unwrap();
                img.write_at(&[7], (64 << 40) - 1).unwrap();
                img.flush().unwrap();
                assert_eq!(img.stats().allocated_bytes, BS);
            }
            img.close().unwrap();
        }
    });
}

#[test]
fn map_entries_that_lie() {
    type Edit = fn(&mut Craft, &mut Vec<MapEntry>);
    let cases: Vec<(&str, Edit, Want)> = vec![
        (
            "entry past EOF",
            |_, e| e[0].off = 1 << 40,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "entry too long",
            |_, e| e[0].len = 1 << 20,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "entry shorter than a header",
            |_, e| e[0].len = 10,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "entry in the header area",
            |_, e| e[0].off = 4096,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "unmapped entry with an offset",
            |_, e| e[2].off = LOG_START,
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "entry inside another record",
            |_, e| e[0].off = e[1].off + 16,
            Want::Damaged(&[0]),
        ),
        (
            "entry at another block's record",
            |_, e| e[0] = e[1],
            Want::Damaged(&[0]),
        ),
        (
            "entry with the wrong length",
            |_, e| e[0].len -= 16,
            Want::Damaged(&[0]),
        ),
        (
            "entry with the wrong birth",
            |_, e| e[3].birth = 9,
            Want::Damaged(&[3]),
        ),
        (
            "block 2 shares block 3's record",
            |_, e| e[2] = e[3],
            Want::Damaged(&[2]),
        ),
        (
            "entry at a leaf record",
            |c, e| {
                let decoy = c.leaf(1, &vec![MapEntry::default(); 1024]);
                e[0].off = decoy.off;
                e[0].len = decoy.len;
            },
            Want::Damaged(&[0]),
        ),
        (
            "data record of the wrong size",
            |c, e| {
                let small = zstd::bulk::compress(&vec![1u8; 8192], 3).unwrap();
                let (off, len, _) = c.append(RecordKind::Data, 3, 1, 8192, &small);
                e[3] = MapEntry {
                    kind: EntryKind::Data,
                    off,
                    len,
                    birth: 1,
                };
            },
            Want::Damaged(&[3]),
        ),
        (
            "data record longer than a block",
            |c, e| {
                e[3] = c.data(3, &vec![1u8; 8192]);
            },
            Want::Refused(ErrorKind::Corrupt),
        ),
        (
            "zstd bomb data record",
            |c, e| {
                let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
                let (off, len, _) = c.append(RecordKind::Data, 3, 1, 4096, &bomb);
                e[3] = MapEntry {
                    kind: EntryKind::Data,
                    off,
                    len,
                    birth: 1,
                };
            },
            Want::Damaged(&[3]),
        ),
        (
            "zstd payload decoding short",
            |c, e| {
                let short = zstd::bulk::compress(&[9u8; 100], 3).unwrap();
                let (off, len, _) = c.append(RecordKind::Data, 3, 1, 4096, &short);
                e[3] = MapEntry {
                    kind: EntryKind::Data,
                    off,
                    len,
                    birth: 1,
                };
            },
            Want::Damaged(&[3]),
        ),
        (
            "raw payload with a zstd codec byte",
            |c, e| {
                let (off, len, _) = c.append(RecordKind::Data, 3, 1, 4096, &block_bytes(3));
                e[3] = MapEntry {
                    kind: EntryKind::Data,
                    off,
                    len,
                    birth: 1,
                };
            },
            Want::Damaged(&[3]),
        ),
    ];
    for (name, edit, want) in cases {
        let (mut c, mut e) = base();
        edit(&mut c, &mut e);
        let (_, bytes) = finish(c, &e, |_| {});
        expect_case(name, bytes, base_expect(), want);
    }
}

/// An image whose leaf 0 has, for block 0, an entry word of kind `kind`.
fn leaf_with_raw_kind(kind: u64) -> Vec<u8> {
    let (mut c, e) = base();
    let mut raw = encode_leaf(&e);
    let word = u64::from_le_bytes(raw[..8].try_into().unwrap());
    let word = (word & ((1 << 56) - 1)) | kind << 56;
    raw[..8].copy_from_slice(&word.to_le_bytes());
    let (off, len, crc) = c.append(RecordKind::Leaf, 0, 0, raw.len() as u32, &raw);
    let ip = c.index(&[LeafPtr {
        leaf: 0,
        off,
        len,
        crc,
    }]);
    let sb = c.superblock(ip);
    c.put_superblock(&sb);
    c.bytes
}

#[test]
fn unknown_entry_kind_is_refused() {
    expect_case(
        "entry of kind 7",
        leaf_with_raw_kind(7),
        base_expect(),
        Want::Refused(ErrorKind::Corrupt),
    );
    expect_case(
        "entry of kind 255",
        leaf_with_raw_kind(255),
        base_expect(),
        Want::Refused(ErrorKind::Corrupt),
    );
}

#[test]
fn index_and_leaves_that_lie() {
    type Build = fn(&mut Craft, &[MapEntry]) -> RecPtr;
    let cases: Vec<(&str, Build)> = vec![
        ("leaf number beyond the disk", |c, e| {
            let mut lp = c.leaf(0, e);
            lp.leaf = 5;
            c.index(&[lp])
        }),
        ("leaves out of order", |c, e| {
            let a = c.leaf(1, &vec![MapEntry::default(); 1024]);
            let b = c.leaf(0, e);
            c.index(&[a, b])
        }),
        ("the same leaf twice", |c, e| {
            let a = c.leaf(0, e);
            c.index(&[a, a])
        }),
        ("index pointing at the wrong leaf number", |c, e| {
            let mut lp = c.leaf(0, e);
            lp.leaf = 1;
            c.index(&[lp])
        }),
        ("index pointing at a data record", |c, e| {
            let mut lp = c.leaf(0, e);
            lp.off = LOG_START;
            c.index(&[lp])
        }),
        ("leaf pointer past EOF", |c, e| {
            let mut lp = c.leaf(0, e);
            lp.off = 1 << 30;
            c.index(&[lp])
        }),
        ("leaf pointer of 4 GiB", |c, e| {
            let mut lp = c.leaf(0, e);
            lp.len = u32::MAX;
            c.index(&[lp])
        }),
        ("index count without entries", |c, e| {
            let lp = c.leaf(0, e);
            let raw = encode_index(&[lp]);
            let (off, len, crc) = c.append(RecordKind::Index, 1000, 0, raw.len() as u32, &raw);
            RecPtr { off, len, crc }
        }),
        ("index count 2^40", |c, e| {
            let lp = c.leaf(0, e);
            let raw = encode_index(&[lp]);
            let (off, len, crc) = c.append(RecordKind::Index, 1 << 40, 0, raw.len() as u32, &raw);
            RecPtr { off, len, crc }
        }),
        ("index of 23 bytes", |c, _| {
            let (off, len, crc) = c.append(RecordKind::Index, 1, 0, 23, &[0u8; 23]);
            RecPtr { off, len, crc }
        }),
        ("index record of kind leaf", |c, e| {
            let lp = c.leaf(0, e);
            RecPtr {
                off: lp.off,
                len: lp.len,
                crc: lp.crc,
            }
        }),
        ("leaf of the wrong raw length", |c, e| {
            let raw = encode_leaf(e);
            let (off, len, crc) = c.append(RecordKind::Leaf, 0, 0, 100, &raw[..100]);
            c.index(&[LeafPtr {
                leaf: 0,
                off,
                len,
                crc,
            }])
        }),
        ("zstd bomb leaf", |c, _| {
            let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
            let (off, len, crc) = c.append(RecordKind::Leaf, 0, 1, 16384, &bomb);
            c.index(&[LeafPtr {
                leaf: 0,
                off,
                len,
                crc,
            }])
        }),
        ("zstd bomb index", |c, _| {
            let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
            let (off, len, crc) = c.append(RecordKind::Index, 1, 1, 24, &bomb);
            RecPtr { off, len, crc }
        }),
    ];
    for (name, build) in cases {
        let (mut c, e) = base();
        let ip = build(&mut c, &e);
        let sb = c.superblock(ip);
        c.put_superblock(&sb);
        expect_case(
            name,
            c.bytes,
            base_expect(),
            Want::Refused(ErrorKind::Corrupt),
        );
    }
}

#[test]
fn roll_forward_records_that_lie() {
    // Records after the superblock's log start, in its epoch and lsn order,
    // are replayed at open; ones that are valid but impossible refuse the open.
    type Tail = fn(&mut Craft);
    let refused: Vec<(&str, Tail)> = vec![
        ("data for a block beyond the disk", |c| {
            c.append(RecordKind::Data, 5000, 0, 4096, &[1u8; 4096]);
        }),
        ("data with raw length 8192", |c| {
            c.append(RecordKind::Data, 2, 0, 8192, &[1u8; 4096]);
        }),
        ("data with a payload over a block", |c| {
            c.append(RecordKind::Data, 2, 0, 4096, &[1u8; 8192]);
        }),
        ("zero run that wraps around", |c| {
            let mut p = (u64::MAX - 1).to_le_bytes().to_vec();
            p.extend_from_slice(&5u64.to_le_bytes());
            c.append(RecordKind::Zero, 0, 0, 0, &p);
        }),
        ("zero run past the disk", |c| {
            let mut p = 2000u64.to_le_bytes().to_vec();
            p.extend_from_slice(&100u64.to_le_bytes());
            c.append(RecordKind::Zero, 0, 0, 0, &p);
        }),
        ("zero run of 0 blocks", |c| {
            let mut p = 1u64.to_le_bytes().to_vec();
            p.extend_from_slice(&0u64.to_le_bytes());
            c.append(RecordKind::Zero, 0, 0, 0, &p);
        }),
        ("zero record of 15 bytes", |c| {
            c.append(RecordKind::Zero, 0, 0, 0, &[0u8; 15]);
        }),
    ];
    for (name, tail) in refused {
        let (c, e) = base();
        let (mut c, _) = finish(c, &e, |_| {});
        tail(&mut c);
        expect_case(
            name,
            c.bytes,
            base_expect(),
            Want::Refused(ErrorKind::Corrupt),
        );
    }

    // Replayed: a valid record for block 2 and a zero run over block 1.
    let (c, e) = base();
    let (mut c, _) = finish(c, &e, |_| {});
    c.data(2, &block_bytes(2));
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&1u64.to_le_bytes());
    c.append(RecordKind::Zero, 1, 0, 0, &p);
    let mut want = (*base_expect().content).clone();
    want[2 * 4096..3 * 4096].copy_from_slice(&block_bytes(2));
    want[4096..2 * 4096].fill(0);
    expect_case(
        "valid roll-forward",
        c.bytes,
        Expect {
            content: Arc::new(want),
        },
        Want::Damaged(&[]),
    );

    // Ignored (end of log): another epoch, an lsn gap, a birth past 32 bits.
    type Stop = fn(&mut Craft);
    let stops: Vec<(&str, Stop)> = vec![
        ("another epoch", |c| {
            let lsn = c.lsn;
            c.record(
                RecordKind::Data,
                2,
                0,
                4096,
                &block_bytes(2),
                1,
                EPOCH + 1,
                lsn,
            );
        }),
        ("an lsn gap", |c| {
            let lsn = c.lsn + 1;
            c.record(RecordKind::Data, 2, 0, 4096, &block_bytes(2), 1, EPOCH, lsn);
        }),
        // Regression: roll-forward took the largest birth of any record and
        // added one (overflow for u64::MAX); births are now 32-bit on decode.
        ("a leaf record with birth u64::MAX", |c| {
            let lsn = c.lsn;
            let raw = encode_leaf(&vec![MapEntry::default(); 1024]);
            c.record(
                RecordKind::Leaf,
                0,
                0,
                raw.len() as u32,
                &raw,
                u64::MAX,
                EPOCH,
                lsn,
            );
        }),
    ];
    for (name, tail) in stops {
        let (c, e) = base();
        let (mut c, _) = finish(c, &e, |_| {});
        tail(&mut c);
        expect_case(name, c.bytes, base_expect(), Want::Damaged(&[]));
    }
}

#[test]
fn newer_superblock_over_a_broken_index_is_refused_not_rolled_back() {
    // Slot 1 holds a newer superblock whose index is damaged; slot 0 an older
    // valid one. The open is refused rather than silently going back in time.
    let (c, e) = base();
    let (mut c, _) = finish(c, &e, |_| {});
    let lp = c.leaf(0, &e);
    let mut ip = c.index(&[lp]);
    ip.crc ^= 0xFFFF;
    let mut sb = c.superblock(ip);
    sb.seq = 3;
    c.put_superblock(&sb);
    expect_case(
        "broken newer index",
        c.bytes,
        base_expect(),
        Want::Refused(ErrorKind::Corrupt),
    );
}

#[test]
fn counters_near_their_limits_open_read_only_only() {
    // Regression (found by the fuzzer): a superblock with seq = 2^62 passed
    // decode; a read-write session then wrote seq 2^62 + 2, which decode
    // refuses, so an image closed cleanly no longer opened. Such images
    // (only hostile ones get there) now open read-only only.
    type Edit = fn(&mut Superblock);
    let cases: Vec<(&str, Edit)> = vec![
        ("seq 2^62", |sb| sb.seq = 1 << 62),
        ("lsn 2^62", |sb| sb.log_start_lsn = 1 << 62),
        ("gen u32::MAX - 1", |sb| sb.gen = u64::from(u32::MAX) - 1),
    ];
    for (name, edit) in cases {
        let (c, e) = base();
        let (_, bytes) = finish(c, &e, edit);
        bounded(name, 20, move || {
            let img =
                Image::open_on(Arc::new(MemStore::from_bytes(bytes.clone())), &opts(true)).unwrap();
            verify_blocks(&img, &base_expect(), &BTreeSet::new(), name);
            let err = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &opts(false))
                .err()
                .unwrap_or_else(|| panic!("{name}: opened read-write"));
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        });
    }
    // The same through a roll-forward record born at generation u32::MAX.
    let (c, e) = base();
    let (mut c, _) = finish(c, &e, |_| {});
    let lsn = c.lsn;
    c.record(
        RecordKind::Data,
        2,
        0,
        4096,
        &block_bytes(2),
        u64::from(u32::MAX),
        EPOCH,
        lsn,
    );
    let bytes = c.bytes;
    let err = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &opts(false))
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

/// An unclean image (kill -9 after two flushes) whose log, since the last
/// checkpoint, holds block 1's record and then block 0's, each flushed.
fn two_flushed_records() -> (Vec<u8>, Found, Vec<u8>) {
    let store = Arc::new(MemStore::new());
    let create = CreateOptions {
        size: SMALL,
        block_size: BS,
        codec: Codec::None,
    };
    let img = Image::create_on(store.clone(), &create, &opts(false)).unwrap();
    img.write_at(&random_bytes(4096, 1), 0).unwrap();
    img.close().unwrap();
    let img = Image::open_on(store.clone(), &opts(false)).unwrap();
    img.write_at(&random_bytes(4096, 2), 4096).unwrap();
    img.flush().unwrap();
    let c = random_bytes(4096, 3);
    img.write_at(&c, 0).unwrap();
    img.flush().unwrap();
    // kill -9: the host holds everything written so far.
    let bytes = store.to_bytes();
    drop(img);
    let rec = records(&bytes)
        .into_iter()
        .rev()
        .find(|r| r.header.kind == RecordKind::Data && r.header.key == 1)
        .unwrap();
    (bytes, rec, c)
}

#[test]
fn damaged_synced_log_record_reads_as_an_error_and_later_writes_survive() {
    // Found by the fuzzer: roll-forward stopped at the first record that did
    // not read back, so damage to one flushed record silently dropped every
    // later flushed record (their blocks read older values). Records now say
    // how far the log was synced; block 0's record proves block 1's was.
    let (mut bytes, rec, c) = two_flushed_records();
    bytes[(rec.off + 100) as usize] ^= 0x10; // in the payload
    let mut buf = vec![0u8; 4096];
    for read_only in [true, false] {
        let store = Arc::new(MemStore::from_bytes(bytes.clone()));
        let img = Image::open_on(store.clone(), &opts(read_only)).unwrap();
        let notes = img.recovery_notes();
        assert!(
            notes.len() == 1 && notes[0].contains(&format!("record at {}", rec.off)),
            "{notes:?}"
        );
        let err = img.read_at(&mut buf, 4096).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Corrupt,
            "block 1 must read as an error"
        );
        img.read_at(&mut buf, 0).unwrap();
        assert!(
            buf == c,
            "block 0 was flushed after block 1: its last value"
        );
        if read_only {
            continue;
        }
        // The recovery checkpoint kept both facts.
        img.close().unwrap();
        let img = Image::open_on(store, &opts(false)).unwrap();
        assert!(img.read_at(&mut buf, 4096).is_err());
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf == c);
        let report = img.check().unwrap();
        assert_eq!(report.bad.len(), 1, "{report:?}");
        assert_eq!(report.bad[0].block, 1, "{report:?}");
    }
}

#[test]
fn damaged_synced_log_record_that_says_nothing_fails_the_open_unless_salvaged() {
    // A synced record whose header is damaged cannot say which block it
    // held: replaying the records after it could leave that block at an
    // older value, so the open fails (never wrong data) — unless the admin
    // asks for salvage (`vbdfs check --repair`), which replays every record
    // that can be read and drops the damaged one.
    let (mut bytes, rec, c) = two_flushed_records();
    bytes[rec.off as usize] ^= 0x01; // the magic
    for read_only in [true, false] {
        let store = Arc::new(MemStore::from_bytes(bytes.clone()));
        let err = Image::open_on(store, &opts(read_only)).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let text = err.to_string();
        assert!(text.contains("the log is damaged"), "{text}");
        assert!(text.contains(&rec.off.to_string()), "{text}");
        assert!(text.contains("check --repair"), "{text}");
    }
    let store = Arc::new(MemStore::from_bytes(bytes));
    let salvage = OpenOptions {
        salvage_log: true,
        ..opts(false)
    };
    let img = Image::open_on(store.clone(), &salvage).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == c, "block 0's later record is replayed");
    img.read_at(&mut buf, 4096).unwrap();
    assert!(
        buf == [0; 4096],
        "block 1's record is lost: its older value"
    );
    img.close().unwrap();
    // Salvaged and checkpointed: an ordinary open from now on.
    let img = Image::open_on(store, &opts(false)).unwrap();
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == c);
    assert!(img.check().unwrap().is_ok());
}

#[test]
fn check_repair_salvages_a_log_that_refuses_the_open() {
    let (mut bytes, rec, _) = two_flushed_records();
    bytes[rec.off as usize] ^= 0x01;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vbd");
    std::fs::write(&path, &bytes).unwrap();
    let vbdfs = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vbdfs"))
            .args(args)
            .output()
            .unwrap()
    };
    let p = path.to_str().unwrap();
    let out = vbdfs(&["check", p]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("the log is damaged"), "{err}");
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    let out = vbdfs(&["check", "--repair", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("log: salvage") && text.contains("dropped log records"),
        "the repair says what it dropped: {text}"
    );
    let out = vbdfs(&["check", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_lying_entry_does_not_get_another_blocks_record_reclaimed() {
    // Found by the fuzzer. Block 2's entry (a lie) names block 3's record;
    // a ZERO record in the roll-forward region then unmaps block 2, so the
    // recovery checkpoint of a read-write open counts that record as dead.
    // Block 3 still uses it: reclaim must punch only records that belong to
    // the block they died for (it checks the header's key and birth of
    // entries loaded from the image), or block 3 would read as damaged.
    let mut c = Craft::new();
    let mut e = vec![MapEntry::default(); 1024];
    // Block 3's record starts on a host page, so it holds whole pages that
    // reclaim can punch.
    let page = c.bytes.len().div_ceil(4096) * 4096;
    c.bytes.resize(page, 0);
    e[3] = c.data(3, &block_bytes(3));
    e[2] = e[3];
    let (mut c, _) = finish(c, &e, |_| {});
    let mut p = 2u64.to_le_bytes().to_vec();
    p.extend_from_slice(&1u64.to_le_bytes());
    c.append(RecordKind::Zero, 2, 0, 0, &p);
    let store = Arc::new(MemStore::from_bytes(c.bytes));
    let img = Image::open_on(store.clone(), &opts(false)).unwrap();
    img.close().unwrap();
    let img = Image::open_on(store, &opts(true)).unwrap();
    let mut buf = vec![0u8; BS as usize];
    img.read_at(&mut buf, 3 * BS)
        .unwrap_or_else(|e| panic!("block 3 was readable before the read-write open: {e}"));
    assert!(buf == block_bytes(3));
}

#[test]
fn encrypted_damaged_synced_record_fails_the_open_and_salvage_replays_the_rest() {
    // An encrypted DATA record keeps its block number inside the sealed
    // payload: once damaged, what it held is unknown, so it cannot be
    // stepped over like a plain one.
    use vbdfs::crypto::{KdfParams, KeyMaterial};
    let key = KeyMaterial::from_bytes(b"corrupt test key")
        .unwrap()
        .with_kdf(KdfParams::insecure_for_tests());
    let store = Arc::new(MemStore::new());
    let create = CreateOptions {
        size: SMALL,
        block_size: BS,
        codec: Codec::None,
    };
    let img = Image::create_on_encrypted(store.clone(), &create, &opts(false), &key).unwrap();
    img.write_at(&random_bytes(4096, 1), 0).unwrap();
    img.close().unwrap();
    let img = Image::open_on_with_key(store.clone(), &opts(false), Some(&key)).unwrap();
    img.write_at(&random_bytes(4096, 2), 4096).unwrap();
    img.flush().unwrap();
    let c = random_bytes(4096, 3);
    img.write_at(&c, 0).unwrap();
    img.flush().unwrap();
    let mut bytes = store.to_bytes();
    drop(img);
    // The last two DATA records: block 1's, then block 0's.
    let data: Vec<Found> = records(&bytes)
        .into_iter()
        .filter(|r| r.header.kind == RecordKind::Data)
        .collect();
    let rec = &data[data.len() - 2];
    bytes[(rec.off + 100) as usize] ^= 0x10;
    let err = Image::open_on_with_key(
        Arc::new(MemStore::from_bytes(bytes.clone())),
        &opts(true),
        Some(&key),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("the log is damaged"), "{err}");
    let salvage = OpenOptions {
        salvage_log: true,
        ..opts(false)
    };
    let img = Image::open_on_with_key(Arc::new(MemStore::from_bytes(bytes)), &salvage, Some(&key))
        .unwrap();
    assert_eq!(img.recovery_notes().len(), 1, "{:?}", img.recovery_notes());
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == c, "the record after the damaged one is replayed");
    img.read_at(&mut buf, 4096).unwrap();
    assert!(buf == [0; 4096], "the dropped block reads its older value");
}
