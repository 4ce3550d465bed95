//! Roll-forward: applying the log written after the last checkpoint to the
//! map it committed, stepping over (or, salvaging, past) damaged records.

use super::log::{next_off, read_next};
use super::logend;
use super::map::BlockMap;
use super::mapload::seal_overhead;
use super::reader::SnapshotReader;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{align_up, MapEntry, RecordHeader, RecordKind, Superblock, LOG_UNIT};
use crate::io::Store;

/// Applies the log after the checkpoint, up to `log_end` (the end of the
/// file, or of the run's hole: `Superblock::log_limit`); returns the tail
/// after the last valid record.
pub(super) fn roll_forward(
    store: &dyn Store,
    sb: &Superblock,
    map: &mut BlockMap,
    log_end: u64,
    backing: Option<&SnapshotReader>,
    salvage: bool,
    notes: &mut Vec<String>,
) -> Result<(u64, u64, u64)> {
    let nblocks = sb.virtual_size.div_ceil(sb.block_size());
    let (mut off, mut lsn, mut max_birth) = (sb.log_start_off, sb.log_start_lsn, sb.gen);
    let block_size = 1u32 << sb.block_shift;
    let max_payload = block_size + seal_overhead(store);
    loop {
        // The next record follows the last one, or starts the next unit
        // when the last one ended an append (format.md, "The log").
        let follows = |h: &RecordHeader| h.epoch == sb.log_epoch && h.lsn == lsn;
        let here = off;
        // A record written whole, then altered (it passes its crc, not its
        // authentication): only salvage goes past it, as past damage.
        let (next, altered) = match read_following(store, off, log_end, follows) {
            Ok((at, next)) => {
                off = at;
                (next, None)
            }
            Err(e) if salvage && e.kind() == ErrorKind::Corrupt => (None, Some(e)),
            Err(e) => {
                return Err(Error::corrupt(format!(
                    "{e}; `vbdfs check --repair` replays the log past it (dropping what that \
                     record held)"
                )))
            }
        };
        let Some((h, payload)) = next else {
            let damaged = altered.map_or_else(
                || logend::synced_but_damaged(store, sb.log_epoch, here, lsn, log_end),
                Err,
            );
            let damaged = match damaged {
                Err(e) if salvage && e.kind() == ErrorKind::Corrupt => {
                    match salvage_past(store, sb.log_epoch, (here, lsn), log_end, &e, notes) {
                        Some(at) => {
                            (off, lsn) = at;
                            continue;
                        }
                        None => break,
                    }
                }
                other => other?,
            };
            match damaged {
                None => break, // the end of the log (a torn tail after a crash)
                Some(damaged) => {
                    let h = damaged.header;
                    if h.kind == RecordKind::Data {
                        match check_data_record(&h, nblocks, block_size, max_payload) {
                            // The block reads as an error, not as an older value.
                            Ok(()) => {
                                map.set(h.key, data_entry(&h)?);
                            }
                            // Its header lies about the block: what it held is
                            // unknown; salvage drops it.
                            Err(e) if !salvage => return Err(e),
                            Err(_) => {}
                        }
                    }
                    notes.push(format!(
                        "the log record at {} ({:?}, key {}) is damaged although the record at \
                         {} says it was synced; stepped over it",
                        h.self_off, h.kind, h.key, damaged.witness
                    ));
                    ::log::warn!("{}", notes[notes.len() - 1]);
                    // Its birth is not verified: it does not count towards
                    // the generations this session continues from.
                    off = next_off(&h);
                    lsn += 1;
                    continue;
                }
            }
        };
        match h.kind {
            RecordKind::Data => {
                check_data_record(&h, nblocks, block_size, max_payload)?;
                map.set(h.key, data_entry(&h)?);
            }
            RecordKind::Zero => {
                let (first, count) = zero_payload(&payload)?;
                if count == 0 || first.checked_add(count).is_none_or(|end| end > nblocks) {
                    return Err(Error::corrupt(format!(
                        "zero record at {off} is out of bounds"
                    )));
                }
                super::backing::set_holes(map, backing, first, count, sb.block_shift);
            }
            RecordKind::Leaf | RecordKind::Index | RecordKind::SnapTable | RecordKind::Config => {}
        }
        max_birth = max_birth.max(h.birth);
        off = next_off(&h);
        lsn += 1;
    }
    Ok((off, lsn, max_birth))
}

/// A record read back: its header and payload.
type Record = (RecordHeader, Vec<u8>);

/// The record that continues the log at `off` — there, or when none does
/// there, at the next log unit — and where it was looked for last.
fn read_following(
    store: &dyn Store,
    off: u64,
    file_len: u64,
    follows: impl Fn(&RecordHeader) -> bool,
) -> Result<(u64, Option<Record>)> {
    let next = read_next(store, off, file_len)?.filter(|(h, _)| follows(h));
    if next.is_some() || off.is_multiple_of(LOG_UNIT) {
        return Ok((off, next));
    }
    let at = align_up(off, LOG_UNIT);
    let next = read_next(store, at, file_len)?.filter(|(h, _)| follows(h));
    Ok((at, next))
}

/// Salvage (`check --repair`): roll-forward cannot go on at `here`, where
/// record `lsn` was expected, because of `why`. Notes what is dropped and
/// returns where the log goes on: the next readable record of the run (its
/// offset and lsn), or None when nothing readable follows.
fn salvage_past(
    store: &dyn Store,
    epoch: u64,
    (here, lsn): (u64, u64),
    file_len: u64,
    why: &Error,
    notes: &mut Vec<String>,
) -> Option<(u64, u64)> {
    let next = logend::next_readable(store, epoch, here, lsn, file_len);
    notes.push(match next {
        Some((at, next)) => format!(
            "salvage: {why}; dropped log records {lsn}..{} and replayed from the record at {at}",
            next - 1
        ),
        None => {
            format!("salvage: {why}; dropped the log from record {lsn} on (nothing after it reads)")
        }
    });
    ::log::warn!("{}", notes[notes.len() - 1]);
    next
}

/// A DATA record met in roll-forward must name a block of the disk and hold
/// one block.
fn check_data_record(
    h: &RecordHeader,
    nblocks: u64,
    block_size: u32,
    max_payload: u32,
) -> Result<()> {
    if h.key >= nblocks || h.raw_len != block_size || h.payload_len > max_payload {
        return Err(Error::corrupt(format!(
            "data record at {} is out of bounds",
            h.self_off
        )));
    }
    Ok(())
}

/// The map entry of a DATA record.
fn data_entry(h: &RecordHeader) -> Result<MapEntry> {
    let birth = u32::try_from(h.birth).map_err(|_| Error::corrupt("birth overflow"))?;
    Ok(MapEntry::data(h.self_off, h.total_len() as u32, birth))
}

/// Decodes a ZERO record payload: first block and count.
pub(super) fn zero_payload(payload: &[u8]) -> Result<(u64, u64)> {
    let bytes: [u8; 16] = payload
        .try_into()
        .map_err(|_| Error::corrupt("zero record payload is not 16 bytes"))?;
    let (a, b) = bytes.split_at(8);
    let first = u64::from_le_bytes(a.try_into().map_err(|_| Error::corrupt("zero record"))?);
    let count = u64::from_le_bytes(b.try_into().map_err(|_| Error::corrupt("zero record"))?);
    Ok((first, count))
}
