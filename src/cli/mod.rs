//! The `vbdfs` command line: argument definitions (clap) and dispatch to one
//! module per command group. Every command returns a [`Result`]; `main` prints
//! an error as one line `vbdfs: <message>` and exits non-zero.

mod compact;
mod create;
mod daemon;
mod inspect;
pub mod keys;
pub mod logger;
mod mount;
pub mod mountinfo;
pub mod options;
pub(crate) mod output;
mod resize;
mod snapshot;
mod umount;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::Result;

/// vbdfs: copy-on-write, compressed, checksummed disk images served through
/// FUSE as a flat raw file.
#[derive(Debug, Parser)]
#[command(name = "vbdfs", version, about, max_term_width = 100)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new image.
    Create(CreateArgs),
    /// Show an image's size, layout, space use and state.
    Info(InfoArgs),
    /// Mount an image: MOUNTPOINT/disk is the flat raw disk, MOUNTPOINT/control takes commands.
    Mount(MountArgs),
    /// Flush, write a clean state and unmount (waits until the image is closed).
    Umount(UmountArgs),
    /// Verify every checksum and all metadata.
    Check(CheckArgs),
    /// Offline snapshot management (a mounted image: use MOUNTPOINT/control).
    Snapshot(SnapshotArgs),
    /// New copy-on-write image whose unwritten blocks read from a snapshot of a base.
    Clone(CloneArgs),
    /// Convert a raw, qcow2 or vhd file into an image.
    Import(ImportArgs),
    /// Convert an image into a raw file (or qcow2 when DEST ends in .qcow2).
    Export(ExportArgs),
    /// Reclaim space held by overwritten blocks and deleted snapshots, and shorten the file (offline; mounted: MOUNTPOINT/control).
    Compact(CompactArgs),
    /// Change the key of an encrypted image (rewrites only its keyslots, not the data).
    Rekey(RekeyArgs),
    /// Change the disk's size (offline; snapshots keep theirs).
    Resize(ResizeArgs),
}

/// `vbdfs create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Path of the new image (must not exist).
    pub image: PathBuf,
    /// Virtual disk size, e.g. 10G (K, M, G, T are powers of 1024).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Block size: a power of two from 4K to 1M (default 64K; with --backing,
    /// the base's).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub block_size: Option<String>,
    /// Compression: none, zstd (level 1, the default) or zstd:LEVEL (1..19, or -7..-1: faster, larger).
    #[arg(long, value_name = "CODEC")]
    pub compress: Option<String>,
    /// Make a copy-on-write clone of BASE at snapshot SNAP (without @SNAP, a
    /// snapshot of the base's current state is taken first). A base mounted
    /// read-write is asked through its control file; one mounted read-only
    /// must be unmounted. --size, --block-size and --compress default to the
    /// base's.
    #[arg(long, value_name = "BASE[@SNAP]")]
    pub backing: Option<String>,
    /// Encrypt the image (XChaCha20-Poly1305, data key wrapped under
    /// --key-file through Argon2id). Needs --key-file. With --backing, leave
    /// it out: a clone is encrypted exactly when its base is, and --key-file
    /// then gives the base's key.
    #[arg(long)]
    pub encrypt: bool,
    /// Key file for --encrypt: a passphrase or raw key bytes (one trailing
    /// newline ignored); must not be readable by group or others (chmod 600).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The image.
    pub image: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Key file of an encrypted image (without it, only unencrypted facts are shown).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The image.
    pub image: PathBuf,
    /// An existing directory to mount on.
    pub mountpoint: PathBuf,
    /// Options, comma-separated: cache=SIZE, ro, rw, allow_other, threads=N, uid=N,
    /// gid=N, mode=OCTAL, adapt[=LEVEL], log-region=SIZE, key-file=PATH (mount(8)/fstab options
    /// such as nofail or _netdev are ignored).
    ///
    /// cache=SIZE: engine buffer cache (default 256M; K, M, G, T suffixes).
    /// ro / rw: read-only or read-write (default rw).
    /// allow_other: let other users in; access then follows mode, uid and gid.
    /// threads=N: I/O worker threads (default 32).
    /// uid=N, gid=N: numeric owner of disk and control (default: the mounting user).
    /// mode=OCTAL: permission bits of disk (default 0600; control is always 0600).
    /// adapt[=LEVEL]: while write-back falls behind, compress at faster zstd
    ///   levels, down to LEVEL (default -3), instead of slowing writes (zstd images).
    /// log-region=SIZE: the smallest hole of the image file the log moves into
    ///   (default 256M, at least 1M): smaller keeps the file shorter, moves more often.
    /// key-file=PATH: the key of an encrypted image (a file readable by its
    ///   owner only; read before the daemon starts).
    ///
    /// Accepted and ignored (they belong to mount(8), fstab or systemd): defaults,
    /// nofail, noauto, auto, _netdev, nodev, nosuid, noexec, dev, suid, exec, user,
    /// users, nouser, comment=..., x-*. Any other option is an error. -o may repeat.
    #[arg(short = 'o', value_name = "OPTS", verbatim_doc_comment)]
    pub options: Vec<String>,
    /// Stay in the foreground and log to stderr.
    #[arg(short = 'f', long)]
    pub foreground: bool,
}

