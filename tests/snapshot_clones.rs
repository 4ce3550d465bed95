//! Clones at the engine level: reads through the base snapshot, copy-up of
//! partial writes, discards that hide the base, holds, chains, a replaced or
//! changed base, cycles, and the depth limit.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

mod common;

use common::pattern;
use std::path::{Path, PathBuf};
use vbdfs::engine::CloneOptions;
use vbdfs::format::{Superblock, SB_SLOT_SIZE};
use vbdfs::{Codec, CreateOptions, ErrorKind, Image, OpenOptions};

const BS: u64 = 4096;

fn opts() -> OpenOptions {
    OpenOptions {
        cache_bytes: 1 << 20,
        workers: 2,
        ..OpenOptions::default()
    }
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    img.read_at(&mut buf, off).unwrap();
    buf
}

/// A base image at `dir/name` holding `fill` in its first 64 KiB, snapshot "gold".
fn base(dir: &Path, name: &str, fill: u8) -> PathBuf {
    let path = dir.join(name);
    let c = CreateOptions {
        size: 1 << 20,
        block_size: BS,
        codec: Codec::Zstd(1),
    };
    let img = Image::create(&path, &c, &opts()).unwrap();
    img.write_at(&[fill; 65536], 0).unwrap();
    img.snapshot_create("gold").unwrap();
    img.write_at(&[0xEE; 65536], 0).unwrap(); // after the snapshot: never seen by clones
    img.close().unwrap();
    path
}

fn clone(new: &Path, base: &Path, snap: Option<&str>) -> Image {
    Image::create_clone(new, base, snap, &CloneOptions::default(), &opts()).unwrap()
}

#[test]
fn clone_reads_base_copies_up_and_hides_discards() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), "base.vbd", 0xAB);
    let c = clone(&dir.path().join("vm1.vbd"), &b, Some("gold"));
    assert_eq!(c.len(), 1 << 20);
    assert_eq!(read(&c, 0, 65536), vec![0xAB; 65536]);
    assert_eq!(read(&c, 65536, 100), vec![0; 100]);
    // Partial write: the rest of the block comes from the base.
    c.write_at(&[1; 10], 100).unwrap();
    let mut want = vec![0xAB; 4096];
    want[100..110].fill(1);
    assert_eq!(read(&c, 0, 4096), want);
    // Discard of whole blocks and a zero write hide the base.
    c.discard(8192, 8192).unwrap();
    c.write_at(&[0; 4096], 20480).unwrap();
    assert_eq!(read(&c, 8192, 8192), vec![0; 8192]);
    assert_eq!(c.next_data(8192), Some(16384));
    assert_eq!(c.next_hole(0), 8192);
    c.flush().unwrap();
    assert_eq!(read(&c, 20480, 4096), vec![0; 4096]);
    let chain = c.backing_chain();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].snapshot, "gold");
    c.close().unwrap();

    // After reopen (ZERO entries replayed and checkpointed) nothing changed.
    let c = Image::open(&dir.path().join("vm1.vbd"), &opts()).unwrap();
    assert_eq!(read(&c, 0, 4096), want);
    assert_eq!(read(&c, 4096, 4096), vec![0xAB; 4096]);
    assert_eq!(read(&c, 8192, 8192), vec![0; 8192]);
    assert_eq!(read(&c, 20480, 4096), vec![0; 4096]);
    assert_eq!(read(&c, 24576, 4096), vec![0xAB; 4096]);
    assert!(c.check().unwrap().is_ok());
    c.close().unwrap();

    // The base never changed, and its snapshot is held.
    let base = Image::open(&b, &opts()).unwrap();
    assert_eq!(read(&base, 0, 10), vec![0xEE; 10]);
    assert_eq!(base.snapshot("gold").unwrap().holds, 1);
    let e = base.snapshot_delete("gold").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("held by 1 clone(s)"), "{e}");
}

