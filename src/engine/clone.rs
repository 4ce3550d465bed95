//! Making clones: [`Image::create_clone`].
//!
//! Order of steps, chosen so a crash or error never leaves a clone whose base
//! snapshot could be deleted under it:
//! 1. open the base read-write (so it must not be mounted: a mounted image is
//!    locked, and the refusal says where it is mounted);
//! 2. without a snapshot name, take a snapshot `clone-base-YYYYMMDD-HHMMSS`
//!    (UTC) first;
//! 3. add a hold to the snapshot (committed in the base) and close the base;
//! 4. write the clone under a temporary name in the target directory — one
//!    CONFIG record and a superblock naming it — sync, and link it to the
//!    final name (never replacing an existing file);
//! 5. on any failure after 3, release the hold again (best effort; a stale
//!    hold only makes `delete` ask for `--force`).
//!
//! A mounted base cannot be opened read-write: the CLI then takes the
//! snapshot and the hold through the mount's control file, reads the base
//! read-only ([`Image::base_snapshot`]) and writes the clone with
//! [`Image::create_clone_from`].

use super::clock::UtcTime;
use super::open::{now_ns, random_u64, validate};
use super::{Image, OpenOptions};
use crate::crypto::{KeyMaterial, SEAL_OVERHEAD};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    align_up, BackingRef, Codec, RecPtr, RecordHeader, RecordKind, SnapEntry, Superblock,
    LOG_START, RECORD_ALIGN, RECORD_FLAG_COPY, RECORD_FLAG_HAS_COPY, SB_SLOT_SIZE,
};
use crate::io::{FileStore, Store};
use crate::CreateOptions;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// How to make a clone; every field defaults to the base's value.
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// Virtual size (default: the base snapshot's size). Bytes past the base's
    /// size read as zeros.
    pub size: Option<u64>,
    /// Block size (default: the base's).
    pub block_size: Option<u64>,
    /// Compression (default: the base's).
    pub codec: Option<Codec>,
}

/// `clone-base-YYYYMMDD-HHMMSS` for a time in seconds since the epoch (UTC).
fn clone_base_name(secs: u64) -> String {
    let t = UtcTime::from_secs(secs);
    format!(
        "clone-base-{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// The path from directory `from` to `to` (both absolute and canonical).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// Writes a new clone onto an empty store: a CONFIG record at the start of
/// the log and the first superblock naming it; with `key`, an encrypted clone
/// (keyslots, sealed CONFIG record, superblock MAC: `docs/format.md` §11).
fn format_clone(
    store: &dyn Store,
    create: &CreateOptions,
    backing: &BackingRef,
    key: Option<&KeyMaterial>,
) -> Result<()> {
    let block_shift = validate(create)?;
    backing.validate()?;
    let epoch = random_u64();
    let io = |e| Error::io("format clone", e);
    store.set_len(LOG_START).map_err(io)?;
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&random_u64().to_le_bytes());
    uuid[8..].copy_from_slice(&random_u64().to_le_bytes());
    let sealer = key
        .map(|k| crate::crypto::keyslot::create(store, k, &uuid))
        .transpose()?;
    let raw = backing.encode();
    let sealed_len = raw.len()
        + if sealer.is_some() {
            SEAL_OVERHEAD as usize
        } else {
            0
        };
    let mut header = RecordHeader {
        kind: RecordKind::Config,
        codec: 0,
        flags: RECORD_FLAG_HAS_COPY,
        payload_len: sealed_len as u32,
        raw_len: raw.len() as u32,
        lsn: 1,
        epoch,
        self_off: LOG_START,
        key: 0,
        birth: 1,
        crc: 0,
        synced: 0,
    };
    // The record, then its second copy at the next log unit (format.md §4).
    let plain = raw;
    let mut copy = RecordHeader {
        flags: RECORD_FLAG_COPY,
        lsn: 2,
        self_off: super::copies::second_off(LOG_START, header.total_len() as u32),
        ..header
    };
    for h in [&mut header, &mut copy] {
        let mut payload = plain.clone();
        if let Some(s) = &sealer {
            h.birth = 0;
            payload = s.seal(&h.sealed_aad(), 0, 1, &plain)?;
        }
        store
            .write_at(&h.encode(&payload), h.self_off)
            .map_err(io)?;
    }
    let log_start = copy.self_off + align_up(copy.total_len(), RECORD_ALIGN);
    let sb = Superblock {
        flags: 0,
        image_uuid: uuid,
        seq: 1,
        gen: 1,
        block_shift,
        codec: create.codec,
        virtual_size: create.size,
        log_start_off: log_start,
        log_start_lsn: 3,
        log_epoch: epoch,
        log_tail: log_start,
        index: RecPtr::default(),
        snap_table: RecPtr::default(),
        config: RecPtr {
            off: LOG_START,
            len: header.total_len() as u32,
            crc: header.crc,
        },
        created_ns: now_ns(),
        log_limit: 0,
        crypto: if sealer.is_some() {
            crate::crypto::CRYPTO_XCHACHA20_POLY1305
        } else {
            0
        },
    };
    let bytes = crate::crypto::encode_superblock_with(&sb, 1, sealer.as_ref());
    store.write_at(&bytes, SB_SLOT_SIZE).map_err(io)?;
    store.sync().map_err(io)
}

/// Writes the clone under a temporary name in `dir` and links it to `new`.
fn write_clone(
    new: &Path,
    dir: &Path,
    create: &CreateOptions,
    b: &BackingRef,
    key: Option<&KeyMaterial>,
) -> Result<()> {
    let name = new.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(format!("{}: create", tmp.display()), e))?;
    let made = format_clone(&FileStore::new(file), create, b, key).and_then(|()| {
        std::fs::hard_link(&tmp, new).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::new(
                    ErrorKind::Exists,
                    format!("{}: already exists", new.display()),
                )
            } else {
                Error::io(format!("{}: create", new.display()), e)
            }
        })
    });
    let _ = std::fs::remove_file(&tmp);
    made?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", e))
}

