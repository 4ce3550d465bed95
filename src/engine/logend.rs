//! Where roll-forward stops: the torn tail of a crash, or damage to records
//! that had been synced (format.md §5, "Damage in the roll-forward region").
//!
//! Roll-forward applies the log until the first record that does not read
//! back. After a crash that is the first write that never became durable,
//! and stopping there is right. But if that record *was* synced and then
//! damaged (bit rot, a lost host write), stopping would silently drop every
//! later synced write. Records carry how far their epoch's log was durable
//! when they were written (`RecordHeader::synced`), so a later record can
//! prove the stop point was synced: then the damaged record is stepped over
//! when its header still says what it held (its block then reads as an
//! error), and the open fails otherwise.

use super::log::read_next;
use crate::error::{Error, Result};
use crate::format::{
    align_up, RecordHeader, RecordKind, LOG_UNIT, RECORD_ALIGN, RECORD_HEADER_LEN,
};
use crate::io::Store;

/// The log is read this much at a time while looking for later records.
const SCAN_CHUNK: usize = 1 << 20;

/// A record that is damaged although a later record says it was synced.
#[derive(Debug)]
pub(super) struct Damaged {
    /// Its header, which passes every check but the crc.
    pub header: RecordHeader,
    /// The later record that proves it was synced.
    pub witness: u64,
}

/// Roll-forward of `epoch` found no valid record `lsn` at `off` (nor at the
/// next log unit). `Ok(None)`: no later record says it was synced, so this
/// is the end of the log. `Ok(Some)`: it was synced and its header is intact
/// enough to step over (a DATA record of an unencrypted image, or a record
/// roll-forward skips anyway). An error: it was synced and cannot be
/// stepped over, so the records after it cannot be replayed safely.
pub(super) fn synced_but_damaged(
    store: &dyn Store,
    epoch: u64,
    off: u64,
    lsn: u64,
    file_len: u64,
) -> Result<Option<Damaged>> {
    let Some(witness) = later_claim(store, epoch, off, lsn, file_len)? else {
        return Ok(None);
    };
    let header = [off, align_up(off, LOG_UNIT)]
        .into_iter()
        .find_map(|at| plausible_header(store, epoch, at, lsn, file_len));
    let steppable = |h: &RecordHeader| match h.kind {
        RecordKind::Data => store.sealer().is_none(),
        RecordKind::Zero => false,
        RecordKind::Leaf | RecordKind::Index | RecordKind::SnapTable | RecordKind::Config => true,
    };
    let place = match align_up(off, LOG_UNIT) {
        next if next != off => format!("{off} or {next}"),
        _ => off.to_string(),
    };
    match header {
        Some(header) if steppable(&header) => Ok(Some(Damaged { header, witness })),
        _ => Err(Error::corrupt(format!(
            "the log is damaged: record {lsn} (at offset {place}) was synced (the record \
             at {witness} says so) but does not read back, and what it held is unknown; \
             the writes after it cannot be replayed safely (`vbdfs check --repair` \
             replays what can be read: the blocks of unreadable records may then read \
             older values)"
        ))),
    }
}

/// Salvage (`OpenOptions::salvage_log`): the first valid record of `epoch`
/// after `off` with an lsn above `lsn`, as (offset, lsn). Records of an
/// append lie back to back at [`RECORD_ALIGN`] offsets, so every aligned
/// offset is looked at.
pub(super) fn next_readable(
    store: &dyn Store,
    epoch: u64,
    off: u64,
    lsn: u64,
    file_len: u64,
) -> Option<(u64, u64)> {
    scan(
        store,
        epoch,
        off,
        RECORD_ALIGN,
        file_len,
        |at| match read_next(store, at, file_len) {
            Ok(Some((h, _))) if h.epoch == epoch && h.lsn > lsn => Some((at, h.lsn)),
            _ => None,
        },
    )
}

