//! Stable-toolchain fuzz harness for the engine (no cargo-fuzz, no nightly).
//!
//! Two targets:
//! - [`open_target`]: "open arbitrary bytes as an image and use it". Inputs are
//!   engine-made seed images mutated by plain byte mutators (bit flips, magic
//!   numbers, truncation, splices) and by structure-aware ones that re-seal
//!   checksums, so the lies get past the CRCs (superblock fields, record header
//!   fields, map entries re-encoded into a new checkpoint, records appended at
//!   the roll-forward position). Oracle: no panic, no hang, only typed errors;
//!   reads are repeatable; `check()` names exactly the unreadable blocks; and for
//!   inputs whose checksums were not re-sealed, no block ever reads wrong data.
//!   If the image opens read-write, a write + flush + close must reopen with the
//!   write in place and every other block unchanged.
//! - [`crash_target`]: "random operation sequences with injected crashes". The
//!   input drives writes/discards/flushes/checkpoints/snapshot creates and
//!   deletes/compactions/reopens on a `FaultStore`
//!   that crashes at an input-chosen event; every power-loss variant of the
//!   crash (durable only, all, prefixes, random subsets, torn writes) must open
//!   without repair, pass `check()`, and hold in every block its value at the
//!   last successful flush or one written after it; every snapshot whose create
//!   returned must be there with exactly its data, every one whose delete
//!   returned must be gone. Half the inputs get a transient EIO or ENOSPC at
//!   that event instead of a crash: no flush may succeed once the image has
//!   reported the failure, and the store's state must satisfy the same rules.
//!
//! Used by `tests/fuzz.rs`: a short run in `cargo test`, a long one in its
//! ignored test `fuzz_long`; see `docs/testing.md`.
#![allow(dead_code)] // each user takes the parts it needs

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vbdfs::format::{
    align_up, decode_index, encode_index, encode_leaf, EntryKind, LeafPtr, MapEntry, RecPtr,
    RecordHeader, RecordKind, Superblock, LEAF_ENTRIES, LOG_START, RECORD_ALIGN, RECORD_HEADER_LEN,
    SB_SLOT_SIZE,
};
use vbdfs::io::{FaultStore, MemStore};
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

/// Deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[allow(clippy::needless_update)] // future fields keep their defaults
fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        cache_bytes: 256 << 10,
        workers: 1,
        ..OpenOptions::default()
    }
}

fn typed(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Corrupt
            | ErrorKind::Io
            | ErrorKind::Unsupported
            | ErrorKind::Failed
            | ErrorKind::NotFound
            | ErrorKind::NoSpace
    )
}

// ---------------------------------------------------------------------------
// Seeds

/// A seed image and the true contents of its disk.
#[derive(Debug, Clone)]
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
    pub content: Vec<u8>,
    pub block_size: u64,
    /// Closed cleanly: nothing to roll forward, so byte damage anywhere must
    /// show as an error. (In an unclean image, damage to the last records
    /// synced before the crash looks like a torn tail and ends the log there:
    /// a known limitation, see docs/testing.md and format.md §5.)
    pub clean: bool,
    /// Encrypted: records are authenticated, so even lies with re-sealed
    /// checksums must never read as wrong data.
    pub encrypted: bool,
}

/// The key of the encrypted seeds (cheap KDF). Inputs whose superblock says
/// "encrypted" are opened with it.
pub fn fuzz_key() -> vbdfs::crypto::KeyMaterial {
    vbdfs::crypto::KeyMaterial::from_bytes(b"vbdfs fuzz key")
        .expect("key")
        .with_kdf(vbdfs::crypto::KdfParams::insecure_for_tests())
}

fn open_store(store: Arc<MemStore>, read_only: bool) -> vbdfs::Result<Image> {
    // Any input may claim encryption: without a key such an image is refused
    // as Invalid ("needs a key"), then it is opened with the fuzz key.
    match Image::open_on(store.clone(), &opts(read_only)) {
        Err(e) if e.kind() == ErrorKind::Invalid => {
            Image::open_on_with_key(store, &opts(read_only), Some(&fuzz_key()))
        }
        r => r,
    }
}

fn fill(rng: &mut Rng, len: usize) -> Vec<u8> {
    match rng.below(3) {
        0 => rng.bytes(len),
        1 => {
            let b = rng.next() as u8 | 1;
            (0..len).map(|i| b.wrapping_add((i % 7) as u8)).collect()
        }
        _ => {
            let mut v = vec![0; len];
            v[len / 2] = 1;
            v
        }
    }
}

