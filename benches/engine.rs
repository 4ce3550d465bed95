//! Engine throughput bench (`cargo bench --bench engine`, harness = false):
//! the same I/O patterns through `vbdfs::Image` (no FUSE) and on a raw file
//! with O_DIRECT pread/pwrite, printed side by side with their ratio.
//!
//! Patterns (each timed, medians over ROUNDS rounds):
//! - seq write 1 MiB over the whole data set, then flush (raw: fdatasync);
//! - seq read 1 MiB over it, cold: the image is reopened (empty engine cache)
//!   and the image file's page cache dropped; the raw file is read O_DIRECT;
//! - 4 KiB random write / read inside the data set for RAND_SECS seconds, with
//!   1 thread (queue depth 1) and with THREADS threads; random writes end
//!   with a flush (raw: fdatasync), random reads start cold as above.
//!
//! The engine cache (CACHE_MB, default 16) is far smaller than the data set
//! (DATA_MB, default 512), so reads and write-back hit the disk. Buffers are
//! 50 % compressible (each 4 KiB: 2 KiB random, 2 KiB zeros), like fio's
//! `buffer_compress_percentage=50` in benches/e2e.sh. Images: `--compress none`
//! and zstd level 1, 64 KiB blocks (the defaults), so 4 KiB writes are a
//! read-modify-write of a block.
//!
//! ENCRYPT=1 instead compares plain images with encrypted ones (XChaCha20-
//! Poly1305 records, `vbdfs::crypto`), for both codecs, as ratios.
//!
//! Environment: DATA_MB, CACHE_MB, ROUNDS (3), RAND_SECS (2), THREADS (4),
//! BENCH_DIR (default target/bench-engine; must be on a real disk, not tmpfs),
//! QUICK=1 (64 MiB, 1 round, 0.5 s: a smoke run).

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vbdfs::crypto::KeyMaterial;
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

const MIB: usize = 1 << 20;
const KIB4: usize = 4096;

struct Config {
    data: u64,
    cache: u64,
    rounds: usize,
    rand: Duration,
    threads: usize,
    dir: PathBuf,
}

fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Config {
    fn from_env() -> Config {
        let quick = std::env::var("QUICK").is_ok_and(|v| v == "1");
        let (d_data, d_rounds, d_rand) = if quick {
            (64.0, 1.0, 0.5)
        } else {
            (512.0, 3.0, 2.0)
        };
        let dir = std::env::var_os("BENCH_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-engine"),
            PathBuf::from,
        );
        Config {
            data: (env_num("DATA_MB", d_data) as u64) << 20,
            cache: (env_num("CACHE_MB", 16.0) as u64) << 20,
            rounds: env_num("ROUNDS", d_rounds).max(1.0) as usize,
            rand: Duration::from_secs_f64(env_num("RAND_SECS", d_rand)),
            threads: env_num("THREADS", 4.0).max(1.0) as usize,
            dir,
        }
    }
}

/// A page-aligned buffer (for O_DIRECT) without unsafe: over-allocate and slice.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + KIB4];
        let off = (KIB4 - buf.as_ptr() as usize % KIB4) % KIB4;
        Aligned { buf, off, len }
    }
    fn get(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// xorshift64*: cheap, deterministic per seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Fills `buf` with 50 % compressible data (per 4 KiB: 2 KiB random, 2 KiB zeros).
fn fill(buf: &mut [u8], rng: &mut Rng) {
    for chunk in buf.chunks_mut(KIB4) {
        let half = chunk.len() / 2;
        for w in chunk[..half].chunks_mut(8) {
            let x = rng.next().to_le_bytes();
            w.copy_from_slice(&x[..w.len()]);
        }
        chunk[half..].fill(0);
    }
}

/// The target of one measurement: the engine, or a raw file with O_DIRECT.
trait Target: Sync {
    fn write(&self, buf: &[u8], off: u64);
    fn read(&self, buf: &mut [u8], off: u64);
    fn sync(&self);
}

struct Raw(File);
impl Target for Raw {
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_all_at(buf, off).expect("raw pwrite");
    }
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_exact_at(buf, off).expect("raw pread");
    }
    fn sync(&self) {
        self.0.sync_data().expect("raw fdatasync");
    }
}

struct Engine(Image);
impl Target for Engine {
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_at(buf, off).expect("engine write_at");
    }
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_at(buf, off).expect("engine read_at");
    }
    fn sync(&self) {
        self.0.flush().expect("engine flush");
    }
}

/// Drops the page cache of one file (GNU dd: POSIX_FADV_DONTNEED on all of it).
fn drop_file_cache(path: &Path) {
    let _ = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status();
}

