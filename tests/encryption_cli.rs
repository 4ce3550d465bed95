//! Encryption through the command line and a real FUSE mount: create
//! --encrypt, mount -o key-file=, --key-file on offline commands, info without
//! the key, wrong/missing key refused with the file unchanged, rekey.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use common::{fuse_available, p, run, stderr, stdout, Mount};

const PATTERN: &[u8] = b"KNOWN-PLAINTEXT-THROUGH-THE-MOUNT-42";

fn key_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Random bytes with PATTERN every 4 KiB (zstd keeps it literally).
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for at in (0..len - PATTERN.len()).step_by(4096) {
        v[at..at + PATTERN.len()].copy_from_slice(PATTERN);
    }
    v
}

#[test]
fn encrypted_image_through_the_cli_and_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (k1, k2, open_key) = (dir.join("k1"), dir.join("k2"), dir.join("k-open"));
    key_file(&k1, "correct horse battery staple\n", 0o600);
    key_file(&k2, "another passphrase", 0o600);
    key_file(&open_key, "world readable", 0o644);
    let img = dir.join("e.vbd");

    let out = run(&["create", p(&img), "--size", "16M", "--encrypt"]);
    assert!(!out.status.success());
    let out = run(&[
        "create",
        p(&img),
        "--size",
        "16M",
        "--encrypt",
        "--key-file",
        p(&open_key),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    let out = run(&[
        "create",
        p(&img),
        "--size",
        "16M",
        "--encrypt",
        "--key-file",
        p(&k1),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // info without the key: the unencrypted facts.
    let out = run(&["info", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("encryption: xchacha20-poly1305"),
        "{}",
        stdout(&out)
    );
    let out = run(&["info", p(&img), "--key-file", p(&k1)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("encryption: xchacha20-poly1305"));
    assert!(stdout(&out).contains("snapshots"));

    // Missing and wrong keys: refused, the file unchanged byte for byte.
    let before = std::fs::read(&img).unwrap();
    for args in [
        vec!["check", p(&img)],
        vec!["check", p(&img), "--key-file", p(&k2)],
        vec!["check", "--repair", p(&img), "--key-file", p(&k2)],
        vec!["compact", p(&img), "--key-file", p(&k2)],
        vec!["snapshot", "create", p(&img), "s", "--key-file", p(&k2)],
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.contains("wrong key") || err.contains("encrypted"),
            "{args:?}: {err}"
        );
    }
    if fuse_available() {
        let mnt = dir.join("mnt");
        let e = Mount::try_new(&img, &mnt, None).err().unwrap();
        assert!(e.contains("encrypted"), "{e}");
        let opt = format!("key-file={}", p(&k2));
        let e = Mount::try_new(&img, &mnt, Some(&opt)).err().unwrap();
        assert!(e.contains("wrong key"), "{e}");
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused open wrote"
    );

    // Data written through the mount is not in the file.
    let payload = data(3 << 20);
    if fuse_available() {
        let opt = format!("key-file={}", p(&k1));
        let m = Mount::new(&img, &dir.join("mnt"), Some(&opt));
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.disk())
            .unwrap();
        disk.write_all_at(&payload, 1 << 20).unwrap();
        disk.sync_all().unwrap();
        let mut back = vec![0u8; payload.len()];
        disk.read_exact_at(&mut back, 1 << 20).unwrap();
        assert!(back == payload);
        drop(disk);
        m.umount();
    } else {
        // Without FUSE: write the same through import.
        let raw = dir.join("src.raw");
        let mut whole = vec![0u8; 16 << 20];
        whole[1 << 20..(1 << 20) + payload.len()].copy_from_slice(&payload);
        std::fs::write(&raw, &whole).unwrap();
        std::fs::remove_file(&img).unwrap();
        let out = run(&["import", p(&raw), p(&img), "--key-file", p(&k1)]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = run(&[
        "snapshot",
        "create",
        p(&img),
        "s3cr3t-snapshot-name",
        "--key-file",
        p(&k1),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&img).unwrap();
    assert!(!contains(&bytes, PATTERN), "plaintext in the image file");
    assert!(
        !contains(&bytes, b"s3cr3t-snapshot-name"),
        "snapshot name in the file"
    );

    let out = run(&["snapshot", "list", p(&img), "--key-file", p(&k1)]);
    assert!(
        stdout(&out).contains("s3cr3t-snapshot-name"),
        "{}",
        stdout(&out)
    );
    let out = run(&["check", p(&img), "--key-file", p(&k1)]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // Export with the key gives the plaintext back.
    let raw = dir.join("out.raw");
    let out = run(&["export", p(&img), p(&raw), "--key-file", p(&k1)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exported = std::fs::read(&raw).unwrap();
    assert!(exported[1 << 20..(1 << 20) + payload.len()] == payload[..]);

    // Import into an encrypted image.
    let img2 = dir.join("imported.vbd");
    let out = run(&["import", p(&raw), p(&img2), "--key-file", p(&k1)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!contains(&std::fs::read(&img2).unwrap(), PATTERN));
    let out = run(&["check", p(&img2), "--key-file", p(&k1)]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Rekey: the old key is refused, the data is intact.
    let data_before = std::fs::read(&img).unwrap();
    let out = run(&[
        "rekey",
        p(&img),
        "--key-file",
        p(&k1),
        "--new-key-file",
        p(&k2),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let data_after = std::fs::read(&img).unwrap();
    assert!(
        data_before[16384..] == data_after[16384..],
        "rekey rewrote data"
    );
    let out = run(&["check", p(&img), "--key-file", p(&k1)]);
    assert!(stderr(&out).contains("wrong key"), "{}", stderr(&out));
    let raw2 = dir.join("out2.raw");
    let out = run(&["export", p(&img), p(&raw2), "--key-file", p(&k2)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read(&raw2).unwrap()[1 << 20..(1 << 20) + payload.len()] == payload[..]);

    // A damaged record: check fails and names a block.
    let mut bytes = std::fs::read(&img).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();
    let out = run(&["check", p(&img), "--key-file", p(&k2)]);
    assert!(!out.status.success());
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("block"), "{text}");
}

#[test]
fn clone_of_an_encrypted_base_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = dir.join("k");
    key_file(&k, "clone key\n", 0o600);
    let (base, new) = (dir.join("base.vbd"), dir.join("clone.vbd"));
    let out = run(&[
        "create",
        p(&base),
        "--size",
        "8M",
        "--encrypt",
        "--key-file",
        p(&k),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let src = format!("{}@gold", p(&base));
    let out = run(&["snapshot", "create", p(&base), "gold", "--key-file", p(&k)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["clone", &src, p(&new)]);
    assert!(!out.status.success(), "clone without the key");
    let out = run(&["clone", &src, p(&new), "--key-file", p(&k)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["info", p(&new)]);
    assert!(
        stdout(&out).contains("xchacha20-poly1305"),
        "{}",
        stdout(&out)
    );
    let out = run(&["check", p(&new), "--key-file", p(&k)]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

/// The export of an encrypted image is its plaintext: the new file is its
/// owner's alone (mode 0600, whatever the umask), and an export interrupted
/// by SIGINT or SIGTERM removes its unfinished file (which it writes under
/// a hidden name) before it ends with 128 + the signal.
#[test]
fn an_interrupted_export_leaves_no_plaintext_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = dir.join("k");
    key_file(&k, "export key\n", 0o600);
    let (raw, img) = (dir.join("src.raw"), dir.join("e.vbd"));
    std::fs::write(&raw, data(192 << 20)).unwrap();
    let out = run(&["import", p(&raw), p(&img), "--key-file", p(&k)]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&raw).unwrap();
    let full = dir.join("full.raw");
    let out = run(&["export", p(&img), p(&full), "--key-file", p(&k)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::fs::metadata(&full).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    std::fs::remove_file(&full).unwrap();
    for (sig, name) in [(2, "-INT"), (15, "-TERM")] {
        let dest = dir.join("cut.raw");
        let mut child = common::vbdfs()
            .args(["export", p(&img), p(&dest), "--key-file", p(&k)])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let temp = dir.join(format!(".cut.raw.tmp-{}", child.id()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !temp.exists() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the export ended before its file appeared"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no {}",
                temp.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mode = std::fs::metadata(&temp).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        common::sh("kill", &[name, &child.id().to_string()]);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + sig), "{err}");
        assert!(err.contains("interrupted: removed the unfinished"), "{err}");
        assert!(!temp.exists() && !dest.exists());
    }
}
