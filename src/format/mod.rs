//! The on-disk format, byte for byte (see `docs/format.md`).
//!
//! This layer owns the layout of the superblocks, record headers and map
//! entries: encoding, decoding and validation of every field read from a file.
//! It does no I/O and holds no state. Every integer on disk is little-endian.
//! All structs that touch disk bytes are `#[repr(C)]` zerocopy types with their
//! sizes pinned by `const` assertions; decoding returns typed values that have
//! passed every bound check, or an [`Error`](crate::Error) of kind `Corrupt`.

mod config;
mod crc;
mod entry;
mod record;
mod snap;
mod superblock;

pub use config::{BackingRef, MAX_BACKING_PATH};
pub use entry::{
    decode_index, decode_leaf, encode_index, encode_leaf, EntryKind, LeafPtr, MapEntry,
};
pub use record::{
    align_up, RecordHeader, RecordKind, LOG_UNIT, RECORD_ALIGN, RECORD_FLAG_COPY,
    RECORD_FLAG_HAS_COPY, RECORD_HEADER_LEN,
};
pub use snap::{check_snapshot_name, SnapEntry, SnapTable, MAX_SNAPSHOTS, MAX_SNAP_NAME};
pub use superblock::{
    Codec, RecPtr, Superblock, INCOMPAT_ENCRYPTED, MAGIC as VBD_MAGIC, SB_CRC_OFF, SB_FLAG_DIRTY,
    SB_LOG_LIMIT_OFF, SB_MAC_OFF,
};

/// Size of one superblock slot; slot `i` starts at `i * SB_SLOT_SIZE`.
pub const SB_SLOT_SIZE: u64 = 4096;
/// Number of superblock slots (written alternately).
pub const SB_SLOTS: u64 = 2;
/// First byte of the log. Bytes between the slots and here are reserved (zero).
pub const LOG_START: u64 = 64 * 1024;

/// Smallest block size (4 KiB).
pub const MIN_BLOCK_SHIFT: u8 = 12;
/// Largest block size (1 MiB).
pub const MAX_BLOCK_SHIFT: u8 = 20;
/// Default block size (64 KiB).
pub const DEFAULT_BLOCK_SHIFT: u8 = 16;
/// Largest virtual size: 64 TiB (the limit tested is 16 TiB; 64 TiB keeps
/// block indexes and leaf counts far from every integer bound).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Map entries per leaf (each leaf is one LEAF record of 16 KiB raw).
pub const LEAF_ENTRIES: u64 = 1024;
/// Byte offsets in map entries are 56 bits wide.
pub const MAX_FILE_OFFSET: u64 = (1 << 56) - 1;
/// Largest payload of any record: a 1 MiB block, or a leaf index for 64 TiB at
/// 4 KiB blocks (2^24 leaves x 24 bytes = 384 MiB raw, compressed far smaller;
/// capped here at 512 MiB so a hostile length cannot force a larger allocation).
pub const MAX_PAYLOAD: u32 = 512 << 20;
/// Largest superblock sequence number and log sequence number accepted (2^62):
/// unreachable by real images, far enough from `u64::MAX` that counting on
/// from them cannot overflow.
pub const MAX_COUNTER: u64 = 1 << 62;
/// zstd levels accepted: 1..=19 (the library's normal range; 1 is the
/// default) and the fast levels -7..=-1 (faster, larger output).
pub fn zstd_level_ok(level: i32) -> bool {
    (1..=19).contains(&level) || (-7..=-1).contains(&level)
}

/// The accepted zstd levels, as error messages name them.
pub const ZSTD_LEVELS_TEXT: &str = "1..19 (or -7..-1 for faster)";
