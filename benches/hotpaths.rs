//! Micro benchmarks of the engine's hot paths (`cargo bench --bench
//! hotpaths`, harness = false): the per-block work every write-back and every
//! cache miss does, timed in memory (no disk, no FUSE), each as the median of
//! ROUNDS rounds of a fixed number of iterations.
//!
//! - codec: zstd level 1 encode and decode of a 64 KiB block (50 %
//!   compressible, like the e2e benchmark's fio buffers), the zero check;
//! - checksums: crc32c of a 64 KiB payload, and a record header made from a
//!   payload crc (the crc combination done under the log lock);
//! - cache: inserting and filling a block into a full cache (eviction
//!   included), a hit;
//! - request statistics: timing and counting one request (control file);
//! - map + cache through `Image` on an in-memory store: a 4 KiB read of an
//!   unmapped block (cache miss, map lookup), a 4 KiB read of a cached block,
//!   a 4 KiB write into a cached block (copy-on-write of the cached block when
//!   write-back holds it, dirty marking, queueing), a flush with a full cache
//!   and nothing dirty.
//!
//! Environment: ROUNDS (default 5), QUICK=1 (1 round, fewer iterations: the
//! smoke run CI does).
#![allow(clippy::unwrap_used)] // a bench panics on failure like a test

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vbdfs::cache::BlockCache;
use vbdfs::codec;
use vbdfs::control::{Op, RequestStats};
use vbdfs::format::{RecordHeader, RecordKind};
use vbdfs::io::MemStore;
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const BLOCK: usize = 64 << 10;

/// Each 4 KiB: 2 KiB of pseudo-random bytes, 2 KiB of zeros.
fn half_compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            if i % 4096 < 2048 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                0
            }
        })
        .collect()
}

struct Bench {
    rounds: usize,
    scale: u64,
    rows: Vec<(String, String)>,
}

impl Bench {
    /// Times `iters` calls of `f`, ROUNDS times; records the median as ns/op
    /// and, with `bytes` per call, as MB/s.
    fn run(&mut self, name: &str, iters: u64, bytes: usize, mut f: impl FnMut(u64)) {
        let iters = (iters / self.scale).max(1);
        let mut per_op: Vec<Duration> = (0..self.rounds)
            .map(|_| {
                let t = Instant::now();
                for i in 0..iters {
                    f(i);
                }
                t.elapsed() / iters as u32
            })
            .collect();
        per_op.sort();
        let median = per_op[per_op.len() / 2];
        let rate = if bytes > 0 {
            format!("{:.0} MB/s", bytes as f64 / median.as_secs_f64() / 1e6)
        } else {
            "".into()
        };
        self.rows.push((
            name.to_string(),
            format!("{:.2} us | {rate}", median.as_secs_f64() * 1e6),
        ));
    }
}

fn main() {
    // The allocator as the mount daemon configures it (without it, freeing
    // the evicted 64 KiB blocks trims the heap and every new one faults in).
    vbdfs::sys::limit_malloc_retention();
    let quick = std::env::var("QUICK").is_ok_and(|v| v == "1");
    let rounds = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 });
    let mut b = Bench {
        rounds,
        scale: if quick { 20 } else { 1 },
        rows: Vec::new(),
    };

    // Codec.
    let block = half_compressible(BLOCK, 1);
    let (stored, encoded) = codec::encode(&block, Codec::Zstd(1));
    let encoded = encoded.into_owned();
    b.run("zstd:1 encode 64 KiB", 2000, BLOCK, |_| {
        black_box(codec::encode(black_box(&block), Codec::Zstd(1)));
    });
    let mut out = vec![0u8; BLOCK];
    b.run("zstd decode 64 KiB", 4000, BLOCK, |_| {
        codec::decode(stored, black_box(&encoded), &mut out).unwrap();
    });
    let zeros = vec![0u8; BLOCK];
    b.run("zero check 64 KiB (all zero)", 20_000, BLOCK, |_| {
        black_box(codec::is_zero(black_box(&zeros)));
    });

    // Checksums.
    b.run("crc32c 64 KiB", 20_000, BLOCK, |_| {
        black_box(crc32c::crc32c(black_box(&block)));
    });
    let crc = crc32c::crc32c(&block);
    b.run("record header from a payload crc", 200_000, 0, |i| {
        let mut h = RecordHeader {
            kind: RecordKind::Data,
            codec: stored,
            flags: 0,
            payload_len: BLOCK as u32,
            raw_len: BLOCK as u32,
            lsn: i,
            epoch: 7,
            self_off: 65536 + i * 4096,
            key: i,
            birth: 3,
            crc: 0,
            synced: 1,
        };
        black_box(h.encode_header_for(black_box(crc)));
    });

    // Cache.
    let cache = BlockCache::new(64 << 20, BLOCK); // 1024 blocks
    let fill = |blk: u64| {
        let (slot, created) = cache.get_or_insert(blk);
        if created {
            cache.finish_load(&slot, vec![0u8; BLOCK]);
        }
    };
    (0..2048).for_each(|blk| fill(500_000 + blk)); // full: every insert evicts
    b.run("cache insert + fill (evicting)", 20_000, 0, |i| {
        let (slot, created) = cache.get_or_insert(1_000_000 + i);
        if created {
            cache.finish_load(&slot, vec![0u8; BLOCK]);
        }
    });
    (0..512).for_each(fill);
    b.run("cache hit", 1_000_000, 0, |i| {
        black_box(cache.lookup(i % 512));
    });

    // Request statistics: what the FUSE front end adds to every request on
    // `disk` (the clock read at the start and the counting after the reply).
    let stats = RequestStats::default();
    b.run(
        "request statistics: time + count one request",
        2_000_000,
        0,
        |i| {
            let started = Instant::now();
            stats.finish(Op::Read, black_box(started), 4096, i, true);
        },
    );

    // Map + cache through the engine, in memory.
    let create = CreateOptions {
        size: 1 << 30,
        codec: Codec::Zstd(1),
        ..CreateOptions::default()
    };
    let open = OpenOptions {
        cache_bytes: 64 << 20,
        ..OpenOptions::default()
    };
    let img = Image::create_on(Arc::new(MemStore::new()), &create, &open).unwrap();
    let mut buf = vec![0u8; 4096];
    b.run("Image read 4 KiB, unmapped block", 500_000, 4096, |i| {
        img.read_at(&mut buf, (i * 7919 % 16384) * BLOCK as u64)
            .unwrap();
    });
    img.write_at(&half_compressible(16 * BLOCK, 2), 0).unwrap();
    img.flush().unwrap();
    b.run("Image read 4 KiB, cached block", 500_000, 4096, |i| {
        img.read_at(&mut buf, (i % 256) * 4096).unwrap();
    });
    let data = half_compressible(4096, 3);
    b.run("Image write 4 KiB, cached block", 200_000, 4096, |i| {
        img.write_at(&data, (i % 256) * 4096).unwrap();
    });
    // A flush looks only at unwritten blocks, not at every cached one.
    img.write_at(&half_compressible(1024 * BLOCK, 4), 0)
        .unwrap();
    img.flush().unwrap();
    b.run(
        "Image flush, cache full (1,024 blocks), none dirty",
        200_000,
        0,
        |_| {
            img.flush().unwrap();
        },
    );
    img.close().unwrap();

    println!("hot paths: medians of {rounds} round(s)\n");
    println!("| operation | time per op | rate |");
    println!("|---|---|---|");
    for (name, figure) in &b.rows {
        println!("| {name} | {figure} |");
    }
}
