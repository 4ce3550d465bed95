//! Reads leave no copy of the image in the host page cache: records are read
//! with O_DIRECT, so `cache=` bounds the memory that holds image data.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Bytes of `path` the host page cache holds (`fincore`), or None without it.
fn in_page_cache(path: &std::path::Path) -> Option<u64> {
    let out = std::process::Command::new("fincore")
        .args(["-b", "-n", "-o", "RES"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[test]
fn reads_leave_no_copy_in_the_host_page_cache() {
    for codec in [Codec::None, Codec::Zstd(1)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.vbd");
        let create = CreateOptions {
            size: 64 << 20,
            block_size: 65536,
            codec,
        };
        // A cache of 4 MiB: most of the 32 MiB read back misses it.
        let opts = OpenOptions {
            cache_bytes: 4 << 20,
            ..OpenOptions::default()
        };
        let img = Image::create(&path, &create, &opts).unwrap();
        let data = pattern(32 << 20, 7);
        img.write_at(&data, 0).unwrap();
        img.close().unwrap();
        // Nothing of the file in the page cache to begin with.
        let dd = std::process::Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .unwrap();
        assert!(dd.success());
        let Some(before) = in_page_cache(&path) else {
            eprintln!("fincore is not installed: skipped");
            return;
        };
        let img = Image::open(&path, &opts).unwrap();
        // Runs of records (1 MiB reads) and single records (4 KiB reads of
        // blocks not cached: the cache holds 4 MiB of 32).
        let mut got = vec![0u8; 32 << 20];
        for (i, chunk) in got.chunks_mut(1 << 20).enumerate() {
            img.read_at(chunk, (i << 20) as u64).unwrap();
        }
        assert!(got == data, "{codec:?}: data read back differs");
        let mut small = vec![0u8; 4096];
        for block in (0..512u64).step_by(7) {
            let off = block * 65536 + 8192;
            img.read_at(&mut small, off).unwrap();
            assert_eq!(small[..], data[off as usize..off as usize + 4096]);
        }
        let after = in_page_cache(&path).unwrap();
        img.close().unwrap();
        // Only what the open reads (superblocks, the log's end) goes
        // through the page cache: ~90 KiB here, 32 MiB if records did.
        assert!(
            after.saturating_sub(before) <= 1 << 20,
            "{codec:?}: reading 32 MiB left {after} bytes of the image in the page cache ({before} before)"
        );
    }
}
