//! Keys of encrypted images on the command line: `--key-file FILE` (offline
//! commands) and `-o key-file=FILE` (mount) load one key for the whole
//! command; every image the command opens or creates uses it.
//!
//! A key file holds a passphrase or raw key bytes (one trailing newline is
//! dropped) and must not be accessible by group or others: such a file is
//! refused (`chmod 600 FILE`). The key is read before the mount daemon forks,
//! so a relative path works, and it is never logged.

use crate::cli::output::say;
use std::path::Path;
use std::sync::Mutex;

use crate::crypto::KeyMaterial;
use crate::format::{Superblock, SB_SLOTS, SB_SLOT_SIZE};
use crate::{CreateOptions, Error, ErrorKind, Image, OpenOptions, Result};

static KEY: Mutex<Option<KeyMaterial>> = Mutex::new(None);

/// Loads the key of this command from `path` (none: no key).
pub fn set(path: Option<&Path>) -> Result<()> {
    let key = path.map(KeyMaterial::from_file).transpose()?;
    *KEY.lock().unwrap_or_else(|p| p.into_inner()) = key;
    Ok(())
}

/// The key of this command, if one was given.
pub fn get() -> Option<KeyMaterial> {
    KEY.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Opens an image with the command's key.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Error::invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let key = get();
    let mut tries = 0;
    loop {
        let opened = Image::open_with_key(path, opts, key.as_ref());
        // An image another process has open read-write (a mount's daemon),
        // read from outside: the writer may give back the space of records
        // (compaction, reclaim) that the durable state this open started
        // from still replays, or holds as its map (a leaf read as lost). A
        // newer state starts past them. Nobody rewrites an image that no
        // writer holds (one mounted read-only): its damage is real.
        let damage = match &opened {
            Err(e) if e.kind() == ErrorKind::Corrupt => Some(e.to_string()),
            Err(_) => None,
            Ok(image) => image.damage().into_iter().next(),
        };
        let Some(damage) = damage.filter(|_| opts.read_only && tries < MOUNTED_RETRIES) else {
            return opened;
        };
        if !held_by_a_writer(path) {
            return opened;
        }
        ::log::info!("{}: {damage}; reading its newer state", path.display());
        drop(opened);
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Opens of a mounted image from outside that are tried again after a
/// Corrupt error (see [`open`]).
const MOUNTED_RETRIES: u32 = 5;

/// True if another process holds the image at `path` open read-write (the
/// engine's exclusive lock; read-only opens take none).
pub(super) fn held_by_a_writer(path: &Path) -> bool {
    std::fs::File::open(path).is_ok_and(|file| {
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    })
}

/// Creates an image, encrypted under the command's key if one was given.
pub fn create(path: &Path, create: &CreateOptions, opts: &OpenOptions) -> Result<Image> {
    match get() {
        Some(key) => Image::create_encrypted(path, create, opts, &key),
        None => Image::create(path, create, opts),
    }
}

/// The newest valid superblock of the image at `path`, read without a key
/// (for the facts `info` shows of a locked encrypted image).
pub fn read_header(path: &Path) -> Result<Superblock> {
    use std::os::unix::fs::FileExt;
    let file =
        std::fs::File::open(path).map_err(|e| Error::io(format!("{}: open", path.display()), e))?;
    let mut best: Option<Superblock> = None;
    for slot in 0..SB_SLOTS {
        let mut buf = vec![0u8; SB_SLOT_SIZE as usize];
        if file.read_exact_at(&mut buf, slot * SB_SLOT_SIZE).is_err() {
            continue;
        }
        if let Ok(sb) = Superblock::decode(&buf, slot as u8) {
            if best.as_ref().is_none_or(|b| sb.seq > b.seq) {
                best = Some(sb);
            }
        }
    }
    best.ok_or_else(|| Error::corrupt(format!("{}: no valid superblock", path.display())))
}

/// The name of an image's encryption for `info`.
pub fn encryption_name(crypto: u8) -> &'static str {
    match crypto {
        0 => "none",
        _ => "xchacha20-poly1305",
    }
}

/// `vbdfs rekey IMAGE --key-file OLD --new-key-file NEW`.
pub fn rekey(args: &super::RekeyArgs) -> Result<()> {
    let old = KeyMaterial::from_file(&args.key_file)?;
    let new = KeyMaterial::from_file(&args.new_key_file)?;
    let canon = super::mount::canonical_file(&args.image)?;
    crate::crypto::rekey_file(&canon, &old, &new)
        .map_err(|e| super::mountinfo::explain_locked(&canon, e, false))?;
    say!(
        "{}: key changed (only the keyslots were rewritten)",
        args.image.display()
    )?;
    Ok(())
}
