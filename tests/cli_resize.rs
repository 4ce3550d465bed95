//! `vbdfs resize`: the disk changes size as a raw file does under
//! `truncate` (compared byte for byte through `vbdfs export`), an ext4 in it
//! grows with `resize2fs` and stays clean, and every refusal (a mounted
//! image, a shrink without `--shrink`, bad sizes) is one error line that
//! changes nothing.

mod common;

use common::{create, fuse_available, info_json, p, run, sh, stderr, stdout};
use common::{FsMount, Loop, Mount};
use std::path::Path;

fn resize(image: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["resize", p(image)];
    all.extend_from_slice(args);
    run(&all)
}

fn assert_refused(image: &Path, args: &[&str], needle: &str) {
    let size = info_json(image)["virtual_size"].clone();
    let out = resize(image, args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        err.starts_with("vbdfs: ") && err.trim_end().lines().count() == 1,
        "{args:?}: not one error line: {err}"
    );
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert_eq!(
        info_json(image)["virtual_size"],
        size,
        "{args:?} changed it"
    );
}

/// Resizes `image` and a raw copy `raw` (with `truncate`) to `size`; their
/// bytes must then be the same.
fn resize_both(image: &Path, raw: &Path, size: &str, shrink: bool, dir: &Path) {
    let mut args = vec![size];
    if shrink {
        args.push("--shrink");
    }
    let out = resize(image, &args);
    assert!(out.status.success(), "resize {size}: {}", stderr(&out));
    sh("truncate", &["-s", size, p(raw)]);
    let exported = dir.join("exported.raw");
    let _ = std::fs::remove_file(&exported);
    let out = run(&["export", p(image), p(&exported)]);
    assert!(out.status.success(), "export: {}", stderr(&out));
    let cmp = std::process::Command::new("cmp")
        .args([p(raw), p(&exported)])
        .output()
        .expect("cmp");
    assert!(
        cmp.status.success(),
        "after resize to {size}: the image differs from a truncated raw file: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn resize_matches_truncate_on_a_raw_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    let raw = tmp.path().join("a.raw");
    // Off the 64 KiB block size: the last block is partly past the end.
    create(&img, "3000K", &[]);
    let fill: Vec<u8> = (0..3000u32 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&raw, &fill).expect("raw");
    let out = run(&["import", p(&raw), p(&tmp.path().join("b.vbd"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let img = tmp.path().join("b.vbd");
    let _ = std::fs::remove_file(tmp.path().join("a.vbd"));
    resize_both(&img, &raw, "8M", false, tmp.path());
    resize_both(&img, &raw, "1000K", true, tmp.path());
    resize_both(&img, &raw, "+5000K", false, tmp.path());
    let out = resize(&img, &["-512K", "--shrink"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("{}: disk size 5.86 MiB -> 5.36 MiB", p(&img))
    );
    assert_eq!(info_json(&img)["virtual_size"], 5488 * 1024);
    // Snapshots keep their size; `snapshot list` shows it.
    let out = run(&["snapshot", "create", p(&img), "small"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(resize(&img, &["+1M"]).status.success());
    let out = run(&["snapshot", "list", p(&img)]);
    let text = stdout(&out);
    assert!(
        text.lines().next().unwrap_or("").contains("DISK SIZE"),
        "{text}"
    );
    let line = text.lines().find(|l| l.starts_with("small ")).unwrap_or("");
    assert!(line.contains("5.36 MiB"), "{text}");
    assert_eq!(info_json(&img)["virtual_size"], 6512 * 1024);
    let out = run(&["check", p(&img)]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn refusals_are_one_line_and_change_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "64M", &[]);
    assert_refused(&img, &["32M"], "run again with --shrink");
    assert_refused(&img, &["-1M"], "run again with --shrink");
    assert_refused(
        &img,
        &["-64M", "--shrink"],
        "cannot shrink a disk of 64 MiB by 64 MiB",
    );
    assert_refused(&img, &["0", "--shrink"], "positive multiple of 512");
    assert_refused(&img, &["1000"], "positive multiple of 512");
    assert_refused(&img, &["65T"], "at most 64 TiB");
    assert_refused(&img, &["ten"], "invalid size 'ten'");
    assert_refused(&img, &["+"], "invalid size ''");
    let missing = tmp.path().join("missing.vbd");
    let out = resize(&missing, &["1G"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing.vbd"), "{}", stderr(&out));
    if !fuse_available() {
        return;
    }
    let m = Mount::new(&img, &tmp.path().join("mnt"), None);
    assert_refused(&img, &["128M"], "is mounted at");
    m.umount();
    assert!(resize(&img, &["64M"]).status.success(), "same size");
}

/// The admin's path: stop the VM, unmount, resize, mount, grow the file
/// system inside.
#[test]
fn an_ext4_inside_grows_with_resize2fs_and_keeps_its_files() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("vm.vbd");
    create(&img, "64M", &[]);
    let mnt = tmp.path().join("mnt");
    let fs = tmp.path().join("fs");
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    {
        let m = Mount::new(&img, &mnt, None);
        sh("mkfs.ext4", &["-q", "-F", p(&m.disk())]);
        let lo = Loop::new(&m.disk(), true);
        let f = FsMount::new(&lo.dev, &fs);
        std::fs::write(fs.join("before"), &data).expect("write");
        f.umount();
        drop(lo);
        m.umount();
    }
    let out = resize(&img, &["+192M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Mount::new(&img, &mnt, None);
    assert_eq!(std::fs::metadata(m.disk()).expect("stat").len(), 256 << 20);
    let lo = Loop::new(&m.disk(), true);
    sh("e2fsck", &["-fy", &lo.dev]);
    sh("resize2fs", &[&lo.dev]);
    let f = FsMount::new(&lo.dev, &fs);
    assert_eq!(std::fs::read(fs.join("before")).expect("read"), data);
    // More than the old disk held: the new space is usable.
    for i in 0..4 {
        std::fs::write(fs.join(format!("after{i}")), &data).expect("write after grow");
    }
    f.umount();
    let out = std::process::Command::new("e2fsck")
        .args(["-fn", &lo.dev])
        .output()
        .expect("e2fsck");
    assert!(
        out.status.success(),
        "e2fsck after the grow: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(lo);
    m.umount();
    let out = run(&["check", p(&img)]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}
