//! The commands' standard output. `println!` panics when standard output
//! cannot be written (a full disk, a closed pipe); [`say!`] returns the
//! error instead, for the caller's `?`.

use crate::{Error, Result};
use std::io::Write;

/// Writes one line to standard output, like `println!`: `say!("{x}")?`.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::output::line(::std::format_args!($($arg)*))
    };
}
pub(crate) use say;

/// One line to standard output. A reader that went away (`| head`) ends the
/// command quietly with the status of one killed by SIGPIPE (141), as other
/// tools end; any other failure is an error.
pub fn line(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => Err(Error::io("writing to standard output", e)),
    }
}
