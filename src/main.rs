//! The `vbdfs` command: parse the arguments, run the command, and turn an
//! error into one line `vbdfs: <message>` on stderr with a non-zero exit.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

fn main() -> ExitCode {
    let cli = match vbdfs::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    match vbdfs::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vbdfs: {}", printable(&err.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): an error
/// stays one line even when it quotes a name read from a file.
fn printable(text: &str) -> String {
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
    fn errors_stay_one_line() {
        assert_eq!(
            super::printable("a.qcow2: backing file x\nvbdfs: forged\u{1b}[2J: gone"),
            "a.qcow2: backing file x\\nvbdfs: forged\\u{1b}[2J: gone"
        );
        assert_eq!(super::printable("plain – text ✓"), "plain – text ✓");
    }

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
