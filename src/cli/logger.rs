//! The daemon's logger (a small `log::Log`): to stderr in the foreground
//! (`vbdfs mount -f`), and when daemonized to syslog through the `/dev/log`
//! datagram socket (facility daemon, ident `vbdfs`). Without `/dev/log` the
//! daemon's messages are dropped, except the last error, which the control
//! file shows. For debugging, `VBDFS_LOG_FILE=PATH` appends to a file instead,
//! and `VBDFS_LOG=error|warn|info|debug|trace` sets the level (default info;
//! fuser's own messages are shown from warn, or everything at debug/trace).

use std::io::Write;
use std::os::unix::net::UnixDatagram;

use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;

enum Sink {
    Stderr,
    Syslog(UnixDatagram),
    File(Mutex<std::fs::File>),
    Discard,
}

struct Logger {
    sink: Sink,
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        let limit = if meta.target().starts_with("fuser") && self.level < LevelFilter::Debug {
            LevelFilter::Warn.min(self.level)
        } else {
            self.level
        };
        meta.level() <= limit
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let pid = std::process::id();
        match &self.sink {
            Sink::Stderr => {
                let _ = writeln!(
                    std::io::stderr(),
                    "vbdfs[{pid}]: {}: {}",
                    record.level(),
                    record.args()
                );
            }
            Sink::Syslog(sock) => {
                let severity = match record.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
                let msg = format!("<{}>vbdfs[{pid}]: {}", 3 * 8 + severity, record.args());
                let _ = sock.send_to(msg.as_bytes(), "/dev/log");
            }
            Sink::File(file) => {
                let _ = writeln!(
                    file.lock(),
                    "vbdfs[{pid}]: {}: {}",
                    record.level(),
                    record.args()
                );
            }
            Sink::Discard => {}
        }
    }

    fn flush(&self) {}
}

fn level_from_env() -> LevelFilter {
    std::env::var("VBDFS_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LevelFilter::Info)
}

fn install(sink: Sink) {
    let level = level_from_env();
    if log::set_logger(Box::leak(Box::new(Logger { sink, level }))).is_ok() {
        log::set_max_level(level);
    }
}

/// Logs to stderr (foreground), or to `VBDFS_LOG_FILE` when set.
pub fn init_foreground() {
    install(file_sink().unwrap_or(Sink::Stderr));
}

/// Logs to `VBDFS_LOG_FILE` when set, else to syslog if `/dev/log` exists.
pub fn init_daemon() {
    let sink = file_sink().unwrap_or_else(|| match UnixDatagram::unbound() {
        Ok(sock) if std::path::Path::new("/dev/log").exists() => Sink::Syslog(sock),
        _ => Sink::Discard,
    });
    install(sink);
}

/// Checks, before a daemonized mount starts, that `VBDFS_LOG_FILE` (when
/// set) can be opened: an error here, not the daemon's messages dropped.
pub fn check_log_file() -> crate::Result<()> {
    if let Some(path) = std::env::var_os("VBDFS_LOG_FILE") {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                crate::Error::io(
                    format!("VBDFS_LOG_FILE={}", std::path::Path::new(&path).display()),
                    e,
                )
            })?;
    }
    Ok(())
}

fn file_sink() -> Option<Sink> {
    let path = std::env::var_os("VBDFS_LOG_FILE")?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ok()?;
    Some(Sink::File(Mutex::new(file)))
}
