#![allow(clippy::unwrap_used)]
//! mount(8) integration through the installed helper: `mount -t vbdfs` (which
//! creates the mount point), an alternate fstab with `mount -T` (ro, nofail,
//! _netdev, x-systemd.*), plain `umount` leaving the image clean, an unknown
//! option refused without leftovers, a `--direct-io=on` loop device over the
//! disk (the Xen `file:` path), and the commands of vbdfs@.service run in order
//! (readiness, stop).
//!
//! install.sh puts everything into a temporary prefix; a copy of the installed
//! mount.vbdfs goes to /sbin (where mount(8) looks) for the test and is removed
//! (and anything that was there restored) by a guard, also on failure.

mod admin_util;

use std::path::{Path, PathBuf};
use std::process::Command;

use admin_util::{
    admin_env_ok, create_image, daemon_pid, info_json, is_mounted, mount_entry, ok, path_str,
    pattern, read_at, run, text, wait_gone, write_at, Installed, LoopGuard, MountGuard, SbinHelper,
    MIB,
};

/// Installs into `tmp/prefix` and puts the installed helper into /sbin.
fn setup(tmp: &Path) -> (Installed, SbinHelper) {
    let inst = Installed::new(&tmp.join("prefix"), &["--mount-helper-dir=none"]);
    let sbin = SbinHelper::install(&inst.helper());
    (inst, sbin)
}

/// mount(8) with a PATH that does not contain vbdfs: the helper must find the
/// installed binary by itself.
fn mount_cmd(args: &[&str]) -> std::process::Output {
    Command::new("mount")
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap()
}

fn assert_clean(img: &Path) {
    let info = info_json(img);
    assert_eq!(info["clean"], serde_json::json!(true), "{info:#}");
}

#[test]
fn mount_t_vbdfs_creates_the_mount_point_and_umount_leaves_the_image_clean() {
    if !admin_env_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_inst, _sbin) = setup(tmp.path());
    let img = tmp.path().join("vm1.vbd");
    create_image(&img, "256M", &[]);
    let dir = tmp.path().join("run/vbd/vm1"); // missing: the helper creates it
    let out = mount_cmd(&[
        "-t",
        "vbdfs",
        path_str(&img),
        path_str(&dir),
        "-o",
        "cache=64M",
    ]);
    let m = MountGuard::adopt(&dir);
    assert!(out.status.success(), "mount -t vbdfs failed: {out:?}");
    let (fstype, source, opts) = mount_entry(&dir).expect("mounted");
    assert_eq!(fstype, "fuse.vbdfs");
    assert_eq!(source, img.display().to_string());
    assert!(opts.starts_with("rw"), "{opts}");
    let status = std::fs::read_to_string(dir.join("control")).unwrap();
    assert!(status.contains("cache-size: 67108864"), "{status}");
    assert_eq!(
        std::fs::metadata(m.disk()).unwrap().len(),
        256 * MIB,
        "disk size"
    );

    // Data written through the mount survives a plain umount and a remount.
    for i in 0..8u64 {
        write_at(&m.disk(), &pattern(1, i), i * 17 * MIB + 4096);
    }
    m.umount();
    assert!(!is_mounted(&dir));
    assert_clean(&img);

    let out = mount_cmd(&["-t", "vbdfs", path_str(&img), path_str(&dir)]);
    let m = MountGuard::adopt(&dir);
    assert!(out.status.success(), "{out:?}");
    for i in 0..8u64 {
        assert!(
            read_at(&m.disk(), MIB as usize, i * 17 * MIB + 4096) == pattern(1, i),
            "block {i} lost across umount/mount"
        );
    }
    m.umount();
    assert_clean(&img);
}

