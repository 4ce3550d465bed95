#![allow(clippy::unwrap_used)]
//! Many images at once: 64 vbdfs mounts (8 times the kernel loop driver's
//! default device count), each written and read back, then the resident memory
//! of every idle daemon (VmRSS, one daemon process per mount) measured and held
//! under 16 MiB; plain `umount` of all of them leaves every image clean.
//!
//! The figures are printed (run with `--nocapture`) and quoted in docs/admin.md.

mod admin_util;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use admin_util::{
    admin_env_ok, create_image, daemon_pid, info_json, pattern, read_at, rss_kib, wait_gone,
    write_at, MountGuard, MIB,
};

const IMAGES: u64 = 64;
const RSS_LIMIT_KIB: u64 = 16 * 1024;

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn sixty_four_images_mounted_at_once_stay_small() {
    if !admin_env_ok() {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let imgs: Vec<PathBuf> = (0..IMAGES)
        .map(|n| tmp.path().join(format!("img{n:02}.vbd")))
        .collect();
    for img in &imgs {
        create_image(img, "64M", &[]);
    }
    // Mount all 64 (each with a 64 MiB cache, which is only allocated as used).
    let mut mounts: Vec<MountGuard> = Vec::new();
    for (n, img) in imgs.iter().enumerate() {
        let dir = tmp.path().join(format!("mnt{n:02}"));
        mounts.push(MountGuard::vbdfs_mount(img, &dir, Some("cache=64M")));
    }
    let mounted_s = t0.elapsed().as_secs_f64();

    let pids: Vec<u32> = mounts
        .iter()
        .map(|m| daemon_pid(&m.dir).expect("daemon pid"))
        .collect();
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let per_mount_process = distinct.len() == pids.len();

    std::thread::sleep(Duration::from_millis(500));
    let mut fresh: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap()).collect();

    // Each one usable: two 1 MiB blocks written, then all read back.
    for (n, m) in mounts.iter().enumerate() {
        let n = n as u64;
        write_at(&m.disk(), &pattern(n, 0), (n % 60) * MIB);
        write_at(&m.disk(), &pattern(n, 1), 62 * MIB);
    }
    for (n, m) in mounts.iter().enumerate() {
        let n = n as u64;
        assert!(
            read_at(&m.disk(), MIB as usize, (n % 60) * MIB) == pattern(n, 0),
            "image {n}: block 0 differs"
        );
        assert!(
            read_at(&m.disk(), MIB as usize, 62 * MIB) == pattern(n, 1),
            "image {n}: block 1 differs"
        );
    }

    // Idle again: measure.
    std::thread::sleep(Duration::from_secs(1));
    let mut idle: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap()).collect();
    let total_kib: u64 = idle.iter().sum();
    let (fresh_med, idle_med) = (median(&mut fresh), median(&mut idle));
    let (idle_min, idle_max) = (idle[0], idle[idle.len() - 1]);
    eprintln!(
        "{IMAGES} mounts up in {mounted_s:.1} s; {} daemon processes ({}); \
         VmRSS per idle mount: fresh median {:.1} MiB, after I/O median {:.1} MiB \
         (min {:.1}, max {:.1}), total {:.0} MiB",
        distinct.len(),
        if per_mount_process {
            "one per mount"
        } else {
            "shared"
        },
        fresh_med as f64 / 1024.0,
        idle_med as f64 / 1024.0,
        idle_min as f64 / 1024.0,
        idle_max as f64 / 1024.0,
        total_kib as f64 / 1024.0
    );
    assert!(
        idle_max < RSS_LIMIT_KIB,
        "an idle mount uses {idle_max} KiB RSS (limit {RSS_LIMIT_KIB} KiB)"
    );

    // Plain umount of all; every daemon exits and every image is clean.
    let t1 = Instant::now();
    for m in mounts.drain(..) {
        m.umount();
    }
    for p in &pids {
        assert!(wait_gone(*p, 30), "daemon {p} still running");
    }
    eprintln!("{IMAGES} umounts in {:.1} s", t1.elapsed().as_secs_f64());
    for img in &imgs {
        let info = info_json(img);
        assert_eq!(
            info["clean"],
            serde_json::json!(true),
            "{}: {info:#}",
            img.display()
        );
    }
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
}