/// `vbdfs umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
}

/// `vbdfs check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image.
    pub image: PathBuf,
    /// Open read-write first, which runs crash recovery and leaves the image
    /// clean; replays past a damaged log record that would refuse the open
    /// (dropping it: its block may read an older value).
    #[arg(long)]
    pub repair: bool,
    /// Key file of an encrypted image.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// create, list, delete or rollback.
    #[arg(value_parser = ["create", "list", "delete", "rollback"])]
    pub action: String,
    /// The image.
    pub image: PathBuf,
    /// The snapshot name (not for list).
    pub name: Option<String>,
    /// delete: delete even if clones are based on the snapshot (they can then
    /// no longer be opened).
    #[arg(long)]
    pub force: bool,
    /// Key file of an encrypted image.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The base: IMAGE@SNAP.
    pub source: String,
    /// The new image.
    pub new: PathBuf,
    /// Key file of an encrypted base: the clone is encrypted under the same key.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to read.
    pub source: PathBuf,
    /// The image to create.
    pub image: PathBuf,
    /// The source format (default: detected).
    #[arg(long, value_parser = ["raw", "qcow2", "vhd"])]
    pub format: Option<String>,
    /// Encrypt the new image under this key file (see `create --encrypt`).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// IMAGE or IMAGE@SNAP.
    pub image: String,
    /// The file to write: a raw file, a qcow2 when it ends in .qcow2, or a block device.
    pub dest: PathBuf,
    /// Key file of an encrypted image.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The image.
    pub image: PathBuf,
    /// Key file of an encrypted image.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The image (not mounted).
    pub image: PathBuf,
    /// The new size (e.g. 20G), or +SIZE to grow by, -SIZE to shrink by (K, M, G, T are
    /// powers of 1024; a multiple of 512 bytes).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
    /// Allow a smaller size: the data past it is dropped (shrink the file system and
    /// partitions inside first).
    #[arg(long)]
    pub shrink: bool,
    /// Key file of an encrypted image.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `vbdfs rekey`.
#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// The encrypted image (not mounted).
    pub image: PathBuf,
    /// The current key file.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// The new key file.
    #[arg(long, value_name = "FILE")]
    pub new_key_file: PathBuf,
}

/// Runs one command; Ok carries the exit status (non-zero e.g. when `check`
/// finds problems it has already reported).
pub fn run(cli: Cli) -> Result<ExitCode> {
    // One key per command, for every image it opens (crate::cli::keys).
    let key_file = match &cli.command {
        Command::Create(a) => a.key_file.clone(),
        Command::Info(a) => a.key_file.clone(),
        Command::Check(a) => a.key_file.clone(),
        Command::Snapshot(a) => a.key_file.clone(),
        Command::Import(a) => a.key_file.clone(),
        Command::Export(a) => a.key_file.clone(),
        Command::Compact(a) => a.key_file.clone(),
        Command::Clone(a) => a.key_file.clone(),
        Command::Resize(a) => a.key_file.clone(),
        _ => None,
    };
    // Before any thread starts (key derivation, readers, progress).
    if matches!(cli.command, Command::Import(_) | Command::Export(_)) {
        crate::convert::staging::remove_on_signals()?;
    }
    keys::set(key_file.as_deref())?;
    if !matches!(cli.command, Command::Mount(_)) {
        logger::init_command();
    }
    let result = match cli.command {
        Command::Create(a) => create::run(&a).map(|()| ExitCode::SUCCESS),
        Command::Info(a) => inspect::info(&a).map(|()| ExitCode::SUCCESS),
        Command::Check(a) => inspect::check(&a),
        Command::Mount(a) => mount::run(&a).map(|()| ExitCode::SUCCESS),
        Command::Umount(a) => umount::run(&a).map(|()| ExitCode::SUCCESS),
        Command::Snapshot(a) => snapshot::run(&a).map(|()| ExitCode::SUCCESS),
        Command::Clone(a) => snapshot::clone(&a).map(|()| ExitCode::SUCCESS),
        Command::Import(a) => crate::convert::run_import(
            &a.source,
            &a.image,
            a.format.as_deref(),
            &crate::CreateOptions::default(),
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Export(a) => {
            crate::convert::run_export(&a.image, &a.dest, None).map(|()| ExitCode::SUCCESS)
        }
        Command::Compact(a) => compact::run(&a).map(|()| ExitCode::SUCCESS),
        Command::Rekey(a) => keys::rekey(&a).map(|()| ExitCode::SUCCESS),
        Command::Resize(a) => resize::run(&a).map(|()| ExitCode::SUCCESS),
    };
    if result.is_ok() {
        logger::show_held();
    }
    result
}
