//! Keyslots: the wrapped master key of an encrypted image (bytes 8192..16384).
//!
//! Two 4 KiB slots at 8192 and 12288, written alternately like the
//! superblocks; each carries its own crc32c and seq and the newest valid one
//! is used. Layout of a slot (little-endian):
//!
//! | off | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `"VBDKEYS1"` |
//! | 8 | 8 | seq (+1 per keyslot write) |
//! | 16 | 1 | cipher: 1 = XChaCha20-Poly1305 |
//! | 17 | 1 | kdf: 1 = Argon2id (version 0x13) |
//! | 18 | 2 | zero |
//! | 20 | 4 | Argon2 m_cost (KiB) |
//! | 24 | 4 | Argon2 t_cost |
//! | 28 | 4 | Argon2 p_cost |
//! | 32 | 32 | salt (random per keyslot write) |
//! | 64 | 16 | image uuid (binds the slot to its image) |
//! | 80 | 24 | wrap nonce |
//! | 104 | 48 | wrapped master key: ciphertext (32) and tag (16) |
//! | 152 | 32 | key check value |
//! | 184 | 3908 | zero |
//! | 4092 | 4 | crc32c over bytes 0..4092 |
//!
//! KEK = Argon2id(secret, salt, m, t, p) (32 bytes); wrap key = HKDF-SHA256
//! (KEK, salt = uuid, info "vbdfs v1 keyslot wrap"); check value = HKDF-SHA256
//! (KEK, uuid, "vbdfs v1 keyslot check"). The master key is sealed with
//! XChaCha20-Poly1305 under the wrap key with bytes 0..104 as associated data.
//! A crc failure means a damaged slot; a check value that differs means a
//! wrong key; a matching check value with a failing tag means a damaged (or
//! tampered) slot.

use super::{ct_eq, hkdf, random, KeyMaterial, Sealer};
use crate::error::{Error, ErrorKind, Result};
use crate::io::Store;
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// Where the keyslot area starts.
pub const KEYSLOT_AREA: u64 = 8192;
/// Size of one keyslot.
pub const KEYSLOT_SIZE: u64 = 4096;
const MAGIC: &[u8; 8] = b"VBDKEYS1";
const CIPHER_XCHACHA: u8 = 1;
const KDF_ARGON2ID: u8 = 1;

/// Argon2id cost of a keyslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane (about 0.1-0.3 s per unlock on a server core).
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// The smallest cost Argon2 allows: for tests only.
    pub fn insecure_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

type Key32 = Zeroizing<[u8; 32]>;
type Slots = (Vec<(u64, Slot)>, Option<Error>);

/// A decoded keyslot.
#[derive(Debug, Clone)]
struct Slot {
    seq: u64,
    kdf: KdfParams,
    salt: [u8; 32],
    uuid: [u8; 16],
    nonce: [u8; 24],
    wrapped: [u8; 48],
    check: [u8; 32],
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl Slot {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; KEYSLOT_SIZE as usize];
        self.encode_head(&mut b);
        b[104..152].copy_from_slice(&self.wrapped);
        b[152..184].copy_from_slice(&self.check);
        let crc = crc32c::crc32c(&b[..4092]);
        b[4092..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Bytes 0..104: everything the wrap binds.
    fn encode_head(&self, b: &mut [u8]) {
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16] = CIPHER_XCHACHA;
        b[17] = KDF_ARGON2ID;
        b[20..24].copy_from_slice(&self.kdf.m_cost_kib.to_le_bytes());
        b[24..28].copy_from_slice(&self.kdf.t_cost.to_le_bytes());
        b[28..32].copy_from_slice(&self.kdf.p_cost.to_le_bytes());
        b[32..64].copy_from_slice(&self.salt);
        b[64..80].copy_from_slice(&self.uuid);
        b[80..104].copy_from_slice(&self.nonce);
    }

    fn aad(&self) -> [u8; 104] {
        let mut b = [0u8; 104];
        self.encode_head(&mut b);
        b
    }

