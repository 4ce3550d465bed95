//! The foreign-format readers, checked byte for byte against QEMU: every
//! fixture is read through `vbdfs::convert::open_source` in odd-sized pieces
//! and compared with `qemu-img convert -O raw` of the same file, and the data
//! extents the reader reports must cover every non-zero byte.

mod convert_common;

use convert_common::{build_fixtures, qemu_raw, qemu_size, tmp};
use vbdfs::convert::{open_source, Source};

fn read_all(src: &dyn Source) -> Vec<u8> {
    let len = src.len() as usize;
    let mut out = vec![0u8; len];
    let mut off = 0usize;
    let mut step = 100_003usize;
    while off < len {
        let n = step.min(len - off);
        src.read_at(&mut out[off..off + n], off as u64)
            .expect("read");
        off += n;
        step = if step > 1 << 20 { 777 } else { step * 3 };
    }
    out
}

fn assert_extents_cover(src: &dyn Source, data: &[u8]) {
    let len = src.len();
    let mut covered = vec![false; data.len()];
    let mut pos = 0;
    while let Some((s, e)) = src.next_data(pos, len).expect("next_data") {
        assert!(
            s >= pos && e > s && e <= len,
            "bad extent {s}..{e} at {pos}"
        );
        covered[s as usize..e as usize]
            .iter_mut()
            .for_each(|c| *c = true);
        pos = e;
    }
    if let Some(i) = data.iter().zip(&covered).position(|(&b, &c)| b != 0 && !c) {
        panic!(
            "{}: non-zero byte at {i} outside every extent",
            src.path().display()
        );
    }
}

#[test]
fn readers_match_qemu() {
    let (_d, dir) = tmp();
    for f in build_fixtures(&dir) {
        let src = open_source(&f.path, None).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        // QEMU rounds a raw file up to whole sectors; so does the importer.
        let size = qemu_size(&f.path, f.fmt);
        assert_eq!(
            src.len().next_multiple_of(512),
            size,
            "{}: virtual size",
            f.name
        );
        let ours = read_all(src.as_ref());
        let mut theirs = qemu_raw(&f.path, f.fmt);
        assert!(
            theirs[ours.len()..].iter().all(|&b| b == 0),
            "{}: tail",
            f.name
        );
        theirs.truncate(ours.len());
        if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
            panic!("{}: first difference at byte {i}", f.name);
        }
        assert_extents_cover(src.as_ref(), &ours);
    }
}