/// Calls `found` at each offset from `off` (rounded up to `step`) to the end
/// of the file whose bytes start like a record header of `epoch`, until it
/// returns something.
fn scan<T>(
    store: &dyn Store,
    epoch: u64,
    off: u64,
    step: u64,
    file_len: u64,
    mut found: impl FnMut(u64) -> Option<T>,
) -> Option<T> {
    let epoch_bytes = epoch.to_le_bytes();
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut pos = align_up(off, step);
    while pos + RECORD_HEADER_LEN as u64 <= file_len {
        let n = (file_len - pos).min(SCAN_CHUNK as u64) as usize;
        store.read_at(&mut buf[..n], pos).ok()?;
        // Offsets whose whole header lies in this chunk; the next chunk
        // starts at the first one that does not.
        let starts = n - (RECORD_HEADER_LEN - 1);
        for at in (0..starts).step_by(step as usize) {
            let head = &buf[at..at + RECORD_HEADER_LEN];
            if &head[..4] == b"VREC" && head[24..32] == epoch_bytes {
                if let Some(t) = found(pos + at as u64) {
                    return Some(t);
                }
            }
        }
        pos += align_up(starts as u64, step);
    }
    None
}

/// The offset of a valid record of `epoch` after `off` whose header says the
/// log was durable through `lsn` or later. Later appends start at log-unit
/// boundaries, and a record that can say so was taken after the sync that
/// covered `lsn`, so in a later append: only boundaries are looked at.
fn later_claim(
    store: &dyn Store,
    epoch: u64,
    off: u64,
    lsn: u64,
    file_len: u64,
) -> Result<Option<u64>> {
    let mut failure = None;
    let found = scan(store, epoch, off, LOG_UNIT, file_len, |at| match read_next(
        store, at, file_len,
    ) {
        Ok(Some((h, _))) => {
            (h.epoch == epoch && h.lsn > lsn && h.synced_through() >= Some(lsn)).then_some(at)
        }
        Ok(None) => None,
        Err(e) => {
            failure = Some(e);
            Some(at)
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// The header at `at` if it decodes and names record `lsn` of `epoch`
/// within the file: only its crc (so its payload, or a field the other
/// checks do not cover) is wrong.
fn plausible_header(
    store: &dyn Store,
    epoch: u64,
    at: u64,
    lsn: u64,
    file_len: u64,
) -> Option<RecordHeader> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    store.read_at(&mut head, at).ok()?;
    let h = RecordHeader::decode(&head, at).ok()?;
    (h.epoch == epoch && h.lsn == lsn && at + h.total_len() <= file_len).then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStore;

    /// A file with header-like bytes of `epoch` at each of `offs`.
    fn store_with(len: usize, epoch: u64, offs: &[usize]) -> MemStore {
        let mut bytes = vec![0u8; len];
        for &o in offs {
            bytes[o..o + 4].copy_from_slice(b"VREC");
            bytes[o + 24..o + 32].copy_from_slice(&epoch.to_le_bytes());
        }
        MemStore::from_bytes(bytes)
    }

    fn all(store: &MemStore, epoch: u64, step: u64, len: usize) -> Vec<u64> {
        let mut seen = Vec::new();
        let none: Option<()> = scan(store, epoch, 0, step, len as u64, |at| {
            seen.push(at);
            None
        });
        assert!(none.is_none());
        seen
    }

    #[test]
    fn the_scan_sees_headers_across_chunk_boundaries() {
        let len = 2 * SCAN_CHUNK + 4096;
        let offs = [
            16,
            SCAN_CHUNK - 48,
            SCAN_CHUNK - 16,
            SCAN_CHUNK,
            2 * SCAN_CHUNK + 4032,
        ];
        let store = store_with(len, 7, &offs);
        let want: Vec<u64> = offs.iter().map(|&o| o as u64).collect();
        assert_eq!(all(&store, 7, RECORD_ALIGN, len), want);
        assert!(
            all(&store, 8, RECORD_ALIGN, len).is_empty(),
            "another epoch"
        );
        // Log-unit steps see only the unit boundaries.
        assert_eq!(all(&store, 7, LOG_UNIT, len), [SCAN_CHUNK as u64]);
    }
}
