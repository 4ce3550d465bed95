//! qcow2 reader (versions 2 and 3): the L1/L2 walk with normal, zero and
//! compressed clusters, extended L2 entries (subclusters) and a backing file
//! read below unallocated ranges. Internal snapshots are not read: only the
//! active state is imported (a note says so). Refcounts are not needed to read
//! and are ignored. No table is cached beyond the L1: each request reads the L2
//! entries it needs with one `pread`, so the reader is stateless and can be
//! shared by any number of reader threads.

mod decompress;
pub mod header;

use super::source::{check_read, layered_next_data, read_below, FileReader, Run, Source};
use crate::Result;
use header::Header;
use std::path::Path;

/// Bits 9..=55 of an L1 or standard L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bit 62: compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// Standard descriptor bit 0: reads as zeros (v3 without extended L2).
const ZERO_FLAG: u64 = 1;
/// L2 entries read per request at most (bounds the table read).
const BATCH: u64 = 512;

/// How one unit (a cluster, or a subcluster with extended L2) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Map {
    /// Plain data at this host offset (of the unit's first byte).
    Host(u64),
    /// A compressed cluster with this descriptor.
    Compressed(u64),
    /// Reads as zeros.
    Zero,
    /// Read from the backing file.
    Below,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Source {
    file: FileReader,
    h: Header,
    l1: Vec<u64>,
    backing: Option<Box<dyn Source>>,
    notes: Vec<String>,
}

