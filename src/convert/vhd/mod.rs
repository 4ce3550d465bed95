//! VHD reader: fixed, dynamic and differencing disks. The BAT is not loaded:
//! each request reads the BAT entries and the bitmap bytes it needs, so memory
//! stays small for any disk size and the reader can be shared between threads.
//! Sectors whose bitmap bit is clear read as zeros on a dynamic disk (the spec's
//! meaning) and come from the parent on a differencing disk. A differencing
//! disk's parent is found through its locators (`W2ru`, `W2ku`, `MacX`) or
//! header name, resolved relative to the child's directory, and must carry
//! the unique id the child records.

pub mod footer;

use super::source::{check_read, layered_next_data, read_below, FileReader, Run, Source};
use crate::{Error, ErrorKind, Result};
use footer::{DiskType, DynHeader, Footer};
use std::path::{Path, PathBuf};

/// BAT entries read per request at most.
const BATCH: u64 = 1024;
/// A BAT entry for a block that is not allocated.
const UNALLOCATED: u32 = 0xffff_ffff;

/// An open VHD disk.
#[derive(Debug)]
pub struct VhdSource {
    file: FileReader,
    footer: Footer,
    dynamic: Option<DynHeader>,
    parent: Option<Box<dyn Source>>,
    notes: Vec<String>,
}

impl VhdSource {
    /// Opens the disk in `file`; `open_parent(path)` opens a differencing
    /// disk's parent (as VHD, within the caller's chain bookkeeping).
    pub fn open(
        file: FileReader,
        open_parent: impl FnOnce(&Path) -> Result<Box<dyn Source>>,
    ) -> Result<Self> {
        let footer = footer::read_footer(&file)?;
        let mut notes = Vec::new();
        let (dynamic, parent) = match footer.disk_type {
            DiskType::Fixed => {
                // The data comes first and the footer follows it.
                file.check_range(0, footer.size + 512, "VHD fixed disk data")?;
                (None, None)
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let diff = footer.disk_type == DiskType::Differencing;
                let h = footer::read_dyn_header(&file, footer.data_offset, footer.size, diff)?;
                let parent = if diff {
                    let path = find_parent(&file, &h)?;
                    let p = open_parent(&path)?;
                    notes.extend(p.notes());
                    Some(p)
                } else {
                    None
                };
                (Some(h), parent)
            }
        };
        Ok(VhdSource {
            file,
            footer,
            dynamic,
            parent,
            notes,
        })
    }

    /// The parsed footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The file offset of block `index`'s bitmap, or `None` if unallocated.
    fn blocks(&self, h: &DynHeader, first: u64, n: u64) -> Result<Vec<Option<u64>>> {
        let mut raw = vec![0u8; (n * 4) as usize];
        self.file
            .read_exact_at(&mut raw, h.bat_offset + first * 4, "VHD BAT")?;
        raw.chunks_exact(4)
            .map(|c| {
                let e = u32::from_be_bytes(c.try_into().unwrap_or([0xff; 4]));
                if e == UNALLOCATED {
                    return Ok(None);
                }
                let at = u64::from(e) * 512;
                self.file
                    .check_range(at, h.bitmap_size + h.block_size, "VHD data block")?;
                Ok(Some(at))
            })
            .collect()
    }

    /// The run at `pos` at block granularity: whether the block is stored here.
    fn map(&self, h: &DynHeader, pos: u64, limit: u64) -> Result<(Option<u64>, u64)> {
        let first = pos / h.block_size;
        let last = (limit - 1) / h.block_size;
        let n = (last - first + 1).min(BATCH);
        let blocks = self.blocks(h, first, n)?;
        let head = blocks.first().copied().flatten();
        let mut end = (first + 1) * h.block_size;
        for b in blocks.iter().skip(1) {
            if b.is_some() != head.is_some() {
                break;
            }
            end += h.block_size;
        }
        Ok((head, end.min(limit)))
    }

