//! The superblock: 512 bytes in each of two 4 KiB slots at offsets 0 and 4096.

use super::{
    zstd_level_ok, LOG_START, MAX_BLOCK_SHIFT, MAX_COUNTER, MAX_FILE_OFFSET, MAX_VIRTUAL_SIZE,
    MIN_BLOCK_SHIFT,
};
use crate::error::{Error, Result};
use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The first bytes of a vbd image (superblock slot 0).
pub const MAGIC: [u8; 8] = *b"VBDF\x89\r\n\x1a";
const VERSION: u16 = 1;
const LEN: usize = 512;
/// The image was open for writing and not closed cleanly (informational: recovery
/// never needs it, `info` reports it).
pub const SB_FLAG_DIRTY: u32 = 1;
/// Incompatible features this build understands (none yet).
/// Incompat feature bit 0: records are sealed (`crypto` = 1, `crate::crypto`).
pub const INCOMPAT_ENCRYPTED: u64 = 1;
const KNOWN_INCOMPAT: u64 = INCOMPAT_ENCRYPTED;
/// Where an encrypted image's superblock MAC (HMAC-SHA256 of bytes
/// `0..SB_MAC_OFF`) lives, in the reserved bytes.
pub const SB_MAC_OFF: usize = 176;
/// Where the superblock's `log_limit` lies (after the MAC's 32 bytes).
pub const SB_LOG_LIMIT_OFF: usize = 208;
/// Length of the superblock header that the crc covers (the crc follows).
pub const SB_CRC_OFF: usize = LEN - 4;

/// How blocks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is.
    None,
    /// zstd at a level.
    Zstd(i32),
}

