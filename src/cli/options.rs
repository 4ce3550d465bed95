//! Parsing of user-written values: sizes (`64K`, `10G`), codecs (`zstd:3`) and
//! the `-o` mount option string.
//!
//! Sizes take an optional K, M, G or T suffix (powers of 1024, case-insensitive,
//! optionally followed by `B` or `iB`). Mount options are comma-separated; the
//! ones vbdfs acts on are listed in [`MountOptions`], and [`IGNORED`] lists the
//! mount(8)/fstab options that are accepted and ignored. Anything else is an
//! error that names the option.

use crate::format::{zstd_level_ok, ZSTD_LEVELS_TEXT};
use crate::{Codec, Error, Result};

/// mount(8)/fstab pass-through options that vbdfs accepts and ignores: they
/// are meant for mount(8), systemd or the kernel's generic mount flags, which a
/// FUSE mount sets itself (`nodev,nosuid` always; access times of `disk` mean
/// nothing to a guest). The same set `mount.vbdfs` drops (with `x-*`, `X-*`
/// and `comment=`); `loop` is refused with advice instead.
pub const IGNORED: &[&str] = &[
    "nofail",
    "noauto",
    "auto",
    "_netdev",
    "nodev",
    "nosuid",
    "noexec",
    "dev",
    "suid",
    "exec",
    "user",
    "users",
    "nouser",
    "defaults",
    "owner",
    "group",
    "async",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
];

/// Default number of I/O worker threads per mount (`threads=`).
pub const DEFAULT_THREADS: usize = 32;
/// Largest accepted `threads=` value.
pub const MAX_THREADS: usize = 1024;
/// The fastest zstd level plain `adapt` lets write-back fall back to.
pub const DEFAULT_ADAPT_FLOOR: i32 = -3;
/// Smallest accepted `log-region=` value.
const MIN_LOG_REGION: u64 = 1 << 20;
/// Smallest accepted `cache=` value.
pub const MIN_CACHE: u64 = 1 << 20;
/// Smallest `cache=` that leaves room for blocks: the FUSE request buffers
/// alone keep 4 MiB ([`crate::fuse::BufPool::budget`]). Smaller values work
/// (existing fstab lines keep mounting) but get a warning.
pub const USEFUL_CACHE: u64 = 8 << 20;

/// Parses a size such as `4096`, `64K`, `10G` or `2TiB` (no fractions).
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(format!(
            "invalid size '{text}': expected a whole number with an optional K, M, G or T suffix"
        ))
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad());
    }
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_uppercase();
    let unit = suffix
        .strip_suffix("IB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(&suffix);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| Error::invalid(format!("size '{text}' is too large (over 16 EiB)")))
}

/// Formats a byte count for humans: `1.5 GiB`, `64 KiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Parses `none`, `zstd` (level 1) or `zstd:LEVEL` (see [`zstd_level_ok`]).
pub fn parse_codec(text: &str) -> Result<Codec> {
    let bad = || {
        Error::invalid(format!(
            "invalid compression '{text}': expected none, zstd or zstd:LEVEL"
        ))
    };
    match text.split_once(':') {
        None if text == "none" => Ok(Codec::None),
        None if text == "zstd" => Ok(Codec::Zstd(1)),
        Some(("zstd", level)) => {
            let level: i32 = level.parse().map_err(|_| bad())?;
            if !zstd_level_ok(level) {
                return Err(Error::invalid(format!(
                    "invalid zstd level {level}: expected {ZSTD_LEVELS_TEXT}"
                )));
            }
            Ok(Codec::Zstd(level))
        }
        _ => Err(bad()),
    }
}

/// The parsed `-o` options of `vbdfs mount`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountOptions {
    /// `cache=SIZE`: engine buffer cache in bytes (None: engine default, 256 MiB).
    pub cache_bytes: Option<u64>,
    /// `ro`: open the image read-only and mount read-only (`rw` undoes it).
    pub read_only: bool,
    /// `allow_other`: users other than the mounting one may access the mount
    /// (permission checks then follow `mode=`, `uid=`, `gid=`).
    pub allow_other: bool,
    /// `threads=N`: I/O worker threads (None: [`DEFAULT_THREADS`]).
    pub threads: Option<usize>,
    /// `uid=N`: owner of `disk` and `control` (default: the mounting user).
    pub uid: Option<u32>,
    /// `gid=N`: group of `disk` and `control` (default: the mounting group).
    pub gid: Option<u32>,
    /// `mode=OCTAL`: permission bits of `disk` (default 0600).
    pub mode: Option<u32>,
    /// `key-file=PATH`: key file of an encrypted image (`crate::cli::keys`).
    pub key_file: Option<std::path::PathBuf>,
    /// `adapt` or `adapt=LEVEL`: while write-back falls behind, compress at
    /// zstd levels down to LEVEL (default [`DEFAULT_ADAPT_FLOOR`]).
    pub adapt_floor: Option<i32>,
    /// `log-region=SIZE`: the smallest hole of the image file the log moves
    /// into (None: the engine's default, 256 MiB).
    pub log_region: Option<u64>,
}

