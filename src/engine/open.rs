//! Creating images and opening them: locking, superblock choice, then the
//! map ([`super::mapload`]) and the log after it ([`super::replay`]).

use super::log::LogTail;
use super::mapload::load_map_losing;
use super::replay::roll_forward;
use super::{Image, Inner, OpenOptions};
use crate::cache::BlockCache;
use crate::crypto::KeyMaterial;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    align_up, zstd_level_ok, Superblock, LOG_START, LOG_UNIT, MAX_BLOCK_SHIFT, MAX_COUNTER,
    MAX_VIRTUAL_SIZE, MIN_BLOCK_SHIFT, SB_FLAG_DIRTY, SB_SLOTS, SB_SLOT_SIZE, ZSTD_LEVELS_TEXT,
};
use crate::io::{FileStore, Store};
use crate::{Codec, CreateOptions};
use parking_lot::{Mutex, RwLock};
use std::fs::{File, OpenOptions as FsOpen};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // getrandom only fails if the OS has no entropy source at all.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b) | 1
}

pub(super) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Checks a disk size: a positive multiple of 512 bytes, at most 64 TiB.
pub fn check_disk_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "size {size} must be a positive multiple of 512 bytes, at most 64 TiB"
        )));
    }
    Ok(())
}

/// Checks create options; the message names the bad value.
pub(super) fn validate(create: &CreateOptions) -> Result<u8> {
    let bs = create.block_size;
    if !bs.is_power_of_two()
        || !(MIN_BLOCK_SHIFT..=MAX_BLOCK_SHIFT).contains(&(bs.trailing_zeros() as u8))
    {
        return Err(Error::invalid(format!(
            "block size {bs} is not a power of two from 4 KiB to 1 MiB"
        )));
    }
    check_disk_size(create.size)?;
    if let Codec::Zstd(level) = create.codec {
        if !zstd_level_ok(level) {
            return Err(Error::invalid(format!(
                "invalid zstd level {level}: expected {ZSTD_LEVELS_TEXT}"
            )));
        }
    }
    Ok(bs.trailing_zeros() as u8)
}

/// Writes the first superblock of a new image onto an empty store; with
/// `key`, an encrypted image (keyslots first, then the superblock with its MAC).
pub(super) fn format_store(
    store: &dyn Store,
    create: &CreateOptions,
    key: Option<&KeyMaterial>,
) -> Result<()> {
    let block_shift = validate(create)?;
    let sb = Superblock {
        flags: 0,
        image_uuid: {
            let mut u = [0u8; 16];
            u[..8].copy_from_slice(&random_u64().to_le_bytes());
            u[8..].copy_from_slice(&random_u64().to_le_bytes());
            u
        },
        seq: 1,
        gen: 1,
        block_shift,
        codec: create.codec,
        virtual_size: create.size,
        log_start_off: LOG_START,
        log_start_lsn: 1,
        log_epoch: random_u64(),
        log_tail: LOG_START,
        index: Default::default(),
        snap_table: Default::default(),
        config: Default::default(),
        created_ns: now_ns(),
        log_limit: 0,
        crypto: if key.is_some() {
            crate::crypto::CRYPTO_XCHACHA20_POLY1305
        } else {
            0
        },
    };
    let io = |e| Error::io("format image", e);
    store.set_len(LOG_START).map_err(io)?;
    let sealer = match key {
        Some(key) => Some(crate::crypto::keyslot::create(store, key, &sb.image_uuid)?),
        None => None,
    };
    let bytes = crate::crypto::encode_superblock_with(&sb, 1, sealer.as_ref());
    store.write_at(&bytes, SB_SLOT_SIZE).map_err(io)?;
    store.sync().map_err(io)
}

/// How long a lock held elsewhere is retried before the image is reported
/// in use. A child process that another thread of this process forks shares
/// its open files, and so the lock of an image open at that moment, until it
/// execs: an image closed and reopened meanwhile looked in use (seen in the
/// test suite: 7 of 150 runs of a close-and-reopen test next to a test that
/// ran `dd`).
const LOCK_RETRY: Duration = Duration::from_millis(500);

fn lock(file: &File, path: &Path) -> Result<()> {
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Locked,
                    format!(
                        "{}: image is in use by another process (mounted or open)",
                        path.display()
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("{}: lock", path.display()), e))
            }
        }
    }
}