/// Small images made by the engine: 4 KiB and 64 KiB blocks, zstd and none,
/// clean and unclean (copied while open, log not checkpointed), with
/// overwrites and discards, over one or two map leaves.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let configs = [
        (4096u64, Codec::Zstd(1), 48u64, false),
        (4096, Codec::None, 40, true),
        (4096, Codec::Zstd(3), 1030, false),
        (65536, Codec::Zstd(1), 12, true),
        (65536, Codec::None, 6, false),
        // Encrypted (opened with fuzz_key()).
        (4096, Codec::Zstd(1), 40, false),
    ];
    for (i, &(bs, codec, blocks, unclean)) in configs.iter().enumerate() {
        let mut rng = Rng::new(i as u64 + 1);
        let size = blocks * bs - if i % 2 == 0 { 512 } else { 0 };
        let store = Arc::new(MemStore::new());
        let create = CreateOptions {
            size,
            block_size: bs,
            codec,
        };
        let mut content = vec![0u8; size as usize];
        let img = if i == 5 {
            Image::create_on_encrypted(store.clone(), &create, &opts(false), &fuzz_key())
        } else {
            Image::create_on(store.clone(), &create, &opts(false))
        }
        .expect("seed create");
        let write = |img: &Image, content: &mut Vec<u8>, rng: &mut Rng| {
            let len = 1 + rng.below(2 * bs) as usize;
            let len = len.min(size as usize);
            let off = rng.below(size - len as u64 + 1);
            let data = fill(rng, len);
            img.write_at(&data, off).expect("seed write");
            content[off as usize..off as usize + len].copy_from_slice(&data);
        };
        for _ in 0..6 {
            write(&img, &mut content, &mut rng);
        }
        // The last block, and one in the second leaf if there is one.
        let last = vec![0xC3u8; 700];
        img.write_at(&last, size - 700).expect("seed write");
        content[(size - 700) as usize..].copy_from_slice(&last);
        // Two of the seeds carry snapshots (a snapshot table, records that
        // only a snapshot holds).
        if i % 2 == 1 {
            img.snapshot_create("a").expect("seed snapshot");
            img.snapshot_create("b").expect("seed snapshot");
        }
        img.close().expect("seed close");
        let img = open_store(store.clone(), false).expect("seed reopen");
        for _ in 0..3 {
            write(&img, &mut content, &mut rng);
        }
        if i % 2 == 1 {
            img.snapshot_delete("a").expect("seed snapshot delete");
            img.snapshot_create("c").expect("seed snapshot");
        }
        let off = rng.below(size / 2);
        img.discard(off, bs + 100).expect("seed discard");
        content[off as usize..(off + bs + 100) as usize].fill(0);
        write(&img, &mut content, &mut rng);
        img.flush().expect("seed flush");
        let bytes = if unclean {
            let b = store.to_bytes();
            drop(img);
            b
        } else {
            img.close().expect("seed close");
            store.to_bytes()
        };
        out.push(Seed {
            name: format!(
                "bs{bs}-{codec}-{blocks}b-{}{}",
                if unclean { "unclean" } else { "clean" },
                if i == 5 { "-encrypted" } else { "" }
            ),
            bytes,
            content,
            block_size: bs,
            clean: !unclean,
            encrypted: i == 5,
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Parsing helpers for structure-aware mutation

/// A record found by scanning a file.
#[derive(Debug, Clone, Copy)]
pub struct Found {
    pub off: u64,
    pub header: RecordHeader,
}

/// Every record with a valid header and checksum, in file order.
pub fn scan(bytes: &[u8]) -> Vec<Found> {
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
                out.push(Found { off, header: h });
                off = align_up(end, RECORD_ALIGN);
                continue;
            }
        }
        off += RECORD_ALIGN;
    }
    out
}

/// The valid superblock with the highest sequence number, and its slot.
pub fn newest_superblock(bytes: &[u8]) -> Option<(Superblock, u64)> {
    let mut best: Option<(Superblock, u64)> = None;
    for slot in 0..2u64 {
        let at = (slot * SB_SLOT_SIZE) as usize;
        let Some(b) = bytes.get(at..at + SB_SLOT_SIZE as usize) else {
            continue;
        };
        if let Ok(sb) = Superblock::decode(b, slot as u8) {
            if best.as_ref().is_none_or(|(s, _)| sb.seq > s.seq) {
                best = Some((sb, slot));
            }
        }
    }
    best
}

fn put_superblock(bytes: &mut Vec<u8>, sb: &Superblock, slot: u64) {
    let at = (slot * SB_SLOT_SIZE) as usize;
    if bytes.len() < at + SB_SLOT_SIZE as usize {
        bytes.resize(at + SB_SLOT_SIZE as usize, 0);
    }
    bytes[at..at + SB_SLOT_SIZE as usize].copy_from_slice(&sb.encode(slot as u8));
}

/// Appends a record at the (16-aligned) end of `bytes`; returns its pointer.
fn append_record(bytes: &mut Vec<u8>, mut h: RecordHeader, payload: &[u8]) -> RecPtr {
    let off = align_up(bytes.len() as u64, RECORD_ALIGN);
    bytes.resize(off as usize, 0);
    h.self_off = off;
    h.payload_len = payload.len() as u32;
    let enc = h.encode(payload);
    bytes.extend_from_slice(&enc);
    RecPtr {
        off,
        len: h.total_len() as u32,
        crc: h.crc,
    }
}

/// Where roll-forward would stop for `sb`, and the lsn it would expect next.
fn roll_forward_end(bytes: &[u8], sb: &Superblock) -> (u64, u64) {
    let (mut off, mut lsn) = (sb.log_start_off, sb.log_start_lsn);
    loop {
        let at = off as usize;
        let Some(head) = bytes.get(at..) else {
            return (off, lsn);
        };
        let Ok(h) = RecordHeader::decode(head, off) else {
            return (off, lsn);
        };
        let end = off + h.total_len();
        if end > bytes.len() as u64
            || h.verify(head, &bytes[at + RECORD_HEADER_LEN..end as usize])
                .is_err()
            || h.epoch != sb.log_epoch
            || h.lsn != lsn
        {
            return (off, lsn);
        }
        off = align_up(end, RECORD_ALIGN);
        lsn += 1;
    }
}

