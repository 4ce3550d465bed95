//! The command line without a mount: create, info, check, refusals and errors.
//! Every error must be one `vbdfs: ...` line with a non-zero exit, never a panic.

mod common;

use common::{create, info_json, p, run, stderr, stdout};

/// Asserts a failed run with one `vbdfs:` error line containing `needle`.
fn assert_error(args: &[&str], needle: &str) {
    let out = run(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.starts_with("vbdfs: "),
        "{args:?}: not a vbdfs error line: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: more than one line: {err}"
    );
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn create_then_info_and_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(
        &img,
        "100M",
        &["--block-size", "16K", "--compress", "zstd:3"],
    );
    let v = info_json(&img);
    assert_eq!(v["virtual_size"], 100 << 20, "{v}");
    assert_eq!(v["block_size"], 16 << 10, "{v}");
    assert_eq!(v["codec"], "zstd:3", "{v}");
    assert!(common::is_clean(&img), "fresh image not clean: {v}");

    let out = run(&["info", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("virtual size: 100 MiB (104857600 bytes)"),
        "{text}"
    );
    assert!(text.contains("block size: 16 KiB"), "{text}");
    assert!(text.contains("codec: zstd:3"), "{text}");
    assert!(text.contains("state: clean"), "{text}");
    assert!(text.contains("mounted at: no"), "{text}");

    let fast = tmp.path().join("fast.vbd");
    create(&fast, "100M", &["--compress", "zstd:-3"]);
    assert_eq!(info_json(&fast)["codec"], "zstd:-3");

    let out = run(&["check", p(&img)]);
    assert!(
        out.status.success(),
        "check of a fresh image failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = run(&["check", "--repair", p(&img)]);
    assert!(
        out.status.success(),
        "check --repair failed: {}",
        stderr(&out)
    );
}

#[test]
fn create_refuses_bad_arguments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("b.vbd");
    let i = p(&img);
    assert_error(&["create", i], "--size");
    assert_error(&["create", i, "--size", "12X"], "12X");
    assert_error(&["create", i, "--size", "0"], "--size");
    assert_error(&["create", i, "--size", "1000"], "multiple of 512");
    assert_error(&["create", i, "--size", "65T"], "at most 64 TiB");
    // A negative size reaches the size parser (not clap's "unexpected argument").
    assert_error(&["create", i, "--size", "-1"], "invalid size '-1'");
    assert_error(
        &["create", i, "--size", "1G", "--block-size", "-4K"],
        "'-4K'",
    );
    assert_error(
        &["create", i, "--size", "1G", "--block-size", "3K"],
        "--block-size",
    );
    assert_error(
        &["create", i, "--size", "1G", "--block-size", "2M"],
        "--block-size",
    );
    assert_error(&["create", i, "--size", "1G", "--compress", "lz4"], "lz4");
    assert_error(
        &["create", i, "--size", "1G", "--compress", "zstd:-8"],
        "level -8",
    );
    assert_error(
        &["create", i, "--size", "1G", "--compress", "zstd:0"],
        "level 0",
    );
    assert_error(
        &[
            "create",
            i,
            "--size",
            "1G",
            "--backing",
            "/nonexistent/x.vbd",
        ],
        "/nonexistent/x.vbd",
    );
    assert_error(&["create", i, "--size", "1G", "--encrypt"], "--key-file");
    assert!(!img.exists(), "a refused create left a file behind");
    create(&img, "1M", &[]);
    assert_error(&["create", i, "--size", "1M"], i);
}

#[test]
fn usage_mistakes_are_one_line_with_the_usage_and_exit_2() {
    for (args, needle) in [
        (&["create"][..], "usage: vbdfs create"),
        (&["frobnicate"][..], "unrecognized subcommand 'frobnicate'"),
        (
            &["info", "a.vbd", "--bogus"][..],
            "unexpected argument '--bogus'",
        ),
        (&["mount", "a.vbd"][..], "<MOUNTPOINT>"),
    ] {
        assert_error(args, needle);
        assert_eq!(run(args).status.code(), Some(2), "{args:?}");
    }
    let out = run(&["create", "--help"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("--block-size"), "{out:?}");
}

#[test]
fn compact_reports_host_space_keeps_an_unchanged_file_and_refuses_missing_images() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("c.vbd");
    create(&img, "1M", &[]);
    let len = || std::fs::metadata(&img).expect("image").len();
    let before = len();
    // Nothing to move: the file keeps its length, run after run (each
    // compact used to lengthen it by the index its checkpoints wrote).
    for _ in 0..3 {
        let out = run(&["compact", p(&img)]);
        assert!(out.status.success(), "{out:?}");
        assert!(stdout(&out).contains("host space"), "{out:?}");
        assert_eq!(len(), before, "{out:?}");
    }
    let missing = tmp.path().join("missing.vbd");
    assert_error(&["compact", p(&missing)], "missing.vbd");
}

#[test]
fn bad_files_and_paths_are_one_line_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("missing.vbd");
    assert_error(&["info", p(&missing)], "missing.vbd");
    assert_error(&["check", p(&missing)], "missing.vbd");
    let junk = tmp.path().join("junk.vbd");
    std::fs::write(&junk, vec![0x5a; 100_000]).expect("write junk");
    assert_error(&["info", p(&junk)], "junk.vbd");
    let empty = tmp.path().join("empty.vbd");
    std::fs::write(&empty, b"").expect("write empty");
    assert_error(&["info", p(&empty)], "empty.vbd");
    assert_error(&["umount", p(tmp.path())], "not a vbdfs mount point");
    let out = tmp.path().join("out.raw");
    assert_error(&["export", p(tmp.path()), p(&out)], "is not a regular file");
    assert_error(&["export", "/dev/null", p(&out)], "is not a regular file");
    assert!(!out.exists());
    let vbd = tmp.path().join("a.vbd");
    create(&vbd, "1M", &[]);
    let copy = tmp.path().join("b.vbd");
    assert_error(&["import", p(&vbd), p(&copy)], "is a vbd image already");
    assert!(!copy.exists());
    let nowhere = tmp.path().join("nodir/e.raw");
    assert_error(&["export", p(&vbd), p(&nowhere)], "e.raw: no directory");
    assert_error(&["mount", p(&missing), p(tmp.path())], "missing.vbd");
}

