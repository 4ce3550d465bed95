//! Decompression of one qcow2 compressed cluster (raw deflate or zstd). The
//! output is exactly one cluster: decompression stops when the buffer is full
//! (the stored data may be followed by padding or by the next cluster's bytes),
//! and input that ends before a full cluster came out is an error. Output is
//! never larger than the caller's buffer, so a hostile stream cannot inflate
//! memory.

use super::header::Compression;
use flate2::{Decompress, FlushDecompress, Status};
use std::cell::RefCell;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

thread_local! {
    // One zstd context per reader thread, reused across clusters.
    static ZSTD: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
}

/// Fills `out` from the compressed bytes `input`; `Err` carries a reason.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    // qcow2 stores raw deflate streams (no zlib header), window up to 2^12
    // bytes; a 2^15 window decodes them as well.
    let mut d = Decompress::new(false);
    match d.decompress(input, out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd | Status::BufError | Status::Ok) => {}
        Err(e) => return Err(format!("deflate: {e}")),
    }
    if d.total_out() == out.len() as u64 {
        Ok(())
    } else {
        Err(format!(
            "deflate stream gave {} of {} bytes",
            d.total_out(),
            out.len()
        ))
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dec = match slot.as_mut() {
            Some(d) => {
                d.reinit().map_err(|e| format!("zstd: {e}"))?;
                d
            }
            None => slot.insert(Decoder::new().map_err(|e| format!("zstd: {e}"))?),
        };
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        loop {
            let (in_before, out_before) = (inb.pos(), outb.pos());
            dec.run(&mut inb, &mut outb)
                .map_err(|e| format!("zstd: {e}"))?;
            if outb.pos() == outb.capacity() {
                return Ok(());
            }
            if inb.pos() == in_before && outb.pos() == out_before {
                return Err(format!(
                    "zstd stream ended after {} of {} bytes",
                    outb.pos(),
                    outb.capacity()
                ));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression as Level, FlushCompress};

    #[test]
    fn zstd_roundtrip_and_padding() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).expect("compress");
        c.extend_from_slice(&[0u8; 300]); // padding after the frame
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zstd, &c, &mut out).expect("decompress");
        assert_eq!(out, data);
        let mut short = vec![0u8; data.len()];
        let cut = c.get(..c.len() / 4).expect("slice");
        assert!(decompress(Compression::Zstd, cut, &mut short).is_err());
        assert!(decompress(Compression::Zstd, &[0xffu8; 64], &mut short).is_err());
    }

    #[test]
    fn deflate_roundtrip_and_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
        let mut comp = Compress::new(Level::default(), false);
        let mut c = vec![0u8; 8192];
        comp.compress(&data, &mut c, FlushCompress::Finish)
            .expect("compress");
        c.truncate(comp.total_out() as usize);
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zlib, &c, &mut out).expect("inflate");
        assert_eq!(out, data);
        let mut big = vec![0u8; data.len() * 2];
        assert!(decompress(Compression::Zlib, &c, &mut big).is_err());
        assert!(decompress(Compression::Zlib, &[0xffu8; 64], &mut out).is_err());
    }
}
