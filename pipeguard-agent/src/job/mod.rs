//! One command under enforcement: the engine behind `pipeguard exec`.
//!
//! Order matters: the programs are attached and the allowlist and pod entry are written
//! before the command is moved into the cgroup, so its first packet is already judged.

pub mod allowlist;
mod child;
pub mod confine;
pub mod preflight;
mod sink;
pub mod state;
mod summary;

use std::{path::PathBuf, time::Duration};

use pipeguard_common::{
    MODE_AUDIT, MODE_ENFORCE, POD_DENY_RAW_SOCKETS, PodEntry, VERDICT_AUDIT, VERDICT_DENY,
};

pub use self::{
    child::ExitReason,
    sink::EventSink,
    summary::{Destination, Summary},
};
use crate::{
    cgroup::OwnedCgroup,
    engine::{Engine, EngineConfig, PolicyEntries, UnknownPods, dns, events},
};

/// Jobs' cgroups live in this directory under the cgroup2 mount.
pub const JOB_CGROUP_PARENT: &str = "pipeguard";

/// The policy id `exec` writes its one allowlist under.
const JOB_POLICY_ID: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Deny what the policy does not allow.
    Enforce,
    /// Allow everything; report what enforce mode would deny.
    Audit,
}

pub struct JobSpec {
    pub command: Vec<String>,
    /// Its `ingress` half, when present, judges who may connect to the job's listeners.
    pub allowlist: PolicyEntries,
    pub mode: Mode,
    pub deny_raw_sockets: bool,
    /// A domain policy selects the job: its DNS queries are checked against `allowlist.names`.
    pub dns_filtered: bool,
    /// Keep every capability and a writable cgroupfs (`--privileged-job`).
    pub privileged: bool,
    pub cgroup_parent: PathBuf,
    /// bpffs directory under which the job pins its programs (see `state`).
    pub state_dir: PathBuf,
    pub events: EventSink,
    pub kernel_log_level: u8,
    /// Names under it may always be queried (`--cluster-domain`).
    pub cluster_domain: String,
    /// Learned addresses live at least this long (`--dns-min-ttl`).
    pub dns_min_ttl: Duration,
    /// Report allowed attempts too, so every destination has its processes (`--learn`).
    pub learn: bool,
    /// Anomaly detectors fed by the job's events and, at its end, its byte counts.
    pub detectors: crate::events::anomaly::Detectors,
}

pub struct JobOutcome {
    pub exit: ExitReason,
    /// Denied attempts (audited ones in audit mode), from the kernel counters.
    pub violations: u64,
    pub summary: Summary,
    /// The processes events named, per destination.
    pub processes: crate::learn::ProcessLog,
    pub anomalies: Vec<crate::events::anomaly::Anomaly>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("creating the job cgroup under {parent}: {source}")]
    Cgroup {
        parent: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the job's pin directory under {dir}: {source}")]
    State {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub fn run(spec: JobSpec) -> Result<JobOutcome, JobError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(spec))
}

