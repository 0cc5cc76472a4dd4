//! `pipeguard events`: follow the agent's violation stream and print it readably.

use std::{path::PathBuf, process::ExitCode};

use crate::events::{
    client::{Request, follow},
    record::{Kind, Record},
};

/// Follow the violation stream of an agent.
///
/// Example: pipeguard events --endpoint http://127.0.0.1:9440 --token-file /var/run/pipeguard/token --namespace ci
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// The agent's HTTP listener.
    #[arg(long, env = "PIPEGUARD_ENDPOINT", default_value = "http://127.0.0.1:9440")]
    pub endpoint: String,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Only records of pods in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Print the records as JSON lines, unchanged.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EventsArgs) -> ExitCode {
    let token = match &args.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t.trim().to_string()),
            Err(error) => {
                eprintln!("pipeguard events: --token-file {}: {error}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("pipeguard events: {error}");
            return ExitCode::FAILURE;
        }
    };
    let req = Request {
        endpoint: &args.endpoint,
        token: token.as_deref(),
        namespace: args.namespace.as_deref(),
        sse: false,
    };
    let result = runtime.block_on(follow(&req, |line| {
        if args.json {
            println!("{line}");
        } else {
            match serde_json::from_str::<Record>(line) {
                Ok(record) => println!("{}", human(&record)),
                Err(_) => println!("{line}"),
            }
        }
        true
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pipeguard events: {error}");
            ExitCode::FAILURE
        }
    }
}

/// One line a person can read at a glance.
pub fn human(r: &Record) -> String {
    if r.kind == Kind::Drops {
        return format!(
            "{} LOST   {} kernel events on {} ({})",
            r.time,
            r.count,
            r.node,
            r.reason.clone().unwrap_or_default()
        );
    }
    let verdict = if r.verdict.as_deref() == Some("audit") {
        "AUDIT "
    } else {
        "DENIED"
    };
    let pod = r
        .pod
        .as_ref()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_else(|| format!("cgroup {}", r.cgroup_id));
    let process = format!(
        "{}[{}]",
        r.comm.clone().unwrap_or_default(),
        r.pid.unwrap_or_default()
    );
    let dest = match (r.dst_ip, r.dst_port) {
        (Some(ip), Some(port)) => format!("{ip}:{port}/{}", r.protocol.clone().unwrap_or_default()),
        _ => "a raw or packet socket".to_string(),
    };
    let count = if r.count > 1 {
        format!(" ×{}", r.count)
    } else {
        String::new()
    };
    let ci =
        r.ci.as_ref()
            .map(|c| {
                format!(
                    " [{} {}]",
                    c.system,
                    c.fields
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })
            .unwrap_or_default();
    format!(
        "{} {verdict} {pod} {process} → {dest} via {}{count}{ci}: {}",
        r.time,
        r.hook.clone().unwrap_or_default(),
        r.reason.clone().unwrap_or_default()
    )
}
