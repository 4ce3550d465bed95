//! `vbdfs info` and `vbdfs check`: read-only inspection of an image (also of a
//! mounted one: read-only opens take no lock), and `check --repair`, which
//! opens read-write and so needs the image unmounted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::create::with_path;
use super::mount::canonical_file;
use super::options::format_size;
use super::{mountinfo, CheckArgs, InfoArgs};
use crate::{Image, OpenOptions, Result};

/// Cache for inspection: small, it reads each block once.
const INSPECT_CACHE: u64 = 32 << 20;

fn open(path: &Path, read_only: bool) -> Result<(PathBuf, Image)> {
    let canon = canonical_file(path)?;
    let opts = OpenOptions {
        read_only,
        cache_bytes: INSPECT_CACHE,
        ..OpenOptions::default()
    };
    let image = Image::open(&canon, &opts)
        .map_err(|e| mountinfo::explain_locked(&canon, e))
        .map_err(|e| with_path(e, path))?;
    Ok((canon, image))
}

/// Runs `vbdfs info`.
pub fn info(args: &InfoArgs) -> Result<()> {
    let (canon, image) = open(&args.image, true)?;
    let mounted = mountinfo::mount_points_of(&canon);
    let stats = image.stats();
    if args.json {
        let mut value = serde_json::to_value(&stats).unwrap_or_default();
        if let Some(obj) = value.as_object_mut() {
            obj.insert("image".into(), canon.display().to_string().into());
            let dirs: Vec<String> = mounted.iter().map(|d| d.display().to_string()).collect();
            obj.insert("mounted_at".into(), dirs.into());
            obj.insert("encryption".into(), "none".into());
            obj.insert("backing".into(), serde_json::Value::Null);
            obj.insert("snapshots".into(), serde_json::Value::Array(Vec::new()));
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(());
    }
    let bytes = |n: u64| format!("{} ({n} bytes)", format_size(n));
    let state = match (&stats.failed, stats.clean) {
        (Some(why), _) => format!("failed: {why}"),
        (None, true) => "clean".to_string(),
        (None, false) => "dirty (not closed cleanly; recovered on the next read-write open)".into(),
    };
    let mounted_at = match mounted.first() {
        Some(dir) => dir.display().to_string(),
        None => "no".into(),
    };
    let lines = [
        ("image", canon.display().to_string()),
        ("virtual size", bytes(stats.virtual_size)),
        ("block size", format_size(stats.block_size)),
        ("codec", stats.codec.clone()),
        ("encryption", "none".into()),
        ("backing", "none".into()),
        ("snapshots", "none".into()),
        ("allocated", bytes(stats.allocated_bytes)),
        ("stored", bytes(stats.stored_bytes)),
        ("file size", bytes(stats.file_bytes)),
        ("state", state),
        ("generation", stats.generation.to_string()),
        ("uuid", stats.uuid.clone()),
        ("mounted at", mounted_at),
    ];
    for (key, value) in lines {
        println!("{key}: {value}");
    }
    Ok(())
}

/// Runs `vbdfs check`: prints the report; exit status 1 when anything is bad.
pub fn check(args: &CheckArgs) -> Result<ExitCode> {
    let (canon, image) = open(&args.image, !args.repair)?;
    let mounted = mountinfo::mount_points_of(&canon);
    if let Some(dir) = mounted.first() {
        println!(
            "note: {} is mounted at {}; checking its last durable state",
            canon.display(),
            dir.display()
        );
    }
    let report = image.check().map_err(|e| with_path(e, &args.image))?;
    println!("blocks checked: {}", report.blocks_checked);
    for bad in &report.bad {
        println!(
            "bad block {} (offset {}): {}",
            bad.block, bad.offset, bad.reason
        );
    }
    if args.repair {
        image.close().map_err(|e| with_path(e, &args.image))?;
    }
    if report.is_ok() {
        println!("{}: ok", canon.display());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "vbdfs: {}: {} bad block(s)",
            canon.display(),
            report.bad.len()
        );
        Ok(ExitCode::FAILURE)
    }
}
