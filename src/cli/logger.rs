//! The logger (a small `log::Log`): for commands other than `mount`, warnings
//! to stderr once the command succeeded; the daemon's to stderr in the foreground
//! (`vbdfs mount -f`), and when daemonized to syslog through the `/dev/log`
//! datagram socket (facility daemon, ident `vbdfs`). Without `/dev/log` (a
//! container, a minimal host) its warnings and errors go to the kernel's log
//! through `/dev/kmsg` (`dmesg`); the last error is also in the control file. For debugging, `VBDFS_LOG_FILE=PATH` appends to a file instead,
//! and `VBDFS_LOG=error|warn|info|debug|trace` sets the level (default info;
//! fuser's own messages are shown from warn, or everything at debug/trace).

use std::io::Write;
use std::os::unix::net::UnixDatagram;

use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;

enum Sink {
    Stderr,
    Syslog(UnixDatagram),
    /// The kernel's log (`/dev/kmsg`), when there is no `/dev/log`.
    Kmsg(Mutex<std::fs::File>),
    File(Mutex<std::fs::File>),
    /// A command's (not a mount's): kept until it ends, shown if it
    /// succeeded ([`show_held`]; a failed one says why in one line).
    Held(Mutex<Vec<(Level, String)>>),
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
                let msg = format!("{}vbdfs[{pid}]: {}", priority(record), record.args());
                let _ = sock.send_to(msg.as_bytes(), "/dev/log");
            }
            Sink::Kmsg(kmsg) => {
                // One write is one line of the kernel's log; without its
                // newline the kernel holds it back for a continuation.
                let text = record.args().to_string().replace('\n', " ");
                let msg = format!("{}vbdfs[{pid}]: {text}\n", priority(record));
                let _ = kmsg.lock().write_all(msg.as_bytes());
            }
            Sink::File(file) => {
                let _ = writeln!(
                    file.lock(),
                    "vbdfs[{pid}]: {}: {}",
                    record.level(),
                    record.args()
                );
            }
            Sink::Held(held) => held
                .lock()
                .push((record.level(), record.args().to_string())),
            Sink::Discard => {}
        }
    }

    fn flush(&self) {}
}

/// The syslog priority prefix: facility daemon, the record's severity.
fn priority(record: &Record<'_>) -> String {
    let severity = match record.level() {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    };
    format!("<{}>", 3 * 8 + severity)
}

fn level_from_env(default: LevelFilter) -> LevelFilter {
    std::env::var("VBDFS_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The logger installed, if any.
static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();

fn install(sink: Sink, default: LevelFilter) {
    let level = level_from_env(default);
    if LOGGER.set(Logger { sink, level }).is_ok() {
        if let Some(logger) = LOGGER.get() {
            if log::set_logger(logger).is_ok() {
                log::set_max_level(level);
            }
        }
    }
}

/// Logs to stderr (foreground), or to `VBDFS_LOG_FILE` when set.
pub fn init_foreground() {
    install(file_sink().unwrap_or(Sink::Stderr), LevelFilter::Info);
}

/// For the commands other than `mount`: the engine's warnings (a compaction
/// that stopped early, space that could not be given back) are kept and
/// shown on stderr when the command succeeds ([`show_held`]), or appended
/// to `VBDFS_LOG_FILE` when set; `VBDFS_LOG` sets the level (default warn: a
/// command's own output says what it did).
pub fn init_command() {
    let held = Sink::Held(Mutex::new(Vec::new()));
    install(file_sink().unwrap_or(held), LevelFilter::Warn);
}

/// Shows on stderr what the engine logged during a command that succeeded,
/// one line each (`vbdfs: warning: …`). A command that failed shows only its
/// error: the engine's messages on the way there would repeat it.
pub fn show_held() {
    let Some(Logger {
        sink: Sink::Held(held),
        ..
    }) = LOGGER.get()
    else {
        return;
    };
    for (level, message) in held.lock().drain(..) {
        let level = level.as_str().to_lowercase();
        let message = crate::error::printable(&message);
        let _ = writeln!(std::io::stderr(), "vbdfs: {level}: {message}");
    }
}

/// Logs to `VBDFS_LOG_FILE` when set, else to syslog if `/dev/log` exists,
/// else warnings and errors (`VBDFS_LOG` sets the level) to the kernel's log
/// (`dmesg`; a log shared with the whole host: not the daemon's news).
pub fn init_daemon() {
    if let Some(sink) = file_sink() {
        return install(sink, LevelFilter::Info);
    }
    if let Ok(sock) = UnixDatagram::unbound() {
        if std::path::Path::new("/dev/log").exists() {
            return install(Sink::Syslog(sock), LevelFilter::Info);
        }
    }
    match std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        Ok(kmsg) => install(Sink::Kmsg(Mutex::new(kmsg)), LevelFilter::Warn),
        Err(_) => install(Sink::Discard, LevelFilter::Warn),
    }
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