fn interesting_u64(rng: &mut Rng, len: u64) -> u64 {
    let vals = [
        0,
        1,
        2,
        15,
        16,
        63,
        64,
        511,
        512,
        4095,
        4096,
        65535,
        65536,
        len,
        len.wrapping_sub(1),
        len + 1,
        len + 4096,
        1 << 31,
        (1 << 32) - 1,
        1 << 32,
        (1 << 56) - 1,
        1 << 56,
        1 << 62,
        u64::MAX,
        u64::MAX - 1,
        i64::MAX as u64,
    ];
    if rng.chance(4) {
        rng.next()
    } else {
        vals[rng.below(vals.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------
// Mutators

/// How an input was made: whether its checksums can still be trusted to
/// catch the damage (then wrong data is a bug), and what was done.
#[derive(Debug, Clone)]
pub struct Mutated {
    pub bytes: Vec<u8>,
    pub resealed: bool,
    pub steps: Vec<String>,
}

fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>, steps: &mut Vec<String>) {
    let len = b.len() as u64;
    match rng.below(8) {
        0 | 1 if len > 0 => {
            let n = 1 + rng.below(4);
            for _ in 0..n {
                let p = rng.below(len) as usize;
                b[p] ^= 1 << rng.below(8);
            }
            steps.push(format!("flip {n} bits"));
        }
        2 if len > 0 => {
            let p = rng.below(len) as usize;
            b[p] = [0u8, 0xFF, 0x7F, 0x80, 1][rng.below(5) as usize];
            steps.push(format!("set byte {p}"));
        }
        3 if len >= 8 => {
            let p = (rng.below(len / 8) * 8) as usize;
            let v = interesting_u64(rng, len);
            if rng.chance(2) {
                b[p..p + 8].copy_from_slice(&v.to_le_bytes());
            } else {
                b[p..p + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
            steps.push(format!("word at {p} = {v:#x}"));
        }
        4 => {
            let cut = if rng.chance(2) {
                rng.below(len + 1)
            } else {
                (rng.below(len / 4096 + 1)) * 4096
            };
            b.truncate(cut as usize);
            steps.push(format!("truncate to {cut}"));
        }
        5 => {
            let n = rng.below(70_000) as usize;
            let tail = if rng.chance(2) {
                vec![0; n]
            } else {
                rng.bytes(n)
            };
            b.extend_from_slice(&tail);
            steps.push(format!("append {n}"));
        }
        6 if len > 16 => {
            let n = 1 + rng.below(len.min(8192));
            let from = rng.below(len - n + 1) as usize;
            let to = rng.below(len - n + 1) as usize;
            let chunk = b[from..from + n as usize].to_vec();
            b[to..to + n as usize].copy_from_slice(&chunk);
            steps.push(format!("copy {n} from {from} to {to}"));
        }
        _ if len > 0 => {
            let p = rng.below(len) as usize;
            let n = (1 + rng.below(64) as usize).min(b.len() - p);
            let noise = rng.bytes(n);
            b[p..p + n].copy_from_slice(&noise);
            steps.push(format!("noise {n} at {p}"));
        }
        _ => {}
    }
}

/// Lies that get past the checksums: re-sealed superblock fields, record
/// header fields and payloads, map entries, roll-forward records.
fn mutate_sealed(rng: &mut Rng, b: &mut Vec<u8>, steps: &mut Vec<String>) {
    let Some((mut sb, slot)) = newest_superblock(b) else {
        return;
    };
    let len = b.len() as u64;
    match rng.below(5) {
        0 => {
            // A superblock field.
            let v = interesting_u64(rng, len);
            let field = rng.below(12);
            match field {
                0 => sb.seq = v,
                1 => sb.gen = v,
                2 => sb.virtual_size = v,
                3 => sb.log_start_off = v,
                4 => sb.log_start_lsn = v,
                5 => sb.log_epoch = v,
                6 => sb.index.off = v,
                7 => sb.index.len = v as u32,
                8 => sb.snap_table.off = v,
                9 => sb.config.off = v,
                10 => sb.block_shift = v as u8,
                _ => sb.flags = v as u32,
            }
            put_superblock(b, &sb, slot);
            steps.push(format!("superblock field {field} = {v:#x}"));
        }
        1 => {
            // A record header field or payload byte, re-sealed in place.
            let recs = scan(b);
            if recs.is_empty() {
                return;
            }
            let r = recs[rng.below(recs.len() as u64) as usize];
            let at = r.off as usize;
            let end = at + r.header.total_len() as usize;
            let mut payload = b[at + RECORD_HEADER_LEN..end].to_vec();
            let mut h = r.header;
            let v = interesting_u64(rng, len);
            let field = rng.below(8);
            match field {
                0 => h.key = v,
                1 => h.birth = v,
                2 => h.raw_len = v as u32,
                3 => h.lsn = v,
                4 => h.codec = v as u8,
                5 => {
                    h.kind = [
                        RecordKind::Data,
                        RecordKind::Zero,
                        RecordKind::Leaf,
                        RecordKind::Index,
                        RecordKind::SnapTable,
                    ][rng.below(5) as usize]
                }
                _ if !payload.is_empty() => {
                    let p = rng.below(payload.len() as u64) as usize;
                    payload[p] ^= 1 << rng.below(8);
                }
                _ => {}
            }
            let enc = h.encode(&payload);
            b[at..at + enc.len().min(end - at)].copy_from_slice(&enc[..enc.len().min(end - at)]);
            // The pointer to this record (if any) still holds the old crc:
            // fix the superblock's index pointer when the index was hit.
            if sb.index.off == r.off {
                sb.index.crc = h.crc;
                put_superblock(b, &sb, slot);
            }
            steps.push(format!("record at {} field {field} = {v:#x}", r.off));
        }
        2 | 3 => {
            // A new checkpoint whose map lies: a leaf entry changed, then the
            // leaf, the index and the superblock re-sealed around it.
            let Some(map) = read_map(b, &sb) else {
                return;
            };
            let (mut leaves, _) = map;
            if leaves.is_empty() {
                leaves.insert(0, vec![MapEntry::default(); LEAF_ENTRIES as usize]);
            }
            let keys: Vec<u64> = leaves.keys().copied().collect();
            let leaf_no = keys[rng.below(keys.len() as u64) as usize];
            let entries = leaves.get_mut(&leaf_no).expect("leaf");
            let i = rng.below(LEAF_ENTRIES) as usize;
            let recs = scan(b);
            let what = match rng.below(6) {
                0 if !recs.is_empty() => {
                    // Point at some record, whole.
                    let r = recs[rng.below(recs.len() as u64) as usize];
                    entries[i] = MapEntry {
                        kind: EntryKind::Data,
                        off: r.off,
                        len: r.header.total_len() as u32,
                        birth: r.header.birth as u32,
                    };
                    "entry -> a record"
                }
                1 => {
                    entries[i].off = interesting_u64(rng, len) & ((1 << 56) - 1);
                    entries[i].kind = EntryKind::Data;
                    "entry offset"
                }
                2 => {
                    entries[i].len = interesting_u64(rng, len) as u32;
                    "entry length"
                }
                3 => {
                    entries[i].birth = rng.next() as u32;
                    "entry birth"
                }
                4 => {
                    entries[i].kind = EntryKind::Zero;
                    entries[i].off = 0;
                    entries[i].len = 0;
                    "entry zero"
                }
                _ => {
                    let j = rng.below(LEAF_ENTRIES) as usize;
                    entries[i] = entries[j];
                    "entry copied"
                }
            };
            let mut ptrs = Vec::new();
            let template = RecordHeader {
                kind: RecordKind::Leaf,
                codec: 0,
                flags: 0,
                payload_len: 0,
                raw_len: 0,
                lsn: 0,
                epoch: 0,
                self_off: 0,
                key: 0,
                birth: u64::from(sb.gen as u32),
                crc: 0,
                synced: 0,
            };
            for (&leaf, entries) in &leaves {
                let raw = encode_leaf(entries);
                let mut h = template;
                h.key = leaf;
                h.raw_len = raw.len() as u32;
                let p = append_record(b, h, &raw);
                ptrs.push(LeafPtr {
                    leaf,
                    off: p.off,
                    len: p.len,
                    crc: p.crc,
                });
            }
            let raw = encode_index(&ptrs);
            let mut h = template;
            h.kind = RecordKind::Index;
            h.key = ptrs.len() as u64;
            h.raw_len = raw.len() as u32;
            let index = append_record(b, h, &raw);
            let mut next = sb.clone();
            next.seq += 1;
            next.index = index;
            next.log_start_off = align_up(b.len() as u64, RECORD_ALIGN);
            next.log_tail = next.log_start_off;
            put_superblock(b, &next, next.seq % 2);
            steps.push(format!("map lie: leaf {leaf_no} entry {i}: {what}"));
        }
        _ => {
            // A record appended where roll-forward continues, in its epoch
            // and lsn order.
            let (end, lsn) = roll_forward_end(b, &sb);
            if end > b.len() as u64 + 4096 {
                return;
            }
            b.truncate(end as usize);
            let bs = 1u64 << sb.block_shift;
            let nblocks = sb.virtual_size.div_ceil(bs);
            let kind =
                [RecordKind::Data, RecordKind::Zero, RecordKind::Leaf][rng.below(3) as usize];
            let key = if rng.chance(2) {
                rng.below(nblocks + 2)
            } else {
                interesting_u64(rng, len)
            };
            let (codec, raw_len, payload) = match kind {
                RecordKind::Zero => {
                    let mut p = key.to_le_bytes().to_vec();
                    p.extend_from_slice(&(1 + rng.below(4)).to_le_bytes());
                    (0u8, 0u32, p)
                }
                _ if rng.chance(2) => (0, bs as u32, rng.bytes(bs as usize)),
                _ => {
                    let n = rng.below(bs * 2) as usize;
                    (
                        rng.below(2) as u8,
                        interesting_u64(rng, bs) as u32,
                        rng.bytes(n),
                    )
                }
            };
            let h = RecordHeader {
                kind,
                codec,
                flags: 0,
                payload_len: 0,
                raw_len,
                lsn,
                epoch: sb.log_epoch,
                self_off: 0,
                key,
                birth: if rng.chance(8) {
                    interesting_u64(rng, len)
                } else {
                    sb.gen + 1
                },
                crc: 0,
                synced: 0,
            };
            append_record(b, h, &payload);
            steps.push(format!("roll-forward {kind:?} key {key:#x}"));
        }
    }
}

/// The head map as leaves (from the newest superblock's index).
type Leaves = BTreeMap<u64, Vec<MapEntry>>;

fn read_map(bytes: &[u8], sb: &Superblock) -> Option<(Leaves, Vec<LeafPtr>)> {
    let mut leaves = BTreeMap::new();
    if sb.index.off == 0 {
        return Some((leaves, Vec::new()));
    }
    let rec = |off: u64, len: u32| -> Option<(RecordHeader, Vec<u8>)> {
        let at = off as usize;
        let end = at.checked_add(len as usize)?;
        let slice = bytes.get(at..end)?;
        let h = RecordHeader::decode(slice, off).ok()?;
        let mut raw = vec![0u8; h.raw_len as usize];
        vbdfs::codec::decode(h.codec, &slice[RECORD_HEADER_LEN..], &mut raw).ok()?;
        Some((h, raw))
    };
    let (_, raw) = rec(sb.index.off, sb.index.len)?;
    let ptrs = decode_index(&raw, 1 << 30).ok()?;
    for p in &ptrs {
        let (_, raw) = rec(p.off, p.len)?;
        let entries = vbdfs::format::decode_leaf(&raw, u64::MAX >> 8, u32::MAX).ok()?;
        leaves.insert(p.leaf, entries);
    }
    Some((leaves, ptrs))
}

/// Makes one input from a seed.
pub fn mutate(rng: &mut Rng, seed: &Seed) -> Mutated {
    let mut bytes = seed.bytes.clone();
    let mut steps = Vec::new();
    let mut resealed = false;
    let n = 1 + rng.below(3);
    for _ in 0..n {
        if rng.chance(2) {
            mutate_sealed(rng, &mut bytes, &mut steps);
            resealed = true;
        } else {
            mutate_bytes(rng, &mut bytes, &mut steps);
        }
    }
    Mutated {
        bytes,
        resealed,
        steps,
    }
}

// ---------------------------------------------------------------------------
// Target 1: open arbitrary bytes and use them

/// Per-block view of an image: Ok(contents) or the error kind.
fn block_view(img: &Image, bs: u64) -> Vec<Result<Vec<u8>, ErrorKind>> {
    let n = img.len().div_ceil(bs);
    // Cap the work on a huge claimed size: the first and last 64 blocks.
    let blocks: Vec<u64> = if n <= 256 {
        (0..n).collect()
    } else {
        (0..64).chain(n - 64..n).collect()
    };
    blocks
        .into_iter()
        .map(|b| {
            let off = b * bs;
            let len = bs.min(img.len() - off) as usize;
            let mut buf = vec![0u8; len];
            match img.read_at(&mut buf, off) {
                Ok(()) => Ok(buf),
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io),
                        "read of block {b} failed with kind {:?}: {e}",
                        e.kind()
                    );
                    Err(e.kind())
                }
            }
        })
        .collect()
}

fn checked_view(img: &Image, truth: Option<&[u8]>) -> Vec<Result<Vec<u8>, ErrorKind>> {
    let bs = img.block_size();
    let view = block_view(img, bs);
    // Repeatable.
    let again = block_view(img, bs);
    assert!(view == again, "two reads of the same image disagree");
    if let Some(truth) = truth {
        if img.len() == truth.len() as u64 && view.len() as u64 == img.len().div_ceil(bs) {
            for (b, r) in view.iter().enumerate() {
                if let Ok(data) = r {
                    let start = b * bs as usize;
                    assert!(
                        data[..] == truth[start..start + data.len()],
                        "block {b} reads WRONG DATA without an error"
                    );
                }
            }
        }
    }
    let report = img.check().expect("check");
    // The head's unreadable blocks; snapshots' damage is reported with the
    // snapshot's name.
    let bad: BTreeSet<u64> = report
        .bad
        .iter()
        .filter(|b| !b.reason.starts_with("snapshot '"))
        .map(|b| b.block)
        .collect();
    // Snapshots: listed ones open and read, or fail with a typed error.
    for s in img.snapshot_list() {
        match img.open_snapshot(&s.name) {
            Ok(reader) => {
                let mut buf = vec![0u8; bs as usize];
                let n = reader.len().div_ceil(bs).min(64);
                for b in 0..n {
                    let len = bs.min(reader.len() - b * bs) as usize;
                    if let Err(e) = reader.read_at(&mut buf[..len], b * bs) {
                        assert!(
                            matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io),
                            "snapshot {} block {b}: read error of kind {:?}: {e}",
                            s.name,
                            e.kind()
                        );
                    }
                }
            }
            Err(e) => assert!(typed(e.kind()), "open snapshot {}: {e}", s.name),
        }
    }
    if view.len() as u64 == img.len().div_ceil(bs) {
        let failed: BTreeSet<u64> = view
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_err())
            .map(|(b, _)| b as u64)
            .collect();
        assert_eq!(
            bad, failed,
            "check() must name exactly the unreadable blocks"
        );
    }
    let _ = img.next_data(0);
    let _ = img.next_hole(0);
    let _ = img.stats();
    view
}

