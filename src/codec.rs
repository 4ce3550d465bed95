//! Block codec: compression of one block into a record payload and back.
//!
//! Owns the choice "compressed or raw" (a block that does not shrink by at least
//! 1/8 is stored raw) and bounded decompression (output must be exactly the
//! block size). Knows nothing of records or files.

use crate::error::{Error, Result};
use crate::format::Codec;
use std::borrow::Cow;
use std::cell::RefCell;

/// Codec id stored in a record header: payload stored as is.
pub const STORED_RAW: u8 = 0;
/// Codec id stored in a record header: payload is one zstd frame.
pub const STORED_ZSTD: u8 = 1;

thread_local! {
    /// One zstd compression context per thread, reused (its level switched
    /// when needed): creating a context costs more than compressing a 4 KiB
    /// block.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    /// One zstd decompression context per thread, reused.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress(block: &[u8], level: i32, limit: usize) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        match cell.as_mut() {
            Some((l, ctx)) if *l != level => {
                ctx.set_compression_level(level).ok()?;
                *l = level;
            }
            Some(_) => {}
            None => *cell = Some((level, zstd::bulk::Compressor::new(level).ok()?)),
        }
        let (_, ctx) = cell.as_mut()?;
        let mut out = Vec::with_capacity(limit);
        // A block that does not fit in `limit` bytes fails here: stored raw.
        ctx.compress_to_buffer(block, &mut out).ok()?;
        Some(out)
    })
}

/// Encodes `block` with `codec`; returns the stored codec id and payload
/// (borrowed from `block` when it is stored raw).
pub fn encode(block: &[u8], codec: Codec) -> (u8, Cow<'_, [u8]>) {
    if let Codec::Zstd(level) = codec {
        if let Some(out) = compress(block, level, block.len() - block.len() / 8) {
            return (STORED_ZSTD, Cow::Owned(out));
        }
    }
    (STORED_RAW, Cow::Borrowed(block))
}

/// Decodes a payload stored with `stored` into `out` (exactly `out.len()` bytes).
pub fn decode(stored: u8, payload: &[u8], out: &mut [u8]) -> Result<()> {
    match stored {
        STORED_RAW if payload.len() == out.len() => {
            out.copy_from_slice(payload);
            Ok(())
        }
        STORED_ZSTD => {
            let n = DECOMPRESSOR
                .with(|cell| {
                    let mut cell = cell.borrow_mut();
                    if cell.is_none() {
                        *cell = Some(zstd::bulk::Decompressor::new()?);
                    }
                    match cell.as_mut() {
                        Some(ctx) => ctx.decompress_to_buffer(payload, out),
                        None => Err(std::io::Error::other("no zstd context")),
                    }
                })
                .map_err(|e| Error::corrupt(format!("zstd payload does not decode: {e}")))?;
            if n != out.len() {
                return Err(Error::corrupt(format!(
                    "zstd payload decodes to {n} bytes, not {}",
                    out.len()
                )));
            }
            Ok(())
        }
        _ => Err(Error::corrupt(format!(
            "payload of {} bytes with codec {stored} does not fit a block",
            payload.len()
        ))),
    }
}

/// Decodes a payload into a new block of `len` bytes; a raw payload of the
/// right length is moved, not copied.
pub fn decode_owned(stored: u8, payload: Vec<u8>, len: usize) -> Result<Vec<u8>> {
    if stored == STORED_RAW && payload.len() == len {
        return Ok(payload);
    }
    decode_to_vec(stored, &payload, len)
}

/// Decodes a payload into a new block of exactly `len` bytes (no zero-fill of
/// the output first).
pub fn decode_to_vec(stored: u8, payload: &[u8], len: usize) -> Result<Vec<u8>> {
    match stored {
        STORED_RAW if payload.len() == len => Ok(payload.to_vec()),
        STORED_ZSTD => {
            let out = DECOMPRESSOR
                .with(|cell| {
                    let mut cell = cell.borrow_mut();
                    if cell.is_none() {
                        *cell = Some(zstd::bulk::Decompressor::new()?);
                    }
                    match cell.as_mut() {
                        // The capacity bounds the output: a zstd bomb fails.
                        Some(ctx) => ctx.decompress(payload, len),
                        None => Err(std::io::Error::other("no zstd context")),
                    }
                })
                .map_err(|e| Error::corrupt(format!("zstd payload does not decode: {e}")))?;
            if out.len() != len {
                return Err(Error::corrupt(format!(
                    "zstd payload decodes to {} bytes, not {len}",
                    out.len()
                )));
            }
            Ok(out)
        }
        _ => Err(Error::corrupt(format!(
            "payload of {} bytes with codec {stored} does not fit a block",
            payload.len()
        ))),
    }
}

/// True if every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(8);
    let tail = words.remainder();
    words.into_iter().all(|w| w == [0u8; 8]) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_block_round_trips() {
        let block: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let (id, payload) = encode(&block, Codec::Zstd(1));
        assert_eq!(id, STORED_ZSTD);
        assert!(payload.len() < block.len() / 4);
        let mut out = vec![0; block.len()];
        decode(id, &payload, &mut out).unwrap();
        assert_eq!(out, block);
    }

    #[test]
    fn one_thread_switches_levels_and_each_payload_decodes() {
        // Text-like: the levels compress it to different sizes.
        let words = [
            "disk ", "image ", "the ", "record ", "of ", "zstd\n", "cache ",
        ];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = Vec::with_capacity(65536 + 8);
        while block.len() < 65536 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            block.extend_from_slice(words[(x % 7) as usize].as_bytes());
        }
        block.truncate(65536);
        let mut sizes = Vec::new();
        for level in [1, -5, 1, 9, -5] {
            let (id, payload) = encode(&block, Codec::Zstd(level));
            assert_eq!(id, STORED_ZSTD);
            let mut out = vec![0u8; block.len()];
            decode(id, &payload, &mut out).unwrap();
            assert!(out == block, "level {level}");
            sizes.push(payload.len());
        }
        // The context really changed level each time (and back).
        assert_eq!(sizes[0], sizes[2]);
        assert_eq!(sizes[1], sizes[4]);
        assert!(sizes[1] > sizes[0] && sizes[3] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn incompressible_block_is_stored_raw() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let block: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (id, payload) = encode(&block, Codec::Zstd(3));
        assert_eq!(id, STORED_RAW);
        assert_eq!(payload, block);
    }

    #[test]
    fn wrong_length_is_corrupt() {
        let block = vec![1u8; 4096];
        let (id, payload) = encode(&block, Codec::Zstd(1));
        let mut short = vec![0; 2048];
        assert!(decode(id, &payload, &mut short).is_err());
        let mut out = vec![0; 4096];
        assert!(decode(STORED_RAW, &payload, &mut out).is_err());
        assert!(decode(9, &payload, &mut out).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 100]));
        let mut b = vec![0u8; 100];
        b[99] = 1;
        assert!(!is_zero(&b));
        b[99] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }
}
