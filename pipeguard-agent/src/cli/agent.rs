//! `pipeguard agent`: the DaemonSet agent. Every flag also reads PIPEGUARD_<FLAG>, so the
//! deploy ConfigMap can set them as environment variables.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use crate::{
    agent::{self, AgentConfig, GuardConfig, Settings},
    engine::UnknownPods,
    job::Mode,
};

/// Enforce NetworkPolicy egress on this node's CI runner pods.
///
/// Example: pipeguard agent --node-name "$NODE_NAME" --guard-namespaces ci,arc-runners
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// This node's name (spec.nodeName of its pods).
    #[arg(long, env = "PIPEGUARD_NODE_NAME", required_unless_present = "uninstall")]
    pub node_name: Option<String>,
    /// Where the kubelet cgroup tree lives. Default: the cgroup2 mount.
    #[arg(long, env = "PIPEGUARD_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// kubeconfig file. Default: in-cluster config, then KUBECONFIG, then ~/.kube/config.
    #[arg(long, env = "PIPEGUARD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "PIPEGUARD_LISTEN", default_value = "0.0.0.0:9440")]
    pub listen: SocketAddr,
    /// Namespaces whose pods are guarded, comma-separated.
    #[arg(long, env = "PIPEGUARD_GUARD_NAMESPACES", value_delimiter = ',')]
    pub guard_namespaces: Vec<String>,
    /// Pods matching this label selector (key=value,key) are guarded.
    #[arg(long, env = "PIPEGUARD_GUARD_SELECTOR")]
    pub guard_selector: Option<String>,
    /// Do not recognize Actions Runner Controller, GitLab Runner and Tekton pods by their labels.
    #[arg(long, env = "PIPEGUARD_NO_RUNNER_LABELS")]
    pub no_runner_labels: bool,
    /// What a new pod cgroup gets before it is matched to a pod: allow (mixed nodes) or deny
    /// (dedicated runner node pools).
    #[arg(long, env = "PIPEGUARD_UNKNOWN_PODS", value_enum, default_value = "allow")]
    pub unknown_pods: UnknownPods,
    /// Isolate guarded pods that no egress NetworkPolicy selects.
    #[arg(long, env = "PIPEGUARD_DEFAULT_DENY_EGRESS")]
    pub default_deny_egress: bool,
    /// Isolate guarded pods that no ingress NetworkPolicy selects: only the node (see
    /// --ingress-from-node) may connect to them.
    #[arg(long, env = "PIPEGUARD_DEFAULT_DENY_INGRESS")]
    pub default_deny_ingress: bool,
    /// Sources every ingress allowlist admits on every port, so the kubelet's probes keep
    /// working (as Cilium and Calico do by default): auto (every address of this node's
    /// interfaces, read at start), none (the node is judged like any source), or a
    /// comma-separated list of CIDRs.
    #[arg(
        long,
        env = "PIPEGUARD_INGRESS_FROM_NODE",
        default_value = "auto",
        value_name = "auto|none|CIDR,..."
    )]
    pub ingress_from_node: String,
    /// Deny all egress of guarded pods that can step around a node-level guard (privileged,
    /// CAP_NET_ADMIN/SYS_ADMIN/BPF added, hostPID) instead of only reporting them.
    #[arg(long, env = "PIPEGUARD_REFUSE_PRIVILEGED")]
    pub refuse_privileged: bool,
    /// enforce, or audit (allow everything, report what would be denied).
    #[arg(long, env = "PIPEGUARD_MODE", value_enum, default_value = "enforce")]
    pub mode: Mode,
    /// Seconds to wait for the first API sync before reporting not ready.
    #[arg(long, env = "PIPEGUARD_SYNC_DEADLINE", default_value = "60")]
    pub sync_deadline: u64,
    /// Seconds a watch may keep failing before the agent reports not ready (enforcement
    /// keeps the last known state meanwhile).
    #[arg(long, env = "PIPEGUARD_WATCH_FAILURE_SECONDS", default_value = "60")]
    pub watch_failure_seconds: u64,
    /// Where links and maps are pinned (on a bpf filesystem), so enforcement survives an
    /// agent restart or upgrade; the next agent adopts them.
    #[arg(long, env = "PIPEGUARD_PIN_DIR", default_value = "/sys/fs/bpf/pipeguard")]
    pub pin_dir: PathBuf,
    /// Do not print violation records on stdout.
    #[arg(long, env = "PIPEGUARD_NO_EVENTS_STDOUT")]
    pub no_events_stdout: bool,
    /// Also append violation records to this file (JSON lines), rotated by size.
    #[arg(long, env = "PIPEGUARD_EVENTS_FILE")]
    pub events_file: Option<PathBuf>,
    /// Rotate the events file past this many bytes.
    #[arg(long, env = "PIPEGUARD_EVENTS_FILE_MAX_BYTES", default_value = "104857600")]
    pub events_file_max_bytes: u64,
    /// Rotated events files kept (events.jsonl.1 … .N).
    #[arg(long, env = "PIPEGUARD_EVENTS_FILE_KEEP", default_value = "5")]
    pub events_file_keep: usize,
    /// File holding the bearer token for GET /v1/events (e.g. a mounted Secret). Without
    /// it the endpoint only serves a loopback listener.
    #[arg(long, env = "PIPEGUARD_EVENTS_TOKEN_FILE")]
    pub events_token_file: Option<PathBuf>,
    /// Count denied attempts per destination in /metrics (one series per destination: opt in
    /// only where the number of destinations is bounded).
    #[arg(long, env = "PIPEGUARD_METRICS_PER_DESTINATION")]
    pub metrics_per_destination: bool,
    /// Anomaly signal setting, repeatable: SIGNAL=off, SIGNAL=on, deny_burst=COUNT/DURATION
    /// (default 20/10s), upload_volume=SIZE (default 100MiB). The agent raises deny_burst and
    /// dns_tunnel (the queries of DNS-filtered pods);
    /// with --baseline also new_destination (allowed traffic to a destination not in the
    /// workload's stable baseline) and upload_volume (bytes to one destination above SIZE,
    /// or more than 10 times the most a baseline run sent there).
    #[arg(long, value_name = "SIGNAL=SETTING", value_parser = crate::events::anomaly::parse_setting)]
    pub anomaly: Vec<crate::events::anomaly::Setting>,
    /// Record each CI workload's runs (destinations, packets, bytes) in WorkloadBaseline
    /// objects and compare new runs with them (new_destination, upload_volume). Turns on the
    /// kernel's per-destination flow statistics (one map update per packet).
    #[arg(long, env = "PIPEGUARD_BASELINE")]
    pub baseline: bool,
    /// How often the runs are read from the kernel and written when they changed.
    #[arg(long, env = "PIPEGUARD_BASELINE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub baseline_interval: Duration,
    /// Runs a destination must appear in to be in a workload's stable baseline; with fewer
    /// earlier runs a workload has no baseline yet and raises no new_destination.
    #[arg(long, env = "PIPEGUARD_BASELINE_STABLE_RUNS", default_value = "2", value_parser = clap::value_parser!(u64).range(1..))]
    pub baseline_stable_runs: u64,
    /// Do not post Kubernetes Events on pods for blocked attempts.
    #[arg(long, env = "PIPEGUARD_NO_KUBE_EVENTS")]
    pub no_kube_events: bool,
    /// Names under this domain may always be queried by DNS-filtered pods (the cluster's
    /// own services).
    #[arg(long, env = "PIPEGUARD_CLUSTER_DOMAIN", default_value = crate::engine::DEFAULT_CLUSTER_DOMAIN, value_name = "DOMAIN", value_parser = super::dns_flags::parse_cluster_domain)]
    pub cluster_domain: String,
    /// Addresses learned from an allowed DNS answer stay allowed at least this long, whatever
    /// its TTL: seconds or a duration (30, 30s, 2m).
    #[arg(long, env = "PIPEGUARD_DNS_MIN_TTL", default_value = "30s", value_name = "DURATION", value_parser = super::dns_flags::parse_dns_min_ttl)]
    pub dns_min_ttl: std::time::Duration,
    /// Remove everything pinned under --pin-dir (detaching the programs) and exit.
    #[arg(long)]
    pub uninstall: bool,
    /// aya-log level of the kernel programs: off, error, warn, info, debug, trace.
    #[arg(long, env = "PIPEGUARD_KERNEL_LOG_LEVEL", default_value = "warn", value_parser = super::exec::parse_kernel_log_level)]
    pub kernel_log_level: u8,
}

