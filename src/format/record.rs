//! Log records: a 64-byte header followed by the payload, 16-byte aligned.

use super::{MAX_FILE_OFFSET, MAX_PAYLOAD};
use crate::error::{Error, Result};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

const MAGIC: u32 = u32::from_le_bytes(*b"VREC");
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 64;
/// Records start at multiples of this.
pub const RECORD_ALIGN: u64 = 16;

/// Each append to the log starts at a multiple of this offset; the bytes
/// after its last record up to the next multiple are zeros (a unit is never
/// written twice). Recovery that finds no record after a record's end
/// continues at the next multiple.
pub const LOG_UNIT: u64 = 4096;

/// Header flag of a metadata record's second copy (format.md §4, "Second
/// copies"): the record before it, at the previous log unit, is the first.
pub const RECORD_FLAG_COPY: u16 = 1;
/// Header flag of a metadata record's first copy: a second copy follows it
/// (a record without it was written before copies existed).
pub const RECORD_FLAG_HAS_COPY: u16 = 2;

/// Rounds `n` up to a multiple of `align` (a power of two).
pub fn align_up(n: u64, align: u64) -> u64 {
    (n + align - 1) & !(align - 1)
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// One block of guest data; `key` = block index.
    Data = 1,
    /// A run of blocks that read as zeros; `key` = first block, payload = count.
    Zero = 2,
    /// One map leaf; `key` = leaf index.
    Leaf = 3,
    /// The list of leaf records of a checkpoint; `key` = number of leaves.
    Index = 4,
    /// The snapshot table; `key` = number of snapshots (`format::snap`).
    SnapTable = 5,
    /// The backing reference of a clone; `key` = 0 (`format::snap`).
    Config = 6,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::Zero,
            3 => Self::Leaf,
            4 => Self::Index,
            5 => Self::SnapTable,
            6 => Self::Config,
            _ => return None,
        })
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawHeader {
    magic: U32,
    kind: u8,
    codec: u8,
    flags: U16,
    payload_len: U32,
    raw_len: U32,
    lsn: U64,
    epoch: U64,
    self_off: U64,
    key: U64,
    birth: U64,
    crc32c: U32,
    synced: U32,
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == RECORD_HEADER_LEN);

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record holds.
    pub kind: RecordKind,
    /// 0 = payload stored raw, 1 = zstd.
    pub codec: u8,
    /// [`RECORD_FLAG_COPY`] on the second copy of a metadata record; else 0.
    pub flags: u16,
    /// Stored payload bytes after the header.
    pub payload_len: u32,
    /// Length of the payload once decoded.
    pub raw_len: u32,
    /// Log sequence number, +1 per record within a file.
    pub lsn: u64,
    /// The log run this record belongs to.
    pub epoch: u64,
    /// Where the record was written (misdirected-write check).
    pub self_off: u64,
    /// Kind-specific key (block, leaf index, count).
    pub key: u64,
    /// Checkpoint generation the content belongs to.
    pub birth: u64,
    /// crc32c of header (with this field zero) and payload.
    pub crc: u32,
    /// How far the log of this epoch was durable when the record was
    /// written: 0 claims nothing; `v` > 0 says every record of the epoch with
    /// lsn ≤ `lsn - v` had been made durable by a completed sync. Recovery
    /// uses it to tell a torn tail from damage to synced records.
    pub synced: u32,
}