#[test]
fn alternate_fstab_with_ro_nofail_and_systemd_options() {
    if !admin_env_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_inst, _sbin) = setup(tmp.path());
    let img = tmp.path().join("vm2.vbd");
    create_image(&img, "128M", &[]);
    // Put data in first (rw), so the ro mount has something to show.
    {
        let dir = tmp.path().join("seed");
        let m = MountGuard::vbdfs_mount(&img, &dir, None);
        write_at(&m.disk(), &pattern(2, 0), 5 * MIB);
        m.umount();
    }
    let rw_dir = tmp.path().join("mnt-rw");
    let ro_dir = tmp.path().join("mnt-ro");
    let fstab = tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n\
             {img} {rw} vbdfs cache=64M,nofail,_netdev,x-systemd.requires=local-fs.target,comment=x 0 0\n\
             {img} {ro} vbdfs ro,cache=32M,noauto,nofail,defaults 0 0\n",
            img = img.display(),
            rw = rw_dir.display(),
            ro = ro_dir.display()
        ),
    )
    .unwrap();

    // rw line
    let out = mount_cmd(&["-T", path_str(&fstab), path_str(&rw_dir)]);
    let m = MountGuard::adopt(&rw_dir);
    assert!(out.status.success(), "mount -T (rw line) failed: {out:?}");
    let (fstype, _, opts) = mount_entry(&rw_dir).unwrap();
    assert_eq!(fstype, "fuse.vbdfs");
    assert!(opts.starts_with("rw"), "{opts}");
    assert!(read_at(&m.disk(), MIB as usize, 5 * MIB) == pattern(2, 0));
    write_at(&m.disk(), &pattern(2, 1), 9 * MIB);
    m.umount();
    assert_clean(&img);

    // ro line (noauto only affects `mount -a`)
    let out = mount_cmd(&["-T", path_str(&fstab), path_str(&ro_dir)]);
    let m = MountGuard::adopt(&ro_dir);
    assert!(out.status.success(), "mount -T (ro line) failed: {out:?}");
    let (_, _, opts) = mount_entry(&ro_dir).unwrap();
    assert!(opts.starts_with("ro"), "{opts}");
    let status = std::fs::read_to_string(ro_dir.join("control")).unwrap();
    assert!(status.contains("read-only: yes"), "{status}");
    assert!(read_at(&m.disk(), MIB as usize, 5 * MIB) == pattern(2, 0));
    assert!(read_at(&m.disk(), MIB as usize, 9 * MIB) == pattern(2, 1));
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .expect_err("a ro mount must refuse writes");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    m.umount();
    assert_clean(&img);

    // `mount -a -T FSTAB` mounts the auto line only (noauto is skipped).
    let out = mount_cmd(&["-a", "-T", path_str(&fstab), "-t", "vbdfs"]);
    let m1 = MountGuard::adopt(&rw_dir);
    let m2 = MountGuard::adopt(&ro_dir);
    assert!(out.status.success(), "mount -a: {out:?}");
    assert!(is_mounted(&rw_dir));
    assert!(!is_mounted(&ro_dir), "noauto line was mounted by mount -a");
    // Again (boot scripts, `mount -a` after editing fstab): what is mounted
    // is recognised and skipped.
    let out = mount_cmd(&["-a", "-T", path_str(&fstab), "-t", "vbdfs"]);
    assert!(out.status.success(), "second mount -a: {out:?}");
    drop(m2);
    m1.umount();
    assert_clean(&img);
}

#[test]
fn unknown_option_fails_and_leaves_no_mount_point_behind() {
    if !admin_env_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_inst, _sbin) = setup(tmp.path());
    let img = tmp.path().join("vm3.vbd");
    create_image(&img, "64M", &[]);
    let dir = tmp.path().join("a/b/mnt");
    let out = mount_cmd(&[
        "-t",
        "vbdfs",
        path_str(&img),
        path_str(&dir),
        "-o",
        "cache=64M,bogus=1",
    ]);
    let _m = MountGuard::adopt(&dir);
    assert!(!out.status.success(), "bogus option accepted: {out:?}");
    assert!(text(&out.stderr).contains("bogus"), "{out:?}");
    assert!(!is_mounted(&dir));
    assert!(
        !tmp.path().join("a").exists(),
        "the helper left the directories it created"
    );
    // A missing image is reported, nothing is created.
    let out = mount_cmd(&[
        "-t",
        "vbdfs",
        path_str(&tmp.path().join("nope.vbd")),
        path_str(&dir),
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("does not exist"), "{out:?}");
    assert!(!tmp.path().join("a").exists());
}

#[test]
fn direct_io_loop_device_over_the_disk_like_xen_file() {
    if !admin_env_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("vm4.vbd");
    create_image(&img, "128M", &[]);
    let dir = tmp.path().join("mnt");
    let m = MountGuard::vbdfs_mount(&img, &dir, Some("cache=64M"));
    {
        let lo = LoopGuard::attach(&m.disk(), &["--direct-io=on"]);
        let dio = ok("losetup", &["-n", "-O", "DIO", &lo.dev]);
        assert_eq!(dio.trim(), "1", "loop device not in direct-I/O mode");
        let dev = PathBuf::from(&lo.dev);
        for i in 0..4u64 {
            write_at(&dev, &pattern(4, i), i * 7 * MIB);
        }
        for i in 0..4u64 {
            assert!(read_at(&m.disk(), MIB as usize, i * 7 * MIB) == pattern(4, i));
        }
        // discard through the loop device reaches the engine: reads give zeros
        ok(
            "blkdiscard",
            &[
                "-o",
                &(7 * MIB).to_string(),
                "-l",
                &MIB.to_string(),
                &lo.dev,
            ],
        );
        assert!(read_at(&m.disk(), MIB as usize, 7 * MIB)
            .iter()
            .all(|b| *b == 0));
    }
    m.umount();
    assert_clean(&img);
}

