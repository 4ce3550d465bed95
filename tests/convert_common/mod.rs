//! Helpers shared by the `convert_*` tests: run qemu-img / qemu-io, build
//! source images, and read a whole disk as QEMU sees it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command and panics with its stderr if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-io -f FMT FILE -c CMD...`.
pub fn qemu_io(fmt: &str, file: &Path, cmds: &[&str]) {
    let f = file.to_str().expect("utf8 path");
    let mut args = vec!["-f", fmt, f];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args);
}

/// Path `name` inside `dir` as a String.
pub fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().expect("utf8").to_string()
}

/// The whole guest content of `file` (format `fmt`) as QEMU reads it.
pub fn qemu_raw(file: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.raw");
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        file.to_str().expect("utf8"),
        out.to_str().expect("utf8"),
    ]);
    std::fs::read(out).expect("read converted")
}

/// A raw file of `size` bytes with patterned data at `(offset, len, byte)`.
pub fn make_raw(path: &Path, size: u64, writes: &[(u64, u64, u8)]) {
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("set_len");
    use std::os::unix::fs::FileExt;
    for &(off, len, byte) in writes {
        let data: Vec<u8> = (0..len).map(|i| byte ^ (i % 251) as u8).collect();
        f.write_all_at(&data, off).expect("write");
    }
}

/// `qemu-img compare -f A_FMT -F B_FMT A B` must say identical.
pub fn assert_identical(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img compare");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Images are identical"),
        "qemu-img compare {} {}: {text}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temp directory path helper.
pub fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().to_path_buf();
    (d, path)
}

/// Runs `qemu-img ARGS` with `dir` as the working directory (so backing
/// names are stored relative).
pub fn qemu_img_in(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One source image built with the QEMU tools, and its QEMU format name.
#[derive(Debug)]
pub struct Fixture {
    pub name: &'static str,
    pub path: PathBuf,
    pub fmt: &'static str,
}

fn fx(name: &'static str, dir: &Path, file: &str, fmt: &'static str) -> Fixture {
    Fixture {
        name,
        path: dir.join(file),
        fmt,
    }
}

/// Builds every kind of source the importer supports, in `dir`.
pub fn build_fixtures(dir: &Path) -> Vec<Fixture> {
    const M: u64 = 1 << 20;
    let mut out = Vec::new();
    let holes = dir.join("holes.raw");
    make_raw(
        &holes,
        8 * M,
        &[
            (0, 65536, 0xab),
            (M + 512, 4096, 0x11),
            (5 * M - 100, 300, 0x22),
            (8 * M - 4096, 4096, 0x33),
        ],
    );
    out.push(fx("raw with holes", dir, "holes.raw", "raw"));
    make_raw(
        &dir.join("odd.raw"),
        3_000_001,
        &[(10, 20, 0x44), (2_999_000, 1001, 0x55)],
    );
    out.push(fx("raw of odd size", dir, "odd.raw", "raw"));

    let s = |n: &str| p(dir, n);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4096",
        &s("v2.qcow2"),
        "6M",
    ]);
    qemu_io(
        "qcow2",
        &dir.join("v2.qcow2"),
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1M 12k",
            "write -P 0x01 5000 3000",
            "write -P 0x02 6140k 4k",
        ],
    );
    out.push(fx("qcow2 v2 (compat=0.10)", dir, "v2.qcow2", "qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=1.1",
        &s("v3.qcow2"),
        "6M",
    ]);
    qemu_io(
        "qcow2",
        &dir.join("v3.qcow2"),
        &[
            "write -P 0xab 0 256k",
            "write -z 64k 64k",
            "write -P 0x03 3M 100k",
            "write -P 0x04 4097k 1k",
        ],
    );
    out.push(fx("qcow2 v3 with zero clusters", dir, "v3.qcow2", "qcow2"));

    let h = s("holes.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &h,
        &s("zlib4k.qcow2"),
    ]);
    out.push(fx(
        "qcow2 compressed zlib, 4 KiB clusters",
        dir,
        "zlib4k.qcow2",
        "qcow2",
    ));
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", &h, &s("zlib.qcow2")]);
    out.push(fx(
        "qcow2 compressed zlib, 64 KiB clusters",
        dir,
        "zlib.qcow2",
        "qcow2",
    ));
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        &h,
        &s("zstd.qcow2"),
    ]);
    out.push(fx("qcow2 compressed zstd", dir, "zstd.qcow2", "qcow2"));
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=2M",
        &h,
        &s("zstd2m.qcow2"),
    ]);
    out.push(fx(
        "qcow2 compressed zstd, 2 MiB clusters",
        dir,
        "zstd2m.qcow2",
        "qcow2",
    ));

    // A backing chain: raw base (shorter than the overlays) <- qcow2 <- qcow2,
    // with relative backing names, zero clusters hiding base data.
    make_raw(&dir.join("base.raw"), 3 * M, &[(0, 3 * M, 0x5a)]);
    qemu_img_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "4M",
        ],
    );
    qemu_io(
        "qcow2",
        &dir.join("mid.qcow2"),
        &["write -P 0x66 1M 64k", "write -z 2M 128k"],
    );
    qemu_img_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "6M",
        ],
    );
    qemu_io(
        "qcow2",
        &dir.join("top.qcow2"),
        &[
            "write -z 0 128k",
            "write -P 0xee 1056k 64k",
            "write -P 0x77 5M 4k",
        ],
    );
    out.push(fx(
        "qcow2 overlay chain over qcow2 over raw",
        dir,
        "top.qcow2",
        "qcow2",
    ));

    qemu_img(&["create", "-q", "-f", "qcow2", &s("ebase.qcow2"), "4M"]);
    qemu_io("qcow2", &dir.join("ebase.qcow2"), &["write -P 0x55 0 4M"]);
    qemu_img_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "-b",
            "ebase.qcow2",
            "-F",
            "qcow2",
            "ext.qcow2",
            "4M",
        ],
    );
    qemu_io(
        "qcow2",
        &dir.join("ext.qcow2"),
        &[
            "write -P 0xab 4k 4k",
            "write -z 64k 8k",
            "write -P 0xcd 1M 256k",
            "write -P 0x0f 2052k 4k",
        ],
    );
    out.push(fx(
        "qcow2 extended L2 over a backing file",
        dir,
        "ext.qcow2",
        "qcow2",
    ));

    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic",
        &h,
        &s("dyn.vhd"),
    ]);
    out.push(fx("VHD dynamic", dir, "dyn.vhd", "vpc"));
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        &h,
        &s("fixed.vhd"),
    ]);
    out.push(fx("VHD fixed", dir, "fixed.vhd", "vpc"));
    out
}

/// qemu-img's virtual size of `file`.
pub fn qemu_size(file: &Path, fmt: &str) -> u64 {
    let out = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        fmt,
        file.to_str().expect("utf8"),
    ]);
    let key = "\"virtual-size\":";
    let at = out.rfind(key).expect("virtual-size") + key.len();
    out[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .expect("num")
        .parse()
        .expect("u64")
}
