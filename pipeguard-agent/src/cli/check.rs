//! `pipeguard check`: offline NetworkPolicy evaluation. (Being written.)

use std::process::ExitCode;

/// Evaluate NetworkPolicy manifests offline.
#[derive(clap::Args)]
pub struct CheckArgs {}

pub fn run(_args: CheckArgs) -> ExitCode {
    eprintln!("pipeguard check: not implemented yet");
    ExitCode::from(2)
}
