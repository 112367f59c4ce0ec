//! `cargo-rba`: lets `cargo rba build …` mean `rba build …`.
//!
//! Cargo runs an external subcommand `cargo rba ARGS` as `cargo-rba rba ARGS`. This binary
//! drops that extra `rba` and executes the `rba` binary installed beside it (`cargo install
//! rba-agent` puts both in the same directory), so there is one CLI, parsed in one place,
//! and `cargo rba` can never drift from `rba`. Outside that directory, `rba` on `PATH` is used.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|first| first == "rba") {
        args.remove(0);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("rba")))
        .filter(|rba| rba.is_file());
    let program = beside.map(OsString::from).unwrap_or_else(|| "rba".into());
    let error = Command::new(&program).args(&args).exec();
    eprintln!(
        "cargo-rba: error: cannot run {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(2)
}
