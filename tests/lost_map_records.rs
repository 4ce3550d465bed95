//! Map records lost in both copies (docs/admin.md §9): a head leaf costs its
//! blocks, a snapshot's leaf the snapshot's blocks, the snapshot table the
//! snapshots — never the rest of the image, and never wrong data. Read-only
//! sessions serve what is left; read-write opens, which would write the map
//! or the table back without what was lost, refuse.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;
mod copies_common;

use copies_common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vbdfs::format::{RecordKind, LOG_UNIT, RECORD_HEADER_LEN};
use vbdfs::io::MemStore;
use vbdfs::{ErrorKind, Image};

/// The image of [`image`] with both copies of the head's newest record of
/// leaf 1 (blocks 1024..1100) damaged.
fn without_head_leaf_one(bytes: &[u8]) -> Vec<u8> {
    let leaf = pairs(bytes)
        .into_iter()
        .rev()
        .find(|p| p.kind == RecordKind::Leaf && p.key == 1)
        .unwrap();
    let mut lost = bytes.to_vec();
    damage(&mut lost, leaf.first);
    damage(&mut lost, leaf.second);
    lost
}

/// A map leaf whose record is damaged in both copies costs its 1024 blocks,
/// not the image: a read-only open reads every other block (and the
/// snapshot, whose leaf is another record), the lost ones — written or not —
/// fail as Corrupt, `check` names exactly them, and a read-write open,
/// which would write the map back without them, is refused.
#[test]
fn a_map_leaf_lost_in_both_copies_costs_its_blocks_not_the_image() {
    let (bytes, head, snap) = image(false);
    let lost = without_head_leaf_one(&bytes);
    let store = Arc::new(MemStore::from_bytes(lost.clone()));
    let img = Image::open_on(store, &opts(true)).unwrap();
    let notes = img.lost_leaves();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("map leaf 1")
            && notes[0].contains("blocks 1024..=1099 (offsets 4194304..=4501504)")
    );
    let mut buf = vec![0u8; 1024 * BS as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == head[..buf.len()], "leaf 0's blocks");
    let mut one = vec![0u8; BS as usize];
    for b in [1024, 1030, 1099] {
        let e = img.read_at(&mut one, b * BS).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("map leaf 1"), "{e}");
    }
    // A read across the leaves (loaded in runs) fails too.
    let mut across = vec![0u8; 10 * BS as usize];
    let e = img.read_at(&mut across, 1020 * BS).unwrap_err();
    assert!(e.to_string().contains("map leaf 1"), "{e}");
    let s1 = img.open_snapshot("s1").unwrap();
    let mut all = vec![0u8; SIZE as usize];
    s1.read_at(&mut all, 0).unwrap();
    assert!(all == snap, "the snapshot reads wrong data");
    // check names exactly the lost blocks, without reading them.
    let report = img.check().unwrap();
    let bad: Vec<u64> = report.bad.iter().map(|b| b.block).collect();
    assert_eq!(bad, (1024..1100).collect::<Vec<_>>());
    assert!(report.bad.iter().all(|b| b.reason.contains("map leaf 1")));
    // What the snapshot holds alone in leaf 1 depends on the lost leaf.
    let e = img.snapshot_usage().unwrap_err();
    assert!(e.to_string().contains("head's map leaf 1"), "{e}");
    img.close().unwrap();
    let store = Arc::new(MemStore::from_bytes(lost));
    let e = Image::open_on(store, &opts(false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("refused read-write"), "{e}");
}

/// What a lost leaf's note says: where both copies were, also when their
/// bytes are zeros (a punched range), and no sealed header's "key 0" for an
/// encrypted image's leaf 1.
#[test]
fn a_lost_leaf_is_described_by_both_copies() {
    let (bytes, _, _) = image(false);
    let leaf = pairs(&bytes)
        .into_iter()
        .rev()
        .find(|p| p.kind == RecordKind::Leaf && p.key == 1)
        .unwrap();
    let mut zeroed = bytes.clone();
    zeroed[leaf.first as usize..(leaf.second + LOG_UNIT) as usize].fill(0);
    let img = Image::open_on(Arc::new(MemStore::from_bytes(zeroed)), &opts(true)).unwrap();
    let notes = img.lost_leaves();
    assert!(
        notes.len() == 1 && notes[0].contains(&format!("no second copy at {} either", leaf.second)),
        "{notes:?}"
    );
    // Sealed headers hide the leaf number: the head's leaves are the last
    // written, in order.
    let (mut bytes, _, _) = image(true);
    let last = pairs(&bytes)
        .into_iter()
        .rev()
        .find(|p| p.kind == RecordKind::Leaf)
        .unwrap();
    damage(&mut bytes, last.first);
    damage(&mut bytes, last.second);
    let k = key();
    let store = Arc::new(MemStore::from_bytes(bytes));
    let img = Image::open_on_with_key(store, &opts(true), Some(&k)).unwrap();
    let notes = img.lost_leaves();
    assert!(
        notes.len() == 1 && notes[0].starts_with("map leaf 1:") && !notes[0].contains("key 0"),
        "{notes:?}"
    );
}

