//! `vbdfs info` and `vbdfs check`: read-only inspection of an image (also of a
//! mounted one: read-only opens take no lock), and `check --repair`, which
//! opens read-write and so needs the image unmounted.

use crate::cli::output::say;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::create::with_path;
use super::mount::canonical_file;
use super::options::format_size;
use super::{mountinfo, CheckArgs, InfoArgs};
use crate::{CheckReport, Image, OpenOptions, Result};

/// Cache for inspection: small, it reads each block once.
const INSPECT_CACHE: u64 = 32 << 20;

fn open(path: &Path, read_only: bool) -> Result<(PathBuf, Image)> {
    let canon = canonical_file(path)?;
    let opts = OpenOptions {
        read_only,
        cache_bytes: INSPECT_CACHE,
        // `check --repair`: replay past log damage that would refuse the open.
        salvage_log: !read_only,
        ..OpenOptions::default()
    };
    let image = super::keys::open(&canon, &opts)
        .map_err(|e| mountinfo::explain_locked(&canon, e, false))
        .map_err(|e| with_path(e, path))?;
    Ok((canon, image))
}

/// Runs `vbdfs info`.
pub fn info(args: &InfoArgs) -> Result<()> {
    let (canon, image) = match open(&args.image, true) {
        Ok(opened) => opened,
        Err(e) if args.key_file.is_none() => {
            // An encrypted image without its key: the unencrypted facts.
            match super::keys::read_header(&canon_or(&args.image)) {
                Ok(sb) if sb.crypto != 0 => return locked_info(args, &sb),
                _ => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let encryption = if image.is_encrypted() {
        "xchacha20-poly1305"
    } else {
        "none"
    };
    let mounted = mountinfo::mount_points_of(&canon);
    let stats = image.stats();
    if args.json {
        let mut value = serde_json::to_value(&stats).unwrap_or_default();
        if let Some(obj) = value.as_object_mut() {
            obj.insert("image".into(), canon.display().to_string().into());
            let dirs: Vec<String> = mounted.iter().map(|d| d.display().to_string()).collect();
            obj.insert("mounted_at".into(), dirs.into());
            obj.insert("encryption".into(), encryption.into());
            let chain = image.backing_chain();
            let backing = if chain.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::to_value(&chain).unwrap_or_default()
            };
            obj.insert("backing".into(), backing);
            let snaps = serde_json::to_value(image.snapshot_list()).unwrap_or_default();
            obj.insert("snapshots".into(), snaps);
            obj.insert("lost_map_leaves".into(), image.lost_leaves().into());
            obj.insert(
                "lost_snapshot_table".into(),
                image.lost_snapshot_table().into(),
            );
        }
        say!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )?;
        return Ok(());
    }
    let bytes = |n: u64| format!("{} ({n} bytes)", format_size(n));
    // A mount whose daemon is gone (killed) holds nothing open.
    let dead = mounted.first().is_some_and(|dir| mountinfo::is_dead(dir));
    let state = match (&stats.failed, stats.clean, mounted.first()) {
        (Some(why), _, _) => format!("failed: {why}"),
        (None, true, _) => "clean".to_string(),
        (None, false, Some(_)) if dead => {
            "dirty (its mount's daemon is gone; recovered on the next read-write open)".into()
        }
        (None, false, Some(_)) => "in use (open read-write by the mount)".into(),
        // Not mounted, but a writer holds it: an unmounted daemon still
        // closing it, or an offline command.
        (None, false, None) if super::keys::held_by_a_writer(&args.image) => {
            "in use (open read-write by another process: a daemon still closing it after \
             umount, or an offline command)"
                .into()
        }
        (None, false, None) => {
            "dirty (not closed cleanly; recovered on the next read-write open)".into()
        }
    };
    let mounted_at = match mounted.first() {
        Some(dir) if dead => format!(
            "{} (a dead mount: run `vbdfs umount {}`)",
            dir.display(),
            dir.display()
        ),
        Some(dir) => dir.display().to_string(),
        None => "no".into(),
    };
    let lines = [
        ("image", canon.display().to_string()),
        ("virtual size", bytes(stats.virtual_size)),
        ("block size", format_size(stats.block_size)),
        ("codec", stats.codec.clone()),
        ("encryption", encryption.into()),
        ("backing", backing_text(&image)),
        ("snapshots", snapshots_text(&image)),
        ("allocated", bytes(stats.allocated_bytes)),
        ("stored", bytes(stats.stored_bytes)),
        ("file size", bytes(stats.file_bytes)),
        ("host space", bytes(stats.file_allocated_bytes)),
        ("dead space", dead_text(&image, bytes(stats.dead_bytes))),
        ("state", state),
        ("generation", stats.generation.to_string()),
        ("uuid", stats.uuid.clone()),
        ("mounted at", mounted_at),
    ];
    for (key, value) in lines {
        say!("{key}: {value}")?;
    }
    for lost in image.damage() {
        say!("damage: {lost}")?;
    }
    Ok(())
}

fn canon_or(path: &Path) -> PathBuf {
    canonical_file(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `info` of an encrypted image opened without its key: what the superblock
/// shows in the clear (sizes, codec, state), nothing of the map or snapshots.
fn locked_info(args: &InfoArgs, sb: &crate::format::Superblock) -> Result<()> {
    let state = if sb.flags & crate::format::SB_FLAG_DIRTY == 0 {
        "clean"
    } else {
        "dirty or in use"
    };
    let codec = sb.codec.to_string();
    let enc = super::keys::encryption_name(sb.crypto);
    if args.json {
        let value = serde_json::json!({
            "image": canon_or(&args.image).display().to_string(),
            "virtual_size": sb.virtual_size,
            "block_size": sb.block_size(),
            "codec": codec,
            "encryption": enc,
            "locked": true,
            "clean": sb.flags & crate::format::SB_FLAG_DIRTY == 0,
            "generation": sb.gen,
        });
        say!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )?;
        return Ok(());
    }
    let lines = [
        ("image", canon_or(&args.image).display().to_string()),
        (
            "virtual size",
            format!(
                "{} ({} bytes)",
                format_size(sb.virtual_size),
                sb.virtual_size
            ),
        ),
        ("block size", format_size(sb.block_size())),
        ("codec", codec),
        (
            "encryption",
            format!("{enc} (locked: --key-file FILE shows the rest)"),
        ),
        ("state", state.into()),
        ("generation", sb.gen.to_string()),
    ];
    for (key, value) in lines {
        say!("{key}: {value}")?;
    }
    Ok(())
}

/// The backing chain as `base.vbd@snap -> older.vbd@snap`, or `none`.
fn backing_text(image: &Image) -> String {
    let chain: Vec<String> = image
        .backing_chain()
        .into_iter()
        .map(|l| format!("{}@{} (uuid {})", l.path, l.snapshot, l.uuid))
        .collect();
    if chain.is_empty() {
        "none".into()
    } else {
        chain.join(" -> ")
    }
}

/// `N: name (created ..., clones H), ...`, or `none`.
/// Dead space; with snapshots, it includes what only they hold.
fn dead_text(image: &Image, dead: String) -> String {
    let mut text = if image.snapshot_list().is_empty() {
        dead
    } else {
        format!("{dead}, including the snapshots' own data")
    };
    // Nothing names the records of a lost leaf or snapshot table: they
    // look dead.
    if !image.lost_leaves().is_empty() {
        text.push_str(", and the records of the lost map leaves below");
    }
    if image.lost_snapshot_table().is_some() {
        text.push_str(", and the records only the snapshots of the lost snapshot table held");
    }
    text
}

fn snapshots_text(image: &Image) -> String {
    if image.lost_snapshot_table().is_some() {
        return "unknown (the snapshot table is lost: see damage below)".into();
    }
    let snaps = image.snapshot_list();
    if snaps.is_empty() {
        return "none".into();
    }
    // Past a few, the newest only: `snapshot list` has them all.
    let shown = &snaps[snaps.len().saturating_sub(SNAPSHOTS_SHOWN)..];
    let items: Vec<String> = shown
        .iter()
        .map(|s| {
            let clones = if s.holds > 0 {
                format!(", {} clone(s)", s.holds)
            } else {
                String::new()
            };
            format!(
                "{} ({}{clones})",
                s.name,
                super::snapshot::format_time(s.created_ns)
            )
        })
        .collect();
    let more = match snaps.len() - shown.len() {
        0 => String::new(),
        older => format!(" and {older} older (vbdfs snapshot list shows all)"),
    };
    format!("{}: {}{more}", snaps.len(), items.join(", "))
}

/// Snapshots `info` names on its `snapshots:` line (the newest).
const SNAPSHOTS_SHOWN: usize = 16;

/// Rounds of [`recheck_mounted`] at most.
const RECHECKS: usize = 3;

/// A mounted image's daemon may reclaim records (of blocks rewritten since,
/// of snapshots deleted since) while a check from outside reads them: what
/// was found bad is checked again in the newest durable state, up to
/// [`RECHECKS`] times, and only what stays bad is reported.
fn recheck_mounted(path: &Path, mut report: CheckReport) -> Result<CheckReport> {
    let findings = |r: &CheckReport| r.bad.len() + r.errors.len() + r.damaged_copies.len();
    let found = findings(&report);
    for _ in 0..RECHECKS {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (_, image) = open(path, true)?;
        report = image.recheck(&report).map_err(|e| with_path(e, path))?;
        if report.is_ok() {
            break;
        }
    }
    let gone = found - findings(&report).min(found);
    if gone > 0 {
        say!(
            "note: {gone} finding(s) were records the mount reclaimed while they were read; \
             they are fine in its newer state"
        )?;
    }
    Ok(report)
}

/// One line per bad block, or per run of consecutive blocks bad for the
/// same reason (a lost map leaf's 1024 blocks are one line).
fn bad_block_lines(bad: &[crate::engine::BadBlock]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut i = 0;
    while i < bad.len() {
        let first = &bad[i];
        let mut end = i + 1;
        while end < bad.len()
            && bad[end].block == bad[end - 1].block + 1
            && bad[end].reason == first.reason
            && bad[end].snapshot == first.snapshot
        {
            end += 1;
        }
        let last = &bad[end - 1];
        lines.push(if end - i == 1 {
            format!(
                "bad block {} (offset {}): {}",
                first.block, first.offset, first.reason
            )
        } else {
            format!(
                "bad blocks {}..={} (offsets {}..={}): {}",
                first.block, last.block, first.offset, last.offset, first.reason
            )
        });
        i = end;
    }
    lines
}

/// Runs `vbdfs check`: prints the report; exit status 1 when anything is bad.
pub fn check(args: &CheckArgs) -> Result<ExitCode> {
    let (canon, image) = open(&args.image, !args.repair)?;
    let mounted = mountinfo::mount_points_of(&canon);
    if let Some(dir) = mounted.first() {
        say!(
            "note: {} is mounted at {}; checking its last durable state",
            canon.display(),
            dir.display()
        )?;
    }
    for note in image.recovery_notes() {
        say!("log: {note}")?;
    }
    for lost in image.damage() {
        say!("damage: {lost}")?;
    }
    let mut report = image.check().map_err(|e| with_path(e, &args.image))?;
    // Only another writer (a read-write mount) rewrites what this
    // read-only check read.
    if !report.is_ok() && !args.repair && super::keys::held_by_a_writer(&args.image) {
        report = recheck_mounted(&args.image, report)?;
    }
    say!("blocks checked: {}", report.blocks_checked)?;
    say!("snapshots checked: {}", report.snapshots_checked)?;
    for err in &report.errors {
        say!("error: {err}")?;
    }
    for line in bad_block_lines(&report.bad) {
        say!("{line}")?;
    }
    for fixed in &report.repaired {
        say!("repaired: {fixed}")?;
    }
    for damaged in &report.damaged_copies {
        say!("damaged copy: {damaged}")?;
    }
    if !report.damaged_copies.is_empty() {
        say!(
            "note: nothing is lost while one copy serves; `vbdfs check --repair` writes them \
             anew (not those of a snapshot a clone is based on: export it while one copy serves)"
        )?;
    }
    if report.single_copy_records > 0 {
        say!(
            "note: {} map record(s) have no second copy (written by an older vbdfs); \
             `vbdfs compact` writes them anew (not those of a snapshot a clone is based on)",
            report.single_copy_records
        )?;
    }
    if args.repair {
        image.close().map_err(|e| with_path(e, &args.image))?;
    }
    if report.is_ok() {
        say!("{}: ok", canon.display())?;
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "vbdfs: {}: {} bad block(s), {} damaged map record copy(ies), {} other error(s)",
            canon.display(),
            report.bad.len(),
            report.damaged_copies.len(),
            report.errors.len()
        );
        Ok(ExitCode::FAILURE)
    }
}