fn seq_write(t: &dyn Target, data: u64, seed: u64) -> f64 {
    let mut rng = Rng(seed | 1);
    let mut buf = Aligned::new(MIB);
    let start = Instant::now();
    let mut off = 0;
    while off < data {
        fill(buf.get_mut(), &mut rng);
        t.write(buf.get(), off);
        off += MIB as u64;
    }
    t.sync();
    data as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn seq_read(t: &dyn Target, data: u64) -> f64 {
    let mut buf = Aligned::new(MIB);
    let start = Instant::now();
    let mut off = 0;
    while off < data {
        t.read(buf.get_mut(), off);
        off += MIB as u64;
    }
    data as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// 4 KiB random I/O on `threads` threads for `dur`; returns IOPS.
fn rand_io(t: &dyn Target, data: u64, write: bool, threads: usize, dur: Duration) -> f64 {
    let ops = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let blocks = data / KIB4 as u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for i in 0..threads {
            let (ops, stop) = (&ops, &stop);
            s.spawn(move || {
                let mut rng =
                    Rng(0x9E37_79B9 ^ ((i as u64 + 1) << 20) ^ start.elapsed().as_nanos() as u64);
                let mut buf = Aligned::new(KIB4);
                fill(buf.get_mut(), &mut rng);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let off = (rng.next() % blocks) * KIB4 as u64;
                    if write {
                        t.write(buf.get(), off);
                    } else {
                        t.read(buf.get_mut(), off);
                    }
                    n += 1;
                }
                ops.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
    });
    if write {
        t.sync();
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Results of one target: test name -> per-round values.
type Results = Vec<(String, Vec<f64>)>;

fn record(res: &mut Results, name: &str, v: f64) {
    match res.iter_mut().find(|(n, _)| n == name) {
        Some((_, vals)) => vals.push(v),
        None => res.push((name.to_string(), vec![v])),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn open_raw(path: &Path) -> Raw {
    Raw(FsOpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open raw O_DIRECT"))
}

fn run_raw(cfg: &Config, round: usize, res: &mut Results) {
    let path = cfg.dir.join("raw.img");
    let _ = std::fs::remove_file(&path);
    let f = File::create(&path).expect("create raw");
    f.set_len(cfg.data).expect("size raw");
    drop(f);
    let t = open_raw(&path);
    record(res, "seq write 1M", seq_write(&t, cfg.data, round as u64));
    record(res, "seq read 1M", seq_read(&t, cfg.data));
    for threads in [1, cfg.threads] {
        let w = rand_io(&t, cfg.data, true, threads, cfg.rand);
        record(res, &format!("rand write 4k x{threads}"), w);
        let r = rand_io(&t, cfg.data, false, threads, cfg.rand);
        record(res, &format!("rand read 4k x{threads}"), r);
    }
    drop(t);
    let _ = std::fs::remove_file(&path);
}

fn run_engine(cfg: &Config, codec: Codec, round: usize, res: &mut Results) {
    run_engine_keyed(cfg, codec, None, round, res);
}

fn run_engine_keyed(
    cfg: &Config,
    codec: Codec,
    key: Option<&KeyMaterial>,
    round: usize,
    res: &mut Results,
) {
    let path = cfg.dir.join("engine.vbd");
    let _ = std::fs::remove_file(&path);
    let open = OpenOptions {
        cache_bytes: cfg.cache,
        ..OpenOptions::default()
    };
    let create = CreateOptions {
        size: cfg.data,
        codec,
        ..CreateOptions::default()
    };
    let reopen = |img: Image| -> Engine {
        img.close().expect("close");
        drop_file_cache(&path);
        Engine(Image::open_with_key(&path, &open, key).expect("reopen"))
    };
    let t = Engine(match key {
        Some(k) => Image::create_encrypted(&path, &create, &open, k).expect("create image"),
        None => Image::create(&path, &create, &open).expect("create image"),
    });
    record(res, "seq write 1M", seq_write(&t, cfg.data, round as u64));
    let t = reopen(t.0);
    record(res, "seq read 1M", seq_read(&t, cfg.data));
    let mut t = t;
    for threads in [1, cfg.threads] {
        let w = rand_io(&t, cfg.data, true, threads, cfg.rand);
        record(res, &format!("rand write 4k x{threads}"), w);
        t = reopen(t.0);
        let r = rand_io(&t, cfg.data, false, threads, cfg.rand);
        record(res, &format!("rand read 4k x{threads}"), r);
    }
    t.0.close().expect("close");
    let _ = std::fs::remove_file(&path);
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing
    // useful: run only when asked to bench.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("engine bench: run with `cargo bench --bench engine`");
        return;
    }
    let cfg = Config::from_env();
    std::fs::create_dir_all(&cfg.dir).expect("bench dir");
    println!(
        "engine bench: data {} MiB, engine cache {} MiB, {} round(s), random phases {:.1} s, \
         {} threads for the parallel case, dir {}",
        cfg.data >> 20,
        cfg.cache >> 20,
        cfg.rounds,
        cfg.rand.as_secs_f64(),
        cfg.threads,
        cfg.dir.display()
    );
    if std::env::var("ENCRYPT").is_ok_and(|v| v == "1") {
        encryption_bench(&cfg);
        return;
    }
    let (mut raw, mut none, mut zstd) = (Results::new(), Results::new(), Results::new());
    for round in 0..cfg.rounds {
        // rotate the order so that drift of a shared machine is spread out
        for k in 0..3 {
            match (round + k) % 3 {
                0 => run_raw(&cfg, round, &mut raw),
                1 => run_engine(&cfg, Codec::None, round, &mut none),
                _ => run_engine(&cfg, Codec::Zstd(1), round, &mut zstd),
            }
        }
        eprintln!("round {}/{} done", round + 1, cfg.rounds);
    }
    println!();
    println!("| pattern | raw O_DIRECT | engine none | ratio | engine zstd:1 | ratio |");
    println!("|---|---|---|---|---|---|");
    for (name, vals) in &raw {
        let unit = if name.starts_with("seq") {
            "MB/s"
        } else {
            "IOPS"
        };
        let r = median(vals);
        let get = |res: &Results| {
            res.iter()
                .find(|(n, _)| n == name)
                .map_or(f64::NAN, |(_, v)| median(v))
        };
        let (n, z) = (get(&none), get(&zstd));
        println!(
            "| {name} | {r:.0} {unit} | {n:.0} {unit} | {:.2}x | {z:.0} {unit} | {:.2}x |",
            n / r,
            z / r
        );
    }
    println!();
    println!("(medians of {} round(s); ratio = engine / raw)", cfg.rounds);
    let _ = std::fs::remove_dir(&cfg.dir);
}

/// ENCRYPT=1: plain vs encrypted images, both codecs, same patterns.
fn encryption_bench(cfg: &Config) {
    let key = KeyMaterial::from_bytes(b"engine bench passphrase").expect("key");
    seal_cost();
    let mut res: Vec<Results> = (0..4).map(|_| Results::new()).collect();
    let setups = [
        (Codec::None, false),
        (Codec::None, true),
        (Codec::Zstd(1), false),
        (Codec::Zstd(1), true),
    ];
    for round in 0..cfg.rounds {
        for k in 0..4 {
            let i = (round + k) % 4;
            let (codec, enc) = setups[i];
            run_engine_keyed(cfg, codec, enc.then_some(&key), round, &mut res[i]);
        }
        eprintln!("round {}/{} done", round + 1, cfg.rounds);
    }
    println!();
    println!("| pattern | none | none encrypted | ratio | zstd:1 | zstd:1 encrypted | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (name, _) in &res[0] {
        let unit = if name.starts_with("seq") {
            "MB/s"
        } else {
            "IOPS"
        };
        let get = |r: &Results| {
            r.iter()
                .find(|(n, _)| n == name)
                .map_or(f64::NAN, |(_, v)| median(v))
        };
        let v: Vec<f64> = res.iter().map(get).collect();
        println!(
            "| {name} | {:.0} {unit} | {:.0} {unit} | {:.2}x | {:.0} {unit} | {:.0} {unit} | {:.2}x |",
            v[0],
            v[1],
            v[1] / v[0],
            v[2],
            v[3],
            v[3] / v[2]
        );
    }
    println!();
    println!(
        "(medians of {} round(s); ratio = encrypted / plain)",
        cfg.rounds
    );
    let _ = std::fs::remove_dir(&cfg.dir);
}

/// CPU cost of sealing alone (one core): 64 KiB payloads, like a block.
fn seal_cost() {
    let sealer = vbdfs::crypto::Sealer::new(&[7; 32], &[1; 16]);
    let block = vec![0x5au8; 64 << 10];
    let aad = [0u8; 40];
    let n = 4096; // 256 MiB
    let start = Instant::now();
    let mut sealed = Vec::new();
    for i in 0..n {
        sealed = sealer.seal(&aad, i, 1, &block).expect("seal");
    }
    let seal = (n as f64 * block.len() as f64) / start.elapsed().as_secs_f64() / 1e6;
    let start = Instant::now();
    for _ in 0..n {
        sealer.open(&aad, &sealed, 0).expect("open");
    }
    let open = (n as f64 * block.len() as f64) / start.elapsed().as_secs_f64() / 1e6;
    let start = Instant::now();
    let _ = vbdfs::crypto::KdfParams::default();
    let store = vbdfs::io::MemStore::new();
    let k = KeyMaterial::from_bytes(b"x").expect("key");
    vbdfs::crypto::keyslot::create(&store, &k, &[1; 16]).expect("keyslot");
    let kdf = start.elapsed().as_secs_f64() / 2.0; // two slots
    println!(
        "XChaCha20-Poly1305, one core, 64 KiB payloads: seal {seal:.0} MB/s, open {open:.0} MB/s; \
         Argon2id (64 MiB, 3 passes) unlock {:.2} s",
        kdf
    );
}