    /// Reads `dst` at guest `pos`, all inside the allocated block at `at`.
    fn read_block(&self, h: &DynHeader, at: u64, dst: &mut [u8], pos: u64) -> Result<()> {
        let in_block = pos % h.block_size;
        let s0 = in_block / 512;
        let s1 = (in_block + dst.len() as u64).div_ceil(512);
        let mut bitmap = vec![0u8; (s1.div_ceil(8) - s0 / 8) as usize];
        self.file.read_at(&mut bitmap, at + s0 / 8)?;
        let bit = |s: u64| {
            let byte = bitmap
                .get(((s / 8) - s0 / 8) as usize)
                .copied()
                .unwrap_or(0);
            byte & (0x80 >> (s % 8)) != 0
        };
        let data = at + h.bitmap_size;
        let mut done = 0usize;
        while done < dst.len() {
            let cur = in_block + done as u64;
            let present = bit(cur / 512);
            let mut run_end = (cur / 512 + 1) * 512;
            while run_end < in_block + dst.len() as u64 && bit(run_end / 512) == present {
                run_end += 512;
            }
            let take = (run_end.min(in_block + dst.len() as u64) - cur) as usize;
            let Some(part) = dst.get_mut(done..done + take) else {
                break;
            };
            if present {
                self.file.read_at(part, data + cur)?;
            } else {
                read_below(self.parent.as_deref(), part, pos + done as u64)?;
            }
            done += take;
        }
        Ok(())
    }
}

impl Source for VhdSource {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn len(&self) -> u64 {
        self.footer.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_read(self.path(), self.len(), off, buf.len())?;
        let Some(h) = &self.dynamic else {
            return self.file.read_at(buf, off);
        };
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let block_end = ((pos / h.block_size + 1) * h.block_size).min(end);
            let Some(dst) = buf.get_mut((pos - off) as usize..(block_end - off) as usize) else {
                break;
            };
            match self
                .blocks(h, pos / h.block_size, 1)?
                .first()
                .copied()
                .flatten()
            {
                Some(at) => self.read_block(h, at, dst, pos)?,
                None => read_below(self.parent.as_deref(), dst, pos)?,
            }
            pos = block_end;
        }
        Ok(())
    }

    fn next_data(&self, off: u64, limit: u64) -> Result<Option<(u64, u64)>> {
        let limit = limit.min(self.len());
        let Some(h) = &self.dynamic else {
            return Ok((off < limit).then_some((off, limit)));
        };
        let absent = if self.parent.is_some() {
            Run::Below
        } else {
            Run::Zero
        };
        layered_next_data(off, limit, self.parent.as_deref(), |pos, lim| {
            let (block, end) = self.map(h, pos, lim)?;
            Ok((if block.is_some() { Run::Data } else { absent }, end))
        })
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}

/// Finds the parent of a differencing disk: the first candidate path that
/// exists and carries the recorded unique id.
fn find_parent(child: &FileReader, h: &DynHeader) -> Result<PathBuf> {
    let dir = child.path().parent().unwrap_or(Path::new("")).to_path_buf();
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !candidates.contains(&p) {
            candidates.push(p);
        }
    };
    let mut names: Vec<String> = h.locators.iter().map(|(_, p)| p.clone()).collect();
    names.push(h.parent_name.clone());
    for name in &names {
        let unix = name.trim_start_matches("file://").replace('\\', "/");
        if unix.is_empty() {
            continue;
        }
        let is_windows_abs = unix.as_bytes().get(1) == Some(&b':');
        if !is_windows_abs {
            push(dir.join(unix.trim_start_matches("./")));
        }
        // Absolute paths from another host: try the file name beside the child.
        if let Some(base) = unix.rsplit('/').next().filter(|b| !b.is_empty()) {
            push(dir.join(base));
        }
    }
    let want = footer::uuid_string(&h.parent_uuid);
    let mut mismatch = None;
    for c in &candidates {
        if !c.is_file() {
            continue;
        }
        let f = FileReader::open(c)?;
        let found = footer::read_footer(&f)?;
        if found.uuid == h.parent_uuid {
            return Ok(c.clone());
        }
        mismatch = Some((c.clone(), footer::uuid_string(&found.uuid)));
    }
    let child_name = child.path().display();
    Err(match mismatch {
        Some((p, got)) => Error::corrupt(format!(
            "{child_name}: parent {} has id {got}, the differencing disk expects {want}",
            p.display()
        )),
        None => Error::new(
            ErrorKind::NotFound,
            format!(
                "{child_name}: parent disk not found (looked for {})",
                list(&candidates)
            ),
        ),
    })
}

fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no locator".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
