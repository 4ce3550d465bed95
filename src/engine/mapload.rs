//! Reading a map from the file: an INDEX record's leaf pointers, LEAF
//! records (first copy, else the second), whole maps; every entry checked
//! against the file and the disk's size.

use super::copies::{read_meta_record, Copy, MetaRef};
use super::map::BlockMap;
use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    decode_index, decode_leaf, EntryKind, LeafPtr, MapEntry, RecPtr, RecordKind, LEAF_ENTRIES,
    RECORD_HEADER_LEN,
};
use crate::io::Store;

/// Reads the leaf pointers of the INDEX record `index` (none if `off` is 0).
pub(super) fn read_index(
    store: &dyn Store,
    index: RecPtr,
    file_len: u64,
    nblocks: u64,
) -> Result<Vec<LeafPtr>> {
    if index.off == 0 {
        return Ok(Vec::new());
    }
    let meta = MetaRef {
        ptr: index,
        kind: RecordKind::Index,
        key: None,
    };
    let (h, payload, _) = read_meta_record(store, &meta)?;
    let max_leaves = nblocks.div_ceil(LEAF_ENTRIES);
    // Each listed leaf needs a record of at least a header in the file.
    let max_count = max_leaves.min(file_len / RECORD_HEADER_LEN as u64);
    if h.key > max_count || u64::from(h.raw_len) != h.key * 24 {
        return Err(Error::corrupt(format!(
            "map index at {} does not match its pointer",
            index.off
        )));
    }
    let mut raw = vec![0u8; h.raw_len as usize];
    codec::decode(h.codec, &payload, &mut raw)?;
    decode_index(&raw, max_leaves)
}

/// Reads and validates the LEAF record `ptr` names: 1024 entries, each inside
/// the file and, if mapped, for a block of the disk.
pub(super) fn read_leaf(
    store: &dyn Store,
    ptr: &LeafPtr,
    block_shift: u8,
    file_len: u64,
    nblocks: u64,
) -> Result<Vec<MapEntry>> {
    read_leaf_copy(store, ptr, block_shift, file_len, nblocks).map(|(entries, _)| entries)
}

/// [`read_leaf`], and which copy of the record it read (`copies`).
fn read_leaf_copy(
    store: &dyn Store,
    ptr: &LeafPtr,
    block_shift: u8,
    file_len: u64,
    nblocks: u64,
) -> Result<(Vec<MapEntry>, Copy)> {
    let max_record = (1u32 << block_shift) + RECORD_HEADER_LEN as u32 + seal_overhead(store);
    let (lh, lp, copy) = read_meta_record(store, &leaf_ref(ptr))
        .map_err(|e| e.context(format!("map leaf {}", ptr.leaf)))?;
    let mut bytes = vec![0u8; crate::format::LEAF_ENTRIES as usize * 16];
    if lh.raw_len as usize != bytes.len() {
        return Err(Error::corrupt(format!(
            "leaf {} has raw length {}",
            ptr.leaf, lh.raw_len
        )));
    }
    codec::decode(lh.codec, &lp, &mut bytes)?;
    let entries = decode_leaf(&bytes, file_len, max_record)?;
    for (i, e) in entries.iter().enumerate() {
        let block = ptr.leaf * LEAF_ENTRIES + i as u64;
        if e.kind != EntryKind::Unmapped && block >= nblocks {
            return Err(Error::corrupt(format!(
                "map entry for block {block} beyond the disk"
            )));
        }
    }
    Ok((entries, copy))
}

/// What a leaf pointer names, for [`read_meta_record`].
pub(super) fn leaf_ref(ptr: &LeafPtr) -> MetaRef {
    MetaRef {
        ptr: RecPtr {
            off: ptr.off,
            len: ptr.len,
            crc: ptr.crc,
        },
        kind: RecordKind::Leaf,
        key: Some(ptr.leaf),
    }
}

/// Loads the map committed by the INDEX record `index` (the head's, or a
/// snapshot's: snapshots reuse the INDEX of the checkpoint that made them).
pub(super) fn load_map(
    store: &dyn Store,
    index: RecPtr,
    block_shift: u8,
    file_len: u64,
    nblocks: u64,
) -> Result<BlockMap> {
    load_map_losing(store, index, block_shift, file_len, nblocks, false)
}

/// [`load_map`]; with `lose`, a leaf whose record cannot be read in either
/// copy because its bytes are damaged does not fail the load: its blocks get
/// the [`LOST`](super::map::LOST) entry and it is listed in
/// [`BlockMap::lost`]. A map that contradicts itself (the pointer names a
/// sound record that is not the leaf, a sound leaf that does not decode) is
/// refused as before: it says nothing reliable about the other leaves.
pub(super) fn load_map_losing(
    store: &dyn Store,
    index: RecPtr,
    block_shift: u8,
    file_len: u64,
    nblocks: u64,
    lose: bool,
) -> Result<BlockMap> {
    let mut map = BlockMap::default();
    for ptr in read_index(store, index, file_len, nblocks)? {
        let (entries, copy) = match read_leaf_copy(store, &ptr, block_shift, file_len, nblocks) {
            Ok(read) => read,
            Err(e)
                if lose
                    && matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io)
                    && super::log::read_record(store, ptr.off, ptr.len).is_err() =>
            {
                map.lose_leaf(ptr.leaf, nblocks, e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        for (i, e) in entries.into_iter().enumerate() {
            if e.kind != EntryKind::Unmapped {
                map.set(ptr.leaf * LEAF_ENTRIES + i as u64, e);
            }
        }
        map.ptrs.insert(ptr.leaf, ptr);
        if copy == Copy::Second {
            map.from_second_copy.push(ptr.leaf);
        }
    }
    for leaf in map.leaves.values_mut() {
        leaf.dirty = false;
    }
    Ok(map)
}

/// Bytes sealing adds to a record of the image in `store`.
pub(super) fn seal_overhead(store: &dyn Store) -> u32 {
    if store.sealer().is_some() {
        crate::crypto::SEAL_OVERHEAD
    } else {
        0
    }
}
