//! `vbdfs export`: a `.vbd` image (opened read-only, so a mounted image can be
//! exported too) to a raw file or a qcow2 file. Raw output to a regular file is
//! sparse: only mapped, non-zero blocks are written and the length is set at
//! the end. A new file is written under a temporary name and moved into place
//! on success; an existing regular file is refused. A block device is written
//! in place, zeros included.

use super::import::reader_threads;
use super::pipeline::{self, Plan};
use super::progress::Progress;
use super::staging::TempImage;
use crate::engine::{DiskView, OpenOptions};
use crate::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions as FsOpen};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The grid on which a raw export leaves zeros as holes.
const PAGE: u64 = 4096;

/// Output formats of [`export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A flat raw file (sparse).
    Raw,
    /// A qcow2 v3 file.
    Qcow2,
}

impl std::str::FromStr for ExportFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(ExportFormat::Raw),
            "qcow2" => Ok(ExportFormat::Qcow2),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("cannot export to {other:?} (expected raw or qcow2)"),
            )),
        }
    }
}

/// Splits `IMAGE@SNAP` when the name as a whole is not an existing file.
pub fn split_snapshot(spec: &Path) -> (PathBuf, Option<String>) {
    if spec.exists() {
        return (spec.to_path_buf(), None);
    }
    let s = spec.to_string_lossy();
    match s.rsplit_once('@') {
        Some((img, snap)) if !img.is_empty() && !snap.contains('/') => {
            (PathBuf::from(img), Some(snap.to_string()))
        }
        _ => (spec.to_path_buf(), None),
    }
}

/// Exports `image` (or `IMAGE@SNAP`) to `dest`. Without `format` the
/// destination's extension decides (`.qcow2` gives qcow2, anything else raw).
pub fn export(
    image: &Path,
    dest: &Path,
    format: Option<ExportFormat>,
    progress: bool,
) -> Result<()> {
    let (image, snap) = split_snapshot(image);
    let format = format.unwrap_or_else(|| match dest.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("qcow2") => ExportFormat::Qcow2,
        _ => ExportFormat::Raw,
    });
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let head = crate::cli::keys::open(&image, &opts)?;
    let snapshot = match &snap {
        Some(name) => Some(
            head.open_snapshot(name)
                .map_err(|e| e.context(format!("{}@{name}", image.display())))?,
        ),
        None => None,
    };
    let img: &dyn DiskView = match &snapshot {
        Some(reader) => reader,
        None => &head,
    };
    // An encrypted image's export is its plaintext: only its owner reads it.
    let target = Target::prepare(dest, format, head.is_encrypted())?;
    let bar = Progress::new(progress, img.len(), "export");
    match format {
        ExportFormat::Raw => export_raw(img, &target, &bar),
        ExportFormat::Qcow2 => super::qcow2_writer::write(img, &target.file, &bar),
    }
    .map_err(|e| e.context(format!("export {} to {}", image.display(), dest.display())))?;
    bar.finish();
    target.commit(dest)
}

/// Where the bytes go: a new file under a temporary name, or a block device.
#[derive(Debug)]
struct Target {
    file: File,
    temp: Option<TempImage>,
}

impl Target {
    /// The destination; a new file is created readable by its owner only
    /// when `private`, else as the umask allows.
    fn prepare(dest: &Path, format: ExportFormat, private: bool) -> Result<Target> {
        if let Ok(meta) = std::fs::metadata(dest) {
            let kind = meta.file_type();
            if kind.is_block_device() && format == ExportFormat::Raw {
                let file = FsOpen::new()
                    .write(true)
                    .open(dest)
                    .map_err(|e| Error::io(format!("{}: open", dest.display()), e))?;
                return Ok(Target { file, temp: None });
            }
            if !kind.is_file() && !kind.is_block_device() {
                return Err(Error::invalid(format!(
                    "{}: is not a regular file or block device",
                    dest.display()
                )));
            }
            return Err(Error::new(
                ErrorKind::Exists,
                format!("{}: already exists; remove it first", dest.display()),
            ));
        }
        // Found out before the data is copied, not when it is put in place.
        if std::fs::symlink_metadata(dest).is_ok() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!(
                    "{}: is a symbolic link to nothing; remove it first",
                    dest.display()
                ),
            ));
        }
        if dest.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return Err(Error::invalid(format!(
                "{}: names a directory, not a file",
                dest.display()
            )));
        }
        let temp = TempImage::new(dest)?;
        let file = FsOpen::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o666 })
            .open(&temp.path)
            .map_err(|e| Error::io(format!("{}: create", temp.path.display()), e))?;
        Ok(Target {
            file,
            temp: Some(temp),
        })
    }

    fn is_device(&self) -> bool {
        self.temp.is_none()
    }

    fn commit(self, dest: &Path) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("{}: sync", dest.display()), e))?;
        match self.temp {
            Some(t) => t.commit(dest),
            None => Ok(()),
        }
    }
}

fn export_raw(img: &dyn DiskView, target: &Target, bar: &Progress) -> Result<()> {
    let len = img.len();
    let device = target.is_device();
    if device {
        let dev_len = std::io::Seek::seek(&mut &target.file, std::io::SeekFrom::End(0))
            .map_err(|e| Error::io("seek device", e))?;
        if dev_len < len {
            return Err(Error::invalid(format!(
                "the device holds {dev_len} bytes, the image needs {len}"
            )));
        }
    }
    let plan = Plan {
        len,
        // A new file's holes are as fine as its pages: the zeros around
        // data inside a block stay holes (a device is written whole).
        block: if device { img.block_size() } else { PAGE },
        threads: reader_threads(),
        write_zeros: device,
    };
    let file = &target.file;
    // A length the file system cannot hold fails now, not after the data.
    if !device {
        file.set_len(len).map_err(|e| Error::io("set length", e))?;
    }
    pipeline::copy(
        plan,
        bar,
        |pos| {
            if device {
                return Ok((pos < len).then_some((pos, len)));
            }
            Ok(img
                .next_data(pos)
                .map(|d| (d, img.next_hole(d).max(d + 1).min(len))))
        },
        |buf, off| img.read_at(buf, off),
        |data, off| {
            file.write_all_at(data, off)
                .map_err(|e| Error::io(format!("write at {off}"), e))
        },
    )?;
    Ok(())
}