impl MountOptions {
    /// Parses one or more comma-separated option strings (several `-o` are joined).
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<MountOptions> {
        let mut opts = MountOptions::default();
        for list in lists {
            for item in list
                .as_ref()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                opts.apply(item)?;
            }
        }
        for (set, name) in [
            (opts.adapt_floor.is_some(), "adapt"),
            (opts.log_region.is_some(), "log-region"),
        ] {
            if opts.read_only && set {
                return Err(Error::invalid(format!(
                    "mount option '{name}' is for writes: not with 'ro'"
                )));
            }
        }
        Ok(opts)
    }

    fn apply(&mut self, item: &str) -> Result<()> {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let need = |v: Option<&str>| -> Result<String> {
            match v {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(Error::invalid(format!(
                    "mount option '{key}' needs a value ({key}=...)"
                ))),
            }
        };
        let flag = |v: Option<&str>| -> Result<()> {
            match v {
                None => Ok(()),
                Some(_) => Err(Error::invalid(format!(
                    "mount option '{key}' takes no value"
                ))),
            }
        };
        match key {
            "cache" => {
                let v = need(value)?;
                let bytes = parse_size(&v).map_err(|e| e.context("mount option 'cache'"))?;
                if bytes < MIN_CACHE {
                    return Err(Error::invalid(format!(
                        "mount option 'cache={v}': the cache must be at least 1M"
                    )));
                }
                self.cache_bytes = Some(bytes);
            }
            "log-region" => {
                let v = need(value)?;
                let bytes = parse_size(&v).map_err(|e| e.context("mount option 'log-region'"))?;
                if bytes < MIN_LOG_REGION {
                    return Err(Error::invalid(format!(
                        "mount option 'log-region={v}': at least 1M"
                    )));
                }
                self.log_region = Some(bytes);
            }
            "ro" => {
                flag(value)?;
                self.read_only = true;
            }
            "rw" => {
                flag(value)?;
                self.read_only = false;
            }
            "allow_other" => {
                flag(value)?;
                self.allow_other = true;
            }
            "threads" => {
                let v = need(value)?;
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_THREADS).contains(n))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "mount option 'threads={v}': expected a number from 1 to {MAX_THREADS}"
                        ))
                    })?;
                self.threads = Some(n);
            }
            "uid" | "gid" => {
                let v = need(value)?;
                let id: u32 = v.parse().ok().filter(|&n| n != u32::MAX).ok_or_else(|| {
                    Error::invalid(format!("mount option '{key}={v}': expected a numeric id"))
                })?;
                if key == "uid" {
                    self.uid = Some(id);
                } else {
                    self.gid = Some(id);
                }
            }
            "mode" => {
                let v = need(value)?;
                let mode = u32::from_str_radix(&v, 8)
                    .ok()
                    .filter(|&m| m <= 0o777)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "mount option 'mode={v}': expected octal permission bits such as 0600"
                        ))
                    })?;
                self.mode = Some(mode);
            }
            "adapt" => {
                let floor = match value {
                    None => DEFAULT_ADAPT_FLOOR,
                    Some(v) => v
                        .strip_prefix("zstd:")
                        .unwrap_or(v)
                        .parse()
                        .ok()
                        .filter(|&l| zstd_level_ok(l))
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "mount option 'adapt={v}': expected a zstd level {ZSTD_LEVELS_TEXT}"
                            ))
                        })?,
                };
                self.adapt_floor = Some(floor);
            }
            "key-file" | "keyfile" => {
                // Later options override earlier ones, as in mount(8); two
                // different keys are a mistake in the fstab line, not that.
                let v = std::path::PathBuf::from(need(value)?);
                if self.key_file.as_ref().is_some_and(|k| k != &v) {
                    return Err(Error::invalid(format!(
                        "mount option '{key}' is given twice with different files"
                    )));
                }
                self.key_file = Some(v);
            }
            _ if value.is_none() && IGNORED.contains(&key) => {}
            _ if key.starts_with("x-") || key.starts_with("X-") || key == "comment" => {}
            "loop" => {
                return Err(Error::invalid(
                    "mount option 'loop' does not apply: the image is the source; put a loop \
                     device over MOUNTPOINT/disk instead (losetup -f --show --direct-io=on)",
                ));
            }
            _ => {
                return Err(Error::invalid(format!("unknown mount option '{item}'")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("64K").ok(), Some(64 << 10));
        assert_eq!(parse_size("64k").ok(), Some(64 << 10));
        assert_eq!(parse_size("10M").ok(), Some(10 << 20));
        assert_eq!(parse_size("2G").ok(), Some(2 << 30));
        assert_eq!(parse_size("1T").ok(), Some(1 << 40));
        assert_eq!(parse_size("1GiB").ok(), Some(1 << 30));
        assert_eq!(parse_size("1gb").ok(), Some(1 << 30));
        assert_eq!(parse_size("0").ok(), Some(0));
        for bad in [
            "",
            "K",
            "1.5G",
            "-1",
            "12X",
            "1 G G",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        let msg = parse_size("12X")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("12X"), "{msg}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }

    #[test]
    fn codecs() {
        assert_eq!(parse_codec("none").ok(), Some(Codec::None));
        assert_eq!(parse_codec("zstd").ok(), Some(Codec::Zstd(1)));
        assert_eq!(parse_codec("zstd:9").ok(), Some(Codec::Zstd(9)));
        for bad in ["lz4", "zstd:", "zstd:0", "zstd:30", "zstd:x", "none:1", ""] {
            assert!(parse_codec(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mount_options() {
        let o = MountOptions::parse(&["cache=512M,ro,allow_other", "threads=8,uid=1000,gid=100"]);
        let o = o.ok().unwrap_or_default();
        assert_eq!(o.cache_bytes, Some(512 << 20));
        assert!(o.read_only && o.allow_other);
        assert_eq!((o.threads, o.uid, o.gid), (Some(8), Some(1000), Some(100)));
        let o = MountOptions::parse(&["mode=0644,ro,rw"])
            .ok()
            .unwrap_or_default();
        assert_eq!(o.mode, Some(0o644));
        assert!(!o.read_only);
        let floor = |s: &str| MountOptions::parse(&[s]).ok().and_then(|o| o.adapt_floor);
        assert_eq!(floor("adapt"), Some(DEFAULT_ADAPT_FLOOR));
        assert_eq!(floor("adapt=-5"), Some(-5));
        assert_eq!(floor("adapt=zstd:-1"), Some(-1));
        assert_eq!(floor("cache=8M"), None);
        let region = |s: &str| MountOptions::parse(&[s]).map(|o| o.log_region);
        assert_eq!(region("log-region=16M").ok(), Some(Some(16 << 20)));
        assert!(region("log-region=64K").is_err());
        assert!(region("log-region=16M,ro").is_err());
        let key = MountOptions::parse(&["key-file=/k", "key-file=/k"]).map(|o| o.key_file);
        assert_eq!(key.ok().flatten(), Some("/k".into()));
        let pass = "defaults,nofail,noauto,auto,_netdev,x-systemd.automount,nodev,nosuid,\
                    noexec,dev,suid,exec,user,users,nouser,,noatime,relatime,async,owner,\
                    X-mount.mkdir";
        assert_eq!(
            MountOptions::parse(&[pass]).ok(),
            Some(MountOptions::default())
        );
    }

    #[test]
    fn bad_mount_options_name_the_option() {
        for (bad, needle) in [
            ("bogus", "bogus"),
            ("cache=12X", "cache"),
            ("cache=0", "cache"),
            ("cache", "cache"),
            ("threads=0", "threads"),
            ("threads=many", "threads"),
            ("uid=bob", "uid"),
            ("gid=", "gid"),
            ("mode=999", "mode"),
            ("mode=01777", "mode"),
            ("ro=1", "ro"),
            ("nofail=yes", "nofail"),
            ("key-file", "key-file"),
            ("key-file=/a,keyfile=/b", "given twice"),
            ("adapt=0", "adapt=0"),
            ("adapt=-8", "adapt"),
            ("adapt=fast", "adapt"),
            ("adapt=", "adapt"),
            ("loop", "put a loop device over MOUNTPOINT/disk"),
            ("ro,adapt", "not with 'ro'"),
            ("sync", "unknown mount option 'sync'"),
        ] {
            let err = MountOptions::parse(&[bad])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
