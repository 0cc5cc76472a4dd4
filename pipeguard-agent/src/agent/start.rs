//! The start-up steps of `pipeguard agent`, in the order `run` takes them.

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::{
    AgentConfig, AgentError, Health, cgroup_watch, http, kube, listener, metrics::LiveSources, pod_cgroups,
    triggers::Triggers,
};
use crate::{
    engine::{Engine, EngineConfig},
    events::{
        aggregate::Aggregator,
        hub::Hub,
        kube_events::KubeEvents,
        pipeline::{self, Pipeline, PodIndex},
        sink_queue::{SinkKind, SinkQueue},
        sinks::{FileSink, Stdout},
        stream::{Access, StreamState},
    },
};

/// Starts the HTTP server (not ready, saying why) before anything else, so probes and
/// operators see what the agent is waiting for.
pub(super) async fn http(config: &AgentConfig) -> Result<(Arc<Health>, Arc<Hub>), AgentError> {
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
    let hub = Arc::new(Hub::default());
    let access = Access::new(config.events.token.clone(), config.listen);
    if matches!(access, Access::Off) {
        tracing::info!("GET /v1/events is off: no --events-token-file and the listener is not loopback");
    }
    let stream = StreamState {
        hub: hub.clone(),
        access,
    };
    // Descriptors: the hard limit is ours to use; the listener's caps keep a reserve of it
    // for scans, map updates and the API client whatever the HTTP load.
    let nofile = listener::raise_fd_limit().unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot read or raise RLIMIT_NOFILE; assuming 1024");
        1024
    });
    let limits = listener::Limits::for_fd_limit(nofile);
    tracing::info!(
        nofile,
        max_connections = limits.max_connections,
        per_source = limits.per_source,
        "HTTP listener bounds"
    );
    tokio::spawn(http::serve_with(listener, health.clone(), Some(stream), limits));
    Ok((health, hub))
}

/// The cgroup2 mount the kubepods cgroups live under: given, or found in mountinfo.
pub(super) fn cgroup_root(config: &AgentConfig) -> Result<PathBuf, AgentError> {
    match &config.cgroup_root {
        Some(root) => Ok(root.clone()),
        None => crate::cgroup::cgroup2_mount()
            .map_err(|e| AgentError::CgroupRoot(e.to_string()))?
            .ok_or_else(|| AgentError::CgroupRoot("no cgroup2 mount in /proc/self/mountinfo".into())),
    }
}

