#![allow(clippy::unwrap_used)]
//! mount-helpers/install.sh into a temporary prefix: what it installs, that a
//! second run changes nothing, that `--uninstall` removes exactly that, that it
//! never overwrites a foreign mount helper; the installed systemd unit passes
//! `systemd-analyze verify`; the Xen example configs parse and say what the
//! admin must do.

mod admin_util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use admin_util::{ok, path_str, repo, run, text, Installed};

/// Every path under `root` (files, links, dirs) with its content for files.
fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = p.symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            out.insert(p.clone(), None);
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            out.insert(p, Some(target.to_string_lossy().as_bytes().to_vec()));
        } else {
            out.insert(p.clone(), Some(std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[test]
fn install_is_idempotent_and_uninstall_removes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    let helper_dir = tmp.path().join("sbin-for-mount");
    let hd = format!("--mount-helper-dir={}", helper_dir.display());
    let inst = Installed::new(&prefix, &[&hd]);

    let bin = prefix.join("bin/vbdfs");
    let helper = prefix.join("sbin/mount.vbdfs");
    let unit = prefix.join("lib/systemd/system/vbdfs@.service");
    let doc = prefix.join("share/doc/vbdfs");
    let manifest = prefix.join("share/vbdfs/install-manifest");
    for p in [
        &bin,
        &helper,
        &unit,
        &doc.join("xen/vm1-file.cfg"),
        &doc.join("xen/vm1-tapaio.cfg"),
        &manifest,
    ] {
        assert!(p.is_file(), "{} not installed\n{}", p.display(), inst.log);
    }
    // The binary is the one built; it runs.
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_vbdfs")).unwrap()
    );
    assert!(run(&bin, &["--help"]).status.success());
    // The helper knows where the binary is; the unit runs the installed binary.
    let h = std::fs::read_to_string(&helper).unwrap();
    assert!(
        h.contains(&format!("VBDFS_INSTALLED_BIN=\"{}\"", bin.display())),
        "{h}"
    );
    let u = std::fs::read_to_string(&unit).unwrap();
    assert!(
        u.contains(&format!("ExecStart={} mount ", bin.display())),
        "{u}"
    );
    assert!(
        u.contains(&format!("ExecStop={} umount ", bin.display())),
        "{u}"
    );
    assert!(!u.contains("\nExecStart=/usr/local/bin/"), "{u}");
    // The link where mount(8) would look.
    let link = helper_dir.join("mount.vbdfs");
    assert_eq!(std::fs::read_link(&link).unwrap(), helper);
    // The manifest lists every file and the link.
    let m = std::fs::read_to_string(&manifest).unwrap();
    for p in [&bin, &helper, &unit, &manifest] {
        assert!(m.contains(&format!("f {}\n", p.display())), "{m}");
    }
    assert!(m.contains(&format!("l {}\n", link.display())), "{m}");

    // Idempotent: a second run leaves the same tree, byte for byte.
    let before = tree(tmp.path());
    let again = Installed::new(&prefix, &[&hd]);
    std::mem::forget(again); // `inst` uninstalls once, below
    assert_eq!(before, tree(tmp.path()), "second install changed the tree");

    // --uninstall removes all of it: the prefix and the helper dir it created.
    let out = ok(
        repo().join("mount-helpers/install.sh"),
        &["--prefix", path_str(&prefix), "--uninstall", "--no-reload"],
    );
    assert!(!prefix.exists(), "{} left behind:\n{out}", prefix.display());
    assert!(!helper_dir.exists(), "{} left behind", helper_dir.display());
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
    drop(inst);

    // A second --uninstall has nothing to do and says so.
    let out = run(
        repo().join("mount-helpers/install.sh"),
        &["--prefix", path_str(&prefix), "--uninstall"],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no manifest"), "{:?}", out);
}

#[test]
fn uninstall_keeps_directories_that_existed_and_foreign_files() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("p");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::write(prefix.join("bin/other-tool"), b"not ours").unwrap();
    let inst = Installed::new(&prefix, &["--mount-helper-dir=none"]);
    assert!(prefix.join("bin/vbdfs").is_file());
    drop(inst); // uninstalls
    assert!(!prefix.join("bin/vbdfs").exists());
    assert_eq!(
        std::fs::read(prefix.join("bin/other-tool")).unwrap(),
        b"not ours"
    );
    assert!(!prefix.join("share").exists());
    assert!(!prefix.join("sbin").exists());
    assert!(!prefix.join("lib").exists());
}

#[test]
fn install_refuses_to_replace_a_foreign_mount_helper() {
    let tmp = tempfile::tempdir().unwrap();
    let helper_dir = tmp.path().join("sbin");
    std::fs::create_dir_all(&helper_dir).unwrap();
    std::fs::write(
        helper_dir.join("mount.vbdfs"),
        b"#!/bin/sh\n# someone else's\n",
    )
    .unwrap();
    let out = run(
        repo().join("mount-helpers/install.sh"),
        &[
            "--prefix",
            path_str(&tmp.path().join("p")),
            "--bin",
            env!("CARGO_BIN_EXE_vbdfs"),
            "--no-reload",
            &format!("--mount-helper-dir={}", helper_dir.display()),
        ],
    );
    let _cleanup = Installed {
        prefix: tmp.path().join("p"),
        log: String::new(),
    };
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("was not installed by this prefix"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read(helper_dir.join("mount.vbdfs")).unwrap(),
        b"#!/bin/sh\n# someone else's\n"
    );
}

#[test]
fn install_uses_an_up_to_date_build_without_rebuilding() {
    // A target dir whose release binary is newer than every source: no cargo run.
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_vbdfs"), target.join("release/vbdfs")).unwrap();
    let prefix = tmp.path().join("p");
    let out = std::process::Command::new(repo().join("mount-helpers/install.sh"))
        .args([
            "--prefix",
            path_str(&prefix),
            "--no-reload",
            "--mount-helper-dir=none",
        ])
        .env("CARGO_TARGET_DIR", &target)
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin") // no cargo: a build attempt would fail
        .output()
        .unwrap();
    let _cleanup = Installed {
        prefix: prefix.clone(),
        log: String::new(),
    };
    assert!(out.status.success(), "{out:?}");
    assert!(!text(&out.stdout).contains("cargo build"), "{out:?}");
    assert!(prefix.join("bin/vbdfs").is_file());
}

#[test]
fn installed_systemd_unit_verifies() {
    if run("sh", &["-c", "command -v systemd-analyze"])
        .stdout
        .is_empty()
    {
        eprintln!("skipped: systemd-analyze not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("p");
    let _inst = Installed::new(&prefix, &["--mount-helper-dir=none"]);
    let unit_dir = prefix.join("lib/systemd/system");
    let instance = unit_dir.join("vbdfs@vm1.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no", path_str(&instance)])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    // Only complaints about our unit matter (the host's units may have their own).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("vbdfs@"))
        .filter(|l| !l.contains("xendomains.service")) // not installed here
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{err}");
}

/// A minimal parser for xl domain config files (xl.cfg(5)): `KEY = VALUE`
/// where VALUE is a number, a quoted string or a `[ ... ]` list of strings;
/// `#` starts a comment. Enough to catch syntax slips in the examples.
fn parse_xl_cfg(text: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        let line = strip_comment(line);
        if line.trim().is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or(format!("line {}: no '=' in {line:?}", n + 1))?;
        let key = k.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {}: bad key {key:?}", n + 1));
        }
        let mut value = v.trim().to_string();
        if value.starts_with('[') {
            while !value.trim_end().ends_with(']') {
                let (_, more) = lines
                    .next()
                    .ok_or(format!("line {}: unterminated list", n + 1))?;
                value.push(' ');
                value.push_str(strip_comment(more).trim());
            }
            let v = value.trim();
            let inner = &v[1..v.len() - 1];
            // one quoted string per item (disk specs contain commas themselves)
            let items = rejoin_quoted(inner).map_err(|e| format!("line {}: {e}", n + 1))?;
            out.insert(key.to_string(), items);
        } else if let Some(s) = unquote(&value) {
            out.insert(key.to_string(), vec![s]);
        } else if value.parse::<i64>().is_ok() {
            out.insert(key.to_string(), vec![value]);
        } else {
            return Err(format!("line {}: bad value {value:?}", n + 1));
        }
    }
    Ok(out)
}