/// Blocks of a lost leaf written after the last checkpoint are in the log:
/// the read-only open's roll-forward maps them again, and they read right.
#[test]
fn blocks_of_a_lost_leaf_written_since_the_checkpoint_read_right() {
    let (bytes, _, _) = image(false);
    let store = Arc::new(MemStore::from_bytes(bytes));
    let img = Image::open_on(store.clone(), &opts(false)).unwrap();
    img.write_at(&block(77), 1040 * BS).unwrap();
    img.flush().unwrap();
    // The file as a crash leaves it: the write in the log, not in a leaf.
    let crashed = store.to_bytes();
    drop(img);
    let store = Arc::new(MemStore::from_bytes(without_head_leaf_one(&crashed)));
    let img = Image::open_on(store, &opts(true)).unwrap();
    assert_eq!(img.lost_leaves().len(), 1);
    let mut one = vec![0u8; BS as usize];
    img.read_at(&mut one, 1040 * BS).unwrap();
    assert!(one == block(77), "block 1040 reads wrong data");
    img.read_at(&mut one, 1041 * BS).unwrap_err();
}

/// Writes `lost` (an image with a map record lost in both copies) to a file
/// in `tmp`. A read-write mount of it must be refused in one line naming
/// `what` with the way out; then it is mounted read-only, which must warn
/// about `what` and show it in the control file's `log-damage`. The file,
/// the mount and the mount's warning.
fn mount_lost(tmp: &Path, lost: &[u8], what: &str) -> (PathBuf, common::Mount, String) {
    use common::{p, run, stderr, Mount};
    let path = tmp.join("lost.vbd");
    std::fs::write(&path, lost).unwrap();
    let dir = tmp.join("mnt");
    let err = Mount::try_new(&path, &dir, None).unwrap_err();
    assert!(
        err.contains(what) && err.contains("refused read-write") && err.contains("-o ro"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = run(&["mount", p(&path), p(&dir), "-o", "ro"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Mount::adopt(&path, &dir);
    let warned = stderr(&out);
    assert!(warned.contains(&format!("warning: {what}")), "{warned}");
    let damage = m.status_value("log-damage").unwrap();
    assert!(damage.contains(what), "{damage}");
    (path, m, warned)
}

/// Through the CLI and a real mount: a read-write mount of an image with a
/// lost leaf is refused with the way out; a read-only one mounts with a
/// warning, serves the other leaves' blocks, and EIO for the lost ones;
/// `check` reports the leaf (exit 1) and `info` shows it.
#[test]
fn a_lost_map_leaf_mounts_read_only_with_a_warning() {
    use common::{p, run, stderr, stdout};
    use std::os::unix::fs::FileExt;
    if !common::fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, head, _) = image(false);
    let (path, m, warned) = mount_lost(tmp.path(), &without_head_leaf_one(&bytes), "map leaf 1");
    assert!(warned.contains("I/O errors"), "{warned}");
    // Nobody writes a read-only mount's image: a check of it reports the
    // lost leaf at once (no retries for a newer state, 5 × 200 ms).
    let start = std::time::Instant::now();
    let out = run(&["check", p(&path)]);
    assert!(!out.status.success() && stdout(&out).contains("damage: map leaf 1"));
    assert!(start.elapsed() < std::time::Duration::from_millis(900));
    let disk = std::fs::File::open(m.disk()).unwrap();
    let mut leaf0 = vec![0u8; 1024 * BS as usize];
    disk.read_exact_at(&mut leaf0, 0).unwrap();
    assert!(
        leaf0 == head[..leaf0.len()],
        "leaf 0's blocks read wrong data"
    );
    let mut one = vec![0u8; BS as usize];
    let err = disk.read_exact_at(&mut one, 1030 * BS).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(disk);
    m.umount();
    let out = run(&["check", p(&path)]);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(text.contains("damage: map leaf 1"), "{text}");
    assert!(
        text.contains("bad blocks 1024..=1099 (offsets 4194304..=4501504): its map leaf 1"),
        "{text}"
    );
    let out = run(&["info", p(&path)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("damage: map leaf 1"), "{text}");
    assert!(text.contains("records of the lost map leaves"), "{text}");
}

/// A snapshot's own leaf record lost in both copies costs the snapshot that
/// leaf's blocks: it still opens (read-only and in a read-write session),
/// reads its other blocks right and fails the lost ones; the head, which
/// holds another record of that leaf, reads right, and `check` reports the
/// snapshot.
#[test]
fn a_snapshot_leaf_lost_in_both_copies_costs_the_snapshot_its_blocks() {
    let (bytes, head, snap) = image(false);
    let s1_leaf = pairs(&bytes)
        .into_iter()
        .find(|p| p.kind == RecordKind::Leaf && p.key == 1)
        .unwrap();
    let mut lost = bytes.clone();
    damage(&mut lost, s1_leaf.first);
    damage(&mut lost, s1_leaf.second);
    for rw in [false, true] {
        let store = Arc::new(MemStore::from_bytes(lost.clone()));
        let mut img = Image::open_on(store, &opts(!rw)).unwrap();
        assert!(img.lost_leaves().is_empty());
        let mut all = vec![0u8; SIZE as usize];
        img.read_at(&mut all, 0).unwrap();
        assert!(all == head, "the head reads wrong data");
        let s1 = img.open_snapshot("s1").unwrap();
        assert_eq!(s1.lost_leaves().len(), 1, "{:?}", s1.lost_leaves());
        let mut leaf0 = vec![0u8; 1024 * BS as usize];
        s1.read_at(&mut leaf0, 0).unwrap();
        assert!(leaf0 == snap[..leaf0.len()], "s1's leaf 0 reads wrong data");
        for (off, len) in [(1030 * BS, BS), (1020 * BS, 10 * BS)] {
            let mut buf = vec![0u8; len as usize];
            let e = s1.read_at(&mut buf, off).unwrap_err();
            assert!(e.to_string().contains("map leaf 1"), "{e}");
        }
        let report = img.check().unwrap();
        assert!(
            report.errors.iter().any(|e| e.contains("snapshot 's1'")),
            "{report:?}"
        );
        if rw {
            // A rollback and a compaction would carry the snapshot's map
            // on: refused (compaction until the snapshot is deleted, which
            // works).
            drop(s1);
            let e = img.snapshot_rollback("s1").unwrap_err();
            assert!(e.to_string().contains("map leaf 1"), "{e}");
            img.compact().unwrap_err();
            img.snapshot_delete("s1").unwrap();
            img.compact().unwrap();
            img.read_at(&mut all, 0).unwrap();
            assert!(all == head, "the head reads wrong data after compaction");
        }
        img.close().unwrap();
    }
}

/// `vbdfs snapshot list` of an image with a snapshot leaf lost in both
/// copies still lists the snapshots; what each holds alone is unknown ("?")
/// and a note says why.
#[test]
fn snapshot_list_survives_a_lost_snapshot_leaf() {
    use common::{p, run, stderr, stdout};
    let (mut bytes, _, _) = image(false);
    let s1_leaf = pairs(&bytes)
        .into_iter()
        .find(|p| p.kind == RecordKind::Leaf && p.key == 1)
        .unwrap();
    damage(&mut bytes, s1_leaf.first);
    damage(&mut bytes, s1_leaf.second);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("s.vbd");
    std::fs::write(&path, bytes).unwrap();
    let out = run(&["snapshot", "list", p(&path)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with("s1 "))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.split_whitespace().any(|w| w == "?"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("map leaf 1"), "{}", stderr(&out));
}

/// A check from outside of a mounted image reads its last durable state,
/// which the daemon may replace meanwhile: a map it finds damaged (a leaf
/// lost, or an index that fails the open) is read again in the newer state
/// (up to 5 × 200 ms) before it is reported. Here both copies of the head's
/// `kind` record (leaf 1, or the index) are damaged in the file under a live
/// mount, and 300 ms into the check the daemon writes them anew (a write in
/// leaf 1, then a snapshot's checkpoint): the check must end on the newer
/// state, without a `damage:` line or an error from the first (without the
/// retry it prints one).
fn check_of_a_mounted_image_retries(kind: RecordKind) {
    use common::{create, p, pattern, run, stdout, Mount};
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    if !common::fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("live.vbd");
    create(&path, "8M", &["--block-size", "4K"]);
    let m = Mount::new(&path, &tmp.path().join("mnt"), None);
    let data = pattern(8 << 20, 3);
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(m.disk())
        .unwrap();
    disk.write_all_at(&data, 0).unwrap();
    disk.sync_all().unwrap();
    let command = |cmd: &str| {
        let mut control = std::fs::OpenOptions::new()
            .write(true)
            .open(m.control())
            .unwrap();
        control.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    };
    // A checkpoint that writes the map, and no snapshot that keeps it.
    command("snapshot a");
    command("delete-snapshot a");
    let bytes = std::fs::read(&path).unwrap();
    let record = pairs(&bytes)
        .into_iter()
        .rev()
        .find(|p| p.kind == kind && (kind != RecordKind::Leaf || p.key == 1))
        .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for at in [record.first, record.second] {
        let off = at + RECORD_HEADER_LEN as u64 + 3;
        file.write_all_at(&[bytes[off as usize] ^ 0x5a], off)
            .unwrap();
    }
    file.sync_all().unwrap();
    let check = common::vbdfs()
        .args(["check", p(&path)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    disk.write_all_at(&data[..4096], 1030 * 4096).unwrap();
    disk.sync_all().unwrap();
    command("snapshot b");
    let out = check.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{kind:?}: {text}{}",
        common::stderr(&out)
    );
    assert!(!text.contains("damage:"), "{kind:?}: {text}");
    drop(disk);
    m.umount();
    assert!(run(&["check", p(&path)]).status.success());
}

#[test]
fn a_check_of_a_mounted_image_retries_a_leaf_lost_in_its_older_state() {
    check_of_a_mounted_image_retries(RecordKind::Leaf);
}

#[test]
fn a_check_of_a_mounted_image_retries_an_index_damaged_in_its_older_state() {
    check_of_a_mounted_image_retries(RecordKind::Index);
}

/// The image of [`image`] with both copies of its snapshot table (the
/// newest, which the superblock names) damaged.
fn without_snapshot_table(bytes: &[u8]) -> Vec<u8> {
    let table = pairs(bytes)
        .into_iter()
        .rev()
        .find(|p| p.kind == RecordKind::SnapTable)
        .unwrap();
    let mut lost = bytes.to_vec();
    damage(&mut lost, table.first);
    damage(&mut lost, table.second);
    lost
}

/// A snapshot table damaged in both copies costs the snapshots, not the
/// disk: a read-only open reads the head right and says why no snapshot
/// can be listed or opened (`Corrupt`, naming the table, never "no such
/// snapshot"); `check` reports it; a read-write open, whose checkpoints
/// would write a table without the snapshots and reclaim their records,
/// is refused with the way out.
fn snapshot_table_lost(encrypted: bool) {
    let (bytes, head, _) = image(encrypted);
    let lost = without_snapshot_table(&bytes);
    let k = key();
    let open = |rw: bool| {
        let store = Arc::new(MemStore::from_bytes(lost.clone()));
        Image::open_on_with_key(store, &opts(!rw), encrypted.then_some(&k))
    };
    let img = open(false).unwrap();
    let why = img.lost_snapshot_table().unwrap();
    assert!(
        why.contains("snapshot table") && why.contains("either copy"),
        "{why}"
    );
    assert_eq!(img.damage(), std::slice::from_ref(&why));
    assert!(img.lost_leaves().is_empty());
    assert!(
        img.recovery_notes().is_empty(),
        "{:?}",
        img.recovery_notes()
    );
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == head, "the head reads wrong data");
    assert!(img.snapshot_list().is_empty());
    let opened = img.open_snapshot("s1").err().unwrap();
    for e in [opened, img.snapshot("s1").unwrap_err()] {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("snapshot 's1'") && text.contains("snapshot table"),
            "{text}"
        );
    }
    let report = img.check().unwrap();
    assert!(!report.is_ok());
    assert_eq!(
        report.errors,
        ["the snapshot table is lost: no snapshot was checked"]
    );
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    img.close().unwrap();
    let e = open(true).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("snapshot table") && text.contains("refused read-write"),
        "{text}"
    );
    assert!(text.contains("vbdfs mount -o ro"), "{text}");
}

#[test]
fn a_snapshot_table_lost_in_both_copies_costs_the_snapshots_not_the_disk() {
    snapshot_table_lost(false);
}

#[test]
fn an_encrypted_images_lost_snapshot_table_costs_the_snapshots_not_the_disk() {
    snapshot_table_lost(true);
}

/// A base image file with snapshot `gold` (blocks 3 and 1030 written), a
/// head that differs from it, and a clone of `gold` that wrote block 4:
/// the base's and the clone's paths, and what the clone must read.
fn base_and_clone(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let (base, clone) = (dir.join("base.vbd"), dir.join("clone.vbd"));
    let img = Image::create(&base, &create_options(), &opts(false)).unwrap();
    img.write_at(&block(1), 3 * BS).unwrap();
    img.write_at(&block(2), 1030 * BS).unwrap();
    img.snapshot_create("gold").unwrap();
    img.write_at(&block(3), 3 * BS).unwrap();
    img.close().unwrap();
    let options = vbdfs::engine::CloneOptions::default();
    let img = Image::create_clone(&clone, &base, Some("gold"), &options, &opts(false)).unwrap();
    img.write_at(&block(4), 4 * BS).unwrap();
    img.close().unwrap();
    let mut want = vec![0u8; SIZE as usize];
    apply(&mut want, &[(3, 1), (1030, 2), (4, 4)]);
    (base, clone, want)
}

/// A clone does not need its base's snapshot table: its own reference
/// names the snapshot's index (offset, length, crc). With the base's table
/// lost in both copies, the clone opens read-only and read-write and reads
/// exactly its bytes; the base still opens only read-only, so nothing
/// reclaims the snapshot's records meanwhile.
#[test]
fn a_clone_reads_its_base_snapshot_when_the_bases_table_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (base, clone, want) = base_and_clone(dir.path());
    std::fs::write(
        &base,
        without_snapshot_table(&std::fs::read(&base).unwrap()),
    )
    .unwrap();
    for rw in [false, true, false] {
        let img = Image::open(&clone, &opts(!rw)).unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf == want, "the clone reads wrong data (rw {rw})");
        assert_eq!(img.backing_chain().len(), 1);
        img.close().unwrap();
    }
    assert!(Image::open(&base, &opts(true)).is_ok());
    let e = Image::open(&base, &opts(false)).err().unwrap();
    assert!(e.to_string().contains("refused read-write"), "{e}");
}

/// The clone's reference is not trusted beyond what it can check: a base
/// snapshot deleted (forced, despite the clone's hold) and reclaimed, then
/// the base's table lost, makes the clone's open fail as damage — never read
/// the base's other data or zeros.
#[test]
fn a_clone_of_a_reclaimed_snapshot_fails_when_the_bases_table_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (base, clone, _) = base_and_clone(dir.path());
    let img = Image::open(&base, &opts(false)).unwrap();
    img.snapshot_delete_forced("gold").unwrap();
    // Block 1030's record is the snapshot's alone: reclaimed with it.
    img.compact().unwrap();
    img.close().unwrap();
    std::fs::write(
        &base,
        without_snapshot_table(&std::fs::read(&base).unwrap()),
    )
    .unwrap();
    let outcome = Image::open(&clone, &opts(true)).and_then(|img| {
        let mut buf = vec![0u8; SIZE as usize];
        img.read_at(&mut buf, 0)
    });
    let e = outcome.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

/// Through the CLI and a real mount: an image whose snapshot table is lost
/// mounts read-only with a warning and serves its disk byte-exact with an
/// empty `snapshots/`; a read-write mount is refused with the way out; each
/// command says what is lost in one line (`snapshot list` and `export
/// IMAGE@NAME` fail, `info` and `check` show `damage:`, `check` exits 1).
#[test]
fn a_lost_snapshot_table_mounts_read_only_with_a_warning() {
    use common::{p, run, stderr, stdout};
    if !common::fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, head, _) = image(false);
    let lost = without_snapshot_table(&bytes);
    let (path, m, warned) = mount_lost(tmp.path(), &lost, "the snapshot table");
    assert!(
        warned.contains("could not be read in either copy"),
        "{warned}"
    );
    assert_eq!(m.status_value("snapshots").as_deref(), Some("unknown"));
    assert_eq!(std::fs::read(m.disk()).unwrap(), head);
    let listed = std::fs::read_dir(m.dir.join("snapshots")).unwrap().count();
    assert_eq!(listed, 0);
    m.umount();
    let one_line = |args: &[&str], what: &str| {
        let out = run(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(what), "{args:?}: {err}");
    };
    one_line(&["snapshot", "list", p(&path)], "snapshot table");
    let out_file = tmp.path().join("s1.raw");
    let spec = format!("{}@s1", p(&path));
    one_line(&["export", &spec, p(&out_file)], "snapshot 's1'");
    assert!(!out_file.exists());
    let out = run(&["check", p(&path)]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("damage: the snapshot table"), "{text}");
    assert!(text.contains("error: the snapshot table is lost"), "{text}");
    let out = run(&["info", p(&path)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("snapshots: unknown"), "{text}");
    assert!(text.contains("damage: the snapshot table"), "{text}");
    let out = run(&["info", "--json", p(&path)]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(json["lost_snapshot_table"].is_string(), "{json}");
}