impl Codec {
    fn to_disk(self) -> (u8, i32) {
        match self {
            Codec::None => (0, 0),
            Codec::Zstd(level) => (1, level),
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::None => f.write_str("none"),
            Codec::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

/// Points at a metadata record: where it is, how long, and its checksum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecPtr {
    /// Byte offset of the record header; 0 = none.
    pub off: u64,
    /// Total record length (header + payload, unaligned).
    pub len: u32,
    /// The record's crc32c (as in its header).
    pub crc: u32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawPtr {
    off: U64,
    len: U32,
    crc: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawSuperblock {
    magic: [u8; 8],
    version: U16,
    header_len: U16,
    flags: U32,
    incompat: U64,
    ro_compat: U64,
    compat: U64,
    image_uuid: [u8; 16],
    seq: U64,
    gen: U64,
    self_slot: u8,
    block_shift: u8,
    codec: u8,
    crypto: u8,
    codec_level: I32,
    virtual_size: U64,
    log_start_off: U64,
    log_start_lsn: U64,
    log_epoch: U64,
    log_tail: U64,
    index: RawPtr,
    snap_table: RawPtr,
    config: RawPtr,
    created_ns: U64,
    /// The MAC of an encrypted image (`SB_MAC_OFF`).
    mac: [u8; 32],
    log_limit: U64,
    reserved: [u8; 292],
    crc32c: U32,
}

const _: () = assert!(std::mem::size_of::<RawSuperblock>() == LEN);
const _: () = assert!(std::mem::offset_of!(RawSuperblock, log_limit) == SB_LOG_LIMIT_OFF);
const _: () = assert!(std::mem::offset_of!(RawSuperblock, mac) == SB_MAC_OFF);
const _: () = assert!(std::mem::size_of::<RawPtr>() == 16);

/// A decoded, validated superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// DIRTY etc.
    pub flags: u32,
    /// Identity of the image, fixed at create.
    pub image_uuid: [u8; 16],
    /// Write sequence; the valid slot with the higher one wins.
    pub seq: u64,
    /// Checkpoint generation committed by this superblock.
    pub gen: u64,
    /// log2 of the block size.
    pub block_shift: u8,
    /// Block compression.
    pub codec: Codec,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Where roll-forward starts.
    pub log_start_off: u64,
    /// LSN of the record at `log_start_off`.
    pub log_start_lsn: u64,
    /// Epoch every record of the current log run carries.
    pub log_epoch: u64,
    /// End of the log when this superblock was written (informational).
    pub log_tail: u64,
    /// The leaf index record of the map.
    pub index: RecPtr,
    /// The snapshot table record (none yet).
    pub snap_table: RecPtr,
    /// The config record (backing reference; none yet).
    pub config: RecPtr,
    /// Creation time, ns since the Unix epoch.
    pub created_ns: u64,
    /// Where the current log run must end (it lies in a reused range of the
    /// file; `docs/format.md` §5), or 0: it may grow to the end of the file.
    /// Bounds roll-forward and the search for later records of the run.
    pub log_limit: u64,
    /// 0 = plain, 1 = records sealed with XChaCha20-Poly1305 (`crate::crypto`).
    pub crypto: u8,
}

fn ptr_to_raw(p: RecPtr) -> RawPtr {
    RawPtr {
        off: p.off.into(),
        len: p.len.into(),
        crc: p.crc.into(),
    }
}

fn ptr_from_raw(p: &RawPtr, what: &str) -> Result<RecPtr> {
    let ptr = RecPtr {
        off: p.off.get(),
        len: p.len.get(),
        crc: p.crc.get(),
    };
    if ptr.off != 0 && (ptr.off < LOG_START || ptr.off > MAX_FILE_OFFSET) {
        return Err(Error::corrupt(format!(
            "superblock {what} pointer {} out of range",
            ptr.off
        )));
    }
    Ok(ptr)
}

impl Superblock {
    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// Encodes into a full slot buffer for slot `slot`.
    pub fn encode(&self, slot: u8) -> Vec<u8> {
        let (codec, codec_level) = self.codec.to_disk();
        let mut raw = RawSuperblock {
            magic: MAGIC,
            version: VERSION.into(),
            header_len: (LEN as u16).into(),
            flags: self.flags.into(),
            incompat: if self.crypto != 0 {
                INCOMPAT_ENCRYPTED
            } else {
                0
            }
            .into(),
            ro_compat: 0.into(),
            compat: 0.into(),
            image_uuid: self.image_uuid,
            seq: self.seq.into(),
            gen: self.gen.into(),
            self_slot: slot,
            block_shift: self.block_shift,
            codec,
            crypto: self.crypto,
            codec_level: codec_level.into(),
            virtual_size: self.virtual_size.into(),
            log_start_off: self.log_start_off.into(),
            log_start_lsn: self.log_start_lsn.into(),
            log_epoch: self.log_epoch.into(),
            log_tail: self.log_tail.into(),
            index: ptr_to_raw(self.index),
            snap_table: ptr_to_raw(self.snap_table),
            config: ptr_to_raw(self.config),
            created_ns: self.created_ns.into(),
            mac: [0; 32],
            log_limit: self.log_limit.into(),
            reserved: [0; 292],
            crc32c: 0.into(),
        };
        let crc = crc32c::crc32c(&raw.as_bytes()[..LEN - 4]);
        raw.crc32c = crc.into();
        let mut buf = vec![0u8; super::SB_SLOT_SIZE as usize];
        buf[..LEN].copy_from_slice(raw.as_bytes());
        buf
    }

    /// Decodes and validates the superblock in slot `slot` (its first 512 bytes).
    pub fn decode(bytes: &[u8], slot: u8) -> Result<Superblock> {
        let head = bytes
            .get(..LEN)
            .ok_or_else(|| Error::corrupt("superblock truncated"))?;
        let raw = RawSuperblock::read_from_bytes(head)
            .map_err(|_| Error::corrupt("superblock truncated"))?;
        if raw.magic != MAGIC {
            return Err(Error::corrupt("not a vbd image (bad magic)"));
        }
        if crc32c::crc32c(&head[..LEN - 4]) != raw.crc32c.get() {
            return Err(Error::corrupt(format!(
                "superblock slot {slot} checksum mismatch"
            )));
        }
        if raw.version.get() != VERSION || usize::from(raw.header_len.get()) != LEN {
            return Err(Error::new(
                crate::ErrorKind::Unsupported,
                format!(
                    "image format version {} is not supported",
                    raw.version.get()
                ),
            ));
        }
        if raw.incompat.get() & !KNOWN_INCOMPAT != 0 || raw.ro_compat.get() != 0 {
            return Err(Error::new(
                crate::ErrorKind::Unsupported,
                format!("image uses unknown features {:#x}", raw.incompat.get()),
            ));
        }
        if raw.self_slot != slot {
            return Err(Error::corrupt(format!(
                "superblock in slot {slot} names slot {}",
                raw.self_slot
            )));
        }
        if !(MIN_BLOCK_SHIFT..=MAX_BLOCK_SHIFT).contains(&raw.block_shift) {
            return Err(Error::corrupt(format!(
                "block shift {} out of range",
                raw.block_shift
            )));
        }
        let codec = match (raw.codec, raw.codec_level.get()) {
            (0, _) => Codec::None,
            (1, level) if zstd_level_ok(level) => Codec::Zstd(level),
            (c, l) => return Err(Error::corrupt(format!("unknown codec {c} level {l}"))),
        };
        let encrypted = raw.incompat.get() & INCOMPAT_ENCRYPTED != 0;
        if raw.crypto > 1 || (raw.crypto == 1) != encrypted {
            return Err(Error::new(
                crate::ErrorKind::Unsupported,
                format!("encryption method {} is not supported", raw.crypto),
            ));
        }
        let virtual_size = raw.virtual_size.get();
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(512)
        {
            return Err(Error::corrupt(format!(
                "virtual size {virtual_size} out of range"
            )));
        }
        let log_start_off = raw.log_start_off.get();
        if !(LOG_START..=MAX_FILE_OFFSET).contains(&log_start_off) {
            return Err(Error::corrupt(format!(
                "log start {log_start_off} out of range"
            )));
        }
        let log_limit = raw.log_limit.get();
        if log_limit != 0 && !(log_start_off..=MAX_FILE_OFFSET).contains(&log_limit) {
            return Err(Error::corrupt(format!(
                "log limit {log_limit} out of range (log start {log_start_off})"
            )));
        }
        // seq and gen grow by one per checkpoint, the lsn by one per record:
        // real images stay far below these bounds, and arithmetic on larger
        // values (seq + 1, gen + 1, lsn + 1) would overflow. Births are 32-bit
        // in map entries, so a generation must fit in 32 bits.
        if raw.seq.get() > MAX_COUNTER
            || raw.gen.get() >= u64::from(u32::MAX)
            || raw.log_start_lsn.get() > MAX_COUNTER
        {
            return Err(Error::corrupt(format!(
                "superblock counters out of range (seq {}, generation {}, lsn {})",
                raw.seq.get(),
                raw.gen.get(),
                raw.log_start_lsn.get()
            )));
        }
        Ok(Superblock {
            flags: raw.flags.get(),
            image_uuid: raw.image_uuid,
            seq: raw.seq.get(),
            gen: raw.gen.get(),
            block_shift: raw.block_shift,
            codec,
            virtual_size,
            log_start_off,
            log_start_lsn: raw.log_start_lsn.get(),
            log_epoch: raw.log_epoch.get(),
            log_tail: raw.log_tail.get(),
            index: ptr_from_raw(&raw.index, "index")?,
            snap_table: ptr_from_raw(&raw.snap_table, "snapshot table")?,
            config: ptr_from_raw(&raw.config, "config")?,
            created_ns: raw.created_ns.get(),
            log_limit,
            crypto: raw.crypto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            flags: SB_FLAG_DIRTY,
            image_uuid: [7; 16],
            seq: 3,
            gen: 2,
            block_shift: 16,
            codec: Codec::Zstd(3),
            virtual_size: 1 << 30,
            log_start_off: LOG_START,
            log_start_lsn: 1,
            log_epoch: 99,
            log_tail: LOG_START,
            index: RecPtr {
                off: LOG_START,
                len: 100,
                crc: 5,
            },
            snap_table: RecPtr::default(),
            config: RecPtr::default(),
            created_ns: 1,
            log_limit: 0,
            crypto: 0,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let bytes = sb.encode(1);
        assert_eq!(bytes.len(), 4096);
        assert_eq!(Superblock::decode(&bytes, 1).unwrap(), sb);
    }

    #[test]
    fn a_log_limit_round_trips_and_must_lie_past_the_log_start() {
        let mut sb = sample();
        sb.log_limit = 1 << 30;
        assert_eq!(Superblock::decode(&sb.encode(0), 0).unwrap(), sb);
        sb.log_limit = sb.log_start_off - 1;
        let err = Superblock::decode(&sb.encode(0), 0).unwrap_err();
        assert!(err.to_string().contains("log limit"), "{err}");
    }

    #[test]
    fn wrong_slot_is_corrupt() {
        let bytes = sample().encode(0);
        assert_eq!(
            Superblock::decode(&bytes, 1).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
    }

    #[test]
    fn counters_that_would_overflow_are_corrupt() {
        let cases: [fn(&mut Superblock); 3] = [
            |sb| sb.seq = u64::MAX,
            |sb| sb.gen = u64::from(u32::MAX),
            |sb| sb.log_start_lsn = u64::MAX,
        ];
        for set in cases {
            let mut sb = sample();
            set(&mut sb);
            let err = Superblock::decode(&sb.encode(0), 0).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "{sb:?}");
        }
    }

    #[test]
    fn every_bit_flip_in_header_is_caught() {
        let bytes = sample().encode(0);
        for i in 0..512 * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                Superblock::decode(&b, 0).is_err(),
                "flip of bit {i} not detected"
            );
        }
    }
}