/// Opens `input` read-only and read-write and uses it; panics on a violation.
/// `truth` is the seed's disk when the input's checksums were not re-sealed.
///
/// `lies`: the input went through structure-aware mutations whose checksums
/// were re-sealed (of a plain image). Such a map can make two blocks share one
/// record; a read-write session then reclaims the record as dead for one block
/// while the other still reads it (a known limitation, docs/testing.md), so
/// "read-only and read-write see the same data" and "a session changes only
/// what it writes" are held only without lies.
pub fn open_target(input: &[u8], truth: Option<&[u8]>, rng_seed: u64, lies: bool) {
    let ro = match open_store(Arc::new(MemStore::from_bytes(input.to_vec())), true) {
        Ok(img) => Some(checked_view(&img, truth)),
        Err(e) => {
            assert!(
                typed(e.kind()),
                "open (ro) failed with kind {:?}: {e}",
                e.kind()
            );
            None
        }
    };
    let store = Arc::new(MemStore::from_bytes(input.to_vec()));
    let img = match open_store(store.clone(), false) {
        Ok(img) => img,
        Err(e) => {
            assert!(
                typed(e.kind()),
                "open (rw) failed with kind {:?}: {e}",
                e.kind()
            );
            return;
        }
    };
    let before = checked_view(&img, truth);
    if let (Some(ro), false) = (&ro, lies) {
        assert!(
            *ro == before,
            "read-only and read-write opens see different data"
        );
    }
    // Write something, flush, close, reopen: the write is there and every
    // other block is as it was.
    let mut rng = Rng::new(rng_seed);
    let bs = img.block_size();
    let len = 1 + rng.below(2 * bs).min(img.len() - 1);
    let off = rng.below(img.len() - len + 1);
    let data = rng.bytes(len as usize);
    let wrote = img.write_at(&data, off).and_then(|()| img.flush());
    if let Err(e) = &wrote {
        assert!(
            typed(e.kind()),
            "write failed with kind {:?}: {e}",
            e.kind()
        );
    }
    if let Err(e) = img.close() {
        assert!(
            typed(e.kind()),
            "close failed with kind {:?}: {e}",
            e.kind()
        );
        return;
    }
    if wrote.is_err() {
        return;
    }
    let img = open_store(store, true)
        .unwrap_or_else(|e| panic!("an image closed cleanly does not reopen: {e}"));
    let mut got = vec![0u8; len as usize];
    img.read_at(&mut got, off)
        .unwrap_or_else(|e| panic!("reading back a flushed write: {e}"));
    assert!(got == data, "a flushed write reads back wrong after reopen");
    let after = block_view(&img, bs);
    let first = off / bs;
    let last = (off + len - 1) / bs;
    let n = img.len().div_ceil(bs);
    let index: Vec<u64> = if n <= 256 {
        (0..n).collect()
    } else {
        (0..64).chain(n - 64..n).collect()
    };
    for ((b, was), now) in index.iter().zip(&before).zip(&after) {
        if lies || (first..=last).contains(b) {
            continue;
        }
        assert!(
            was == now,
            "block {b} changed across a session that did not write it ({:?} -> {:?})",
            was.as_ref().map(|_| "data"),
            now.as_ref().map(|_| "data")
        );
    }
}

