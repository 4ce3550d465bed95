//! `vbdfs create`: validate the size, block size and codec, create the image
//! and close it clean; with `--backing BASE[@SNAP]`, a clone (see
//! `snapshot.rs`).

use super::options::{format_size, parse_codec, parse_size};
use super::snapshot::{make_clone, split_at_snapshot};
use super::CreateArgs;
use crate::cli::output::say;
use crate::engine::CloneOptions;
use crate::{CreateOptions, Error, ErrorKind, OpenOptions, Result};

/// Runs `vbdfs create`.
pub fn run(args: &CreateArgs) -> Result<()> {
    if args.encrypt && args.backing.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "create: a clone is encrypted exactly when its base is: leave out --encrypt \
             and give the base's key with --key-file",
        ));
    }
    if args.backing.is_none() && args.encrypt != args.key_file.is_some() {
        return Err(Error::invalid(
            "create: --encrypt and --key-file FILE go together",
        ));
    }
    let size = args
        .size
        .as_deref()
        .map(|text| parse_size(text).map_err(|e| e.context("--size")))
        .transpose()?;
    if let Some(size) = size {
        crate::engine::check_disk_size(size)
            .map_err(|e| with_path(e.context("--size"), &args.image))?;
    }
    let block_size = args
        .block_size
        .as_deref()
        .map(|text| {
            let bs = parse_size(text).map_err(|e| e.context("--block-size"))?;
            if !bs.is_power_of_two() || !(4096..=1 << 20).contains(&bs) {
                return Err(Error::invalid(format!(
                    "--block-size {text}: expected a power of two from 4K to 1M"
                )));
            }
            Ok(bs)
        })
        .transpose()?;
    let codec = args
        .compress
        .as_deref()
        .map(|c| parse_codec(c).map_err(|e| e.context("--compress")))
        .transpose()?;
    if let Some(spec) = &args.backing {
        let (base, snap) = split_at_snapshot(spec);
        let opts = CloneOptions {
            size,
            block_size,
            codec,
        };
        return make_clone(&args.image, &base, snap.as_deref(), &opts);
    }
    let size = size.ok_or_else(|| Error::invalid("create: --size SIZE is required"))?;
    let block_size = block_size.unwrap_or(CreateOptions::default().block_size);
    let mut create = CreateOptions {
        size,
        block_size,
        ..CreateOptions::default()
    };
    if let Some(codec) = codec {
        create.codec = codec;
    }
    let image = super::keys::create(&args.image, &create, &OpenOptions::default())
        .map_err(|e| with_path(e, &args.image))?;
    let codec = image.codec();
    image.close().map_err(|e| with_path(e, &args.image))?;
    say!(
        "created {}: {}, {} blocks, {codec}",
        args.image.display(),
        format_size(size),
        format_size(block_size)
    )?;
    Ok(())
}

/// Adds the image path to an error message that does not name it yet.
pub fn with_path(err: Error, path: &std::path::Path) -> Error {
    let shown = path.display().to_string();
    if err.to_string().contains(&shown) {
        err
    } else {
        err.context(shown)
    }
}