/// Output that cannot be written is an error line, not a panic: a full
/// disk is one `vbdfs:` line and exit 1; a reader that went away (`| head`)
/// ends the command quietly with 141, as SIGPIPE ends other tools.
#[test]
fn output_that_cannot_be_written_is_one_line_or_quiet() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("a.vbd");
    create(&img, "1M", &[]);
    let raw = tmp.path().join("a.raw");
    for args in [
        vec!["info", p(&img)],
        vec!["check", p(&img)],
        vec!["snapshot", "list", p(&img)],
        vec!["export", p(&img), p(&raw)],
    ] {
        let _ = std::fs::remove_file(&raw);
        let full = std::fs::File::create("/dev/full").expect("/dev/full");
        let out = common::vbdfs()
            .args(&args)
            .stdout(full)
            .output()
            .expect("run vbdfs");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            "vbdfs: writing to standard output: No space left on device (os error 28)",
            "{args:?}"
        );
        let _ = std::fs::remove_file(&raw);
        // A pipe whose reader is gone before the command starts (dropped
        // after the spawn, a quick command could write first).
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = common::vbdfs()
            .args(&args)
            .stdout(writer)
            .output()
            .expect("run vbdfs");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{args:?}");
    }
}

#[test]
fn snapshot_arguments_an_action_does_not_take_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("s.vbd");
    create(&img, "1M", &[]);
    let i = p(&img);
    assert_error(&["snapshot", "list", i, "extra"], "takes no snapshot name");
    assert_error(
        &["snapshot", "create", i, "s", "--force"],
        "--force is for snapshot delete",
    );
    assert_error(
        &["snapshot", "list", i, "--force"],
        "--force is for snapshot delete",
    );
    let out = run(&["snapshot", "list", i]);
    assert!(out.status.success(), "{}", stderr(&out));
    // `info` names the newest 16 snapshots and counts the rest.
    for n in 0..20 {
        let out = run(&["snapshot", "create", i, &format!("s{n:02}")]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = run(&["info", i]);
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with("snapshots: "))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.starts_with("snapshots: 20: s04 ("), "{line}");
    assert!(line.contains("s19 (") && !line.contains("s03 ("), "{line}");
    assert!(
        line.ends_with("and 4 older (vbdfs snapshot list shows all)"),
        "{line}"
    );
}

#[test]
fn bad_mount_options_are_refused_before_mounting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("d.vbd");
    create(&img, "1M", &[]);
    let (i, d) = (p(&img), p(tmp.path()));
    for (opts, needle) in [
        ("bogus", "bogus"),
        ("cache=12X", "cache"),
        ("threads=0", "threads"),
        ("mode=999", "mode"),
        ("uid=alice", "uid"),
        ("ro=yes", "ro"),
        ("key-file=/nonexistent/k", "key file /nonexistent/k"),
        ("loop", "put a loop device over MOUNTPOINT/disk"),
        ("ro,adapt", "not with 'ro'"),
    ] {
        assert_error(&["mount", i, d, "-o", opts], needle);
    }
    assert_error(&["mount", i, p(&img)], "not a directory");
}

