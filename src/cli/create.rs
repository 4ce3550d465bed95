//! `vbdfs create`: validate the size, block size and codec, create the image
//! and close it clean.

use super::options::{format_size, parse_codec, parse_size};
use super::CreateArgs;
use crate::{CreateOptions, Error, ErrorKind, Image, OpenOptions, Result};

/// Runs `vbdfs create`.
pub fn run(args: &CreateArgs) -> Result<()> {
    if args.backing.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "create --backing: backing images are not available yet in this build",
        ));
    }
    if args.encrypt || args.key_file.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "create --encrypt: encryption is not available yet in this build",
        ));
    }
    let size_text = args
        .size
        .as_deref()
        .ok_or_else(|| Error::invalid("create: --size SIZE is required"))?;
    let size = parse_size(size_text).map_err(|e| e.context("--size"))?;
    if size == 0 {
        return Err(Error::invalid("--size: the size must be larger than 0"));
    }
    let block_size = parse_size(&args.block_size).map_err(|e| e.context("--block-size"))?;
    if !block_size.is_power_of_two() || !(4096..=1 << 20).contains(&block_size) {
        return Err(Error::invalid(format!(
            "--block-size {}: expected a power of two from 4K to 1M",
            args.block_size
        )));
    }
    let mut create = CreateOptions {
        size,
        block_size,
        ..CreateOptions::default()
    };
    if let Some(codec) = &args.compress {
        create.codec = parse_codec(codec).map_err(|e| e.context("--compress"))?;
    }
    let image = Image::create(&args.image, &create, &OpenOptions::default())
        .map_err(|e| with_path(e, &args.image))?;
    let codec = image.codec();
    image.close().map_err(|e| with_path(e, &args.image))?;
    println!(
        "created {}: {}, {} blocks, {codec}",
        args.image.display(),
        format_size(size),
        format_size(block_size)
    );
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
