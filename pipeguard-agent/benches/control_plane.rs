//! Control-plane benchmark; `cargo xtask bench` runs it (root and cgroup2 needed).
//!
//! In process, through the library: YAML parse, compile (selection and LPM entries) and the
//! map sync of 1k/10k/100k CIDRs, each timed on its own; then the same allowlist changed in
//! place by one CIDR (incremental) and with every CIDR replaced (full rebuild).
//!
//! End to end, through the real `pipeguard agent` binary against a list/watch server: policy
//! change → enforcement, from the moment the server has emitted the watch event until a
//! prober inside the pod's cgroup sees its verdict flip, and the agent's memory.
//!
//! And the event reader's ceiling in user space: decode and aggregate per record.
//!
//! Timings are reported, never asserted. Markdown goes to stdout, every figure to --json.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "control_plane/agent.rs"]
mod agent;
#[path = "control_plane/events.rs"]
mod events;
#[path = "control_plane/library.rs"]
mod library;
#[path = "control_plane/report.rs"]
mod report;

use std::{path::PathBuf, process::ExitCode};

use report::Report;

fn main() -> ExitCode {
    if let Ok(target) = std::env::var(agent::PROBER_ENV) {
        agent::prober(&target);
    }
    let mut quick = false;
    let mut json: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = args.next().map(PathBuf::from),
            // `cargo bench` passes --bench; filters do not apply to this harness.
            _ => {}
        }
    }
    common::require_kernel();
    let mut report = Report::default();
    library::run(quick, &mut report);
    agent::run(quick, &mut report);
    events::run(quick, &mut report);
    print!("{}", report.markdown());
    if let Some(path) = json
        && let Err(error) = std::fs::write(&path, report.json())
    {
        eprintln!("control_plane: writing {}: {error}", path.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