pub(super) fn create_file(
    path: &Path,
    create: &CreateOptions,
    open: &OpenOptions,
    key: Option<&KeyMaterial>,
) -> Result<Image> {
    validate(create)?;
    let file = FsOpen::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::new(
                    ErrorKind::Exists,
                    format!("{}: already exists", path.display()),
                )
            } else {
                Error::io(format!("{}: create", path.display()), e)
            }
        })?;
    lock(&file, path)?;
    let store = Arc::new(FileStore::with_direct_writes(file));
    let made = format_store(store.as_ref(), create, key).and_then(|()| {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("sync directory", e))
    });
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(e.context(path.display()));
    }
    // The first open writes too (its checkpoint): a full disk can fail it.
    // The file is this call's own, new and locked: a failed create leaves
    // nothing.
    Image::open_keyed(store, open, Some(path), key).map_err(|e| {
        let _ = std::fs::remove_file(path);
        e.context(path.display())
    })
}

pub(super) fn open_file(
    path: &Path,
    open: &OpenOptions,
    key: Option<&KeyMaterial>,
) -> Result<Image> {
    let file = FsOpen::new()
        .read(true)
        .write(!open.read_only)
        .open(path)
        .map_err(|e| {
            let kind = match e.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::ReadOnly,
                _ => ErrorKind::Io,
            };
            let hint = match e.raw_os_error() {
                Some(libc::EROFS) if !open.read_only => " (`vbdfs mount -o ro` serves it)",
                _ => "",
            };
            Error::new(kind, format!("{}: {e}{hint}", path.display()))
        })?;
    if !open.read_only {
        lock(&file, path)?;
    }
    let store = if open.read_only {
        FileStore::new(file)
    } else {
        FileStore::with_direct_writes(file)
    };
    Image::open_keyed(Arc::new(store), open, Some(path), key).map_err(|e| e.context(path.display()))
}

