//! The engine side of encryption: a [`Store`] that carries the unlocked keys
//! (the log layer seals and opens records through [`Store::sealer`]), and the
//! superblock MAC.

use super::{keyslot, KeyMaterial, Sealer};
use crate::error::{Error, Result};
use crate::format::{Superblock, SB_CRC_OFF, SB_LOG_LIMIT_OFF, SB_MAC_OFF};
use crate::io::Store;
use std::io;
use std::sync::Arc;

/// A store of an unlocked encrypted image: every method is the inner
/// store's; [`Store::sealer`] gives the keys.
#[derive(Debug)]
pub struct SealedStore {
    inner: Arc<dyn Store>,
    sealer: Sealer,
}

impl SealedStore {
    /// `inner` with the keys `sealer`.
    pub fn new(inner: Arc<dyn Store>, sealer: Sealer) -> SealedStore {
        SealedStore { inner, sealer }
    }
}

impl Store for SealedStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn read_head_and_body(
        &self,
        head: &mut [u8],
        body_len: usize,
        off: u64,
    ) -> io::Result<Vec<u8>> {
        self.inner.read_head_and_body(head, body_len, off)
    }
    fn read_direct(
        &self,
        buf: &mut crate::io::AlignedBuf,
        off: u64,
        len: usize,
    ) -> io::Result<std::ops::Range<usize>> {
        self.inner.read_direct(buf, off, len)
    }
    fn read_direct_spans(
        &self,
        buf: &mut crate::io::AlignedBuf,
        spans: &[(u64, usize)],
    ) -> Vec<io::Result<std::ops::Range<usize>>> {
        self.inner.read_direct_spans(buf, spans)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        self.inner.write_vectored_at(bufs, off)
    }
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_direct_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.preallocate(off, len)
    }
    fn preallocate_window(&self) -> u64 {
        self.inner.preallocate_window()
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(off, len)
    }

    fn find_hole(&self, from: u64, to: u64, min_len: u64) -> io::Result<Option<(u64, u64)>> {
        self.inner.find_hole(from, to, min_len)
    }
    fn allocated(&self) -> Option<u64> {
        self.inner.allocated()
    }
    fn writeback_hint(&self, off: u64, len: u64, wait: bool) {
        self.inner.writeback_hint(off, len, wait)
    }
    fn sealer(&self) -> Option<&Sealer> {
        Some(&self.sealer)
    }
}

/// Encodes `sb` for `slot`; on an encrypted image's store, with its MAC.
pub fn encode_superblock(sb: &Superblock, slot: u8, store: &dyn Store) -> Vec<u8> {
    encode_superblock_with(sb, slot, store.sealer())
}

