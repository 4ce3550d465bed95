//! [`FaultStore`]: a crash and fault simulator for the storage layer.
//!
//! It models a disk with a volatile write cache: every `write_at`, `set_len` and
//! `punch_hole` is *pending* until `sync`, which makes all pending operations
//! durable at once. Each mutating call or sync is an *event*, numbered from 0.
//!
//! - `crash_at(k)`: event `k` does not happen; instead the store freezes a
//!   [`CrashImage`] (the durable bytes plus the pending operations) and fails that
//!   call and every later one with EIO, as a dead machine would.
//! - `fail_at(k, errno)`: event `k` fails with `errno` (EIO, ENOSPC) and the store
//!   keeps working afterwards, as a host with a transient error would. A failed
//!   sync makes nothing durable.
//!
//! A [`CrashImage`] materialises what power loss could leave: nothing pending,
//! everything, any prefix, random subsets (reordering within a flush epoch), and
//! any of those with the last applied write torn at sector granularity.

use super::Store;
use parking_lot::Mutex;
use std::io;

/// One operation not yet made durable.
#[derive(Debug, Clone)]
pub enum PendingOp {
    /// Bytes written at an offset.
    Write { off: u64, data: Vec<u8> },
    /// A length change.
    SetLen(u64),
    /// A punched hole.
    Punch { off: u64, len: u64 },
}

#[derive(Debug, Default)]
struct State {
    current: Vec<u8>,
    /// Holes of `current` (what a host file system would report).
    holes: super::holes::Holes,
    durable: Vec<u8>,
    pending: Vec<PendingOp>,
    events: u64,
    crash_at: Option<u64>,
    crashed: Option<CrashImage>,
    fail_at: Option<(u64, i32)>,
    fail_from: Option<(u64, i32)>,
}

/// A store that keeps writes volatile until sync and injects crashes and errors.
#[derive(Debug, Default)]
pub struct FaultStore {
    state: Mutex<State>,
    /// Upper bound of a pseudo-random delay before each write (µs).
    jitter_us: std::sync::atomic::AtomicU64,
}

/// What a crash left: the durable bytes and the operations still in flight.
#[derive(Debug, Clone)]
pub struct CrashImage {
    durable: Vec<u8>,
    pending: Vec<PendingOp>,
}