/// A snapshot of a base image, as a clone records it: the base's identity and
/// the snapshot's id, generation, index and size (from [`Image::base_snapshot`]).
#[derive(Debug, Clone)]
pub struct BaseSnapshot {
    uuid: [u8; 16],
    entry: SnapEntry,
    block_shift: u8,
    codec: Codec,
    /// The key of an encrypted base: its clones are encrypted under it too.
    secret: Option<KeyMaterial>,
}

impl BaseSnapshot {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }
}

fn canonical(p: &Path) -> Result<PathBuf> {
    p.canonicalize().map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        Error::new(kind, format!("{}: {e}", p.display()))
    })
}

impl Image {
    /// What a clone of snapshot `name` of this image records (works on a
    /// read-only open, e.g. of a mounted base).
    pub fn base_snapshot(&self, name: &str) -> Result<BaseSnapshot> {
        let id = self.snapshot(name)?.id;
        let entry = self
            .inner
            .snaps
            .entry_by_id(id)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("snapshot '{name}'")))?;
        Ok(BaseSnapshot {
            uuid: self.inner.sb.lock().image_uuid,
            entry,
            block_shift: self.inner.block_shift,
            codec: self.inner.codec,
            secret: self.inner.store.sealer().and_then(|s| s.secret()).cloned(),
        })
    }

    /// A snapshot name `clone-base-YYYYMMDD-HHMMSS` (UTC, now) not taken yet.
    pub fn clone_base_name(&self) -> String {
        let first = clone_base_name(now_ns() / 1_000_000_000);
        let mut name = first.clone();
        for n in 2.. {
            if self.snapshot(&name).is_err() {
                break;
            }
            name = format!("{first}-{n}");
        }
        name
    }

    /// Writes `new` as a clone of `base` (the snapshot described by `snap`
    /// of the image at `base_path`) and opens it. The caller holds the
    /// snapshot (see [`Image::snapshot_hold`]); [`Image::create_clone`] does
    /// everything.
    pub fn create_clone_from(
        new: &Path,
        base_path: &Path,
        snap: &BaseSnapshot,
        opts: &CloneOptions,
        open: &OpenOptions,
    ) -> Result<Image> {
        if new.symlink_metadata().is_ok() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("{}: already exists", new.display()),
            ));
        }
        let dir = new
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let (base, dir) = (canonical(base_path)?, canonical(dir)?);
        let entry = &snap.entry;
        let backing = BackingRef {
            base_uuid: snap.uuid,
            snap_id: entry.id,
            snap_gen: entry.gen,
            snap_index: entry.index,
            virtual_size: entry.virtual_size,
            rel_path: relative(&dir, &base).as_os_str().as_bytes().to_vec(),
            abs_path: base.as_os_str().as_bytes().to_vec(),
            snap_name: entry.name.clone(),
        };
        let create = CreateOptions {
            size: opts.size.unwrap_or(entry.virtual_size),
            block_size: opts.block_size.unwrap_or(1 << snap.block_shift),
            codec: opts.codec.unwrap_or(snap.codec),
        };
        let target = dir.join(new.file_name().unwrap_or_default());
        // A clone of an encrypted base is encrypted under the same key.
        let key = snap.secret.as_ref();
        write_clone(&target, &dir, &create, &backing, key)?;
        Image::open_with_key(&target, open, key).inspect_err(|_| {
            let _ = std::fs::remove_file(&target); // ours: it was just linked
        })
    }

    /// Creates `new`, a copy-on-write clone of snapshot `snapshot` of the
    /// image at `base` (without a name, a snapshot of the base's current state
    /// is taken first), and opens it. The base must not be open read-write
    /// elsewhere (`Locked`): its snapshot gets a hold, so it cannot be
    /// deleted while the clone exists.
    pub fn create_clone(
        new: &Path,
        base: &Path,
        snapshot: Option<&str>,
        opts: &CloneOptions,
        open: &OpenOptions,
    ) -> Result<Image> {
        Self::create_clone_with_key(new, base, snapshot, opts, open, None)
    }

    /// [`Image::create_clone`] of a base that may be encrypted (`key` is its
    /// key; the clone is then encrypted under the same key).
    pub fn create_clone_with_key(
        new: &Path,
        base: &Path,
        snapshot: Option<&str>,
        opts: &CloneOptions,
        open: &OpenOptions,
        key: Option<&KeyMaterial>,
    ) -> Result<Image> {
        if new.symlink_metadata().is_ok() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("{}: already exists", new.display()),
            ));
        }
        let base = canonical(base)?;
        let base_opts = OpenOptions {
            read_only: false,
            cache_bytes: 8 << 20,
            workers: 1,
            salvage_log: false,
            adapt_floor: None,
            log_region_min: None,
        };
        let img = Image::open_with_key(&base, &base_opts, key)?;
        let name = match snapshot {
            Some(name) => name.to_string(),
            None => {
                let name = img.clone_base_name();
                img.snapshot_create(&name)?;
                name
            }
        };
        if let Err(e) = img.snapshot_hold(&name) {
            if snapshot.is_none() {
                let _ = img.snapshot_delete(&name);
            }
            // Name the base: the missing snapshot is its, not the new image's.
            return Err(e.context(format!("base {}", base.display())));
        }
        let snap = img.base_snapshot(&name);
        img.close()?;
        let made = snap.and_then(|snap| Image::create_clone_from(new, &base, &snap, opts, open));
        if made.is_err() {
            // The base is left as it was: the hold goes, and so does the
            // snapshot taken for this clone.
            let released = Image::open_with_key(&base, &base_opts, key).and_then(|img| {
                img.snapshot_release(&name)?;
                if snapshot.is_none() {
                    img.snapshot_delete(&name)?;
                }
                img.close()
            });
            if let Err(e) = released {
                ::log::warn!(
                    "could not release the hold on {}@{name}: {e}",
                    base.display()
                );
            }
        }
        made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(clone_base_name(0), "clone-base-19700101-000000");
        assert_eq!(
            clone_base_name(951_782_400 + 3661),
            "clone-base-20000229-010101"
        );
        assert_eq!(
            relative(Path::new("/srv/vms"), Path::new("/srv/gold/base.vbd")),
            PathBuf::from("../gold/base.vbd")
        );
        assert_eq!(
            relative(Path::new("/srv"), Path::new("/srv/base.vbd")),
            PathBuf::from("base.vbd")
        );
    }
}