async fn run_async(spec: JobSpec) -> Result<JobOutcome, JobError> {
    // Leftovers of jobs whose exec was killed: their processes go before anything else.
    for job in state::gc(&spec.state_dir, &spec.cgroup_parent).map_err(|source| JobError::State {
        dir: spec.state_dir.display().to_string(),
        source,
    })? {
        tracing::info!(job = %job.name, "collected the leftovers of a job whose pipeguard exec died");
    }
    let name = format!("exec-{}", std::process::id());
    // Pinned, so that if this process is killed, whatever the job left running stays
    // guarded until `pipeguard gc` (or the next exec) kills it. Dropped last: after the
    // cgroup and everything in it are gone.
    let state = state::JobState::create(&spec.state_dir, &name).map_err(|source| JobError::State {
        dir: spec.state_dir.display().to_string(),
        source,
    })?;
    let mut engine = Engine::load(&EngineConfig {
        unknown_pods: UnknownPods::Allow,
        flow_stats: true,
        report_allowed: spec.learn || spec.detectors.wants_allowed(),
        report_queries: spec.detectors.wants_query_reports(),
        // Names for the learned policy, whether or not the job has domain rules.
        learn_names: spec.learn,
        kernel_log_level: spec.kernel_log_level,
        pin_dir: Some(state.pin_dir().to_path_buf()),
        cluster_domain: spec.cluster_domain.clone(),
        dns_min_ttl: spec.dns_min_ttl,
        ..EngineConfig::default()
    })?;
    let cgroup = OwnedCgroup::create(&spec.cgroup_parent, &name).map_err(|source| JobError::Cgroup {
        parent: spec.cgroup_parent.display().to_string(),
        source,
    })?;
    let cgroup_id = cgroup.id()?;
    engine.put_policy(JOB_POLICY_ID, &spec.allowlist)?;
    engine.put_pod(
        cgroup_id,
        PodEntry {
            policy_id: JOB_POLICY_ID,
            mode: match spec.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            flags: if spec.deny_raw_sockets {
                POD_DENY_RAW_SOCKETS
            } else {
                0
            } | if spec.dns_filtered {
                pipeguard_common::POD_DNS_FILTERED
            } else {
                0
            } | if spec.allowlist.ingress.is_some() {
                pipeguard_common::POD_INGRESS_ISOLATED
            } else {
                0
            },
            ingress_policy_id: crate::engine::ingress_id(JOB_POLICY_ID),
            ..PodEntry::default()
        },
    )?;
    engine.attach(cgroup.path())?;

    let ring = engine.take_events()?;
    let clock = events::Clock::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let names = engine
        .name_texts()
        .inspect_err(|error| tracing::warn!(%error, "events will carry no dst_name"))
        .ok();
    let watch = sink::Watch::new(spec.detectors, names);
    let reader = tokio::spawn(sink::pump(ring, clock, spec.events, watch, stop_rx));

    // With the BPF LSM hook, the programs refuse raw and packet sockets and report each
    // refusal as an event. Without it, AF_PACKET would be open: take CAP_NET_RAW away
    // instead, which blocks both kinds but leaves no event behind. Never in audit mode,
    // which must change nothing about what the job can do.
    let unguarded_packets = engine.packet_guard_unavailable();
    let drop_net_raw = match (spec.deny_raw_sockets, spec.mode, unguarded_packets) {
        (true, Mode::Enforce, Some(reason)) => {
            tracing::warn!(
                %reason,
                "no BPF LSM hook: the job loses CAP_NET_RAW; raw and packet sockets are refused without events"
            );
            true
        }
        (true, Mode::Audit, Some(reason)) => {
            tracing::warn!(
                %reason,
                "no BPF LSM hook: in audit mode raw IP sockets are reported, packet sockets are not"
            );
            false
        }
        _ => false,
    };
    let confinement = if spec.privileged {
        tracing::warn!("{}", confine::privileged_warning());
        confine::Confinement::privileged()
    } else {
        confine::Confinement::default_for_job(drop_net_raw)?
    };
    let mut swept_names = std::collections::HashMap::new();
    let exit = {
        let child = child::run(&spec.command, &cgroup, confinement);
        tokio::pin!(child);
        // A long job resolving many names: expired entries go while it runs, their names
        // kept first for the summary and the learned policy.
        let mut sweep = tokio::time::interval_at(
            tokio::time::Instant::now() + dns::SWEEP_INTERVAL,
            dns::SWEEP_INTERVAL,
        );
        loop {
            tokio::select! {
                exit = &mut child => break exit?,
                _ = sweep.tick() => {
                    keep_learned_names(&engine, &mut swept_names);
                    engine.sweep_dns_logged();
                }
            }
        }
    };

    // Let the last packets' events land, then stop the reader; it drains before it exits.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stop_tx.send(true);
    let (delivered, mut watch, mut sink) =
        reader.await.map_err(|e| std::io::Error::other(e.to_string()))??;
    engine.drain_kernel_logs();

    let counters = engine.counters(cgroup_id)?;
    let violations = counters
        .iter()
        .filter(|(k, _)| k.verdict == VERDICT_DENY || k.verdict == VERDICT_AUDIT)
        .map(|(_, c)| c.packets)
        .sum();
    let mut summary = Summary::new(
        engine.flows(cgroup_id)?,
        &counters,
        delivered,
        engine.event_drops()?,
    );
    // Names next to addresses: what events named, then what the kernel learned (kept at
    // each sweep, and what is still there), the later winning.
    let mut names = watch.dns.names.clone();
    names.extend(swept_names);
    keep_learned_names(&engine, &mut names);
    summary.add_names(names, watch.dns.queries.clone());
    // Bytes per destination are known from the flow table: upload_volume is judged on the
    // job's totals once it has finished.
    for (dest, counter) in summary.allowed.iter().chain(&summary.audited) {
        let key = (dest.ip, dest.port, dest.protocol.clone());
        if let Some(anomaly) = watch.detectors.on_bytes(cgroup_id, &key, counter.bytes) {
            watch.raise(anomaly, &mut sink)?;
        }
    }
    drop(cgroup);
    drop(engine);
    drop(state);
    Ok(JobOutcome {
        exit,
        violations,
        summary,
        processes: watch.processes,
        anomalies: watch.anomalies,
    })
}

/// Adds what the kernel learned (names of the job's destinations) to `names`.
fn keep_learned_names(engine: &Engine, names: &mut std::collections::HashMap<std::net::IpAddr, String>) {
    match engine.learned_names(JOB_POLICY_ID) {
        Ok(learned) => names.extend(learned),
        Err(error) => tracing::warn!(%error, "reading the learned names"),
    }
}