fn apply(bytes: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write { off, data } => {
            let start = *off as usize;
            let end = start + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        PendingOp::SetLen(len) => bytes.resize(*len as usize, 0),
        PendingOp::Punch { off, len } => {
            let start = (*off as usize).min(bytes.len());
            let end = (*off + *len).min(bytes.len() as u64) as usize;
            bytes[start..end].fill(0);
        }
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose durable contents are `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let state = State {
            current: bytes.clone(),
            durable: bytes,
            ..State::default()
        };
        FaultStore {
            state: Mutex::new(state),
            jitter_us: Default::default(),
        }
    }

    /// Delays each write by up to `max_us` microseconds (pseudo-random),
    /// before it takes effect: concurrent writers then land out of order.
    pub fn set_jitter(&self, max_us: u64) {
        self.jitter_us
            .store(max_us, std::sync::atomic::Ordering::Relaxed);
    }

    fn jitter(&self, seed: u64) {
        let max = self.jitter_us.load(std::sync::atomic::Ordering::Relaxed);
        if max > 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let mut x = XorShift::new(seed ^ u64::from(now));
            std::thread::sleep(std::time::Duration::from_micros(x.next_u64() % max));
        }
    }

    /// Crash instead of performing event number `k`.
    pub fn crash_at(&self, k: u64) {
        self.state.lock().crash_at = Some(k);
    }

    /// Fail event number `k` with `errno`, then keep working.
    pub fn fail_at(&self, k: u64, errno: i32) {
        self.state.lock().fail_at = Some((k, errno));
    }

    /// Fail every event from number `k` on with `errno` while reads go on
    /// working: a host disk that has filled up.
    pub fn fail_from(&self, k: u64, errno: i32) {
        self.state.lock().fail_from = Some((k, errno));
    }

    /// How many events (mutations and syncs) happened so far.
    pub fn events(&self) -> u64 {
        self.state.lock().events
    }

    /// The crash image, once a crash happened.
    pub fn crashed(&self) -> Option<CrashImage> {
        self.state.lock().crashed.clone()
    }

    /// A crash image of the present moment (durable bytes plus pending ops).
    pub fn crash_now(&self) -> CrashImage {
        let s = self.state.lock();
        CrashImage {
            durable: s.durable.clone(),
            pending: s.pending.clone(),
        }
    }

    /// What a reader sees now (durable plus pending).
    pub fn current(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// Counts one event; returns an error if it is the crash or failure point.
    fn event(s: &mut State) -> io::Result<()> {
        if s.crashed.is_some() {
            return Err(eio());
        }
        let k = s.events;
        s.events += 1;
        if s.crash_at == Some(k) {
            s.crashed = Some(CrashImage {
                durable: s.durable.clone(),
                pending: s.pending.clone(),
            });
            return Err(eio());
        }
        if let Some((at, errno)) = s.fail_at {
            if at == k {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        if let Some((from, errno)) = s.fail_from {
            if k >= from {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    }

    fn mutate(&self, op: PendingOp) -> io::Result<()> {
        let mut s = self.state.lock();
        Self::event(&mut s)?;
        apply(&mut s.current, &op);
        let len = s.current.len() as u64;
        match &op {
            PendingOp::Write { off, data } => s.holes.fill(*off, off + data.len() as u64),
            PendingOp::SetLen(len) => s.holes.truncate(*len),
            PendingOp::Punch { off, len: n } => s.holes.punch(*off, (off + n).min(len)),
        }
        s.pending.push(op);
        Ok(())
    }
}

impl Store for FaultStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let s = self.state.lock();
        if s.crashed.is_some() {
            return Err(eio());
        }
        let start = usize::try_from(off).map_err(|_| eio())?;
        let src = s
            .current
            .get(start..start + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.jitter(off ^ buf.len() as u64 ^ u64::from(buf.first().copied().unwrap_or(0)));
        self.mutate(PendingOp::Write {
            off,
            data: buf.to_vec(),
        })
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        Self::event(&mut s)?;
        let pending = std::mem::take(&mut s.pending);
        for op in &pending {
            apply(&mut s.durable, op);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.state.lock();
        if s.crashed.is_some() {
            return Err(eio());
        }
        Ok(s.current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mutate(PendingOp::SetLen(len))
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.mutate(PendingOp::Punch { off, len })
    }

    fn find_hole(&self, from: u64, to: u64, min_len: u64) -> io::Result<Option<(u64, u64)>> {
        let s = self.state.lock();
        if s.crashed.is_some() {
            return Err(eio());
        }
        Ok(s.holes.find(from, to, min_len))
    }
}

/// A small deterministic generator (xorshift) so crash variants are reproducible.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeded generator (a zero seed is replaced).
    pub fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

impl CrashImage {
    /// The number of operations in flight at the crash.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Durable state plus the pending operations chosen by `keep`, in order.
    pub fn with(&self, keep: impl Fn(usize) -> bool) -> Vec<u8> {
        let mut bytes = self.durable.clone();
        for (i, op) in self.pending.iter().enumerate() {
            if keep(i) {
                apply(&mut bytes, op);
            }
        }
        bytes
    }

    /// Durable state plus the first `n` pending operations, the `n`-th (if it is
    /// a write) torn: each `sector`-sized piece is old or new at random.
    pub fn torn(&self, n: usize, sector: usize, rng: &mut XorShift) -> Vec<u8> {
        let mut bytes = self.with(|i| i < n);
        if let Some(PendingOp::Write { off, data }) = self.pending.get(n) {
            for (i, chunk) in data.chunks(sector).enumerate() {
                let choice = rng.next_u64() % 3;
                let at = *off as usize + i * sector;
                if bytes.len() < at + chunk.len() {
                    bytes.resize(at + chunk.len(), 0);
                }
                match choice {
                    0 => {}
                    1 => bytes[at..at + chunk.len()].copy_from_slice(chunk),
                    _ => bytes[at..at + chunk.len()].fill(0xA5),
                }
            }
        }
        bytes
    }

    /// Every image a power loss could leave, bounded: nothing pending, all,
    /// each prefix (at most `limit`), `limit` random subsets, and torn writes.
    pub fn variants(&self, seed: u64, limit: usize) -> Vec<(String, Vec<u8>)> {
        let n = self.pending.len();
        let mut out = vec![
            ("durable".to_string(), self.with(|_| false)),
            ("all".to_string(), self.with(|_| true)),
        ];
        let step = (n / limit.max(1)).max(1);
        for p in (1..n).step_by(step) {
            out.push((format!("prefix {p}"), self.with(|i| i < p)));
        }
        let mut rng = XorShift::new(seed);
        for r in 0..limit.min(if n > 1 { limit } else { 0 }) {
            let mask: Vec<bool> = (0..n).map(|_| rng.next_u64().is_multiple_of(2)).collect();
            out.push((format!("subset {r}"), self.with(|i| mask[i])));
        }
        for p in (0..n).step_by(step) {
            for sector in [512usize, 4096] {
                out.push((format!("torn {p}/{sector}"), self.torn(p, sector, &mut rng)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_until_sync() {
        let s = FaultStore::new();
        s.write_at(b"abc", 0).unwrap();
        assert_eq!(s.crash_now().with(|_| false), b"");
        s.sync().unwrap();
        s.write_at(b"X", 1).unwrap();
        let img = s.crash_now();
        assert_eq!(img.with(|_| false), b"abc");
        assert_eq!(img.with(|_| true), b"aXc");
    }

    #[test]
    fn crash_freezes_and_fails_everything_after() {
        let s = FaultStore::new();
        s.crash_at(2);
        s.write_at(b"a", 0).unwrap();
        s.sync().unwrap();
        assert!(s.write_at(b"b", 1).is_err());
        assert!(s.sync().is_err());
        let img = s.crashed().unwrap();
        assert_eq!(img.with(|_| true), b"a");
    }

    #[test]
    fn failed_sync_makes_nothing_durable() {
        let s = FaultStore::new();
        s.fail_at(1, libc::EIO);
        s.write_at(b"a", 0).unwrap();
        assert!(s.sync().is_err());
        assert_eq!(s.crash_now().with(|_| false), b"");
        s.sync().unwrap();
        assert_eq!(s.crash_now().with(|_| false), b"a");
    }

    #[test]
    fn torn_write_mixes_sectors() {
        let s = FaultStore::new();
        s.write_at(&vec![1u8; 4096], 0).unwrap();
        let img = s.crash_now();
        let mut rng = XorShift::new(7);
        let torn = img.torn(0, 512, &mut rng);
        assert_eq!(torn.len(), 4096);
        let kinds: std::collections::HashSet<u8> = torn.chunks(512).map(|c| c[0]).collect();
        assert!(
            kinds.len() > 1,
            "a torn write should mix old and new sectors"
        );
    }
}