pub fn run(args: AgentArgs) -> ExitCode {
    if args.uninstall {
        return match crate::engine::pins::remove_all(&args.pin_dir) {
            Ok(n) => {
                eprintln!(
                    "pipeguard agent: removed {n} pinned objects under {}; programs are detached",
                    args.pin_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("pipeguard agent: uninstall {}: {error}", args.pin_dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let selector = match args
        .guard_selector
        .as_deref()
        .map(agent::parse_selector)
        .transpose()
    {
        Ok(s) => s,
        Err(message) => {
            eprintln!("pipeguard agent: --guard-selector: {message}");
            return ExitCode::from(2);
        }
    };
    let token = match &args.events_token_file {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => Some(String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec()),
            Err(error) => {
                eprintln!("pipeguard agent: --events-token-file {}: {error}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let ingress_from_node = match ingress_from_node(&args.ingress_from_node) {
        Ok(list) => list,
        Err(message) => {
            eprintln!("pipeguard agent: {message}");
            return ExitCode::from(2);
        }
    };
    let anomalies = crate::events::anomaly::AnomalyConfig::from_settings(&args.anomaly);
    let node_name = args.node_name.unwrap_or_default();
    let baseline = args.baseline.then(|| crate::baseline::recorder::RecorderConfig {
        node: node_name.clone(),
        mode: match args.mode {
            Mode::Enforce => "enforce".into(),
            Mode::Audit => "audit".into(),
        },
        interval: args.baseline_interval,
        stable_runs: args.baseline_stable_runs as usize,
        anomalies: anomalies.clone(),
    });
    let config = AgentConfig {
        baseline,
        node_name,
        cgroup_root: args.cgroup_root,
        kubeconfig: args.kubeconfig,
        listen: args.listen,
        settings: Settings {
            guard: GuardConfig {
                namespaces: args
                    .guard_namespaces
                    .into_iter()
                    .filter(|n| !n.is_empty())
                    .collect(),
                selector,
                runner_labels: !args.no_runner_labels,
            },
            default_deny_egress: args.default_deny_egress,
            default_deny_ingress: args.default_deny_ingress,
            ingress_from_node,
            mode: args.mode,
            refuse_privileged: args.refuse_privileged,
        },
        unknown_pods: args.unknown_pods,
        sync_deadline: Duration::from_secs(args.sync_deadline),
        watch_failure_bound: Duration::from_secs(args.watch_failure_seconds),
        kernel_log_level: args.kernel_log_level,
        cluster_domain: args.cluster_domain,
        dns_min_ttl: args.dns_min_ttl,
        pin_dir: Some(args.pin_dir),
        events: agent::EventsConfig {
            stdout: !args.no_events_stdout,
            file: args.events_file,
            file_max_bytes: args.events_file_max_bytes,
            file_keep: args.events_file_keep,
            token,
            kubernetes: !args.no_kube_events,
            per_destination_metrics: args.metrics_per_destination,
            anomalies,
        },
    };
    crate::memory::tune_for_long_running();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("pipeguard agent: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "agent stopped");
            ExitCode::FAILURE
        }
    }
}

/// `--ingress-from-node`: auto, none, or CIDRs.
fn ingress_from_node(value: &str) -> Result<Vec<ipnet::IpNet>, String> {
    match value.trim() {
        "auto" => crate::agent::node_addresses::node_addresses()
            .map_err(|e| format!("--ingress-from-node auto: reading this node's addresses: {e}")),
        "none" | "" => Ok(Vec::new()),
        list => list
            .split(',')
            .map(|cidr| {
                let cidr = cidr.trim();
                cidr.parse::<ipnet::IpNet>()
                    .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|e| format!("--ingress-from-node: {cidr:?}: {e}"))
            })
            .collect(),
    }
}
