//! `vbdfs compact IMAGE`: return the host space of dead records offline.

use super::options::format_size;
use super::CompactArgs;
use crate::cli::output::say;
use crate::cli::{mount::canonical_file, mountinfo};
use crate::error::Result;
use crate::OpenOptions;

/// Opens the image read-write (refused with the mount point while mounted),
/// compacts it and closes it clean.
pub fn run(args: &CompactArgs) -> Result<()> {
    let canon = canonical_file(&args.image)?;
    let opts = OpenOptions {
        cache_bytes: 32 << 20,
        ..OpenOptions::default()
    };
    let image =
        super::keys::open(&canon, &opts).map_err(|e| mountinfo::explain_locked(&canon, e, true))?;
    let report = image.compact()?;
    image.close()?;
    say!(
        "{}: live data {}, host space {} -> {}",
        args.image.display(),
        format_size(report.live_bytes),
        format_size(report.file_allocated_before),
        format_size(report.file_allocated_after)
    )?;
    Ok(())
}
