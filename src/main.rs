//! The `vbdfs` command: parse the arguments, run the command, and turn an
//! error into one line `vbdfs: <message>` on stderr with a non-zero exit.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = vbdfs::cli::Cli::parse();
    match vbdfs::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vbdfs: {err}");
            ExitCode::FAILURE
        }
    }
}
