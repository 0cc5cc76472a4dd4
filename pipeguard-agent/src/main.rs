use std::process::ExitCode;

use clap::Parser;
use pipeguard::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    pipeguard::cli::init_logging(&cli.log_level);
    match cli.command {
        Command::Exec(args) => pipeguard::cli::exec::run(args),
        Command::Check(args) => pipeguard::cli::check::run(args),
        Command::Agent(args) => pipeguard::cli::agent::run(args),
        Command::Events(args) => pipeguard::cli::events::run(args),
        Command::Gc(args) => pipeguard::cli::gc::run(args),
        Command::Suggest(args) => pipeguard::cli::suggest::run(args),
    }
}
