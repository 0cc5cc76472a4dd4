//! `pipeguard exec`: run one command under egress enforcement, policies from files.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    engine::PolicyEntries,
    events::anomaly::{self, AnomalyConfig, Baseline, Detectors},
    job::{self, EventSink, JobSpec, Mode},
    learn,
    policy::{self, PodIdentity},
};

/// Exit code when `--fail-on-violation` is set and something was denied (or audited).
pub const EXIT_VIOLATION: u8 = 99;
/// Exit code when pipeguard itself cannot guard the job; the command was not run.
pub const EXIT_SETUP: u8 = 125;

/// Run a command with its egress enforced by NetworkPolicy manifests.
///
/// The command runs in a fresh cgroup as a pod in --namespace with --label labels; the
/// NetworkPolicies in that namespace that select it decide where it may send.
///
/// Example: sudo pipeguard exec --policy ci-egress.yaml --label app=runner -- make release
///
/// Example: sudo pipeguard exec --mode audit --learn ci-egress.yaml --label app=runner -- make release
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// NetworkPolicy YAML file (several documents allowed) or directory; repeatable.
    /// Optional in audit mode with --learn, --learn-json or --baseline: nothing is allowed,
    /// everything is reported.
    #[arg(long = "policy", value_name = "PATH", required_unless_present_any = ["learn", "learn_json", "baseline"])]
    pub policies: Vec<PathBuf>,
    /// Namespace the job counts as being in.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Label of the job as a pod, KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A container port of the job, NAME=PORT[/PROTOCOL] (TCP when omitted): named ports in
    /// the ingress rules of policies selecting the job mean these, as a pod's container
    /// ports; a name no --port declares is an error. Repeatable.
    #[arg(long = "port", value_name = "NAME=PORT[/PROTOCOL]", value_parser = parse_container_port)]
    pub ports: Vec<(String, u8, u16)>,
    /// Cluster snapshot (Namespaces and Pods, YAML) so podSelector/namespaceSelector peers
    /// resolve to pod IPs.
    #[arg(long, value_name = "PATH")]
    pub cluster: Option<PathBuf>,
    /// enforce: deny what no policy allows. audit: allow everything, report what would be denied.
    #[arg(long, value_enum, default_value = "enforce")]
    pub mode: Mode,
    /// Where violation events go as JSON lines: a file (appended), or - for stdout. Default: stderr.
    #[arg(long, value_name = "PATH|-")]
    pub events: Option<PathBuf>,
    /// Exit with code 99 if anything was denied (or would have been, in audit mode), even
    /// when the command succeeded.
    #[arg(long)]
    pub fail_on_violation: bool,
    /// Let the job open raw IP and AF_PACKET sockets (refused by default: they bypass the
    /// socket hooks).
    #[arg(long)]
    pub allow_raw_sockets: bool,
    /// Let the job keep every capability (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF, ...) and a
    /// writable cgroupfs, for docker-in-docker and the like. A root job can then step
    /// around the guard (TUN injection, leaving the cgroup, detaching the programs);
    /// pipeguard says so in a warning.
    #[arg(long)]
    pub privileged_job: bool,
    /// bpffs directory where the job pins its programs, so that a SIGKILLed pipeguard leaves
    /// the job's leftover processes guarded until `pipeguard gc` kills them.
    #[arg(long, value_name = "DIR", default_value = job::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Write the NetworkPolicy (and DomainPolicy for resolved names) that allows exactly
    /// what the job reached, each peer commented with what was seen. Learn in audit mode
    /// so nothing is blocked: `--mode audit --learn ci-egress.yaml`.
    #[arg(long, value_name = "OUT.yaml")]
    pub learn: Option<PathBuf>,
    /// Write what the job did as JSON (destinations, verdicts, packets, bytes, processes),
    /// the input of `pipeguard suggest --from`.
    #[arg(long, value_name = "RUN.json")]
    pub learn_json: Option<PathBuf>,
    /// Write the job summary as a Markdown table (e.g. to $GITHUB_STEP_SUMMARY), appended.
    #[arg(long, value_name = "FILE")]
    pub summary_markdown: Option<PathBuf>,
    /// Anomaly signal setting, repeatable: SIGNAL=off, SIGNAL=on, deny_burst=COUNT/DURATION
    /// (default 20/10s), upload_volume=SIZE (default 100MiB). Signals: deny_burst,
    /// upload_volume, new_destination (needs --baseline), dns_tunnel.
    #[arg(long, value_name = "SIGNAL=SETTING", value_parser = anomaly::parse_setting)]
    pub anomaly: Vec<anomaly::Setting>,
    /// What the job normally reaches, for the new_destination signal: a run written by
    /// --learn-json (RUN.json) or a policy file (what it allows this job).
    #[arg(long, value_name = "RUN.json|POLICY")]
    pub baseline: Option<PathBuf>,
    /// Names under this domain may always be queried by a job a domain policy selects (the cluster's
    /// own services).
    #[arg(long, default_value = crate::engine::DEFAULT_CLUSTER_DOMAIN, value_name = "DOMAIN", value_parser = super::dns_flags::parse_cluster_domain)]
    pub cluster_domain: String,
    /// Addresses learned from an allowed DNS answer stay allowed at least this long, whatever
    /// its TTL: seconds or a duration (30, 30s, 2m).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = super::dns_flags::parse_dns_min_ttl)]
    pub dns_min_ttl: std::time::Duration,
    /// aya-log level of the kernel programs: off, error, warn, info, debug, trace.
    #[arg(long, default_value = "warn", value_parser = parse_kernel_log_level)]
    pub kernel_log_level: u8,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if k.is_empty() {
        return Err(format!("empty label key in {s:?}"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// `NAME=PORT[/PROTOCOL]` → (name, protocol number, port), with Kubernetes' rules for
/// container port names.
fn parse_container_port(s: &str) -> Result<(String, u8, u16), String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PORT[/PROTOCOL], got {s:?}"))?;
    if !policy::is_port_name(name) {
        return Err(format!(
            "{name:?} is not a valid port name (1-15 lowercase letters, digits and '-', at least one letter)"
        ));
    }
    let (port, protocol) = rest.split_once('/').unwrap_or((rest, "TCP"));
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {port:?} of {name:?} is not a number in 1-65535"))?;
    let protocol = policy::protocol_number(protocol)
        .ok_or_else(|| format!("unknown protocol {protocol:?} for {name:?}: use TCP, UDP or SCTP"))?;
    Ok((name.to_string(), protocol, port))
}

pub(crate) fn parse_kernel_log_level(s: &str) -> Result<u8, String> {
    Ok(match s {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        _ => {
            return Err(format!(
                "unknown level {s:?}: use off, error, warn, info, debug or trace"
            ));
        }
    })
}

pub fn run(args: ExecArgs) -> ExitCode {
    match guard(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("pipeguard: {message}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

fn guard(args: ExecArgs) -> Result<ExitCode, String> {
    // Policies first: an invalid policy is reported even where the kernel checks would fail.
    let (allowlist, dns_filtered) = compile(&args, &args.policies)?;
    let baseline = match &args.baseline {
        Some(path) => Some(load_baseline(&args, path)?),
        None => None,
    };
    let detectors = Detectors::new(&AnomalyConfig::from_settings(&args.anomaly), baseline);
    let cgroup_root = job::preflight::check().map_err(|e| e.to_string())?;
    let events = EventSink::open(args.events.as_ref()).map_err(|e| {
        format!(
            "opening --events {}: {e}",
            args.events
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    })?;
    let outcome = job::run(JobSpec {
        command: args.command.clone(),
        allowlist,
        mode: args.mode,
        deny_raw_sockets: !args.allow_raw_sockets,
        dns_filtered,
        privileged: args.privileged_job,
        cgroup_parent: cgroup_root.join(job::JOB_CGROUP_PARENT),
        state_dir: args.state_dir.clone(),
        events,
        kernel_log_level: args.kernel_log_level,
        cluster_domain: args.cluster_domain.clone(),
        dns_min_ttl: args.dns_min_ttl,
        learn: args.learn.is_some() || args.learn_json.is_some() || args.summary_markdown.is_some(),
        detectors,
    })
    .map_err(|e| e.to_string())?;
    eprintln!("{}", outcome.summary);
    for anomaly in &outcome.anomalies {
        eprintln!("  ANOMALY  {}", anomaly.line());
    }
    write_reports(&args, &outcome)?;
    if args.fail_on_violation && outcome.violations > 0 {
        eprintln!(
            "pipeguard: {} egress violations; exiting with {EXIT_VIOLATION} (--fail-on-violation)",
            outcome.violations
        );
        return Ok(ExitCode::from(EXIT_VIOLATION));
    }
    Ok(ExitCode::from(outcome.exit.shell_code().clamp(0, 255) as u8))
}

/// `--baseline`: a run (`.json`, from --learn-json: the destinations it reached) or policy
/// files (what they allow this job).
fn load_baseline(args: &ExecArgs, path: &PathBuf) -> Result<Baseline, String> {
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading --baseline {}: {e}", path.display()))?;
        let run: learn::Run = serde_json::from_str(&text)
            .map_err(|e| format!("--baseline {}: not a run: {e}", path.display()))?;
        return Ok(Baseline::Seen(
            run.destinations
                .iter()
                .filter(|o| o.reached())
                .map(|o| (policy::canonical(o.ip), o.port, o.protocol.clone()))
                .collect(),
        ));
    }
    compile(args, std::slice::from_ref(path))
        .map(|(allowlist, _)| Baseline::Allowlist(allowlist))
        .map_err(|e| format!("--baseline {}: {e}", path.display()))
}

/// The run as data, then each report asked for. The job has run: a report that cannot be
/// written is an error, so CI does not go on without it.
fn write_reports(args: &ExecArgs, outcome: &job::JobOutcome) -> Result<(), String> {
    if args.learn.is_none() && args.learn_json.is_none() && args.summary_markdown.is_none() {
        return Ok(());
    }
    let run = learn::Run {
        format: learn::RUN_FORMAT,
        command: args.command.clone(),
        mode: match args.mode {
            Mode::Enforce => "enforce".into(),
            Mode::Audit => "audit".into(),
        },
        namespace: args.namespace.clone(),
        labels: args.labels.iter().cloned().collect(),
        finished: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        destinations: learn::Run::observe(&outcome.summary, &outcome.processes),
        anomalies: outcome.anomalies.iter().map(|a| a.line()).collect(),
    };
    let write = |path: &PathBuf, text: String, append: bool| {
        let result = if append {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        } else {
            std::fs::write(path, text)
        };
        result.map_err(|e| format!("writing {}: {e}", path.display()))
    };
    if let Some(path) = &args.learn {
        write(path, learn::learned_policy(&run), false)?;
        eprintln!("pipeguard: learned policy written to {}", path.display());
    }
    if let Some(path) = &args.learn_json {
        let json = serde_json::to_string_pretty(&run).map_err(|e| e.to_string())?;
        write(path, json + "\n", false)?;
    }
    if let Some(path) = &args.summary_markdown {
        write(path, learn::markdown::summary(&run) + "\n", true)?;
    }
    Ok(())
}

/// Policies → the job's allowlist (and whether its DNS is filtered), as `job::allowlist`
/// compiles it for a pod with the job's namespace and labels.
fn compile(args: &ExecArgs, policies: &[PathBuf]) -> Result<(PolicyEntries, bool), String> {
    if policies.is_empty() {
        // Learning from nothing: every destination is reported with its process.
        if args.mode == Mode::Enforce {
            return Err(
                "without --policy, --learn and --baseline need --mode audit: enforcing an empty policy refuses all egress; the command was not run".into(),
            );
        }
        return Ok((PolicyEntries::default(), false));
    }
    let set = policy::load_policies(policies);
    if !set.errors.is_empty() {
        let lines: Vec<String> = set.errors.iter().map(|e| format!("  {e}")).collect();
        return Err(format!(
            "invalid policy, the command was not run:\n{}",
            lines.join("\n")
        ));
    }
    let cluster = match &args.cluster {
        Some(path) => Some(policy::load_cluster(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let pod = PodIdentity {
        namespace: args.namespace.clone(),
        name: "pipeguard-exec".to_string(),
        labels: args.labels.iter().cloned().collect(),
    };
    // A pod's port names are unique (Kubernetes validates that); so are the job's.
    for (i, (name, _, _)) in args.ports.iter().enumerate() {
        if args.ports[..i].iter().any(|(n, _, _)| n == name) {
            return Err(format!(
                "--port {name} is given twice; port names are unique, as in a pod"
            ));
        }
    }
    job::allowlist::check_own_ports(&set, &pod, &args.ports)
        .map_err(|e| format!("{e}\nthe command was not run"))?;
    job::allowlist::compile(&set, &pod, &args.ports, cluster.as_ref())
}

#[cfg(test)]
mod tests {
    use super::parse_container_port;

    #[test]
    fn container_ports_parse_like_a_pods() {
        assert_eq!(parse_container_port("http=8080"), Ok(("http".into(), 6, 8080)));
        assert_eq!(parse_container_port("dns=5353/UDP"), Ok(("dns".into(), 17, 5353)));
        assert_eq!(parse_container_port("m3=9/SCTP"), Ok(("m3".into(), 132, 9)));
        for bad in [
            "http",
            "=80",
            "HTTP=80",
            "a--b=1",
            "-a=1",
            "123=1",
            "http=0",
            "http=65536",
            "http=80/tcp",
            "a-very-long-port-name=1",
        ] {
            assert!(parse_container_port(bad).is_err(), "{bad}");
        }
    }
}
