//! The `vbdfs` command (the command line is being built in src/cli/).
fn main() {
    eprintln!("vbdfs: the command line is not built yet");
    std::process::exit(2);
}
