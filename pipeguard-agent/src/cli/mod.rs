//! The `pipeguard` command line: one module per subcommand.

pub mod agent;
pub mod check;
pub mod dns_flags;
pub mod events;
pub mod exec;
pub mod gc;
pub mod suggest;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pipeguard",
    version,
    about = "Kernel-enforced egress control for CI jobs"
)]
pub struct Cli {
    /// Log filter for pipeguard and its kernel programs (tracing EnvFilter syntax).
    #[arg(long, global = true, default_value = "info", env = "PIPEGUARD_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    Exec(exec::ExecArgs),
    Agent(agent::AgentArgs),
    Events(events::EventsArgs),
    Check(check::CheckArgs),
    Gc(gc::GcArgs),
    Suggest(suggest::SuggestArgs),
}

/// Logs go to stderr; stdout belongs to the guarded job.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
