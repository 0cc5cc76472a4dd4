//! Learning a job's egress: `exec --learn`/`--learn-json` observe one run, `suggest` merges
//! runs into a baseline, and the Markdown summary shows a run to people.

pub mod markdown;
pub mod observe;
pub mod render;
pub mod suggest;

pub use self::observe::{Observed, ProcessLog, RUN_FORMAT, Run};

/// The name of learned and suggested policies.
pub const POLICY_NAME: &str = "pipeguard-learned";

/// The policy that allows exactly what one run reached (allowed, or audited in audit mode).
/// Refused destinations are left out and listed in the header.
pub fn learned_policy(run: &Run) -> String {
    let mut header = vec![
        format!(
            "Learned by pipeguard exec --learn from one run ({} mode, finished {}) of: {}",
            run.mode,
            run.finished,
            run.command.join(" ")
        ),
        "Each peer says what the job sent there. Review it, then enforce it with --policy.".into(),
    ];
    let entries: Vec<render::Entry> = run
        .destinations
        .iter()
        .filter(|o| o.reached())
        .map(|o| render::Entry {
            observed: o.clone(),
            runs: None,
        })
        .collect();
    for refused in run.destinations.iter().filter(|o| !o.reached()) {
        header.push(format!(
            "left out, refused in enforce mode: {}:{}/{} ({} attempts)",
            refused.ip, refused.port, refused.protocol, refused.packets
        ));
    }
    let target = render::Target {
        name: POLICY_NAME,
        namespace: &run.namespace,
        labels: &run.labels,
    };
    render::policies(&target, &header, &entries)
}
