//! Encryption of images: record sealing and the keyslots that hold the data key.
//!
//! An encrypted image has a random 256-bit master key, stored only wrapped in
//! the keyslot area (see [`keyslot`]) under a key derived with Argon2id from
//! the user's key file. From the master key, HKDF-SHA256 (salted with the
//! image uuid) derives two sub-keys: the record key (XChaCha20-Poly1305) and
//! the superblock MAC key (HMAC-SHA256).
//!
//! Every record payload is sealed after compression:
//! `nonce (24) || ciphertext || tag (16)`, where the plaintext is
//! `key u64 || birth u64 || payload` and the associated data is the first 40
//! bytes of the record header (magic, kind, codec, flags, payload_len,
//! raw_len, lsn, epoch, self_off). The header's key and birth fields are zero
//! on disk. See `docs/format.md`, "Encryption".

pub mod keyslot;
mod store;

use crate::error::{Error, ErrorKind, Result};
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use zeroize::Zeroizing;

pub use keyslot::{KdfParams, KEYSLOT_AREA, KEYSLOT_SIZE};
pub use store::{
    attach, encode_superblock, encode_superblock_with, rekey, rekey_file, verify_superblock,
    SealedStore,
};

/// Superblock `crypto` value of XChaCha20-Poly1305 records.
pub const CRYPTO_XCHACHA20_POLY1305: u8 = 1;
/// Nonce bytes in front of a sealed payload.
pub const NONCE_LEN: usize = 24;
/// Tag bytes after a sealed payload.
pub const TAG_LEN: usize = 16;
/// The largest key file: a passphrase or a random key is far smaller, and a
/// key file that names a large file by mistake (an image) is refused before
/// it fills memory.
pub const MAX_KEY_FILE: u64 = 64 << 10;
/// Plaintext prefix of a sealed payload: key u64, birth u64.
pub const INNER_LEN: usize = 16;
/// Bytes a sealed payload adds to the plain one.
pub const SEAL_OVERHEAD: u32 = (NONCE_LEN + TAG_LEN + INNER_LEN) as u32;
/// Bytes of the record header bound into a sealed payload as associated data.
pub const RECORD_AAD_LEN: usize = 40;

/// A secret from a key file: a passphrase or raw key material, wiped on drop.
/// Every secret goes through Argon2id (with the parameters of `kdf` when a new
/// keyslot is made), so a passphrase and a random key are treated alike.
#[derive(Clone)]
pub struct KeyMaterial {
    secret: Zeroizing<Vec<u8>>,
    /// Argon2id cost of keyslots written with this key (create, rekey).
    pub kdf: KdfParams,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never logged.
        write!(
            f,
            "KeyMaterial({} bytes, {:?})",
            self.secret.len(),
            self.kdf
        )
    }
}

impl KeyMaterial {
    /// A secret given as bytes (the default, memory-hard KDF cost).
    pub fn from_bytes(secret: &[u8]) -> Result<KeyMaterial> {
        if secret.is_empty() {
            return Err(Error::invalid("the key is empty"));
        }
        Ok(KeyMaterial {
            secret: Zeroizing::new(secret.to_vec()),
            kdf: KdfParams::default(),
        })
    }

    /// The same secret with another KDF cost (tests use a cheap one).
    pub fn with_kdf(mut self, kdf: KdfParams) -> KeyMaterial {
        self.kdf = kdf;
        self
    }

    /// Reads a key file: its bytes, one trailing newline (`\n` or `\r\n`)
    /// removed. The file must not be readable or writable by group or others:
    /// such a file is refused, with the chmod that fixes it in the message.
    pub fn from_file(path: &Path) -> Result<KeyMaterial> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::Io
            };
            Error::new(kind, format!("key file {}: {e}", path.display()))
        })?;
        if meta.is_dir() {
            return Err(Error::invalid(format!(
                "key file {} is a directory",
                path.display()
            )));
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::invalid(format!(
                "key file {} is accessible by group or others (mode {:o}); \
                 run: chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
        let mut bytes = Zeroizing::new(Vec::new());
        std::fs::File::open(path)
            .and_then(|f| {
                use std::io::Read;
                // The key, and the line end that may follow it.
                f.take(MAX_KEY_FILE + 3).read_to_end(&mut bytes)
            })
            .map_err(|e| Error::io(format!("read key file {}", path.display()), e))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.len() as u64 > MAX_KEY_FILE {
            return Err(Error::invalid(format!(
                "key file {} is larger than {} KiB: is it the right file?",
                path.display(),
                MAX_KEY_FILE >> 10
            )));
        }
        KeyMaterial::from_bytes(&bytes)
            .map_err(|e| e.context(format!("key file {}", path.display())))
    }

    pub(crate) fn secret(&self) -> &[u8] {
        &self.secret
    }
}

/// The unlocked keys of an image: seals and opens records, MACs superblocks.
pub struct Sealer {
    aead: XChaCha20Poly1305,
    mac_key: Zeroizing<[u8; 32]>,
    /// The secret that unlocked the image: the base of an encrypted clone is
    /// unlocked with the same one.
    secret: Option<KeyMaterial>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(xchacha20-poly1305)")
    }
}

fn hkdf(ikm: &[u8], salt: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hkdf::Hkdf::<Sha256>::new(Some(salt), ikm).expand(info, out.as_mut());
    out
}

/// Fills `buf` from the OS random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf)
        .map_err(|e| Error::new(ErrorKind::Io, format!("no random numbers from the OS: {e}")))
}