impl Qcow2Source {
    /// Opens the image in `file`; `open_backing(name, format)` opens the
    /// backing file named in the header (resolved by the caller).
    pub fn open(
        file: FileReader,
        open_backing: impl FnOnce(&str, Option<&str>) -> Result<Box<dyn Source>>,
    ) -> Result<Self> {
        let h = Header::read(&file)?;
        let mut raw = vec![0u8; (h.l1_size * 8) as usize];
        file.read_exact_at(&mut raw, h.l1_offset, "qcow2 L1 table")?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut notes = Vec::new();
        if h.snapshots > 0 {
            notes.push(format!(
                "{}: {} internal snapshot(s) ignored; only the current state is imported",
                file.path().display(),
                h.snapshots
            ));
        }
        if h.marked_corrupt {
            notes.push(format!(
                "{}: the image is marked corrupt by QEMU",
                file.path().display()
            ));
        }
        let backing = match &h.backing_name {
            Some(name) => {
                let b = open_backing(name, h.backing_format.as_deref())?;
                notes.extend(b.notes());
                Some(b)
            }
            None => None,
        };
        Ok(Qcow2Source {
            file,
            h,
            l1,
            backing,
            notes,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.h
    }

    fn unit_bits(&self) -> u32 {
        if self.h.extended_l2 {
            self.h.cluster_bits - 5
        } else {
            self.h.cluster_bits
        }
    }

    /// Classifies unit `sub` of the cluster with L2 entry `e` (+ `bitmap`).
    fn classify(&self, e: u64, bitmap: u64, sub: u32) -> Result<Map> {
        if e & COMPRESSED != 0 {
            return Ok(Map::Compressed(e));
        }
        let host = e & OFFSET_MASK;
        let cs = self.h.cluster_size();
        let located = |host: u64| -> Result<u64> {
            if !host.is_multiple_of(cs) {
                return Err(self
                    .file
                    .corrupt(format!("qcow2 cluster offset {host:#x} is unaligned")));
            }
            if host >= self.file.len() {
                return Err(self.file.corrupt(format!(
                    "qcow2 cluster offset {host:#x} lies outside the file"
                )));
            }
            Ok(host)
        };
        if !self.h.extended_l2 {
            return Ok(if self.h.version >= 3 && e & ZERO_FLAG != 0 {
                Map::Zero
            } else if host == 0 {
                Map::Below
            } else {
                Map::Host(located(host)?)
            });
        }
        let alloc = bitmap >> sub & 1 != 0;
        let zero = bitmap >> (32 + sub) & 1 != 0;
        match (alloc, zero) {
            (true, true) => Err(self
                .file
                .corrupt("qcow2 subcluster both allocated and zero")),
            (true, false) if host == 0 => Err(self
                .file
                .corrupt("qcow2 subcluster allocated in an unallocated cluster")),
            (true, false) => Ok(Map::Host(
                located(host)? + (u64::from(sub) << self.unit_bits()),
            )),
            (false, true) => Ok(Map::Zero),
            (false, false) => Ok(Map::Below),
        }
    }

    /// The mapping of the run that starts at guest offset `pos` and its end
    /// (`<= limit`). A `Host` offset is the host byte for `pos` itself; runs
    /// of `Host` are contiguous in the file.
    fn map(&self, pos: u64, limit: u64) -> Result<(Map, u64)> {
        let cb = self.h.cluster_bits;
        let ub = self.unit_bits();
        let per_l2 = self.h.l2_entries();
        let cluster = pos >> cb;
        let l1_idx = cluster / per_l2;
        let table_end = (l1_idx + 1).saturating_mul(per_l2).saturating_mul(1 << cb);
        let region_end = limit.min(table_end);
        let l2_off = match self.l1.get(l1_idx as usize) {
            Some(&e) => e & OFFSET_MASK,
            None => 0,
        };
        if l2_off == 0 {
            return Ok((Map::Below, region_end));
        }
        let cs = self.h.cluster_size();
        if !l2_off.is_multiple_of(cs) {
            return Err(self
                .file
                .corrupt(format!("qcow2 L2 table offset {l2_off:#x} is unaligned")));
        }
        self.file.check_range(l2_off, cs, "qcow2 L2 table")?;
        let esize = self.h.l2_entry_size();
        let first = cluster % per_l2;
        let wanted = (region_end - 1) >> cb;
        let n = (wanted - cluster + 1).min(per_l2 - first).min(BATCH);
        let mut raw = vec![0u8; (n * esize) as usize];
        self.file.read_at(&mut raw, l2_off + first * esize)?;
        let entries: Vec<(u64, u64)> = raw
            .chunks_exact(esize as usize)
            .map(|c| {
                let word = |i: usize| {
                    c.get(i..i + 8)
                        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
                };
                (word(0), if esize == 16 { word(8) } else { 0 })
            })
            .collect();
        let units_per_cluster = 1u64 << (cb - ub);
        let unit_at = |u: u64| -> Result<Option<Map>> {
            // `u` counts units from the start of cluster `cluster`.
            let Some(&(e, bm)) = entries.get((u / units_per_cluster) as usize) else {
                return Ok(None);
            };
            self.classify(e, bm, (u % units_per_cluster) as u32)
                .map(Some)
        };
        let first_unit = (pos >> ub) - (cluster << (cb - ub));
        let Some(head) = unit_at(first_unit)? else {
            return Ok((Map::Below, region_end));
        };
        let mut end = ((pos >> ub) + 1) << ub;
        let mut u = first_unit + 1;
        if matches!(head, Map::Compressed(_)) {
            end = (cluster + 1) << cb;
        } else {
            let mut prev = head;
            while end < region_end {
                let Some(next) = unit_at(u)? else { break };
                let same = match (prev, next) {
                    (Map::Host(a), Map::Host(b)) => b == a + (1 << ub),
                    (a, b) => a == b,
                };
                if !same {
                    break;
                }
                prev = next;
                u += 1;
                end += 1 << ub;
            }
        }
        let head = match head {
            Map::Host(h) => Map::Host(h + (pos & ((1 << ub) - 1))),
            m => m,
        };
        Ok((head, end.min(region_end)))
    }

    /// Decompresses the cluster with descriptor `desc` into `out` (one cluster).
    fn read_compressed(&self, desc: u64, out: &mut [u8]) -> Result<()> {
        let cb = self.h.cluster_bits;
        let x = 62 - (cb - 8);
        let coffset = desc & ((1u64 << x) - 1);
        let sectors = (desc >> x) & ((1u64 << (cb - 8)) - 1);
        if coffset >= self.file.len() {
            return Err(self.file.corrupt(format!(
                "qcow2 compressed cluster at {coffset:#x} lies outside the file"
            )));
        }
        // At most two clusters of input; the last sector may run past EOF.
        let csize = (sectors + 1) * 512 - (coffset & 511);
        let csize = csize.min(self.file.len() - coffset);
        let mut input = vec![0u8; csize as usize];
        self.file.read_at(&mut input, coffset)?;
        decompress::decompress(self.h.compression, &input, out).map_err(|why| {
            self.file
                .corrupt(format!("qcow2 compressed cluster at {coffset:#x}: {why}"))
        })
    }
}

impl Source for Qcow2Source {
    fn path(&self) -> &Path {
        self.file.path()
    }

    /// Whole 512-byte sectors, as QEMU shows a qcow2 (`size / 512`): a
    /// header size that is not a multiple of 512 drops its partial sector.
    fn len(&self) -> u64 {
        self.h.size / 512 * 512
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_read(self.path(), self.len(), off, buf.len())?;
        let end = off + buf.len() as u64;
        let cs = self.h.cluster_size();
        let mut cluster_buf: Vec<u8> = Vec::new();
        let mut pos = off;
        while pos < end {
            let (m, run_end) = self.map(pos, end)?;
            let run_end = run_end.clamp(pos + 1, end);
            let Some(dst) = buf.get_mut((pos - off) as usize..(run_end - off) as usize) else {
                break;
            };
            match m {
                Map::Host(h) => self.file.read_at(dst, h)?,
                Map::Zero => dst.fill(0),
                Map::Below => read_below(self.backing.as_deref(), dst, pos)?,
                Map::Compressed(desc) => {
                    cluster_buf.resize(cs as usize, 0);
                    self.read_compressed(desc, &mut cluster_buf)?;
                    let at = (pos % cs) as usize;
                    match cluster_buf.get(at..at + dst.len()) {
                        Some(src) => dst.copy_from_slice(src),
                        None => return Err(self.file.corrupt("qcow2 compressed run mismatch")),
                    }
                }
            }
            pos = run_end;
        }
        Ok(())
    }

    fn next_data(&self, off: u64, limit: u64) -> Result<Option<(u64, u64)>> {
        let limit = limit.min(self.len());
        layered_next_data(off, limit, self.backing.as_deref(), |pos, lim| {
            let (m, end) = self.map(pos, lim)?;
            let run = match m {
                Map::Host(_) | Map::Compressed(_) => Run::Data,
                Map::Zero => Run::Zero,
                Map::Below => Run::Below,
            };
            Ok((run, end))
        })
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}
