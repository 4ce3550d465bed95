//! `vbdfs import`: a foreign disk (raw, qcow2, VHD, with its backing chain
//! flattened) into a new standalone `.vbd` image. The image is built under a
//! hidden temporary name beside the target and moved into place only after
//! `Image::close` succeeded, so a failed import leaves nothing behind.

use super::pipeline::{self, Plan};
use super::progress::Progress;
use super::{open_source, Format, Source};
use crate::engine::{CreateOptions, OpenOptions};
use crate::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

/// What an import did, for the caller to show.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// The source's virtual size.
    pub source_size: u64,
    /// The image's virtual size (the source size rounded up to 512 bytes).
    pub image_size: u64,
    /// Things the user should know (ignored snapshots, rounding...).
    pub notes: Vec<String>,
}

/// Imports `source` into a new image at `image`, detecting the source format
/// unless `format` is given. `create` supplies block size and codec; its size
/// is replaced by the source's virtual size rounded up to 512 bytes (the tail
/// past the source reads as zeros). Notes are printed on stderr.
pub fn import(
    source: &Path,
    image: &Path,
    format: Option<Format>,
    create: &CreateOptions,
    progress: bool,
) -> Result<()> {
    let report = import_report(source, image, format, create, progress)?;
    for note in &report.notes {
        eprintln!("vbdfs: note: {note}");
    }
    Ok(())
}

/// [`import`] without printing: returns the report instead.
pub fn import_report(
    source: &Path,
    image: &Path,
    format: Option<Format>,
    create: &CreateOptions,
    progress: bool,
) -> Result<ImportReport> {
    if image.exists() {
        return Err(Error::new(
            ErrorKind::Exists,
            format!(
                "{}: already exists; choose a new image name",
                image.display()
            ),
        ));
    }
    let src = open_source(source, format)?;
    let source_size = src.len();
    if source_size == 0 {
        return Err(Error::invalid(format!(
            "{}: the source disk is empty",
            source.display()
        )));
    }
    let image_size = source_size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::invalid(format!("{}: absurd virtual size", source.display())))?;
    let mut notes = src.notes();
    if image_size != source_size {
        notes.push(format!(
            "{}: size {source_size} is not a multiple of 512; the image is {image_size} bytes \
             and the last {} bytes read as zeros",
            source.display(),
            image_size - source_size
        ));
    }
    let mut opts = create.clone();
    opts.size = image_size;

    let what = format!("import {} into {}", source.display(), image.display());
    let tmp = TempImage::new(image)?;
    let img = crate::cli::keys::create(&tmp.path, &opts, &OpenOptions::default())
        .map_err(|e| e.context(&what))?;
    let plan = Plan {
        len: image_size,
        block: img.block_size(),
        threads: reader_threads(),
        write_zeros: false,
    };
    let bar = Progress::new(progress, image_size, "import");
    let src: &dyn Source = src.as_ref();
    pipeline::copy(
        plan,
        &bar,
        |pos| src.next_data(pos, source_size),
        |buf, off| read_padded(src, buf, off),
        |data, off| img.write_at(data, off),
    )
    .map_err(|e| e.context(&what))?;
    img.close().map_err(|e| e.context(&what))?;
    bar.finish();
    tmp.commit(image)?;
    Ok(ImportReport {
        source_size,
        image_size,
        notes,
    })
}

/// Reads from `src`, with zeros past its end (the 512-byte rounding tail).
fn read_padded(src: &dyn Source, buf: &mut [u8], off: u64) -> Result<()> {
    let avail = src.len().saturating_sub(off).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(avail);
    if !head.is_empty() {
        src.read_at(head, off)?;
    }
    tail.fill(0);
    Ok(())
}

/// Threads that read (and decompress) the source in parallel.
pub fn reader_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
}

/// A file under a hidden temporary name, removed on drop unless committed.
#[derive(Debug)]
pub struct TempImage {
    /// The temporary path.
    pub path: PathBuf,
    done: bool,
}

impl TempImage {
    /// A temporary name in `target`'s directory.
    pub fn new(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{}: not a file name", target.display())))?;
        let tmp_name = format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id());
        let path = target.with_file_name(tmp_name);
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(format!("{}: remove stale file", path.display()), e))?;
        }
        Ok(TempImage { path, done: false })
    }

    /// Moves the file to `target`, refusing to replace a file that appeared
    /// meanwhile, and makes the new name durable.
    pub fn commit(mut self, target: &Path) -> Result<()> {
        let ctx = |e| Error::io(format!("{}: rename into place", target.display()), e);
        match std::fs::hard_link(&self.path, target) {
            Ok(()) => {
                std::fs::remove_file(&self.path).map_err(ctx)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!(
                        "{}: appeared while converting; not replaced",
                        target.display()
                    ),
                ));
            }
            // File systems without hard links: check, then rename.
            Err(_) => {
                if target.exists() {
                    return Err(Error::new(
                        ErrorKind::Exists,
                        format!(
                            "{}: appeared while converting; not replaced",
                            target.display()
                        ),
                    ));
                }
                std::fs::rename(&self.path, target).map_err(ctx)?;
            }
        }
        self.done = true;
        let dir = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all()
                .map_err(|e| Error::io(format!("{}: sync", dir.display()), e))?;
        }
        Ok(())
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
