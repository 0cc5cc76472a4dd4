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
//! And the agent's own cost on a busy node: many pods, a flood, many subscribers
//! (`control_plane/agent_load.rs`); and at control-plane scale: a 50,000-pod cluster with
//! 5,000 NetworkPolicies, churn at 100 creations/s (`control_plane/scale.rs`).
//!
//! `--only SECTION` runs one part: library, agent, events, agent-load, scale.
//!
//! Timings are reported, never asserted. Markdown goes to stdout, every figure to --json.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "control_plane/agent.rs"]
mod agent;
#[path = "control_plane/agent_load.rs"]
mod agent_load;
#[path = "control_plane/events.rs"]
mod events;
#[path = "control_plane/library.rs"]
mod library;
#[path = "control_plane/report.rs"]
mod report;
#[path = "control_plane/scale.rs"]
mod scale;

use std::{path::PathBuf, process::ExitCode};

use report::Report;

/// A section's name for `--only`, and what runs it.
type Section = (&'static str, fn(bool, &mut Report));

fn main() -> ExitCode {
    if let Ok(target) = std::env::var(agent::PROBER_ENV) {
        agent::prober(&target);
    }
    if std::env::var_os(common::probe::ACTIONS_ENV).is_some() {
        // Re-executed as the kernel tests' probe (run_probe), inside a pod cgroup.
        common::probe::main();
        return ExitCode::SUCCESS;
    }
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut json: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = args.next().map(PathBuf::from),
            "--only" => only = args.next(),
            // `cargo bench` passes --bench; filters do not apply to this harness.
            _ => {}
        }
    }
    common::require_kernel();
    let mut report = Report::default();
    let sections: [Section; 5] = [
        ("library", library::run),
        ("agent", agent::run),
        ("events", events::run),
        ("agent-load", agent_load::run),
        ("scale", scale::run),
    ];
    if let Some(name) = &only
        && !sections.iter().any(|(s, _)| s == name)
    {
        eprintln!("control_plane: no section {name:?}");
        return ExitCode::FAILURE;
    }
    for (name, run) in sections {
        if only.as_deref().is_none_or(|o| o == name) {
            run(quick, &mut report);
        }
    }
    print!("{}", report.markdown());
    if let Some(path) = json
        && let Err(error) = std::fs::write(&path, report.json())
    {
        eprintln!("control_plane: writing {}: {error}", path.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