/// The `Exec*=` lines of the unit, with `%i` and `${VAR}` filled in.
fn unit_commands(unit: &str, instance: &str, env: &[(&str, String)]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut cmds = Vec::new();
    for line in unit.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.replace("%i", instance);
        if key == "Environment" {
            let (k, v) = value.split_once('=').unwrap();
            vars.push((k.to_string(), v.to_string()));
        } else if key.starts_with("Exec") {
            cmds.push((key.to_string(), value));
        }
    }
    for (k, v) in env {
        vars.push((k.to_string(), v.clone())); // EnvironmentFile= comes after Environment=
    }
    cmds.into_iter()
        .map(|(k, mut v)| {
            for (name, val) in vars.iter().rev() {
                v = v.replace(&format!("${{{name}}}"), val);
            }
            (k, v)
        })
        .collect()
}

/// Splits a unit command line: words, with '...' quoting (as the unit uses).
fn split_words(cmd: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmd.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            _ => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[test]
fn systemd_unit_commands_start_ready_and_stop_clean() {
    if !admin_env_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let inst = Installed::new(&tmp.path().join("prefix"), &["--mount-helper-dir=none"]);
    let unit =
        std::fs::read_to_string(inst.prefix.join("lib/systemd/system/vbdfs@.service")).unwrap();
    let img = tmp.path().join("svc.vbd");
    create_image(&img, "64M", &[]);
    let instance = format!("admin-test-{}", std::process::id());
    let dir = PathBuf::from(format!("/run/vbd/{instance}"));
    let run_vbd_existed = Path::new("/run/vbd").exists();
    // EnvironmentFile=/etc/vbdfs/%i.conf equivalent
    let env = [
        ("VBDFS_IMAGE", img.display().to_string()),
        ("VBDFS_OPTS", "cache=32M".to_string()),
    ];
    let cmds = unit_commands(&unit, &instance, &env);
    let get =
        |k: &str| -> Vec<String> { split_words(&cmds.iter().find(|(key, _)| key == k).unwrap().1) };

    struct Cleanup {
        dir: PathBuf,
        remove_run_vbd: bool,
    }
    impl Drop for Cleanup {
        fn drop(&mut self) {
            drop(MountGuard::adopt(&self.dir));
            let _ = std::fs::remove_dir(&self.dir);
            if self.remove_run_vbd {
                let _ = std::fs::remove_dir("/run/vbd");
            }
        }
    }
    let _cleanup = Cleanup {
        dir: dir.clone(),
        remove_run_vbd: !run_vbd_existed,
    };

    let pre = get("ExecStartPre");
    ok(
        &pre[0],
        &pre[1..].iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(dir.is_dir());

    let start = get("ExecStart");
    assert!(start.contains(&"-f".to_string()), "{start:?}");
    let main = Command::new(&start[0])
        .args(&start[1..])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Child(Option<std::process::Child>);
    impl Drop for Child {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                if c.try_wait().ok().flatten().is_none() {
                    let _ = Command::new("kill")
                        .args(["-TERM", &c.id().to_string()])
                        .status();
                    let _ = c.wait();
                }
            }
        }
    }
    let main_pid = main.id();
    let post = get("ExecStartPost");
    let ready = run(
        &post[0],
        &post[1..].iter().map(String::as_str).collect::<Vec<_>>(),
    );
    if !ready.status.success() {
        let _ = Command::new("kill")
            .args(["-TERM", &main_pid.to_string()])
            .status();
        let out = main.wait_with_output().unwrap();
        panic!(
            "ExecStartPost (readiness) failed: {ready:?}\ndaemon: {}",
            text(&out.stderr)
        );
    }
    let main = Child(Some(main));
    // Ready means served: the disk is there and usable right away.
    assert!(is_mounted(&dir));
    assert_eq!(
        daemon_pid(&dir),
        Some(main_pid),
        "the main PID serves the mount"
    );
    let disk = dir.join("disk");
    write_at(&disk, &pattern(5, 0), 3 * MIB);
    assert!(read_at(&disk, MIB as usize, 3 * MIB) == pattern(5, 0));

    let stop = get("ExecStop");
    ok(
        &stop[0],
        &stop[1..].iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        wait_gone(main_pid, 30),
        "main process still running after ExecStop"
    );
    let mut main = main;
    let status = main.0.take().unwrap().wait().unwrap();
    assert!(status.success(), "daemon exit status {status}");
    assert!(!is_mounted(&dir));
    assert_clean(&img);

    // SIGTERM alone (KillSignal=, e.g. if ExecStop failed) also ends it cleanly.
    let mut main = Child(Some(
        Command::new(&start[0])
            .args(&start[1..])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let pid = main.0.as_ref().unwrap().id();
    let ready = run(
        &post[0],
        &post[1..].iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(ready.status.success(), "{ready:?}");
    write_at(&disk, &pattern(5, 1), 4 * MIB);
    ok("kill", &["-TERM", &pid.to_string()]);
    let status = main.0.take().unwrap().wait().unwrap();
    assert!(
        status.success(),
        "daemon exit status after SIGTERM: {status}"
    );
    assert!(!is_mounted(&dir));
    assert_clean(&img);
    let m = MountGuard::vbdfs_mount(&img, &tmp.path().join("check"), Some("ro"));
    assert!(read_at(&m.disk(), MIB as usize, 4 * MIB) == pattern(5, 1));
    m.umount();
}