    fn decode(b: &[u8], which: u64) -> Result<Slot> {
        let damaged = |why: &str| Error::corrupt(format!("keyslot {which} damaged ({why})"));
        if b.len() != KEYSLOT_SIZE as usize || &b[..8] != MAGIC {
            return Err(damaged("bad magic"));
        }
        if crc32c::crc32c(&b[..4092]) != u32_at(b, 4092) {
            return Err(damaged("checksum mismatch"));
        }
        // The wrap binds the fields it knows; the reserved bytes must be
        // what the writer left there, or anyone could change them unseen.
        if b[18..20].iter().chain(&b[184..4092]).any(|&x| x != 0) {
            return Err(damaged("reserved bytes are not zero"));
        }
        if b[16] != CIPHER_XCHACHA || b[17] != KDF_ARGON2ID {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("keyslot {which} uses cipher {} kdf {}", b[16], b[17]),
            ));
        }
        let mut s = Slot {
            seq: u64::from_le_bytes(b[8..16].try_into().map_err(|_| damaged("seq"))?),
            kdf: KdfParams {
                m_cost_kib: u32_at(b, 20),
                t_cost: u32_at(b, 24),
                p_cost: u32_at(b, 28),
            },
            salt: [0; 32],
            uuid: [0; 16],
            nonce: [0; 24],
            wrapped: [0; 48],
            check: [0; 32],
        };
        // Refuse costs that would make an unlock take unbounded memory or time.
        if s.kdf.m_cost_kib > 4 << 20 || s.kdf.t_cost > 64 || s.kdf.p_cost > 64 {
            return Err(damaged("KDF cost out of range"));
        }
        s.salt.copy_from_slice(&b[32..64]);
        s.uuid.copy_from_slice(&b[64..80]);
        s.nonce.copy_from_slice(&b[80..104]);
        s.wrapped.copy_from_slice(&b[104..152]);
        s.check.copy_from_slice(&b[152..184]);
        Ok(s)
    }
}