#[test]
fn check_reports_a_damaged_block() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = common::damaged_image(tmp.path());
    let out = run(&["check", p(&img)]);
    assert!(
        !out.status.success(),
        "check passed a damaged image: {}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("bad block"), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("vbdfs: ") && err.contains("bad block"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    let out = run(&["info", p(&img)]);
    assert!(
        out.status.success(),
        "info of a damaged image failed: {}",
        stderr(&out)
    );
}

/// Offsets of the first copies of LEAF records (kind 3, flags without `COPY`,
/// bit 0) in an image file, and where each one's second copy is.
fn leaf_records(bytes: &[u8]) -> Vec<(usize, usize)> {
    (65536..bytes.len().saturating_sub(64))
        .step_by(16)
        .filter(|&at| &bytes[at..at + 4] == b"VREC" && bytes[at + 4] == 3 && bytes[at + 6] & 1 == 0)
        .map(|at| {
            let len =
                64 + u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
            (at, (at + len).div_ceil(4096) * 4096)
        })
        .collect()
}

#[test]
fn check_names_a_damaged_map_record_copy_and_repair_writes_it_anew() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("data");
    std::fs::write(&src, common::pattern(1 << 20, 3)).expect("write");
    let out = run(&["import", p(&src), p(&tmp.path().join("b.vbd"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let img_b = tmp.path().join("b.vbd");
    for (which, copy) in [("first", 0), ("second", 1)] {
        let mut bytes = std::fs::read(&img_b).expect("read");
        let leaves = leaf_records(&bytes);
        let (first, second) = *leaves.last().expect("a leaf record");
        bytes[[first, second][copy] + 100] ^= 0x5a;
        std::fs::write(&img_b, &bytes).expect("write");
        let out = run(&["check", p(&img_b)]);
        let (text, err) = (stdout(&out), stderr(&out));
        assert!(!out.status.success(), "{which}: {text}");
        assert!(
            text.contains(&format!(
                "damaged copy: map leaf 0 at {first}: its {which} copy is damaged"
            )),
            "{which}: {text}"
        );
        assert!(err.contains("1 damaged map record copy"), "{which}: {err}");
        let out = run(&["check", "--repair", p(&img_b)]);
        let text = stdout(&out);
        assert!(out.status.success(), "{which}: {text}{}", stderr(&out));
        let said = match which {
            "first" => "is damaged; read from its second copy; written anew",
            _ => "repaired: map leaf 0 at",
        };
        assert!(text.contains(said), "{which}: {text}");
        let out = run(&["check", p(&img_b)]);
        assert!(out.status.success(), "{which}: {}", stdout(&out));
        assert!(!stdout(&out).contains("damaged"), "{}", stdout(&out));
    }
    let out = run(&["export", p(&img_b), p(&tmp.path().join("back"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let back = std::fs::read(tmp.path().join("back")).expect("read");
    assert!(back == common::pattern(1 << 20, 3), "exported bytes differ");
}

/// A clone of a snapshot the base does not have names the base (the
/// snapshot is its), and creates nothing.
#[test]
fn a_clone_of_a_missing_snapshot_names_the_base() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("base.vbd");
    let new = tmp.path().join("new.vbd");
    let out = run(&["create", p(&base), "--size", "16M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for args in [
        vec!["clone", &format!("{}@nosuch", p(&base)), p(&new)],
        vec![
            "create",
            p(&new),
            "--backing",
            &format!("{}@nosuch", p(&base)),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
        assert_error(
            &args,
            &format!("base {}: no snapshot named 'nosuch'", p(&base)),
        );
        assert!(!new.exists(), "{args:?} left the new image");
    }
}

/// What the engine logs during a command reaches stderr, one `vbdfs: …`
/// line each, once the command has succeeded (it used to be dropped: the
/// commands other than `mount` had no logger); a normal run says nothing
/// there at the default level.
#[test]
fn a_commands_engine_messages_reach_stderr_when_it_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("a.vbd");
    create(&img, "8M", &[]);
    let out = common::vbdfs()
        .env("VBDFS_LOG", "debug")
        .args(["compact", p(&img)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("vbdfs: debug: shortening: done at"), "{err}");
    assert!(err.lines().all(|l| l.starts_with("vbdfs: ")), "{err}");
    let out = common::vbdfs()
        .env_remove("VBDFS_LOG")
        .args(["compact", p(&img)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stderr(&out), "", "nothing at the default level");
}