#[test]
fn clone_without_a_snapshot_name_snapshots_the_base_first() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), "base.vbd", 1);
    let c = clone(&dir.path().join("c.vbd"), &b, None);
    assert_eq!(read(&c, 0, 10), vec![0xEE; 10]);
    let snap = c.backing_chain()[0].snapshot.clone();
    assert!(snap.starts_with("clone-base-"), "{snap}");
    c.close().unwrap();
    let c2 = clone(&dir.path().join("c2.vbd"), &b, None);
    assert_ne!(c2.backing_chain()[0].snapshot, snap);
    // Existing target and missing snapshot are refused; nothing is left behind.
    let e = Image::create_clone(
        &dir.path().join("c.vbd"),
        &b,
        Some("gold"),
        &CloneOptions::default(),
        &opts(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exists);
    let e = Image::create_clone(
        &dir.path().join("x.vbd"),
        &b,
        Some("nope"),
        &CloneOptions::default(),
        &opts(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(!dir.path().join("x.vbd").exists());
    // A clone without a snapshot name that cannot be made (its directory
    // is missing) takes no snapshot of the base: the base is as it was.
    c2.close().unwrap();
    let names = |path: &Path| -> Vec<String> {
        let img = Image::open(path, &opts()).unwrap();
        let names = img.snapshot_list().into_iter().map(|s| s.name).collect();
        img.close().unwrap();
        names
    };
    let before = names(&b);
    let e = Image::create_clone(
        &dir.path().join("nodir/x.vbd"),
        &b,
        None,
        &CloneOptions::default(),
        &opts(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(names(&b), before);
}

#[test]
fn chains_of_clones_and_snapshots_of_clones() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), "base.vbd", 0x11);
    let c1 = clone(&dir.path().join("c1.vbd"), &b, Some("gold"));
    c1.write_at(&[0x22; 4096], 4096).unwrap();
    c1.discard(8192, 4096).unwrap();
    c1.snapshot_create("mid").unwrap();
    c1.write_at(&[0x33; 4096], 0).unwrap();
    let s = c1.open_snapshot("mid").unwrap();
    let mut buf = vec![0u8; 12288];
    s.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 0x11));
    assert!(buf[4096..8192].iter().all(|&x| x == 0x22));
    assert!(buf[8192..].iter().all(|&x| x == 0));
    assert_eq!(s.next_hole(0), 8192);
    drop(s);
    c1.close().unwrap();

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let c2 = clone(&sub.join("c2.vbd"), &dir.path().join("c1.vbd"), Some("mid"));
    assert_eq!(c2.backing_chain().len(), 2);
    assert_eq!(read(&c2, 0, 4096), vec![0x11; 4096]);
    assert_eq!(read(&c2, 4096, 4096), vec![0x22; 4096]);
    assert_eq!(read(&c2, 8192, 4096), vec![0; 4096]);
    assert_eq!(read(&c2, 12288, 4096), vec![0x11; 4096]);
    c2.close().unwrap();

    // Moving the whole tree keeps the relative paths working.
    let moved = tempfile::tempdir().unwrap();
    let to = moved.path().join("tree");
    std::fs::rename(dir.path(), &to).unwrap();
    let c2 = Image::open(&to.join("sub/c2.vbd"), &opts()).unwrap();
    assert_eq!(read(&c2, 12288, 4096), vec![0x11; 4096]);
    std::fs::rename(&to, dir.path()).unwrap();
}

#[test]
fn replaced_or_changed_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), "base.vbd", 5);
    clone(&dir.path().join("c.vbd"), &b, Some("gold"))
        .close()
        .unwrap();
    // Snapshot deleted (forced) and re-created under the same name.
    let img = Image::open(&b, &opts()).unwrap();
    img.snapshot_delete_forced("gold").unwrap();
    img.snapshot_create("gold").unwrap();
    img.close().unwrap();
    let e = Image::open(&dir.path().join("c.vbd"), &opts()).unwrap_err();
    assert!(e.to_string().contains("no longer exists"), "{e}");
    // Another image put in the base's place.
    std::fs::remove_file(&b).unwrap();
    base(dir.path(), "base.vbd", 6);
    let e = Image::open(&dir.path().join("c.vbd"), &opts()).unwrap_err();
    assert!(e.to_string().contains("was replaced"), "{e}");
    // No base at all.
    std::fs::remove_file(&b).unwrap();
    let e = Image::open(&dir.path().join("c.vbd"), &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("base.vbd"), "{e}");
}

/// Rewrites the uuid in both superblock slots of an image file.
fn set_uuid(path: &Path, uuid: [u8; 16]) {
    let mut bytes = std::fs::read(path).unwrap();
    for slot in 0..2u64 {
        let at = (slot * SB_SLOT_SIZE) as usize;
        let Ok(mut sb) = Superblock::decode(&bytes[at..at + 4096], slot as u8) else {
            continue;
        };
        sb.image_uuid = uuid;
        bytes[at..at + 4096].copy_from_slice(&sb.encode(slot as u8));
    }
    std::fs::write(path, bytes).unwrap();
}

fn uuid_of(path: &Path) -> [u8; 16] {
    let bytes = std::fs::read(path).unwrap();
    (0..2u64)
        .filter_map(|s| {
            let at = (s * SB_SLOT_SIZE) as usize;
            Superblock::decode(&bytes[at..at + 4096], s as u8).ok()
        })
        .max_by_key(|sb| sb.seq)
        .unwrap()
        .image_uuid
}

#[test]
fn cycles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = base(dir.path(), "a.vbd", 1);
    clone(&dir.path().join("b.vbd"), &a, Some("gold"))
        .close()
        .unwrap();
    // a.vbd becomes a clone of itself: a copy of b (whose base is a.vbd)
    // carrying a's identity.
    let uuid = uuid_of(&a);
    std::fs::copy(dir.path().join("b.vbd"), &a).unwrap();
    set_uuid(&a, uuid);
    let e = Image::open(&dir.path().join("b.vbd"), &opts()).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    let e = Image::open(&a, &opts()).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
}

