//! The `vbdfs` command: parse the arguments, run the command, and turn an
//! error into one line `vbdfs: <message>` on stderr with a non-zero exit.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

fn main() -> ExitCode {
    if let Err(e) = vbdfs::sys::ignore_file_size_signal() {
        eprintln!("vbdfs: warning: SIGXFSZ not ignored: {e}");
    }
    let cli = match vbdfs::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    match vbdfs::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vbdfs: {}", vbdfs::error::printable(&err.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap renders them; a usage mistake becomes
/// one line, `vbdfs: <what is wrong>; usage: <the command's usage>`, exit 2.
fn usage_error(err: &clap::Error) -> ExitCode {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        err.exit();
    }
    eprintln!("vbdfs: {}", one_line(&err.render().to_string()));
    ExitCode::from(2)
}

/// clap's message (after `error: `, its lines joined) and its usage line.
fn one_line(rendered: &str) -> String {
    let (message, rest) = rendered.split_once("\n\n").unwrap_or((rendered, ""));
    let message = message.trim_start_matches("error: ");
    let mut line = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(usage) = rest.lines().find_map(|l| l.strip_prefix("Usage: ")) {
        line.push_str("; usage: ");
        line.push_str(usage.trim());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  \
                        <IMAGE>\n\nUsage: vbdfs create <IMAGE>\n\nFor more information, \
                        try '--help'.\n";
        assert_eq!(
            one_line(rendered),
            "the following required arguments were not provided: <IMAGE>; \
             usage: vbdfs create <IMAGE>"
        );
        assert_eq!(one_line("error: bad\n"), "bad");
    }
}
