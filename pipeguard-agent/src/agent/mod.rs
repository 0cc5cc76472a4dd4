//! `pipeguard agent`: the DaemonSet. Watches the cluster, finds this node's pod cgroups,
//! and keeps the kernel maps equal to what the NetworkPolicies allow.
//!
//! Order at start: HTTP (so probes can say why it is not ready), programs loaded and
//! attached to the kubepods cgroups, caches synced, then the first sync. Only then ready.

mod cgroup_watch;
pub mod desired;
mod guard;
pub mod http;
mod kube;
pub mod metrics;
mod pod_cgroups;
pub mod snapshot;
pub mod sync;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

pub use self::{
    desired::{LocalPod, Settings, Status},
    guard::{GuardConfig, RUNNER_LABELS, parse_selector},
    http::Health,
};
use crate::{
    engine::{Engine, EngineConfig, PolicyEntries, UnknownPods},
    job::Mode,
};

pub struct AgentConfig {
    pub node_name: String,
    pub cgroup_root: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub listen: SocketAddr,
    pub settings: Settings,
    pub unknown_pods: UnknownPods,
    /// Not ready (and saying why) if the caches have not synced by then.
    pub sync_deadline: Duration,
    pub kernel_log_level: u8,
    /// Where links and maps are pinned, so enforcement survives the agent.
    pub pin_dir: Option<PathBuf>,
    pub events: EventsConfig,
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

/// How often counters and cgroups are re-read even without a change notification.
const RESYNC: Duration = Duration::from_secs(10);

pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let mut health = Health::default();
    if config.events.per_destination_metrics {
        health.metrics.enable_per_destination();
    }
    let health = Arc::new(health);
    health.set_not_ready("starting");
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(listen = %config.listen, node = %config.node_name, "pipeguard agent starting");
    let hub = Arc::new(crate::events::hub::Hub::default());
    let access = crate::events::stream::Access::new(config.events.token.clone(), config.listen);
    if matches!(access, crate::events::stream::Access::Off) {
        tracing::info!("GET /v1/events is off: no --events-token-file and the listener is not loopback");
    }
    let stream = crate::events::stream::StreamState {
        hub: hub.clone(),
        access,
    };
    tokio::spawn(http::serve(listener, health.clone(), Some(stream)));