/// Picks the valid superblock with the highest sequence number.
pub(super) fn read_superblock(store: &dyn Store, file_len: u64) -> Result<Superblock> {
    if file_len < LOG_START {
        return Err(Error::corrupt(format!(
            "file is {file_len} bytes, too short to be a vbd image"
        )));
    }
    let mut best: Option<Superblock> = None;
    let mut first_err = None;
    for slot in 0..SB_SLOTS {
        let mut buf = vec![0u8; SB_SLOT_SIZE as usize];
        store
            .read_at(&mut buf, slot * SB_SLOT_SIZE)
            .map_err(|e| Error::io("read superblock", e))?;
        let decoded = Superblock::decode(&buf, slot as u8).and_then(|sb| {
            crate::crypto::verify_superblock(&buf, slot as u8, store)?;
            Ok(sb)
        });
        match decoded {
            Ok(sb) if best.as_ref().is_none_or(|b| sb.seq > b.seq) => best = Some(sb),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Unsupported => return Err(e),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    best.ok_or_else(|| first_err.unwrap_or_else(|| Error::corrupt("no valid superblock")))
}

/// Reads an image from `store` into memory: superblock, snapshot table,
/// backing chain (clones; relative paths resolve against `origin`'s
/// directory), map, log roll-forward.
pub(super) fn load(
    store: Arc<dyn Store>,
    open: &OpenOptions,
    origin: Option<&Path>,
) -> Result<Inner> {
    let file_len = store.len().map_err(|e| Error::io("size of image", e))?;
    let sb = read_superblock(store.as_ref(), file_len)?;
    // A checkpoint writes records after its log start before its superblock,
    // so the log start is always inside the file. A larger one would put the
    // next append (and the file's end) at an arbitrary offset up to 2^56.
    if sb.log_start_off > file_len {
        return Err(Error::corrupt(format!(
            "log start {} is past the end of the file ({file_len} bytes)",
            sb.log_start_off
        )));
    }
    let nblocks = sb.virtual_size.div_ceil(sb.block_size());
    // Read-only, a snapshot table lost in both copies costs the snapshots.
    let snaps = super::snaptable::load_table(store.as_ref(), &sb, file_len)?;
    if let Some(why) = snaps.lost().filter(|_| !open.read_only) {
        return Err(Error::corrupt(format!(
            "{why}; refused read-write (their records would be reclaimed as dead): \
             `vbdfs mount -o ro` serves the disk without its snapshots"
        )));
    }
    let backing = super::backing::open_backing(store.as_ref(), &sb, file_len, origin)?;
    let base = backing.as_ref().map(|b| b.reader.as_ref());
    // Read-only, a leaf lost in both copies costs its blocks, not the image.
    let mut map = load_map_losing(
        store.as_ref(),
        sb.index,
        sb.block_shift,
        file_len,
        nblocks,
        true,
    )?;
    if let Some(why) = map.lost.values().next().filter(|_| !open.read_only) {
        return Err(Error::corrupt(format!(
            "{why}; refused read-write (the map would be written back without that leaf's \
             blocks): `vbdfs mount -o ro` serves the other leaves' blocks, to copy out with \
             `dd conv=noerror,sync` or ddrescue"
        )));
    }
    let mut recovery_notes = Vec::new();
    let damaged = super::copies::damaged_firsts(store.as_ref(), &sb, &mut map, open.read_only);
    recovery_notes.extend(damaged.notes.iter().cloned());
    // A run in a hole of the file ends at its limit (regions.rs): the
    // records past it are other runs'.
    let log_end = match sb.log_limit {
        0 => file_len,
        limit => limit.min(file_len),
    };
    let (end, lsn, max_birth) = roll_forward(
        store.as_ref(),
        &sb,
        &mut map,
        log_end,
        base,
        open.salvage_log,
        &mut recovery_notes,
    )?;
    // A read-write session counts seq, lsn and generations on from here, and
    // what it writes must still pass Superblock::decode. Real images stay far
    // below half the range; only a hostile one gets there: read it read-only.
    if !open.read_only
        && (sb.seq > MAX_COUNTER / 2
            || lsn > MAX_COUNTER / 2
            || max_birth > u64::from(u32::MAX / 2))
    {
        return Err(Error::corrupt(format!(
            "counters too close to their limits to open read-write (seq {}, lsn {lsn}, \
             generation {max_birth})",
            sb.seq
        )));
    }
    // A new run starts past the end of the file: past every byte of the old
    // run (torn appends, and the last checkpoint's records, which may lie
    // beyond a batch that was in flight at a crash) and past its
    // preallocated zeros (a clean close trims those).
    let tail = if open.read_only {
        end
    } else {
        align_up(file_len.max(end), LOG_UNIT)
    };
    let epoch = if open.read_only {
        sb.log_epoch
    } else {
        random_u64()
    };
    let adapt = match open.adapt_floor {
        Some(floor) if !open.read_only => Some(super::adapt::Adapt::new(sb.codec, floor)?),
        _ => None,
    };
    let block_cache = open.cache_bytes - super::threads_reserve(open, 1 << sb.block_shift);
    let (kick, kick_rx) = crossbeam_channel::bounded(1);
    let (stop_tx, stop_rx) = crossbeam_channel::unbounded();
    // Host space far beyond the head's data: dead space earlier sessions
    // left (their reclaim held the partly dead pages in memory only, a
    // crash its held runs). The reclaim thread compacts it away. (Not with
    // snapshots, whose data the head's does not count: every mount would.)
    let left_dead = !open.read_only
        && snaps.count() == 0
        && store
            .allocated()
            .is_some_and(|held| held > 2 * map.stored_bytes + LEFT_DEAD_MIN);
    // The index as read, unless the recovery checkpoint must write it anew.
    let index_listed = (!open.read_only && !damaged.rewrite.index)
        .then(|| (sb.index, map.ptrs.values().copied().collect()));
    let inner = Inner {
        recovery_notes,
        rewrite: damaged.rewrite,
        read_only: open.read_only,
        disk_size: AtomicU64::new(sb.virtual_size),
        block_shift: sb.block_shift,
        codec: sb.codec,
        adapt,
        opened_clean: sb.flags & SB_FLAG_DIRTY == 0,
        first_gen: max_birth + 1,
        // Read-only, the run found (in a hole: up to its limit) is what is
        // allocated ahead of its tail (statistics).
        log: Mutex::new(LogTail::new(tail, lsn, epoch, max_birth + 1, {
            match (open.read_only, sb.log_limit) {
                (true, limit) if limit != 0 => limit.clamp(tail, file_len.max(tail)),
                _ => file_len,
            }
        })),
        publish_turn: Mutex::new(0),
        publish_cv: parking_lot::Condvar::new(),
        rooms_cv: parking_lot::Condvar::new(),
        map: RwLock::new(map),
        cache: BlockCache::new(block_cache, 1 << sb.block_shift),
        cache_budget: open.cache_bytes,
        checkpoint_lock: Mutex::new(()),
        index_listed: Mutex::new(index_listed),
        regions: super::regions::Regions::with_min(open.log_region_min),
        deleted_snapshots: Mutex::new(Vec::new()),
        compactions: AtomicU64::new(0),
        judging_deleted: Mutex::new(()),
        sync_lock: Mutex::new(()),
        failed: Mutex::new(None),
        failed_flag: AtomicBool::new(false),
        failed_no_space: AtomicBool::new(false),
        sync_failed: AtomicBool::new(false),
        kick,
        kick_rx,
        stop_tx,
        stop_rx,
        snaps: Arc::new(snaps),
        backing,
        readahead: super::readahead::Readahead::new(block_cache),
        dead_space: Default::default(),
        run_bufs: Default::default(),
        sb: Mutex::new(sb),
        store,
    };
    if left_dead {
        inner.regions.want_compaction();
    }
    Ok(inner)
}

/// Host space beyond twice the head's data that makes an open ask for a
/// compaction.
const LEFT_DEAD_MIN: u64 = 64 << 20;