fn strip_comment(line: &str) -> &str {
    // '#' outside quotes starts a comment
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') => return &line[..i],
            _ => {}
        }
    }
    line
}

fn unquote(s: &str) -> Option<String> {
    let s = s.trim();
    let q = s.chars().next()?;
    (matches!(q, '\'' | '"') && s.len() >= 2 && s.ends_with(q)).then(|| s[1..s.len() - 1].into())
}

fn rejoin_quoted(inner: &str) -> Result<Vec<String>, String> {
    let mut items = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let q = rest.chars().next().unwrap();
        if !matches!(q, '\'' | '"') {
            return Err(format!("list item not quoted at {rest:?}"));
        }
        let end = rest[1..]
            .find(q)
            .ok_or(format!("unterminated string {rest:?}"))?
            + 1;
        items.push(rest[1..end].to_string());
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Ok(items)
}

#[test]
fn xen_examples_parse_and_document_the_order_of_operations() {
    let dir = repo().join("mount-helpers/xen");
    for (file, disk) in [
        ("vm1-file.cfg", "file:/run/vbd/vm1/disk,xvda,w"),
        ("vm1-tapaio.cfg", "tap:aio:/run/vbd/vm1/disk,xvda,w"),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let cfg = parse_xl_cfg(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(cfg["disk"], vec![disk.to_string()], "{file}");
        assert_eq!(cfg["name"], vec!["vm1".to_string()], "{file}");
        for key in ["memory", "vcpus", "type"] {
            assert!(cfg.contains_key(key), "{file}: no {key}");
        }
        // The comments walk through mount, create, snapshot, shutdown, umount, in order.
        let steps = [
            "mount -t vbdfs /srv/images/vm1.vbd /run/vbd/vm1",
            "xl create",
            "> /run/vbd/vm1/control",
            "xl shutdown",
            "umount /run/vbd/vm1",
        ];
        let mut at = 0;
        for s in steps {
            let pos = text[at..]
                .find(s)
                .unwrap_or_else(|| panic!("{file}: step {s:?} missing or out of order"));
            at += pos + s.len();
        }
        assert!(text.contains("snapshot "), "{file}");
    }
    let file_cfg = std::fs::read_to_string(dir.join("vm1-file.cfg")).unwrap();
    assert!(file_cfg.contains("losetup --direct-io=on"));
}

#[test]
fn xl_parser_rejects_slips() {
    assert!(parse_xl_cfg("disk = [ 'file:/x,xvda,w' ]\n").is_ok());
    assert!(parse_xl_cfg("disk = [ 'file:/x,xvda,w ]\n").is_err());
    assert!(parse_xl_cfg("disk = [ file:/x ]\n").is_err());
    assert!(parse_xl_cfg("memory 1024\n").is_err());
    assert!(parse_xl_cfg("name = vm1\n").is_err());
    assert!(parse_xl_cfg("disk = [ 'a',\n 'b' ]\n").unwrap()["disk"].len() == 2);
}

#[test]
fn helper_script_passes_sh_n() {
    // POSIX sh syntax (dash is /bin/sh on Debian) for the helper; bash -n for install.sh.
    let helpers = repo().join("mount-helpers");
    ok("sh", &["-n", path_str(&helpers.join("mount.vbdfs"))]);
    ok("bash", &["-n", path_str(&helpers.join("install.sh"))]);
}