// ---------------------------------------------------------------------------
// Target 2: operation sequences with injected crashes

/// Runs an input-driven sequence of operations on a FaultStore that crashes
/// at an input-chosen event, then opens every power-loss variant.
pub fn crash_target(input: &[u8]) {
    let mut rng = Rng::new(input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }));
    let mut cur = input.iter().copied();
    let mut byte = |rng: &mut Rng| cur.next().unwrap_or_else(|| rng.next() as u8);
    let bs = [4096u64, 65536][usize::from(byte(&mut rng) & 1)];
    let codec = if byte(&mut rng) & 1 == 0 {
        Codec::None
    } else {
        Codec::Zstd(1)
    };
    let blocks = 4 + u64::from(byte(&mut rng) % 24);
    let size = blocks * bs;
    let store = Arc::new(FaultStore::new());
    let create = CreateOptions {
        size,
        block_size: bs,
        codec,
    };
    let img = Image::create_on(store.clone(), &create, &opts(false)).expect("create on FaultStore");
    let crash_after = store.events() + 1 + u64::from(byte(&mut rng)) * 2;
    // A quarter of the inputs get a transient EIO, a quarter ENOSPC, at that
    // event instead of a crash: the store keeps working, the image must
    // latch (no flush may succeed once the failure is reported) and what is
    // on the disk must still be flushed-or-later everywhere.
    let fault = match byte(&mut rng) % 4 {
        0 => Some(libc::EIO),
        1 => Some(libc::ENOSPC),
        _ => None,
    };
    match fault {
        Some(errno) => store.fail_at(crash_after, errno),
        None => store.crash_at(crash_after),
    }
    let mut model = vec![0u8; size as usize];
    let mut durable = model.clone();
    let mut later: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let touched = |model: &[u8], later: &mut BTreeMap<u64, Vec<Vec<u8>>>, off: u64, len: u64| {
        for b in off / bs..=(off + len - 1) / bs {
            let s = (b * bs) as usize;
            later
                .entry(b)
                .or_default()
                .push(model[s..s + bs as usize].to_vec());
        }
    };
    let mut img = Some(img);
    // Snapshots: name, the disk it holds, and whether it surely exists (its
    // create or delete returned) or may (the call failed in the crash).
    let mut snaps: Vec<(String, Vec<u8>, bool)> = Vec::new();
    let mut deleted: Vec<String> = Vec::new();
    let ops = 4 + byte(&mut rng) % 24;
    for n in 0..ops {
        let Some(im) = img.as_ref() else { break };
        let op = byte(&mut rng) % 13;
        let a = u64::from(byte(&mut rng)) | u64::from(byte(&mut rng)) << 8;
        let c = u64::from(byte(&mut rng)) | u64::from(byte(&mut rng)) << 8;
        match op {
            0..=4 => {
                let len = 1 + (c * 37) % (2 * bs).min(size);
                let off = (a * 4099) % (size - len + 1);
                let data = fill(&mut rng, len as usize);
                // After the crash writes may fail (Failed) or be accepted
                // into the cache and never persisted: either way the new
                // value is one the block may hold.
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                touched(&model, &mut later, off, len);
                if let Err(e) = im.write_at(&data, off) {
                    assert!(typed(e.kind()), "write: {e}");
                }
            }
            5 | 6 => {
                let len = 1 + (c * 101) % (3 * bs).min(size);
                let off = (a * 4099) % (size - len + 1);
                model[off as usize..(off + len) as usize].fill(0);
                touched(&model, &mut later, off, len);
                if let Err(e) = im.discard(off, len) {
                    assert!(typed(e.kind()), "discard: {e}");
                }
            }
            7 => {
                let latched = im.stats().failed.is_some();
                match im.flush() {
                    Ok(()) => {
                        assert!(
                            !latched,
                            "flush succeeded after the image reported a failed host write"
                        );
                        durable.clone_from(&model);
                        later.clear();
                    }
                    Err(e) => assert!(typed(e.kind()), "flush: {e}"),
                }
            }
            8 => {
                if let Err(e) = im.checkpoint() {
                    assert!(typed(e.kind()), "checkpoint: {e}");
                }
            }
            // A snapshot create is durable on return and flushes the head.
            10 => {
                let name = format!("f{n}");
                match im.snapshot_create(&name) {
                    Ok(_) => {
                        snaps.push((name, model.clone(), true));
                        durable.clone_from(&model);
                        later.clear();
                    }
                    Err(e) => {
                        assert!(typed(e.kind()), "snapshot create: {e}");
                        snaps.push((name, model.clone(), false));
                    }
                }
            }
            11 if !snaps.is_empty() => {
                let i = (a as usize) % snaps.len();
                match im.snapshot_delete(&snaps[i].0) {
                    Ok(()) => deleted.push(snaps.remove(i).0),
                    Err(e) => {
                        assert!(typed(e.kind()), "snapshot delete: {e}");
                        snaps[i].2 = false;
                    }
                }
            }
            12 => {
                if let Err(e) = im.compact() {
                    assert!(typed(e.kind()), "compact: {e}");
                }
            }
            11 => {} // no snapshot to delete
            _ => {
                let im = img.take().expect("image");
                match im.close() {
                    Ok(()) => {
                        durable.clone_from(&model);
                        later.clear();
                        match Image::open_on(store.clone(), &opts(false)) {
                            Ok(im) => img = Some(im),
                            Err(e) => assert!(typed(e.kind()), "reopen: {e}"),
                        }
                    }
                    Err(e) => assert!(typed(e.kind()), "close: {e}"),
                }
            }
        }
    }
    drop(img);
    let crash = store.crashed().unwrap_or_else(|| store.crash_now());
    for (name, bytes) in crash.variants(rng.next(), 6) {
        let what = match fault {
            Some(errno) => format!("errno {errno} at event {crash_after}, then variant {name}"),
            None => format!("crash at event {crash_after}, variant {name}"),
        };
        let img = Image::open_on(Arc::new(MemStore::from_bytes(bytes)), &opts(false))
            .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"));
        let mut got = vec![0u8; size as usize];
        img.read_at(&mut got, 0)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        for b in 0..blocks {
            let s = (b * bs) as usize;
            let have = &got[s..s + bs as usize];
            let ok = have == &durable[s..s + bs as usize]
                || later.get(&b).is_some_and(|v| v.iter().any(|x| x == have));
            assert!(
                ok,
                "{what}: block {b} holds neither its last flushed value nor a later one"
            );
        }
        let report = img.check().expect("check");
        assert!(
            report.is_ok(),
            "{what}: check: {:?} {:?}",
            report.bad,
            report.errors
        );
        let have: Vec<String> = img.snapshot_list().into_iter().map(|s| s.name).collect();
        for (name, content, sure) in &snaps {
            if !have.contains(name) {
                assert!(!sure, "{what}: snapshot {name} was created but is gone");
                continue;
            }
            let reader = img
                .open_snapshot(name)
                .unwrap_or_else(|e| panic!("{what}: snapshot {name}: {e}"));
            let mut got = vec![0u8; content.len()];
            reader
                .read_at(&mut got, 0)
                .unwrap_or_else(|e| panic!("{what}: snapshot {name}: read: {e}"));
            assert!(got == *content, "{what}: snapshot {name} holds other data");
        }
        for name in &deleted {
            assert!(
                !have.contains(name),
                "{what}: deleted snapshot {name} is back"
            );
        }
        img.close()
            .unwrap_or_else(|e| panic!("{what}: close after recovery: {e}"));
    }
    if fault.is_some() {
        // The host error is gone (space freed): a reopen works again. (A
        // failure point the sequence did not reach is disarmed.)
        store.fail_at(u64::MAX, 0);
        let img = Image::open_on(store.clone(), &opts(false))
            .unwrap_or_else(|e| panic!("reopen after a transient host error: {e}"));
        let data = fill(&mut rng, bs as usize);
        img.write_at(&data, 0).expect("write after reopen");
        img.flush().expect("flush after reopen");
        img.close().expect("close after reopen");
        let img = Image::open_on(store, &opts(true)).expect("second reopen");
        let mut got = vec![0u8; bs as usize];
        img.read_at(&mut got, 0).expect("read after reopen");
        assert!(
            got == data,
            "a write after recovering from a host error is lost"
        );
    }
}

