//! `vbdfs compact IMAGE`: return the host space of dead records offline,
//! and shorten the file (its end emptied into the holes below).

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
    // The host space as the file has it closed: the open preallocates room
    // ahead of its log, which the engine's own figures would count.
    let host_space = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&canon).map_or(0, |m| m.blocks() * 512)
    };
    let length = || std::fs::metadata(&canon).map_or(0, |m| m.len());
    let (before, long_before) = (host_space(), length());
    let opts = OpenOptions {
        cache_bytes: 32 << 20,
        // Only checkpoints' records are appended: any hole will do for them
        // (none at the end of the file, where they would lengthen it).
        log_region_min: Some(1 << 20),
        ..OpenOptions::default()
    };
    let image =
        super::keys::open(&canon, &opts).map_err(|e| mountinfo::explain_locked(&canon, e, true))?;
    let report = image.compact()?;
    // The end of the file emptied into the holes below it and cut, the log
    // in the first hole big enough: the close then cuts the holes that end
    // the file.
    let moved = image.evacuate_tail()?;
    image.close()?;
    say!(
        "{}: live data {}, host space {} -> {}, file length {} -> {} ({} of records moved)",
        args.image.display(),
        format_size(report.live_bytes),
        format_size(before),
        format_size(host_space()),
        format_size(long_before),
        format_size(length()),
        format_size(moved)
    )?;
    Ok(())
}
