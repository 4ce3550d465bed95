//! `vbdfs resize IMAGE SIZE`: change the disk's size offline.

use super::options::{format_size, parse_size};
use super::ResizeArgs;
use crate::cli::create::with_path;
use crate::cli::output::say;
use crate::cli::{mount::canonical_file, mountinfo};
use crate::error::{Error, Result};
use crate::OpenOptions;

/// The new size `spec` asks for: `SIZE`, `+SIZE` (grow by) or `-SIZE`
/// (shrink by), from the disk's `current` size.
pub fn new_size(spec: &str, current: u64) -> Result<u64> {
    let spec = spec.trim();
    if let Some(by) = spec.strip_prefix('+') {
        let by = parse_size(by)?;
        current
            .checked_add(by)
            .ok_or_else(|| Error::invalid(format!("size '{spec}' is too large")))
    } else if let Some(by) = spec.strip_prefix('-') {
        let by = parse_size(by)?;
        match current.checked_sub(by) {
            Some(size) if size > 0 => Ok(size),
            _ => Err(Error::invalid(format!(
                "cannot shrink a disk of {} by {}",
                format_size(current),
                format_size(by)
            ))),
        }
    } else {
        parse_size(spec)
    }
}

/// Opens the image read-write (refused with the mount point while mounted),
/// resizes it and closes it clean. Shrinking needs `--shrink`.
pub fn run(args: &ResizeArgs) -> Result<()> {
    let canon = canonical_file(&args.image)?;
    let opts = OpenOptions {
        cache_bytes: 32 << 20,
        ..OpenOptions::default()
    };
    let mut image = super::keys::open(&canon, &opts)
        .map_err(|e| mountinfo::explain_locked(&canon, e, false))?;
    let old = image.len();
    let size = new_size(&args.size, old).map_err(|e| with_path(e, &args.image))?;
    crate::engine::check_disk_size(size).map_err(|e| with_path(e, &args.image))?;
    let (from, to) = two_sizes(old, size);
    if size < old && !args.shrink {
        return Err(Error::invalid(format!(
            "{}: shrinking the disk from {from} to {to} drops the data past {to}; shrink the \
             file system and partitions inside first, then run again with --shrink",
            args.image.display(),
        )));
    }
    let done = image.resize(size).and_then(|()| image.close());
    if let Err(e) = done {
        // The size may be committed before what failed (the checkpoint that
        // commits it comes first): say which, so that a relative size is
        // not applied twice by a retry.
        let now = super::keys::open(
            &canon,
            &OpenOptions {
                read_only: true,
                cache_bytes: 4 << 20,
                ..OpenOptions::default()
            },
        )
        .map(|img| img.len());
        return match now {
            Ok(now) if now == size => {
                eprintln!(
                    "vbdfs: warning: {}: resized, but then: {e} (the image recovers on its next \
                     open; do not run the resize again)",
                    args.image.display()
                );
                say!("{}: disk size {from} -> {to}", args.image.display())?;
                Ok(())
            }
            _ => Err(with_path(
                Error::new(e.kind(), format!("{e} (the disk keeps its size, {from})")),
                &args.image,
            )),
        };
    }
    say!("{}: disk size {from} -> {to}", args.image.display())?;
    Ok(())
}

/// Two sizes for a message, exact in bytes when their rounded forms would
/// read the same (10 MiB and 10 MiB less 512 bytes).
fn two_sizes(a: u64, b: u64) -> (String, String) {
    let (fa, fb) = (format_size(a), format_size(b));
    if fa == fb {
        (format!("{a} bytes"), format!("{b} bytes"))
    } else {
        (fa, fb)
    }
}

#[cfg(test)]
mod tests {
    use super::new_size;

    #[test]
    fn absolute_and_relative_sizes() {
        let g = 1u64 << 30;
        assert_eq!(new_size("20G", 10 * g).unwrap(), 20 * g);
        assert_eq!(new_size("+1G", 10 * g).unwrap(), 11 * g);
        assert_eq!(new_size("-512M", g).unwrap(), g / 2);
        let e = new_size("-1G", g).unwrap_err().to_string();
        assert!(e.contains("cannot shrink a disk of 1 GiB by 1 GiB"), "{e}");
        assert!(new_size("+x", g).is_err());
        assert!(new_size("+16383P", g).is_err());
        let e = new_size(&format!("+{}", u64::MAX), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
    }
}
