//! The copy loop shared by import and export: one thread walks the source's
//! data extents and hands out jobs (block-aligned ranges of at most one
//! chunk); reader threads fill a chunk buffer each, find the all-zero blocks
//! and write only the runs of non-zero blocks. Memory is one chunk per thread
//! plus a short job queue; reads (and the decompression inside them) and
//! writes (and the engine's compression behind them) run on all threads.

use super::progress::Progress;
use crate::{Error, Result};
use crossbeam_channel::bounded;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes per job (rounded up to a multiple of the block size).
pub const CHUNK: u64 = 4 << 20;

/// What to copy and how.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Bytes to cover, `0..len`.
    pub len: u64,
    /// Zero detection and job boundaries use this grid (a power of two).
    pub block: u64,
    /// Reader threads.
    pub threads: usize,
    /// Write all-zero blocks too (a destination that is not known to be zero).
    pub write_zeros: bool,
}

/// Copies every extent from `next_extent(pos)` (the next data range at or
/// after `pos`, or `None`) with `read`, writing non-zero runs with `write`.
pub fn copy<E, R, W>(
    plan: Plan,
    progress: &Progress,
    mut next_extent: E,
    read: R,
    write: W,
) -> Result<()>
where
    E: FnMut(u64) -> Result<Option<(u64, u64)>>,
    R: Fn(&mut [u8], u64) -> Result<()> + Sync,
    W: Fn(&[u8], u64) -> Result<()> + Sync,
{
    let block = plan.block.max(512);
    let chunk = CHUNK.div_ceil(block) * block;
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::SeqCst);
        first_error.lock().get_or_insert(e);
    };
    let (tx, rx) = bounded::<(u64, u64)>(plan.threads.max(1) * 2);
    std::thread::scope(|s| {
        for _ in 0..plan.threads.max(1) {
            let rx = rx.clone();
            let (read, write, fail, failed) = (&read, &write, &fail, &failed);
            s.spawn(move || {
                let mut buf = vec![0u8; chunk as usize];
                for (off, len) in rx {
                    if failed.load(Ordering::SeqCst) {
                        continue;
                    }
                    let Some(data) = buf.get_mut(..len as usize) else {
                        continue;
                    };
                    let r = read(data, off)
                        .and_then(|()| write_runs(data, off, block, plan.write_zeros, write));
                    match r {
                        Ok(()) => progress.inc(len),
                        Err(e) => fail(e),
                    }
                }
            });
        }
        drop(rx);
        let mut pos = 0u64;
        while pos < plan.len && !failed.load(Ordering::SeqCst) {
            let (start, end) = match next_extent(pos) {
                Ok(Some((s, e))) if s < e => (s.max(pos), e.min(plan.len)),
                Ok(_) => break,
                Err(e) => {
                    fail(e);
                    break;
                }
            };
            if start >= end {
                break;
            }
            // Widen to the block grid; the ranges never overlap a sent job.
            let a = (start / block * block).max(pos);
            let b = end.div_ceil(block).saturating_mul(block).min(plan.len);
            progress.inc(a - pos);
            let mut off = a;
            while off < b {
                let len = chunk.min(b - off);
                if tx.send((off, len)).is_err() {
                    break;
                }
                off += len;
            }
            pos = b;
        }
        progress.inc(plan.len.saturating_sub(pos));
        drop(tx);
    });
    match first_error.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// True when every byte of `b` is zero (vectorises well: no early exit per byte).
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Writes the runs of non-zero `block`s of `data` (at guest `off`).
fn write_runs<W>(data: &[u8], off: u64, block: u64, all: bool, write: &W) -> Result<()>
where
    W: Fn(&[u8], u64) -> Result<()>,
{
    if all {
        return write(data, off);
    }
    let mut run: Option<usize> = None;
    let mut at = 0usize;
    // Blocks are measured on the global grid; `off` is block aligned except
    // possibly at the very end of the disk.
    for piece in data.chunks(block as usize) {
        let zero = is_zero(piece);
        match (zero, run) {
            (false, None) => run = Some(at),
            (true, Some(s)) => {
                write(data.get(s..at).unwrap_or(&[]), off + s as u64)?;
                run = None;
            }
            _ => {}
        }
        at += piece.len();
    }
    if let Some(s) = run {
        write(data.get(s..).unwrap_or(&[]), off + s as u64)?;
    }
    Ok(())
}