// ---------------------------------------------------------------------------
// Runner

/// Settings of one fuzzing run.
#[derive(Debug, Clone)]
pub struct Run {
    pub seed: u64,
    /// Stop after this many inputs...
    pub iterations: u64,
    /// ...or this long, whichever comes first.
    pub time: Duration,
    /// One input taking longer than this is a hang.
    pub hang: Duration,
    /// Where failing inputs are written.
    pub out_dir: PathBuf,
}

impl Run {
    /// From `VBDFS_FUZZ_SEED`, `VBDFS_FUZZ_ITERS`, `VBDFS_FUZZ_SECS`,
    /// `VBDFS_FUZZ_OUT`, with the given defaults (no seed: one from the clock).
    pub fn from_env(seed: Option<u64>, iterations: u64, secs: u64) -> Run {
        let get = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Run {
            seed: get("VBDFS_FUZZ_SEED").or(seed).unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            }),
            iterations: get("VBDFS_FUZZ_ITERS").unwrap_or(iterations),
            time: Duration::from_secs(get("VBDFS_FUZZ_SECS").unwrap_or(secs)),
            hang: Duration::from_secs(20),
            out_dir: std::env::var_os("VBDFS_FUZZ_OUT")
                .map_or_else(|| std::env::temp_dir().join("vbdfs-fuzz"), PathBuf::from),
        }
    }
}

