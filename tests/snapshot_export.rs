//! `vbdfs export IMAGE@SNAP`: a snapshot exported to raw and qcow2 holds the
//! disk at snapshot time, while the head has changed since.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::{p, pattern, run, stderr};
use vbdfs::{Codec, CreateOptions, Image, OpenOptions};

#[test]
fn export_of_a_snapshot_is_the_disk_at_snapshot_time() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vbd");
    let c = CreateOptions {
        size: 8 << 20,
        block_size: 65536,
        codec: Codec::Zstd(1),
    };
    let image = Image::create(&img, &c, &OpenOptions::default()).unwrap();
    let a = pattern(3 << 20, 1);
    image.write_at(&a, 1 << 20).unwrap();
    image.snapshot_create("v1").unwrap();
    image.write_at(&pattern(4 << 20, 2), 0).unwrap();
    image.close().unwrap();

    let raw = dir.path().join("v1.raw");
    let out = run(&["export", &format!("{}@v1", p(&img)), p(&raw)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = std::fs::read(&raw).unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert!(got[..1 << 20].iter().all(|&b| b == 0));
    assert!(got[1 << 20..4 << 20] == a[..]);
    assert!(got[4 << 20..].iter().all(|&b| b == 0));

    let q = dir.path().join("v1.qcow2");
    let out = run(&["export", &format!("{}@v1", p(&img)), p(&q)]);
    assert!(out.status.success(), "{}", stderr(&out));
    if let Ok(cmp) = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", p(&q), p(&raw)])
        .output()
    {
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    let out = run(&[
        "export",
        &format!("{}@nope", p(&img)),
        p(&dir.path().join("x")),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
}
