//! An imported image, mounted, reads byte-identical to the source as QEMU
//! reads it (the `disk` file through FUSE, not only the library path).

mod common;
mod convert_common;

use common::{fuse_available, Mount};
use convert_common::{build_fixtures, qemu_raw, tmp};
use vbdfs::convert::import;
use vbdfs::CreateOptions;

#[test]
fn mounted_import_matches_source() {
    if !fuse_available() {
        return;
    }
    let (_d, dir) = tmp();
    for (i, f) in build_fixtures(&dir).into_iter().enumerate() {
        if !matches!(f.fmt, "qcow2" | "vpc") {
            continue;
        }
        let img = dir.join(format!("m{i}.vbd"));
        import(&f.path, &img, None, &CreateOptions::default(), false).expect("import");
        let want = qemu_raw(&f.path, f.fmt);
        let mnt = Mount::new(&img, &dir.join(format!("mnt{i}")), None);
        let got = std::fs::read(mnt.disk()).expect("read disk");
        assert_eq!(got.len(), want.len(), "{}: size", f.name);
        assert!(
            got == want,
            "{}: mounted disk differs from the source",
            f.name
        );
        mnt.umount();
    }
}