/// The keys derived from a secret for one slot: (wrap key, check value).
fn derive(
    secret: &KeyMaterial,
    kdf: KdfParams,
    salt: &[u8; 32],
    uuid: &[u8; 16],
) -> Result<(Key32, Key32)> {
    let params = argon2::Params::new(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost, Some(32))
        .map_err(|e| Error::corrupt(format!("keyslot KDF parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(secret.secret(), salt, kek.as_mut())
        .map_err(|e| Error::invalid(format!("key derivation: {e}")))?;
    Ok((
        hkdf(kek.as_ref(), uuid, b"vbdfs v1 keyslot wrap"),
        hkdf(kek.as_ref(), uuid, b"vbdfs v1 keyslot check"),
    ))
}

fn make_slot(secret: &KeyMaterial, master: &[u8; 32], uuid: &[u8; 16], seq: u64) -> Result<Slot> {
    let mut slot = Slot {
        seq,
        kdf: secret.kdf,
        salt: [0; 32],
        uuid: *uuid,
        nonce: [0; 24],
        wrapped: [0; 48],
        check: [0; 32],
    };
    random(&mut slot.salt)?;
    random(&mut slot.nonce)?;
    let (wrap, check) = derive(secret, slot.kdf, &slot.salt, uuid)?;
    slot.check = *check;
    let mut buf = Zeroizing::new(*master);
    let tag = XChaCha20Poly1305::new(&(*wrap).into())
        .encrypt_inout_detached(
            &XNonce::from(slot.nonce),
            &slot.aad(),
            buf.as_mut_slice().into(),
        )
        .map_err(|_| Error::invalid("wrap master key"))?;
    slot.wrapped[..32].copy_from_slice(buf.as_ref());
    slot.wrapped[32..].copy_from_slice(tag.as_slice());
    Ok(slot)
}

fn unwrap_slot(secret: &KeyMaterial, slot: &Slot, which: u64) -> Result<Zeroizing<[u8; 32]>> {
    let (wrap, check) = derive(secret, slot.kdf, &slot.salt, &slot.uuid)?;
    if !ct_eq(check.as_ref(), &slot.check) {
        return Err(Error::invalid("wrong key for this image"));
    }
    let mut master = Zeroizing::new([0u8; 32]);
    master.copy_from_slice(&slot.wrapped[..32]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&slot.wrapped[32..]);
    XChaCha20Poly1305::new(&(*wrap).into())
        .decrypt_inout_detached(
            &XNonce::from(slot.nonce),
            &slot.aad(),
            master.as_mut_slice().into(),
            &Tag::from(tag),
        )
        .map_err(|_| {
            Error::corrupt(format!(
                "keyslot {which} damaged (the key is right but the wrapped key fails \
                 authentication)"
            ))
        })?;
    Ok(master)
}

/// Makes a new random master key, writes it wrapped under `secret` into both
/// slots of `store` (not synced) and returns its sealer.
pub fn create(store: &dyn Store, secret: &KeyMaterial, uuid: &[u8; 16]) -> Result<Sealer> {
    let mut master = Zeroizing::new([0u8; 32]);
    random(master.as_mut())?;
    for which in 0..2 {
        let slot = make_slot(secret, &master, uuid, 1 + which)?;
        store
            .write_at(&slot.encode(), KEYSLOT_AREA + which * KEYSLOT_SIZE)
            .map_err(|e| Error::io("write keyslot", e))?;
    }
    Ok(Sealer::new(&master, uuid).with_secret(secret))
}

/// Reads both slots: (which, slot) of the valid ones, newest first, and the
/// first error.
fn read_slots(store: &dyn Store) -> Result<Slots> {
    let mut valid = Vec::new();
    let mut first_err = None;
    for which in 0..2 {
        let mut b = vec![0u8; KEYSLOT_SIZE as usize];
        store
            .read_at(&mut b, KEYSLOT_AREA + which * KEYSLOT_SIZE)
            .map_err(|e| Error::io("read keyslot", e))?;
        match Slot::decode(&b, which) {
            Ok(s) => valid.push((which, s)),
            Err(e) if e.kind() == ErrorKind::Unsupported => return Err(e),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    valid.sort_by_key(|(_, s)| std::cmp::Reverse(s.seq));
    Ok((valid, first_err))
}

/// Unlocks the image `uuid` in `store` with `secret`. Only the newest valid
/// slot is tried: after a rekey the old secret is refused. Errors: Invalid
/// "wrong key", Corrupt "keyslot damaged".
pub fn unlock(store: &dyn Store, secret: &KeyMaterial, uuid: &[u8; 16]) -> Result<Sealer> {
    let newest = newest_master(store, secret, uuid)?;
    Ok(Sealer::new(&newest.master, uuid).with_secret(secret))
}

/// The newest valid slot of an image: which of the two, its sequence number,
/// and the master key its secret unwrapped.
struct Newest {
    which: u64,
    seq: u64,
    master: Zeroizing<[u8; 32]>,
}

/// The newest valid slot of image `uuid`, unwrapped with `secret`.
fn newest_master(store: &dyn Store, secret: &KeyMaterial, uuid: &[u8; 16]) -> Result<Newest> {
    let (valid, first_err) = read_slots(store)?;
    let Some((which, slot)) = valid.first() else {
        return Err(first_err.unwrap_or_else(|| Error::corrupt("keyslots damaged")));
    };
    if slot.uuid != *uuid {
        return Err(Error::corrupt(format!(
            "keyslot {which} belongs to another image"
        )));
    }
    let master = unwrap_slot(secret, slot, *which)?;
    Ok(Newest {
        which: *which,
        seq: slot.seq,
        master,
    })
}

/// Replaces the secret: checks `old`, then writes the same master key wrapped
/// under `new` (new salt and nonce) into the older slot, syncs, then into the
/// other slot, syncs. A crash in between leaves the new slot newest (the new
/// secret works) or the old state (the old secret works). Data is untouched.
pub fn rekey(
    store: &dyn Store,
    old: &KeyMaterial,
    new: &KeyMaterial,
    uuid: &[u8; 16],
) -> Result<()> {
    let Newest {
        which,
        mut seq,
        master,
    } = newest_master(store, old, uuid)?;
    for target in [1 - which, which] {
        seq += 1;
        let fresh = make_slot(new, &master, uuid, seq)?;
        store
            .write_at(&fresh.encode(), KEYSLOT_AREA + target * KEYSLOT_SIZE)
            .and_then(|()| store.sync())
            .map_err(|e| Error::io("write keyslot", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStore;

    fn key(s: &[u8]) -> KeyMaterial {
        KeyMaterial::from_bytes(s)
            .unwrap()
            .with_kdf(KdfParams::insecure_for_tests())
    }

    fn mac_of(s: &Sealer) -> [u8; 32] {
        s.mac(b"probe")
    }

    #[test]
    fn create_unlock_wrong_key_damage_rekey() {
        let store = MemStore::new();
        let uuid = [5u8; 16];
        let made = create(&store, &key(b"pass"), &uuid).unwrap();
        let opened = unlock(&store, &key(b"pass"), &uuid).unwrap();
        assert_eq!(mac_of(&made), mac_of(&opened));
        let e = unlock(&store, &key(b"other"), &uuid).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains("wrong key"));
        assert_eq!(
            unlock(&store, &key(b"pass"), &[6; 16]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );

        // One slot damaged: the other still unlocks.
        let mut b = vec![0u8; 1];
        store
            .read_at(&mut b, KEYSLOT_AREA + KEYSLOT_SIZE + 40)
            .unwrap();
        store
            .write_at(&[b[0] ^ 1], KEYSLOT_AREA + KEYSLOT_SIZE + 40)
            .unwrap();
        assert_eq!(
            mac_of(&unlock(&store, &key(b"pass"), &uuid).unwrap()),
            mac_of(&made)
        );
        // Both damaged: "damaged", not "wrong key".
        store.write_at(&[0xff], KEYSLOT_AREA + 40).unwrap();
        let e = unlock(&store, &key(b"pass"), &uuid).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn tampered_wrap_with_right_key_is_damage() {
        // A byte of the wrapped key, of the reserved field after the ids,
        // of the reserved area after the check value: each changed with the
        // crc fixed (deliberately) in both slots.
        for byte in [110, 18, 19, 184, 4091] {
            let store = MemStore::new();
            let uuid = [5u8; 16];
            create(&store, &key(b"pass"), &uuid).unwrap();
            for which in 0..2 {
                let at = KEYSLOT_AREA + which * KEYSLOT_SIZE;
                let mut b = vec![0u8; KEYSLOT_SIZE as usize];
                store.read_at(&mut b, at).unwrap();
                b[byte] ^= 1;
                let crc = crc32c::crc32c(&b[..4092]);
                b[4092..].copy_from_slice(&crc.to_le_bytes());
                store.write_at(&b, at).unwrap();
            }
            let e = unlock(&store, &key(b"pass"), &uuid).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "byte {byte}: {e}");
        }
    }

    #[test]
    fn rekey_keeps_master_and_refuses_old() {
        let store = MemStore::new();
        let uuid = [5u8; 16];
        let made = create(&store, &key(b"old"), &uuid).unwrap();
        assert!(rekey(&store, &key(b"bad"), &key(b"new"), &uuid).is_err());
        rekey(&store, &key(b"old"), &key(b"new"), &uuid).unwrap();
        assert_eq!(
            mac_of(&unlock(&store, &key(b"new"), &uuid).unwrap()),
            mac_of(&made)
        );
        assert!(unlock(&store, &key(b"old"), &uuid).is_err());
        rekey(&store, &key(b"new"), &key(b"third"), &uuid).unwrap();
        assert_eq!(
            mac_of(&unlock(&store, &key(b"third"), &uuid).unwrap()),
            mac_of(&made)
        );
    }
}
