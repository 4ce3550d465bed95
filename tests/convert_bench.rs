//! Import speed against `qemu-img convert` of the same source, as a ratio.
//! Ignored by default (it writes a few hundred MiB); run it with
//! `cargo test --release --test convert_bench -- --ignored --nocapture`.
//! The source mixes holes, compressible and incompressible data; each source
//! format is imported with the default options (zstd level 1, 64 KiB blocks)
//! and converted by `qemu-img convert -O qcow2` (and `-c`, compressed) to
//! compare. A ratio above 1 means vbdfs import is faster.

mod convert_common;

use convert_common::{p, qemu_img, tmp};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use vbdfs::convert::import;
use vbdfs::CreateOptions;

const MIB: u64 = 1 << 20;

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

#[test]
#[ignore = "benchmark: run explicitly"]
fn import_speed_vs_qemu_img() {
    let (_d, dir) = tmp();
    let size = std::env::var("VBDFS_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512)
        * MIB;
    let raw = dir.join("src.raw");
    let f = std::fs::File::create(&raw).expect("create");
    f.set_len(size).expect("len");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; MIB as usize];
    for i in 0..size / MIB {
        match i % 4 {
            0 | 1 => continue, // hole
            2 => {
                // compressible: repeated words with some variation
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog "[(j + i as usize) % 44];
                }
            }
            _ => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
        f.write_all_at(&chunk, i * MIB).expect("write");
    }
    f.sync_all().expect("sync");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        &p(&dir, "src.raw"),
        &p(&dir, "src.qcow2"),
    ]);
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        &p(&dir, "src.raw"),
        &p(&dir, "srcz.qcow2"),
    ]);
    println!(
        "source: {} MiB, half holes, quarter text, quarter random",
        size / MIB
    );
    println!(
        "{:<16} {:>10} {:>14} {:>8} {:>16} {:>8}",
        "source", "vbdfs", "qemu-img", "ratio", "qemu-img -c", "ratio"
    );
    for (name, fmt) in [
        ("src.raw", "raw"),
        ("src.qcow2", "qcow2"),
        ("srcz.qcow2", "qcow2"),
    ] {
        let img = dir.join(format!("{name}.vbd"));
        let ours = timed(|| {
            import(
                &dir.join(name),
                &img,
                None,
                &CreateOptions::default(),
                false,
            )
            .expect("import")
        });
        let theirs = timed(|| {
            qemu_img(&[
                "convert",
                "-f",
                fmt,
                "-O",
                "qcow2",
                &p(&dir, name),
                &p(&dir, "q.qcow2"),
            ]);
        });
        let theirs_c = timed(|| {
            qemu_img(&[
                "convert",
                "-c",
                "-f",
                fmt,
                "-O",
                "qcow2",
                &p(&dir, name),
                &p(&dir, "qc.qcow2"),
            ]);
        });
        let vbd_bytes = std::fs::metadata(&img).expect("stat").len();
        println!(
            "{name:<16} {:>9.2}s {:>13.2}s {:>8.2} {:>15.2}s {:>8.2}   (.vbd {} MiB)",
            ours.as_secs_f64(),
            theirs.as_secs_f64(),
            theirs.as_secs_f64() / ours.as_secs_f64(),
            theirs_c.as_secs_f64(),
            theirs_c.as_secs_f64() / ours.as_secs_f64(),
            vbd_bytes / MIB
        );
        std::fs::remove_file(&img).expect("rm");
        std::fs::remove_file(dir.join("q.qcow2")).expect("rm");
        std::fs::remove_file(dir.join("qc.qcow2")).expect("rm");
    }
}
