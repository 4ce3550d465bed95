//! qcow2 output for `vbdfs export`: a version 3 image (compat 1.1) with
//! 64 KiB clusters, written in one sequential pass. Layout: the header
//! cluster, the L1 table, then data clusters in guest order with each L2
//! table written after the data it maps, and finally the refcount blocks and
//! refcount table (every cluster has refcount 1). All-zero and unmapped
//! clusters are left unallocated. Memory: the L1 table (8 bytes per 512 MiB),
//! one L2 table and one 4 MiB read buffer.

use super::pipeline::is_zero;
use super::progress::Progress;
use crate::engine::DiskView;
use crate::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;

const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (8 bytes each).
const L2_ENTRIES: u64 = CS / 8;
/// 16-bit refcounts (refcount_order 4): entries per refcount block.
const RC_ENTRIES: u64 = CS / 2;
/// Guest bytes read at a time.
const CHUNK: u64 = 64 * CS;
/// L1/L2 entry flag: refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// Header length of a version 3 header without optional fields.
const HEADER_LEN: u32 = 104;

/// Writes `img` as a qcow2 file into `out` (an empty file).
pub fn write(img: &dyn DiskView, out: &File, bar: &Progress) -> Result<()> {
    let len = img.len();
    let l1_size = len.div_ceil(CS * L2_ENTRIES);
    let l1_clusters = (l1_size * 8).div_ceil(CS).max(1);
    let mut w = Writer {
        out,
        next: (1 + l1_clusters) * CS,
        l1: vec![0u64; l1_size as usize],
        l2: vec![0u64; L2_ENTRIES as usize],
        l2_index: None,
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while let Some(d) = img.next_data(pos) {
        let start = (d / CS * CS).max(pos);
        let end = img
            .next_hole(d)
            .max(d + 1)
            .div_ceil(CS)
            .saturating_mul(CS)
            .min(len);
        bar.inc(start - pos);
        let mut off = start;
        while off < end {
            let n = CHUNK.min(end - off);
            let chunk = buf
                .get_mut(..n as usize)
                .ok_or_else(|| Error::invalid("chunk"))?;
            img.read_at(chunk, off)?;
            w.put(chunk, off)?;
            bar.inc(n);
            off += n;
        }
        pos = end;
        if pos >= len {
            break;
        }
    }
    bar.inc(len.saturating_sub(pos));
    w.flush_l2()?;
    w.finish(len, l1_size)
}

struct Writer<'a> {
    out: &'a File,
    /// Next free host offset (cluster aligned).
    next: u64,
    l1: Vec<u64>,
    l2: Vec<u64>,
    /// Which L1 entry `l2` belongs to.
    l2_index: Option<u64>,
}

impl Writer<'_> {
    fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        self.out
            .write_all_at(data, off)
            .map_err(|e| Error::io(format!("qcow2 output: write at {off}"), e))
    }

    /// Stores the guest clusters in `data` (at cluster-aligned guest `off`).
    fn put(&mut self, data: &[u8], off: u64) -> Result<()> {
        let mut run: Option<(usize, u64)> = None; // (start in data, host offset)
        let mut at = 0usize;
        for piece in data.chunks(CS as usize) {
            let guest = off + at as u64;
            let zero = is_zero(piece);
            if !zero {
                let l1_idx = guest / CS / L2_ENTRIES;
                if self.l2_index != Some(l1_idx) {
                    if let Some((s, host)) = run.take() {
                        self.write_at(data.get(s..at).unwrap_or(&[]), host)?;
                    }
                    self.flush_l2()?;
                    self.l2_index = Some(l1_idx);
                }
                let host = self.next;
                self.next += CS;
                let slot = ((guest / CS) % L2_ENTRIES) as usize;
                if let Some(e) = self.l2.get_mut(slot) {
                    *e = host | COPIED;
                }
                run = match run {
                    Some((s, h)) if h + (at - s) as u64 == host => Some((s, h)),
                    Some((s, h)) => {
                        self.write_at(data.get(s..at).unwrap_or(&[]), h)?;
                        Some((at, host))
                    }
                    None => Some((at, host)),
                };
            } else if let Some((s, h)) = run.take() {
                self.write_at(data.get(s..at).unwrap_or(&[]), h)?;
            }
            at += piece.len();
        }
        if let Some((s, h)) = run {
            // The last guest cluster may be short: pad it to a whole cluster.
            let tail = data.get(s..).unwrap_or(&[]);
            self.write_at(tail, h)?;
        }
        Ok(())
    }

    /// Writes the current L2 table (if any entry is set) and records it in L1.
    fn flush_l2(&mut self) -> Result<()> {
        let Some(idx) = self.l2_index.take() else {
            return Ok(());
        };
        if self.l2.iter().all(|&e| e == 0) {
            return Ok(());
        }
        let bytes: Vec<u8> = self.l2.iter().flat_map(|e| e.to_be_bytes()).collect();
        let at = self.next;
        self.write_at(&bytes, at)?;
        self.next += CS;
        if let Some(e) = self.l1.get_mut(idx as usize) {
            *e = at | COPIED;
        }
        self.l2.iter_mut().for_each(|e| *e = 0);
        Ok(())
    }

    /// Writes L1, the refcount structures and the header.
    fn finish(self, len: u64, l1_size: u64) -> Result<()> {
        let l1: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_at(&l1, CS)?;
        let used = self.next / CS;
        // Refcount blocks and table must also cover themselves.
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = used + blocks + table;
            let nb = total.div_ceil(RC_ENTRIES);
            let nt = (nb * 8).div_ceil(CS);
            if nb == blocks && nt == table {
                break;
            }
            (blocks, table) = (nb, nt);
        }
        let total = used + blocks + table;
        let rc_blocks_at = self.next;
        let mut block = vec![0u8; CS as usize];
        for b in 0..blocks {
            let first = b * RC_ENTRIES;
            let count = total.saturating_sub(first).min(RC_ENTRIES) as usize;
            block.iter_mut().for_each(|x| *x = 0);
            for e in block.chunks_exact_mut(2).take(count) {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            self.write_at(&block, rc_blocks_at + b * CS)?;
        }
        let table_at = rc_blocks_at + blocks * CS;
        let mut t = vec![0u8; (table * CS) as usize];
        for (b, e) in t.chunks_exact_mut(8).take(blocks as usize).enumerate() {
            e.copy_from_slice(&(rc_blocks_at + b as u64 * CS).to_be_bytes());
        }
        self.write_at(&t, table_at)?;

        let mut h = vec![0u8; CS as usize];
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = h.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes());
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &len.to_be_bytes());
        put(36, &(l1_size as u32).to_be_bytes());
        put(40, &CS.to_be_bytes());
        put(48, &table_at.to_be_bytes());
        put(56, &(table as u32).to_be_bytes());
        put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
        put(100, &HEADER_LEN.to_be_bytes());
        // Header extension area: just the end marker (zeros) at 104.
        self.write_at(&h, 0)?;
        self.out
            .set_len(total * CS)
            .map_err(|e| Error::io("qcow2 output: set length", e))
    }
}