    let root = match &config.cgroup_root {
        Some(root) => root.clone(),
        None => crate::cgroup::cgroup2_mount()
            .map_err(|e| AgentError::CgroupRoot(e.to_string()))?
            .ok_or_else(|| AgentError::CgroupRoot("no cgroup2 mount in /proc/self/mountinfo".into()))?,
    };
    let mut engine = loop {
        match Engine::load(&EngineConfig {
            unknown_pods: config.unknown_pods,
            flow_stats: false,
            kernel_log_level: config.kernel_log_level,
            pin_dir: config.pin_dir.clone(),
        }) {
            Ok(engine) => break engine,
            // Not ready and saying why beats a crash loop; retry in case it was transient.
            Err(error) => {
                health.set_not_ready(format!("cannot load the eBPF programs: {error}"));
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    };
    let attached = attach_kubepods(&mut engine, &root, &health).await;
    tracing::info!(cgroups = ?attached, "programs attached");

    let client = kube::client(config.kubeconfig.as_deref()).await?;
    let caches = kube::start(client.clone());
    cgroup_watch::start(root.clone(), caches.changed.clone()).map_err(AgentError::Watch)?;
    tokio::select! {
        _ = caches.ready() => {}
        _ = tokio::time::sleep(config.sync_deadline) => {
            health.set_not_ready(format!("caches not synced with the API server after {:?}", config.sync_deadline));
            caches.ready().await;
        }
    }
    tracing::info!("caches synced");

    let pod_index = crate::events::pipeline::PodIndex::default();
    let event_stats = Arc::new(crate::events::pipeline::Stats::default());
    match engine.take_events() {
        Ok(ring) => {
            let file = match &config.events.file {
                Some(path) => match crate::events::sinks::FileSink::open(
                    path.clone(),
                    config.events.file_max_bytes,
                    config.events.file_keep,
                ) {
                    Ok(f) => Some(f),
                    Err(error) => {
                        tracing::error!(path = %path.display(), %error, "cannot open the events file");
                        None
                    }
                },
                None => None,
            };
            let kube = config.events.kubernetes.then(|| {
                crate::events::kube_events::KubeEvents::start(
                    client.clone(),
                    config.node_name.clone(),
                    health.metrics.event_sink_errors.clone(),
                )
            });
            let pipeline = crate::events::pipeline::Pipeline {
                node: config.node_name.clone(),
                index: pod_index.clone(),
                hub: hub.clone(),
                stdout: config.events.stdout,
                file,
                kube,
                drops: engine.take_event_drops().ok(),
                stats: event_stats.clone(),
                per_destination: config
                    .events
                    .per_destination_metrics
                    .then(|| health.metrics.denied_destinations.clone()),
                aggregator: crate::events::aggregate::Aggregator::new(
                    crate::events::pipeline::WINDOW,
                    crate::events::pipeline::MAX_KEYS,
                ),
            };
            tokio::spawn(pipeline.run(ring));
        }
        Err(error) => tracing::error!(%error, "no event stream"),
    }
    // Pinned state from a previous agent is adopted, not overwritten: its allowlists are
    // replaced in the hole-free order and its stale ids deleted.
    let applied = match sync::Applied::adopt(&engine) {
        Ok(applied) => applied,
        Err(error) => {
            health.set_not_ready(format!("cannot read the pinned maps: {error}"));
            return Err(AgentError::Adopt(error));
        }
    };
    let mut state = Loop {
        applied,
        parsed: Default::default(),
        last_good: HashMap::new(),
        reported: Default::default(),
        failing_closed: Default::default(),
        client: config.events.kubernetes.then(|| client.clone()),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Watch)?;
    loop {
        let start = std::time::Instant::now();
        match state.sync(&config, &caches, &root, &mut engine, &pod_index, &health) {
            Ok(stats) => {
                health.set_ready();
                if stats != sync::SyncStats::default() {
                    // The replaced allowlist and the sync's temporaries (all freed by now)
                    // would otherwise stay in the allocator, several times the live size.
                    crate::memory::release_freed();
                }
            }
            Err(error) => {
                health.metrics.sync_errors.inc();
                health.set_not_ready(format!("writing the kernel maps failed: {error}"));
            }
        }
        health.metrics.sync_seconds.observe(start.elapsed().as_secs_f64());
        health.metrics.observe_events(&event_stats, &hub);
        engine.drain_kernel_logs();
        tokio::select! {
            _ = caches.changed.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: detaching and exiting");
                return Ok(());
            }
        }
    }
}

/// Attaches to every kubepods cgroup, waiting (not ready) until kubelet has created one.
async fn attach_kubepods(engine: &mut Engine, root: &std::path::Path, health: &Health) -> Vec<PathBuf> {
    loop {
        let roots = pod_cgroups::kubepods_roots(root);
        if roots.is_empty() {
            health.set_not_ready(format!("no kubepods cgroup under {} yet", root.display()));
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let mut attached = Vec::new();
        for r in roots {
            match engine.attach(&r) {
                Ok(()) => attached.push(r),
                Err(error) => health.set_not_ready(format!("cannot attach programs: {error}")),
            }
        }
        if !attached.is_empty() {
            return attached;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

struct Loop {
    applied: sync::Applied,
    parsed: snapshot::PolicyCache,
    /// Last applied allowlist per pod UID, for fail-closed.
    last_good: HashMap<String, std::sync::Arc<PolicyEntries>>,
    /// Policy errors already logged, so each is logged once.
    reported: std::collections::HashSet<String>,
    /// Pods currently failing closed (UIDs), reported when they start to.
    failing_closed: std::collections::HashSet<String>,
    /// For Kubernetes Events; `None` with --no-kube-events.
    client: Option<::kube::Client>,
}

impl Loop {
    fn sync(
        &mut self,
        config: &AgentConfig,
        caches: &kube::Caches,
        root: &std::path::Path,
        engine: &mut Engine,
        index: &crate::events::pipeline::PodIndex,
        health: &Health,
    ) -> Result<sync::SyncStats, crate::engine::EngineError> {
        let policy_objects = caches.policies.state();
        let policies = self.parsed.policies(&policy_objects);
        self.report_policies(&policy_objects, &policies, health);
        let pods = caches.pods.state();
        let cluster = snapshot::cluster(&caches.namespaces.state(), &pods);
        let scheduled = snapshot::local_pods(&pods, &config.node_name);
        let cgroups = match pod_cgroups::scan(root) {
            Ok(cgroups) => cgroups,
            Err(error) => {
                // An empty scan would delete every pod entry, and with `--unknown-pods allow`
                // open guarded pods. Keep the maps as they are; the next event or the
                // periodic resync scans again.
                tracing::warn!(%error, "scanning pod cgroups failed; kernel state kept as is");
                return Ok(sync::SyncStats::default());
            }
        };
        let mut local = Vec::new();
        for cg in cgroups {
            let Some((namespace, name, labels)) = scheduled.get(&cg.uid) else {
                continue;
            };
            let Ok(cgroup_id) = crate::cgroup::cgroup_id(&cg.path) else {
                continue;
            };
            local.push(LocalPod {
                uid: cg.uid.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                labels: labels.clone(),
                cgroup_id,
            });
        }
        let desired = desired::compute(&config.settings, &policies, &cluster, &local, &self.last_good);
        let stats = self.applied.apply(engine, &desired)?;
        if stats != sync::SyncStats::default() {
            tracing::info!(?stats, pods = desired.len(), "synced");
        }
        let mut by_status: HashMap<&'static str, i64> = HashMap::new();
        for d in &desired {
            let status = match &d.status {
                Status::NotGuarded => "not_guarded",
                Status::Unrestricted => "unrestricted",
                Status::Enforced(_) => "enforced",
                Status::DefaultDeny => "default_deny",
                Status::FailedClosed {
                    reason,
                    kept_last_good,
                } => {
                    // Logged and posted on the pod once per episode, not on every sync.
                    if self.failing_closed.insert(d.pod.uid.clone()) {
                        tracing::warn!(namespace = %d.pod.namespace, pod = %d.pod.name, %reason, kept_last_good, "failing closed");
                        if let Some(client) = &self.client {
                            crate::events::kube_events::post_failed_closed(
                                client.clone(),
                                &d.pod,
                                reason,
                                *kept_last_good,
                                &config.node_name,
                            );
                        }
                    }
                    "failed_closed"
                }
            };
            *by_status.entry(status).or_default() += 1;
            if status != "failed_closed" {
                self.failing_closed.remove(&d.pod.uid);
            }
            if matches!(
                d.status,
                Status::Enforced(_) | Status::DefaultDeny | Status::Unrestricted
            ) && let Some(applied) = self.applied.allowlist_of(d.pod.cgroup_id)
            {
                // Shared with the applied state, not a copy.
                self.last_good.insert(d.pod.uid.clone(), applied);
            }
            self.observe_traffic(engine, d, health);
        }
        let present: std::collections::HashSet<&str> = desired.iter().map(|d| d.pod.uid.as_str()).collect();
        self.last_good.retain(|uid, _| present.contains(uid.as_str()));
        for status in [
            "not_guarded",
            "unrestricted",
            "enforced",
            "default_deny",
            "failed_closed",
        ] {
            health
                .metrics
                .pods
                .get_or_create(&metrics::StateLabels { state: status.into() })
                .set(*by_status.get(status).unwrap_or(&0));
        }
        health.metrics.allowlists.set(self.applied.policy_count() as i64);
        let (v4, v6, pod_entries) = self.applied.map_entries();
        for (map, n) in [("allow_v4", v4), ("allow_v6", v6), ("pods", pod_entries)] {
            health
                .metrics
                .map_entries
                .get_or_create(&metrics::MapLabels { map: map.into() })
                .set(n as i64);
        }
        health
            .metrics
            .allow_entries
            .set(self.applied.entry_count() as i64);
        index.replace(
            desired
                .iter()
                .map(|d| (d.pod.cgroup_id, pod_info(d, &pods, root)))
                .collect(),
        );
        Ok(stats)
    }

    fn report_policies(
        &mut self,
        objects: &[Arc<k8s_openapi::api::networking::v1::NetworkPolicy>],
        set: &crate::policy::PolicySet,
        health: &Health,
    ) {
        for error in &set.errors {
            let text = error.to_string();
            if self.reported.insert(text.clone()) {
                tracing::error!(error = %text, "NetworkPolicy rejected; guarded pods in its namespace fail closed");
            }
        }
        health.metrics.policy_compiled.clear();
        for obj in objects {
            let namespace = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            let ok = set
                .policies
                .iter()
                .any(|p| p.namespace == namespace && p.name == name);
            health
                .metrics
                .policy_compiled
                .get_or_create(&metrics::PolicyLabels { namespace, name })
                .set(ok as i64);
        }
        let failed = set.errors.len() as i64;
        health
            .metrics
            .policies
            .get_or_create(&metrics::StateLabels {
                state: "compiled".into(),
            })
            .set(set.policies.len() as i64);
        health
            .metrics
            .policies
            .get_or_create(&metrics::StateLabels {
                state: "failed".into(),
            })
            .set(failed);
    }

    fn observe_traffic(&self, engine: &Engine, d: &desired::DesiredPod, health: &Health) {
        let Ok(counters) = engine.counters(d.pod.cgroup_id) else {
            return;
        };
        let mut totals: HashMap<u8, (u64, u64)> = HashMap::new();
        for (key, c) in counters {
            let t = totals.entry(key.verdict).or_default();
            t.0 += c.packets;
            t.1 += c.bytes;
        }
        for (verdict, (packets, bytes)) in totals {
            let verdict = match verdict {
                pipeguard_common::VERDICT_ALLOW => "allow",
                pipeguard_common::VERDICT_DENY => "deny",
                pipeguard_common::VERDICT_AUDIT => "audit",
                _ => "error",
            };
            let labels = metrics::TrafficLabels {
                namespace: d.pod.namespace.clone(),
                pod: d.pod.name.clone(),
                verdict: verdict.into(),
            };
            health.metrics.observe_traffic(labels, packets, bytes);
        }
    }
}

/// What the event pipeline needs to know about a pod to enrich its records.
fn pod_info(
    d: &desired::DesiredPod,
    pods: &[Arc<k8s_openapi::api::core::v1::Pod>],
    root: &std::path::Path,
) -> crate::events::pipeline::PodInfo {
    let pod = pods
        .iter()
        .find(|p| p.metadata.uid.as_deref() == Some(d.pod.uid.as_str()));
    let (policies, restriction) = match &d.status {
        Status::Enforced(policies) => (policies.clone(), None),
        Status::DefaultDeny => (
            Vec::new(),
            Some("no egress policy selects the pod and --default-deny-egress is set".into()),
        ),
        Status::FailedClosed {
            reason,
            kept_last_good,
        } => (
            Vec::new(),
            Some(format!(
                "failing closed ({reason}); {}",
                if *kept_last_good {
                    "the last good allowlist applies"
                } else {
                    "all egress is denied"
                }
            )),
        ),
        Status::Unrestricted | Status::NotGuarded => (Vec::new(), None),
    };
    crate::events::pipeline::PodInfo {
        namespace: d.pod.namespace.clone(),
        name: d.pod.name.clone(),
        uid: d.pod.uid.clone(),
        labels: d.pod.labels.clone(),
        annotations: pod
            .and_then(|p| p.metadata.annotations.clone())
            .unwrap_or_default(),
        policies,
        restriction,
        containers: pod
            .map(|p| snapshot::container_cgroups(p, &d.pod.uid, root))
            .unwrap_or_default(),
    }
}

/// The defaults the CLI documents, in one place for tests.
pub fn default_settings() -> Settings {
    Settings {
        guard: GuardConfig {
            runner_labels: true,
            ..GuardConfig::default()
        },
        default_deny_egress: false,
        mode: Mode::Enforce,
    }
}