/// Loads the eBPF programs, retrying while the agent stays not ready.
pub(super) async fn load_engine(config: &AgentConfig, health: &Health) -> Engine {
    loop {
        match Engine::load(&EngineConfig {
            unknown_pods: config.unknown_pods,
            // The baseline's source: per-destination counts (see `baseline::recorder`).
            flow_stats: config.baseline.is_some(),
            kernel_log_level: config.kernel_log_level,
            pin_dir: config.pin_dir.clone(),
            cluster_domain: config.cluster_domain.clone(),
            dns_min_ttl: config.dns_min_ttl,
            report_queries: config.events.anomalies.dns_tunnel.is_some(),
            // The baseline's runs name what pods resolved, domain rules or not.
            learn_names: config.baseline.is_some(),
            ..EngineConfig::default()
        }) {
            Ok(engine) => return engine,
            // Not ready and saying why beats a crash loop; retry in case it was transient.
            Err(error) => {
                health.set_not_ready(format!("cannot load the eBPF programs: {error}"));
                health.beat();
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

/// Attaches to every kubepods cgroup, waiting (not ready) until kubelet has created one.
pub(super) async fn attach_kubepods(
    engine: &mut Engine,
    root: &std::path::Path,
    health: &Health,
) -> Vec<PathBuf> {
    loop {
        health.beat();
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

/// Starts the kube caches and the cgroup watcher, then waits for the caches' first lists
/// (not ready, saying why, once `sync_deadline` has passed).
pub(super) async fn caches(
    config: &AgentConfig,
    root: &std::path::Path,
    health: &Health,
) -> Result<(::kube::Client, kube::Caches), AgentError> {
    let client = kube::client(config.kubeconfig.as_deref()).await?;
    let triggers = Arc::new(Triggers::new(health.metrics.sync_triggers.clone()));
    let caches = kube::start(client.clone(), triggers.clone(), config.node_name.clone());
    cgroup_watch::start(root.to_path_buf(), triggers).map_err(AgentError::Watch)?;
    let waiting = std::time::Instant::now();
    let mut said = false;
    {
        let ready = caches.ready();
        tokio::pin!(ready);
        loop {
            // Alive while waiting: the heartbeat says the agent is not stuck, /readyz says why
            // it is not ready.
            health.beat();
            tokio::select! {
                _ = &mut ready => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if !said && waiting.elapsed() >= config.sync_deadline {
                health.set_not_ready(format!(
                    "caches not synced with the API server after {:?}",
                    config.sync_deadline
                ));
                said = true;
            }
        }
    }
    tracing::info!("caches synced");
    Ok((client, caches))
}

/// What the sync loop shares with the event pipeline: the pod index it fills and the
/// pipeline's statistics it reports.
pub(super) struct EventParts {
    pub(super) index: PodIndex,
    pub(super) stats: Arc<pipeline::Stats>,
    /// Where the baseline recorder raises its anomalies (None: no pipeline runs).
    pub(super) raise: Option<tokio::sync::mpsc::Sender<crate::events::anomaly::Anomaly>>,
}

/// Starts the event pipeline on the kernel's ring buffer, with the configured sinks.
pub(super) fn event_pipeline(
    config: &AgentConfig,
    engine: &mut Engine,
    client: &::kube::Client,
    health: &Health,
    hub: &Arc<Hub>,
) -> EventParts {
    let mut parts = EventParts {
        index: PodIndex::default(),
        stats: Arc::new(pipeline::Stats::default()),
        raise: None,
    };
    let ring = match engine.take_events() {
        Ok(ring) => ring,
        Err(error) => {
            tracing::error!(%error, "no event stream");
            return parts;
        }
    };
    let sinks = start_sinks(&config.events, &parts.stats);
    let (raise, raised) = tokio::sync::mpsc::channel(1024);
    let kube = config.events.kubernetes.then(|| {
        KubeEvents::start(
            client.clone(),
            config.node_name.clone(),
            health.metrics.event_sink_errors.clone(),
        )
    });
    let pipeline = Pipeline {
        node: config.node_name.clone(),
        index: parts.index.clone(),
        hub: hub.clone(),
        sinks,
        kube,
        drops: engine.take_event_drops().ok(),
        names: engine
            .name_texts()
            .inspect_err(|error| tracing::warn!(%error, "events will carry no dst_name"))
            .ok(),
        stats: parts.stats.clone(),
        per_destination: config
            .events
            .per_destination_metrics
            .then(|| health.metrics.denied_destinations.clone()),
        aggregator: Aggregator::new(pipeline::WINDOW, pipeline::MAX_KEYS),
        // Per-attempt signals only: new_destination and upload_volume are judged per run
        // by the baseline recorder, which raises them through `raised`.
        anomalies: Some(crate::events::anomaly::Detectors::new(
            &crate::events::anomaly::AnomalyConfig {
                upload_volume: None,
                new_destination: false,
                ..config.events.anomalies.clone()
            },
            None,
        )),
        raised: Some(raised),
    };
    parts.raise = Some(raise);
    tokio::spawn(pipeline.run(ring));
    parts
}

/// Stdout and the events file, as configured, each on its own writer thread.
fn start_sinks(config: &super::EventsConfig, stats: &Arc<pipeline::Stats>) -> Vec<SinkQueue> {
    let mut sinks = Vec::new();
    if config.stdout {
        match SinkQueue::spawn(SinkKind::Stdout, Stdout::default(), stats.clone()) {
            Ok(q) => sinks.push(q),
            Err(error) => tracing::error!(%error, "cannot start the stdout sink"),
        }
    }
    if let Some(path) = &config.file {
        let queue = FileSink::open(path.clone(), config.file_max_bytes, config.file_keep)
            .and_then(|file| SinkQueue::spawn(SinkKind::File, file, stats.clone()));
        match queue {
            Ok(q) => sinks.push(q),
            Err(error) => tracing::error!(path = %path.display(), %error, "cannot open the events file"),
        }
    }
    sinks
}

/// Lets /metrics read the kernel counters and the pipeline's statistics at scrape time.
pub(super) fn live_metrics(engine: &Engine, health: &Health, hub: &Arc<Hub>, events: &EventParts) {
    let counters = engine
        .counter_reader()
        .inspect_err(|error| tracing::error!(%error, "no traffic counters in /metrics"))
        .ok();
    let learned = engine
        .learned_reader()
        .inspect_err(|error| tracing::error!(%error, "no learned-address count in /metrics"))
        .ok();
    let sockets = engine
        .sockets_reader()
        .inspect_err(|error| tracing::error!(%error, "no socket-table count in /metrics"))
        .ok();
    health.metrics.set_live_sources(LiveSources {
        counters,
        learned,
        sockets,
        events: events.stats.clone(),
        hub: hub.clone(),
    });
}

/// Starts the baseline recorder (`--baseline`) and lets /v1/suggest read the baselines.
pub(super) fn baseline(
    config: &AgentConfig,
    engine: &Engine,
    client: &::kube::Client,
    health: &Health,
    events: &EventParts,
) {
    let store = crate::baseline::kube_store::Store::new(client.clone());
    let _ = health.baselines.set(store.clone());
    let (Some(recorder), Some(raise)) = (&config.baseline, &events.raise) else {
        return;
    };
    let flows = match engine.flow_reader() {
        Ok(f) => f,
        Err(error) => {
            tracing::error!(%error, "no flow statistics: the workload baseline is off");
            return;
        }
    };
    let recorder = crate::baseline::recorder::Recorder::new(
        crate::baseline::recorder::RecorderConfig {
            anomalies: config.events.anomalies.clone(),
            ..recorder.clone()
        },
        store,
        flows,
        engine
            .pod_names()
            .inspect_err(|error| tracing::warn!(%error, "baseline runs will carry no names"))
            .ok(),
        events.index.clone(),
        raise.clone(),
    );
    tokio::spawn(recorder.run());
}
