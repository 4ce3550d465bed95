//! The one error type of the crate, and the one place it becomes an errno.
//!
//! Every layer returns [`Error`]. Its [`ErrorKind`] is small and matchable; the
//! message carries the context (which file, which block, which value) and the
//! source `io::Error` when there is one. [`Error::errno`] is the only mapping to
//! errno values, used by the FUSE front end and the control file.

use std::fmt;
use std::io;

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host file system failed (read, write, sync, lock).
    Io,
    /// The host file system is full.
    NoSpace,
    /// The image file is damaged: a checksum, magic, bound or cross-check failed.
    Corrupt,
    /// A caller passed a bad value (size, option, name, offset).
    Invalid,
    /// The image is held by another process (mounted or open elsewhere).
    Locked,
    /// An earlier write or sync of the host file failed; the image refuses
    /// further writes until it is reopened.
    Failed,
    /// The image or file is read-only.
    ReadOnly,
    /// The named thing already exists.
    Exists,
    /// The named thing does not exist.
    NotFound,
    /// The thing is in use.
    Busy,
    /// The file uses a feature or version this build does not know.
    Unsupported,
}

/// The crate's error: a kind, a human message with context, and maybe a source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
    /// For [`ErrorKind::Failed`]: the kind of the error that failed the image.
    cause: Option<ErrorKind>,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message that names what and where.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
            cause: None,
        }
    }

    /// A host I/O error with context; ENOSPC/EDQUOT become [`ErrorKind::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ if source.kind() == io::ErrorKind::StorageFull => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            message: context.into(),
            source: Some(source),
            cause: None,
        }
    }

    /// The image refuses writes since an earlier error of kind `cause`.
    pub fn failed(message: impl Into<String>, cause: ErrorKind) -> Self {
        Error {
            cause: Some(cause),
            ..Self::new(ErrorKind::Failed, message)
        }
    }

    /// A damaged-file error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// A bad-argument error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// The kind, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The same error with more context in front: `"{context}: {message}"`.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The errno that stands for this error at the FUSE edge and the control file.
    /// An image failed by a full host disk gives ENOSPC, as a raw file on
    /// that disk would (QEMU's default `werror=enospc` then pauses the guest).
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Failed if self.cause == Some(ErrorKind::NoSpace) => libc::ENOSPC,
            ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::Failed => libc::EIO,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::Locked | ErrorKind::Busy => libc::EBUSY,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {}", self.message, source),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): an error
/// stays one line even when it quotes a name read from a file or a command.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table() {
        let cases = [
            (ErrorKind::Io, libc::EIO),
            (ErrorKind::Corrupt, libc::EIO),
            (ErrorKind::Failed, libc::EIO),
            (ErrorKind::NoSpace, libc::ENOSPC),
            (ErrorKind::Invalid, libc::EINVAL),
            (ErrorKind::Locked, libc::EBUSY),
            (ErrorKind::ReadOnly, libc::EROFS),
            (ErrorKind::Exists, libc::EEXIST),
            (ErrorKind::NotFound, libc::ENOENT),
        ];
        for (kind, errno) in cases {
            assert_eq!(Error::new(kind, "x").errno(), errno, "{kind:?}");
        }
        assert_eq!(Error::failed("x", ErrorKind::NoSpace).errno(), libc::ENOSPC);
        assert_eq!(Error::failed("x", ErrorKind::Io).errno(), libc::EIO);
    }

    #[test]
    fn enospc_is_no_space() {
        let e = Error::io("write img", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(e.to_string().starts_with("write img: "));
    }

    #[test]
    fn errors_stay_one_line() {
        assert_eq!(
            printable("a.qcow2: backing file x\nvbdfs: forged\u{1b}[2J: gone"),
            "a.qcow2: backing file x\\nvbdfs: forged\\u{1b}[2J: gone"
        );
        assert_eq!(printable("plain – text ✓"), "plain – text ✓");
    }
}