/// Counts of a finished run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    pub executions: u64,
    pub opened: u64,
}

/// Keeps the input being executed so a watchdog can save it on a hang.
struct Watch {
    current: Mutex<(Vec<u8>, Instant)>,
    done: AtomicBool,
}

fn save(out_dir: &std::path::Path, target: &str, input: &[u8]) -> PathBuf {
    let _ = std::fs::create_dir_all(out_dir);
    let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = out_dir.join(format!("{target}-{h:016x}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

fn with_watchdog<F: FnMut(&Watch) -> Report>(run: &Run, target: &str, mut body: F) -> Report {
    let watch = Arc::new(Watch {
        current: Mutex::new((Vec::new(), Instant::now())),
        done: AtomicBool::new(false),
    });
    let dog = {
        let watch = watch.clone();
        let (hang, out, target) = (run.hang, run.out_dir.clone(), target.to_string());
        std::thread::spawn(move || {
            while !watch.done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                let cur = watch.current.lock().unwrap_or_else(|e| e.into_inner());
                if cur.1.elapsed() > hang {
                    let path = save(&out, &target, &cur.0);
                    eprintln!(
                        "fuzz {target}: an input ran for over {hang:?} (hang); saved to {}",
                        path.display()
                    );
                    std::process::abort();
                }
            }
        })
    };
    let report = body(&watch);
    watch.done.store(true, Ordering::Release);
    let _ = dog.join();
    report
}

fn execute(watch: &Watch, run: &Run, target: &str, input: &[u8], f: impl FnOnce()) {
    *watch.current.lock().unwrap_or_else(|e| e.into_inner()) = (input.to_vec(), Instant::now());
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let path = save(&run.out_dir, target, input);
        eprintln!(
            "fuzz {target}: failure (run seed {}); input saved to {}; replay it with \
             VBDFS_FUZZ_REPLAY={}",
            run.seed,
            path.display(),
            path.display()
        );
        std::panic::resume_unwind(panic);
    }
}

/// Fuzzes [`open_target`] with mutated seed images.
pub fn fuzz_open(run: &Run) -> Report {
    let seeds = seeds();
    with_watchdog(run, "open", |watch| {
        let mut rng = Rng::new(run.seed);
        let start = Instant::now();
        let mut report = Report::default();
        while report.executions < run.iterations && start.elapsed() < run.time {
            let seed = &seeds[rng.below(seeds.len() as u64) as usize];
            let m = mutate(&mut rng, seed);
            // Wrong data is a bug only where the checksums must catch the
            // damage: a clean seed, nothing re-sealed, and the newest
            // superblock intact (a damaged one makes the image open from
            // the older one, i.e. unclean: see Seed::clean).
            let intact = newest_superblock(&seed.bytes).is_some_and(|(_, slot)| {
                let r = (slot * SB_SLOT_SIZE) as usize..(slot * SB_SLOT_SIZE) as usize + 512;
                m.bytes.get(r.clone()) == seed.bytes.get(r)
            });
            let truth = (seed.clean && intact && (!m.resealed || seed.encrypted))
                .then_some(&seed.content[..]);
            let sub = rng.next();
            let input = m.bytes.clone();
            execute(watch, run, "open", &input, || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    open_target(&m.bytes, truth, sub, m.resealed && !seed.encrypted)
                }));
                if let Err(p) = r {
                    eprintln!(
                        "fuzz open: seed image {}, mutations {:?}",
                        seed.name, m.steps
                    );
                    std::panic::resume_unwind(p);
                }
            });
            report.executions += 1;
        }
        report
    })
}

/// Fuzzes [`crash_target`] with random inputs.
pub fn fuzz_crash(run: &Run) -> Report {
    with_watchdog(run, "crash", |watch| {
        let mut rng = Rng::new(run.seed ^ 0xC2A5);
        let start = Instant::now();
        let mut report = Report::default();
        while report.executions < run.iterations && start.elapsed() < run.time {
            let n = 8 + rng.below(120) as usize;
            let input = rng.bytes(n);
            execute(watch, run, "crash", &input, || crash_target(&input));
            report.executions += 1;
        }
        report
    })
}

/// Replays saved inputs: files named `open-*.bin` go to [`open_target`]
/// (without a truth: only the no-panic/typed-error/consistency oracle),
/// `crash-*.bin` to [`crash_target`].
pub fn replay(path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with("crash-") {
        crash_target(&bytes);
    } else {
        open_target(&bytes, None, 1, true);
    }
}
