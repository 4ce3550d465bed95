//! `vbdfs import`: a foreign disk (raw, qcow2, VHD, with its backing chain
//! flattened) into a new standalone `.vbd` image. The image is built under a
//! hidden temporary name beside the target and moved into place only after
//! `Image::close` succeeded, so a failed import leaves nothing behind.

use super::pipeline::{self, Plan};
use super::progress::Progress;
use super::staging::TempImage;
use super::{open_source, Format, Source};
use crate::engine::{CreateOptions, OpenOptions};
use crate::{Error, ErrorKind, Result};
use std::path::Path;

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
