//! The glue the command line calls for `vbdfs import` and `vbdfs export`:
//! parse the format names, run the conversion with progress on a terminal,
//! print the notes and a one-line summary.

use super::{detect, export, import_report, ExportFormat, Format};
use crate::cli::output::say;
use crate::engine::CreateOptions;
use crate::Result;
use std::path::Path;

/// `vbdfs import SOURCE IMAGE [--format F]` with `create` options (block size,
/// codec; the size comes from the source).
pub fn run_import(
    source: &Path,
    image: &Path,
    format: Option<&str>,
    create: &CreateOptions,
) -> Result<()> {
    let format: Option<Format> = format.map(str::parse).transpose()?;
    let shown = match format {
        Some(f) => f,
        None => detect(source)?,
    };
    let report = import_report(source, image, format, create, true)?;
    for note in &report.notes {
        eprintln!("vbdfs: note: {note}");
    }
    say!(
        "imported {} ({shown}, {} bytes) into {}",
        source.display(),
        report.source_size,
        image.display()
    )?;
    Ok(())
}

/// `vbdfs export IMAGE[@SNAP] DEST [--format raw|qcow2]`.
pub fn run_export(image: &str, dest: &Path, format: Option<&str>) -> Result<()> {
    let format: Option<ExportFormat> = format.map(str::parse).transpose()?;
    export(Path::new(image), dest, format, true)?;
    say!("exported {image} to {}", dest.display())?;
    Ok(())
}