/// Encodes `sb` for `slot`, with the MAC of `sealer` if given.
pub fn encode_superblock_with(sb: &Superblock, slot: u8, sealer: Option<&Sealer>) -> Vec<u8> {
    let mut buf = sb.encode(slot);
    if let Some(s) = sealer {
        let mac = s.mac(&mac_input(&buf));
        buf[SB_MAC_OFF..SB_MAC_OFF + 32].copy_from_slice(&mac);
        let crc = crc32c::crc32c(&buf[..SB_CRC_OFF]);
        buf[SB_CRC_OFF..SB_CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
    }
    buf
}

/// What a superblock's MAC covers: bytes `0..SB_MAC_OFF`, and the log
/// limit after the MAC when it is set (an image whose log never reused a
/// range keeps the MAC of the first version).
fn mac_input(sb: &[u8]) -> Vec<u8> {
    let limit = &sb[SB_LOG_LIMIT_OFF..SB_LOG_LIMIT_OFF + 8];
    let mut input = sb[..SB_MAC_OFF].to_vec();
    if limit.iter().any(|&b| b != 0) {
        input.extend_from_slice(limit);
    }
    input
}

/// Checks the MAC of a superblock slot read from an encrypted image's store
/// (nothing to check on a plain one).
pub fn verify_superblock(bytes: &[u8], slot: u8, store: &dyn Store) -> Result<()> {
    let Some(s) = store.sealer() else {
        return Ok(());
    };
    let mac = s.mac(&mac_input(bytes));
    if !super::ct_eq(&mac, &bytes[SB_MAC_OFF..SB_MAC_OFF + 32]) {
        return Err(Error::corrupt(format!(
            "superblock slot {slot} fails authentication"
        )));
    }
    Ok(())
}

/// The store to open an image through: `store` itself for a plain image
/// (a key is then refused), or, for an encrypted one, `store` with the keys
/// unlocked by `key` (a missing or wrong key is refused). Reads only.
pub fn attach(
    store: Arc<dyn Store>,
    sb: &Superblock,
    key: Option<&KeyMaterial>,
) -> Result<Arc<dyn Store>> {
    match (sb.crypto, key) {
        (0, None) => Ok(store),
        (0, Some(_)) => Err(Error::invalid(
            "the image is not encrypted, but a key was given",
        )),
        (_, None) => Err(Error::invalid(
            "the image is encrypted: give its key (--key-file FILE; to mount: -o key-file=FILE)",
        )),
        (_, Some(key)) => {
            let sealer = keyslot::unlock(store.as_ref(), key, &sb.image_uuid)?;
            Ok(Arc::new(SealedStore::new(store, sealer)))
        }
    }
}

/// The uuid of the encrypted image in `store` (newest valid superblock).
fn encrypted_uuid(store: &dyn Store) -> Result<[u8; 16]> {
    let mut best: Option<Superblock> = None;
    for slot in 0..crate::format::SB_SLOTS {
        let mut buf = vec![0u8; crate::format::SB_SLOT_SIZE as usize];
        store
            .read_at(&mut buf, slot * crate::format::SB_SLOT_SIZE)
            .map_err(|e| Error::io("read superblock", e))?;
        if let Ok(sb) = Superblock::decode(&buf, slot as u8) {
            if best.as_ref().is_none_or(|b| sb.seq > b.seq) {
                best = Some(sb);
            }
        }
    }
    let sb = best.ok_or_else(|| Error::corrupt("no valid superblock"))?;
    if sb.crypto == 0 {
        return Err(Error::invalid("the image is not encrypted"));
    }
    Ok(sb.image_uuid)
}

/// Changes the key of the encrypted image in `store` from `old` to `new`:
/// only the keyslots are rewritten (the data key stays, no record changes).
/// The image must not be open elsewhere.
pub fn rekey(store: &dyn Store, old: &KeyMaterial, new: &KeyMaterial) -> Result<()> {
    let uuid = encrypted_uuid(store)?;
    keyslot::rekey(store, old, new, &uuid)
}

/// [`rekey`] of the image file at `path`, under its lock (refused while it is
/// mounted or open).
pub fn rekey_file(path: &std::path::Path, old: &KeyMaterial, new: &KeyMaterial) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("{}: open", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::new(
                crate::ErrorKind::Locked,
                format!("{}: image is in use (mounted or open)", path.display()),
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io(format!("{}: lock", path.display()), e))
        }
    }
    let store = crate::io::FileStore::new(file);
    rekey(&store, old, new).map_err(|e| e.context(path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Codec, RecPtr};

    fn sample(log_limit: u64) -> Superblock {
        Superblock {
            flags: 0,
            image_uuid: [3; 16],
            seq: 5,
            gen: 4,
            block_shift: 16,
            codec: Codec::None,
            virtual_size: 1 << 30,
            log_start_off: 1 << 20,
            log_start_lsn: 9,
            log_epoch: 77,
            log_tail: 2 << 20,
            index: RecPtr::default(),
            snap_table: RecPtr::default(),
            config: RecPtr::default(),
            created_ns: 1,
            log_limit,
            crypto: 1,
        }
    }

    #[test]
    fn the_mac_covers_the_log_limit_once_it_is_set() {
        let sealer = Sealer::new(&[9; 32], &[3; 16]);
        let check = |bytes: &[u8]| {
            let mac = sealer.mac(&mac_input(bytes));
            crate::crypto::ct_eq(&mac, &bytes[SB_MAC_OFF..SB_MAC_OFF + 32])
        };
        // No limit: the MAC of the first version (bytes before it only).
        let plain = encode_superblock_with(&sample(0), 1, Some(&sealer));
        assert!(check(&plain));
        assert_eq!(
            &plain[SB_MAC_OFF..SB_MAC_OFF + 32],
            &sealer.mac(&plain[..SB_MAC_OFF])[..]
        );
        // A limit is authenticated: changed (crc fixed), or cleared, it fails.
        let bounded = encode_superblock_with(&sample(8 << 20), 1, Some(&sealer));
        assert!(check(&bounded));
        for forged in [4u64 << 20, 0] {
            let mut bytes = bounded.clone();
            bytes[SB_LOG_LIMIT_OFF..SB_LOG_LIMIT_OFF + 8].copy_from_slice(&forged.to_le_bytes());
            let crc = crc32c::crc32c(&bytes[..SB_CRC_OFF]);
            bytes[SB_CRC_OFF..SB_CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
            assert!(Superblock::decode(&bytes, 1).is_ok());
            assert!(!check(&bytes), "a forged limit {forged} passed");
        }
    }
}