#[test]
fn chains_deeper_than_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut prev = base(dir.path(), "l0.vbd", 1);
    for level in 1..=16 {
        let next = dir.path().join(format!("l{level}.vbd"));
        let img = clone(&next, &prev, None);
        assert_eq!(img.backing_chain().len(), level);
        img.close().unwrap();
        prev = next;
    }
    let e = Image::create_clone(
        &dir.path().join("l17.vbd"),
        &prev,
        None,
        &CloneOptions::default(),
        &opts(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("deeper than 16"), "{e}");
    // One short line, not every image of the chain in front of it.
    assert!(e.to_string().matches(".vbd").count() <= 3, "{e}");
    assert!(!dir.path().join("l17.vbd").exists());
    // The failed attempt released its hold again.
    let last = Image::open(&prev, &opts()).unwrap();
    assert!(last.snapshot_list().iter().all(|s| s.holds == 0));
}

#[test]
fn clone_size_and_codec_can_differ() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), "base.vbd", 9);
    let o = CloneOptions {
        size: Some(2 << 20),
        block_size: Some(65536),
        codec: Some(Codec::None),
    };
    let c =
        Image::create_clone(&dir.path().join("big.vbd"), &b, Some("gold"), &o, &opts()).unwrap();
    assert_eq!(c.len(), 2 << 20);
    assert_eq!(c.block_size(), 65536);
    assert_eq!(read(&c, 0, 65536), vec![9; 65536]);
    assert_eq!(read(&c, 1 << 20, 65536), vec![0; 65536]);
    c.write_at(&[4; 100], 70000).unwrap();
    assert_eq!(read(&c, 65536, 4464), vec![0; 4464]);
}

/// Writes `blocks` (each its own pattern, flushed on its own so that the
/// records scatter) to `img` and to `model`.
fn scatter(img: &Image, model: &mut [u8], blocks: impl Iterator<Item = u64>, seed: u64) {
    for b in blocks {
        let data = pattern(BS as usize, seed ^ b);
        img.write_at(&data, b * BS).unwrap();
        model[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
        img.flush().unwrap();
    }
}

#[test]
fn large_reads_through_a_chain_of_clones_match_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1usize << 20; // 256 blocks
    let c = CreateOptions {
        size: size as u64,
        block_size: BS,
        codec: Codec::None,
    };
    let (b, c1, c2) = (
        dir.path().join("b.vbd"),
        dir.path().join("c1.vbd"),
        dir.path().join("c2.vbd"),
    );
    let mut model = vec![0u8; size];
    let img = Image::create(&b, &c, &opts()).unwrap();
    scatter(&img, &mut model, (0..200u64).map(|i| (i * 37) % 200), 1);
    img.snapshot_create("gold").unwrap();
    img.close().unwrap();
    let img = clone(&c1, &b, Some("gold"));
    scatter(&img, &mut model, (0..256u64).filter(|b| b % 5 == 1), 2);
    img.discard(100 * BS, 8 * BS).unwrap();
    model[(100 * BS) as usize..(108 * BS) as usize].fill(0);
    img.snapshot_create("mid").unwrap();
    img.close().unwrap();
    let img = clone(&c2, &c1, Some("mid"));
    scatter(&img, &mut model, (0..256u64).filter(|b| b % 7 == 3), 3);
    img.close().unwrap();

    // Fresh opens (empty caches): the whole disk in one read, then reads of
    // every size at odd offsets, against the model.
    let img = Image::open(&c2, &opts()).unwrap();
    assert!(read(&img, 0, size) == model, "one read of the whole clone");
    img.close().unwrap();
    let img = Image::open(&c2, &opts()).unwrap();
    for (off, len) in [
        (1, 65536),
        (4095, 300_001),
        (40_000, 4097),
        (777_777, 270_799),
    ] {
        assert!(
            read(&img, off, len) == model[off as usize..off as usize + len],
            "{off}+{len}"
        );
    }
    // A snapshot of the clone reads the same way.
    img.snapshot_create("now").unwrap();
    let snap = img.open_snapshot("now").unwrap();
    let mut buf = vec![0u8; size];
    snap.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "one read of the clone's snapshot");
    drop(snap);
    img.close().unwrap();

    // Damage the base's record of block 12 (shown by both clones): a large
    // read of the clone fails, and block by block only block 12 does.
    let mut bytes = std::fs::read(&b).unwrap();
    let at = *common::data_records_of(&bytes, 12).last().unwrap();
    bytes[at + 64 + 7] ^= 1;
    std::fs::write(&b, &bytes).unwrap();
    let img = Image::open(&c2, &opts()).unwrap();
    let mut buf = vec![0u8; size];
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    img.close().unwrap();
    let img = Image::open(&c2, &opts()).unwrap();
    for blk in 0..256u64 {
        let mut one = vec![0u8; BS as usize];
        match img.read_at(&mut one, blk * BS) {
            Ok(()) => assert!(
                blk != 12 && one == model[(blk * BS) as usize..((blk + 1) * BS) as usize],
                "block {blk}"
            ),
            Err(e) => assert!(
                blk == 12 && e.kind() == ErrorKind::Corrupt,
                "block {blk}: {e}"
            ),
        }
    }
}