impl RecordHeader {
    /// Total length on disk, header plus payload, unaligned.
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.payload_len)
    }

    /// Encodes header + payload into one buffer, padded to [`RECORD_ALIGN`], and
    /// fills in `crc`.
    pub fn encode(&mut self, payload: &[u8]) -> Vec<u8> {
        let total = align_up(self.total_len(), RECORD_ALIGN) as usize;
        let mut buf = Vec::with_capacity(total);
        buf.extend_from_slice(&self.encode_header(payload));
        buf.extend_from_slice(payload);
        buf.resize(total, 0);
        buf
    }

    /// Encodes only the header for `payload` and fills in `crc`. On disk the
    /// record is this header, the payload, then [`RecordHeader::padding`] zeros.
    pub fn encode_header(&mut self, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        debug_assert_eq!(payload.len(), self.payload_len as usize);
        self.encode_header_for(crc32c::crc32c(payload))
    }

    /// [`RecordHeader::encode_header`] given only the crc32c of the payload
    /// (`payload_len` bytes): the record crc is combined from it, so the
    /// payload can be checksummed before its place in the log is known.
    pub fn encode_header_for(&mut self, payload_crc: u32) -> [u8; RECORD_HEADER_LEN] {
        let head = crc32c::crc32c(self.to_raw(0).as_bytes());
        let crc = super::crc::crc32c_combine(head, payload_crc, self.payload_len as usize);
        self.crc = crc;
        let mut out = [0u8; RECORD_HEADER_LEN];
        out.copy_from_slice(self.to_raw(crc).as_bytes());
        out
    }

    /// The first 40 bytes of the encoded header (magic through self_off): the
    /// associated data a sealed payload is bound to (`crate::crypto`).
    pub fn sealed_aad(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out.copy_from_slice(&self.to_raw(0).as_bytes()[..40]);
        out
    }

    /// The lsn through which this record says its epoch's log was durable
    /// (see [`RecordHeader::synced`]).
    pub fn synced_through(&self) -> Option<u64> {
        (self.synced > 0).then(|| self.lsn - u64::from(self.synced))
    }

    /// The [`RecordHeader::synced`] value of a record `lsn` written when the
    /// log was durable through `durable` (None: nothing of the epoch yet).
    pub fn synced_for(lsn: u64, durable: Option<u64>) -> u32 {
        durable
            .filter(|&d| d < lsn)
            .and_then(|d| u32::try_from(lsn - d).ok())
            .unwrap_or(0)
    }

    /// Zero bytes after the payload up to the next aligned offset.
    pub fn padding(&self) -> usize {
        (align_up(self.total_len(), RECORD_ALIGN) - self.total_len()) as usize
    }

    fn to_raw(self, crc: u32) -> RawHeader {
        RawHeader {
            magic: MAGIC.into(),
            kind: self.kind as u8,
            codec: self.codec,
            flags: self.flags.into(),
            payload_len: self.payload_len.into(),
            raw_len: self.raw_len.into(),
            lsn: self.lsn.into(),
            epoch: self.epoch.into(),
            self_off: self.self_off.into(),
            key: self.key.into(),
            birth: self.birth.into(),
            crc32c: crc.into(),
            synced: self.synced.into(),
        }
    }

    /// Decodes a header read at `at`, checking magic, kind, self offset and
    /// length bounds. The payload checksum is checked by [`RecordHeader::verify`].
    pub fn decode(bytes: &[u8], at: u64) -> Result<RecordHeader> {
        let head = bytes
            .get(..RECORD_HEADER_LEN)
            .ok_or_else(|| Error::corrupt(format!("record at {at} truncated")))?;
        let raw = RawHeader::read_from_bytes(head)
            .map_err(|_| Error::corrupt(format!("record at {at} truncated")))?;
        if raw.magic.get() != MAGIC {
            return Err(Error::corrupt(format!("no record at {at} (bad magic)")));
        }
        let kind = RecordKind::from_u8(raw.kind).ok_or_else(|| {
            Error::corrupt(format!("record at {at} has unknown kind {}", raw.kind))
        })?;
        if raw.self_off.get() != at {
            return Err(Error::corrupt(format!(
                "record at {at} says it belongs at {}",
                raw.self_off.get()
            )));
        }
        let payload_len = raw.payload_len.get();
        // Births are checkpoint generations, 32-bit in map entries.
        if payload_len > MAX_PAYLOAD
            || raw.raw_len.get() > MAX_PAYLOAD
            || raw.codec > 1
            || raw.birth.get() > u64::from(u32::MAX)
            || u64::from(raw.synced.get()) > raw.lsn.get()
        {
            return Err(Error::corrupt(format!(
                "record at {at} has impossible lengths"
            )));
        }
        if at
            .checked_add(u64::from(payload_len) + RECORD_HEADER_LEN as u64)
            .is_none_or(|end| end > MAX_FILE_OFFSET)
        {
            return Err(Error::corrupt(format!(
                "record at {at} runs past the largest offset"
            )));
        }
        Ok(RecordHeader {
            kind,
            codec: raw.codec,
            flags: raw.flags.get(),
            payload_len,
            raw_len: raw.raw_len.get(),
            lsn: raw.lsn.get(),
            epoch: raw.epoch.get(),
            self_off: at,
            key: raw.key.get(),
            birth: raw.birth.get(),
            crc: raw.crc32c.get(),
            synced: raw.synced.get(),
        })
    }

    /// Checks the crc over the header (as read, crc zeroed) and `payload`.
    pub fn verify(&self, header_bytes: &[u8], payload: &[u8]) -> Result<()> {
        let mut head = [0u8; RECORD_HEADER_LEN];
        head.copy_from_slice(
            header_bytes
                .get(..RECORD_HEADER_LEN)
                .unwrap_or(&[0; RECORD_HEADER_LEN]),
        );
        head[56..60].fill(0);
        let mut crc = crc32c::crc32c(&head);
        crc = crc32c::crc32c_append(crc, payload);
        if crc != self.crc {
            // An encrypted image's headers carry key and birth sealed (0
            // here): naming "key 0" would contradict the caller's context.
            let key = if self.key == 0 && self.birth == 0 {
                String::new()
            } else {
                format!(", key {}", self.key)
            };
            return Err(Error::corrupt(format!(
                "record at {} ({:?}{key}) checksum mismatch",
                self.self_off, self.kind
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_from_a_payload_crc_is_the_header_from_the_payload() {
        for len in [0usize, 1, 15, 4096, 70_001] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut a = header(&payload, 4096);
            let mut b = a;
            let from_crc = b.encode_header_for(crc32c::crc32c(&payload));
            assert_eq!(a.encode_header(&payload), from_crc, "len {len}");
            assert_eq!(a.crc, b.crc);
        }
    }

    fn header(payload: &[u8], at: u64) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Data,
            codec: 1,
            flags: 0,
            payload_len: payload.len() as u32,
            raw_len: 65536,
            lsn: 5,
            epoch: 9,
            self_off: at,
            key: 42,
            birth: 3,
            crc: 0,
            synced: 2,
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let payload = b"hello world";
        let mut h = header(payload, 65536);
        let bytes = h.encode(payload);
        assert_eq!(bytes.len() % 16, 0);
        let d = RecordHeader::decode(&bytes, 65536).unwrap();
        assert_eq!(d, h);
        d.verify(&bytes, &bytes[64..64 + payload.len()]).unwrap();
    }

    #[test]
    fn misplaced_record_is_refused() {
        let payload = b"x";
        let bytes = header(payload, 65536).encode(payload);
        assert!(RecordHeader::decode(&bytes, 65552).is_err());
    }

    #[test]
    fn birth_beyond_32_bits_is_refused() {
        let payload = b"x";
        let mut h = header(payload, 65536);
        h.birth = 1 << 32;
        let bytes = h.encode(payload);
        assert!(RecordHeader::decode(&bytes, 65536).is_err());
    }

    #[test]
    fn synced_says_how_far_the_log_was_durable() {
        assert_eq!(RecordHeader::synced_for(10, None), 0, "nothing durable yet");
        assert_eq!(RecordHeader::synced_for(10, Some(9)), 1);
        assert_eq!(RecordHeader::synced_for(10, Some(3)), 7);
        assert_eq!(RecordHeader::synced_for(10, Some(10)), 0, "never itself");
        assert_eq!(
            RecordHeader::synced_for(1 << 40, Some(1)),
            0,
            "too far: no claim"
        );
        let mut h = header(b"x", 65536);
        h.lsn = 10;
        h.synced = RecordHeader::synced_for(10, Some(3));
        assert_eq!(h.synced_through(), Some(3));
        h.synced = 0;
        assert_eq!(h.synced_through(), None);
    }

    #[test]
    fn a_claim_beyond_the_first_record_is_refused() {
        let payload = b"x";
        let mut h = header(payload, 65536);
        h.synced = h.lsn as u32 + 1;
        let bytes = h.encode(payload);
        assert!(RecordHeader::decode(&bytes, 65536).is_err());
        h.synced = h.lsn as u32;
        let bytes = h.encode(payload);
        assert_eq!(
            RecordHeader::decode(&bytes, 65536).unwrap().synced,
            h.synced
        );
    }

    #[test]
    fn every_bit_flip_is_caught() {
        let payload = b"some payload bytes";
        let bytes = header(payload, 65536).encode(payload);
        let n = 64 + payload.len();
        for i in 0..n * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let ok = RecordHeader::decode(&b, 65536)
                .and_then(|h| h.verify(&b, &b[64..64 + payload.len()]));
            // The synced field is covered by the crc too.
            assert!(ok.is_err(), "flip of bit {i} not detected");
        }
    }
}