/// Constant-time equality of two byte strings of the same length.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sealer {
    /// The sub-keys of `master` for the image `uuid`.
    pub fn new(master: &[u8; 32], uuid: &[u8; 16]) -> Sealer {
        let record = hkdf(master, uuid, b"vbdfs v1 record key");
        let mac_key = hkdf(master, uuid, b"vbdfs v1 superblock mac key");
        let aead = XChaCha20Poly1305::new(&(*record).into());
        Sealer {
            aead,
            mac_key,
            secret: None,
        }
    }

    /// The same keys, remembering the secret that unlocked them.
    pub fn with_secret(mut self, secret: &KeyMaterial) -> Sealer {
        self.secret = Some(secret.clone());
        self
    }

    /// The secret that unlocked the image, if known.
    pub fn secret(&self) -> Option<&KeyMaterial> {
        self.secret.as_ref()
    }

    /// Seals `payload` of a record whose header (with the sealed length in
    /// payload_len, key and birth zero) begins with `aad`.
    pub fn seal(&self, aad: &[u8], key: u64, birth: u64, payload: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(payload.len() + SEAL_OVERHEAD as usize);
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&birth.to_le_bytes());
        out.extend_from_slice(payload);
        let tag = self
            .aead
            .encrypt_inout_detached(&XNonce::from(nonce), aad, (&mut out[NONCE_LEN..]).into())
            .map_err(|_| Error::invalid("record too large to seal"))?;
        out.extend_from_slice(tag.as_slice());
        Ok(out)
    }

    /// Opens a sealed payload: (key, birth, payload). Any failure (a changed
    /// byte, a record moved to another place, a wrong key) is Corrupt.
    pub fn open(&self, aad: &[u8], sealed: &[u8], off: u64) -> Result<(u64, u64, Vec<u8>)> {
        let bad = || Error::corrupt(format!("record at {off} fails authentication"));
        if sealed.len() < SEAL_OVERHEAD as usize {
            return Err(bad());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = body.to_vec();
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| bad())?;
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| bad())?;
        self.aead
            .decrypt_inout_detached(
                &XNonce::from(nonce),
                aad,
                buf.as_mut_slice().into(),
                &Tag::from(tag),
            )
            .map_err(|_| bad())?;
        let key = u64::from_le_bytes(buf[..8].try_into().map_err(|_| bad())?);
        let birth = u64::from_le_bytes(buf[8..16].try_into().map_err(|_| bad())?);
        buf.drain(..INNER_LEN);
        Ok((key, birth, buf))
    }

    /// HMAC-SHA256 of `bytes` under the superblock MAC key.
    pub fn mac(&self, bytes: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(self.mac_key.as_ref())
            .unwrap_or_else(|_| unreachable_mac());
        m.update(bytes);
        m.finalize().into_bytes().into()
    }
}

#[cold]
fn unreachable_mac() -> Hmac<Sha256> {
    // HMAC accepts keys of any length; 32 bytes always works.
    <Hmac<Sha256> as KeyInit>::new(&Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&[7; 32], &[1; 16])
    }

    #[test]
    fn seal_open_round_trip() {
        let s = sealer();
        let aad = [3u8; RECORD_AAD_LEN];
        let sealed = s.seal(&aad, 42, 9, b"hello block").unwrap();
        assert_eq!(sealed.len(), 11 + SEAL_OVERHEAD as usize);
        assert!(!sealed.windows(11).any(|w| w == b"hello block"));
        let (k, b, p) = s.open(&aad, &sealed, 0).unwrap();
        assert_eq!((k, b, p.as_slice()), (42, 9, &b"hello block"[..]));
    }

    #[test]
    fn every_bit_flip_and_other_aad_and_key_fail() {
        let s = sealer();
        let aad = [3u8; RECORD_AAD_LEN];
        let sealed = s.seal(&aad, 1, 2, b"payload").unwrap();
        for i in 0..sealed.len() * 8 {
            let mut b = sealed.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(s.open(&aad, &b, 0).is_err(), "flip {i}");
        }
        let mut other = aad;
        other[32] ^= 1;
        assert!(s.open(&other, &sealed, 0).is_err());
        let wrong = Sealer::new(&[8; 32], &[1; 16]);
        assert_eq!(
            wrong.open(&aad, &sealed, 0).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let other_image = Sealer::new(&[7; 32], &[2; 16]);
        assert!(other_image.open(&aad, &sealed, 0).is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        let s = sealer();
        let a = s.seal(&[0; 40], 0, 0, b"same").unwrap();
        let b = s.seal(&[0; 40], 0, 0, b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn key_file_permissions_and_newline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyMaterial::from_file(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(KeyMaterial::from_file(&p).unwrap().secret(), b"secret");
        std::fs::write(&p, b"").unwrap();
        assert!(KeyMaterial::from_file(&p).is_err());
    }

    #[test]
    fn key_files_that_are_too_large_or_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let f = std::fs::File::create(&p).unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .unwrap();
        // The largest that is taken, and one byte more (sparse: a large
        // file is refused after reading one byte past the limit).
        f.set_len(MAX_KEY_FILE).unwrap();
        assert!(KeyMaterial::from_file(&p).is_ok());
        f.set_len(MAX_KEY_FILE + 1).unwrap();
        let e = KeyMaterial::from_file(&p).unwrap_err();
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
        // The line end after the largest key is not part of it.
        for end in [&b"\n"[..], b"\r\n"] {
            use std::os::unix::fs::FileExt;
            f.set_len(MAX_KEY_FILE).unwrap();
            f.write_all_at(end, MAX_KEY_FILE).unwrap();
            assert!(KeyMaterial::from_file(&p).is_ok(), "{end:?}");
        }
        f.set_len(4 << 30).unwrap();
        let e = KeyMaterial::from_file(&p).unwrap_err();
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
        assert!(e.to_string().contains(p.to_str().unwrap()), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = KeyMaterial::from_file(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }
}
