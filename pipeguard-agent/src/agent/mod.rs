//! `pipeguard agent`: the DaemonSet. Watches the cluster, finds this node's pod cgroups,
//! and keeps the kernel maps equal to what the NetworkPolicies allow.
//!
//! Order at start, one step each in [`start`]: HTTP (so probes can say why it is not
//! ready), programs loaded and attached to the kubepods cgroups, caches synced, the event
//! pipeline; then [`sync_loop`] keeps the maps in step. Ready after the first good sync.

mod affected;
mod api_limits;
pub mod bypass;
mod cgroup_watch;
pub mod desired;
mod domain_objects;
mod guard;
pub mod http;
mod ingress_desired;
mod json_text;
mod kube;
mod kube_domains;
pub mod listener;
pub mod metrics;
pub mod node_addresses;
mod pod_cgroups;
mod pod_info;
pub mod raw_policy;
mod readiness;
pub mod snapshot;
mod start;
pub mod suggest_http;
pub mod sync;
mod sync_loop;
mod triggers;
mod watch_events;
mod workflow_pod;
mod world;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use self::{
    desired::{LocalPod, Settings, Status},
    guard::{GuardConfig, RUNNER_LABELS, parse_selector},
    http::Health,
};
use crate::{engine::UnknownPods, job::Mode};

pub struct AgentConfig {
    pub node_name: String,
    pub cgroup_root: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub listen: SocketAddr,
    pub settings: Settings,
    pub unknown_pods: UnknownPods,
    /// Not ready (and saying why) if the caches have not synced by then.
    pub sync_deadline: Duration,
    /// Not ready (and saying why) while a watch has been failing for longer than this.
    pub watch_failure_bound: Duration,
    pub kernel_log_level: u8,
    /// Names under it may always be queried by DNS-filtered pods (`--cluster-domain`).
    pub cluster_domain: String,
    /// Learned addresses live at least this long (`--dns-min-ttl`).
    pub dns_min_ttl: Duration,
    /// Where links and maps are pinned, so enforcement survives the agent.
    pub pin_dir: Option<PathBuf>,
    pub events: EventsConfig,
    /// Record each workload's runs and compare new ones with them (`--baseline`).
    pub baseline: Option<crate::baseline::recorder::RecorderConfig>,
}

/// Where violation records go (several at once).
#[derive(Clone, Debug, Default)]
pub struct EventsConfig {
    pub stdout: bool,
    pub file: Option<PathBuf>,
    pub file_max_bytes: u64,
    pub file_keep: usize,
    /// Bearer token for `GET /v1/events`; without one the endpoint is only on for loopback.
    pub token: Option<Vec<u8>>,
    /// Kubernetes Events on the pod.
    pub kubernetes: bool,
    /// Count denied attempts per destination in metrics (one series per destination).
    pub per_destination_metrics: bool,
    /// Anomaly signals and their thresholds (`--anomaly`).
    pub anomalies: crate::events::anomaly::AnomalyConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("finding the cgroup2 mount: {0}")]
    CgroupRoot(String),
    #[error(transparent)]
    Kube(#[from] kube::KubeError),
    #[error("adopting pinned state: {0}")]
    Adopt(#[source] crate::engine::EngineError),
    #[error("watching cgroups: {0}")]
    Watch(#[source] std::io::Error),
}

pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let (health, hub) = start::http(&config).await?;
    let root = start::cgroup_root(&config)?;
    let mut engine = start::load_engine(&config, &health).await;
    let attached = start::attach_kubepods(&mut engine, &root, &health).await;
    tracing::info!(cgroups = ?attached, "programs attached");
    let (client, caches) = start::caches(&config, &root, &health).await?;
    let events = start::event_pipeline(&config, &mut engine, &client, &health, &hub);
    start::live_metrics(&engine, &health, &hub, &events);
    start::baseline(&config, &engine, &client, &health, &events);
    sync_loop::run(sync_loop::Parts {
        config: &config,
        caches: &caches,
        root: &root,
        engine: &mut engine,
        health: &health,
        events,
        client,
    })
    .await
}

/// The defaults the CLI documents, in one place for tests.
pub fn default_settings() -> Settings {
    Settings {
        guard: GuardConfig {
            runner_labels: true,
            ..GuardConfig::default()
        },
        default_deny_egress: false,
        default_deny_ingress: false,
        // Tests run without a node: nothing is admitted implicitly.
        ingress_from_node: Vec::new(),
        mode: Mode::Enforce,
        refuse_privileged: false,
    }
}
