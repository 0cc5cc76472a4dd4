//! `pipeguard suggest`: several runs of one job (`exec --learn-json`) → one policy; or,
//! with `--endpoint`, the runs an agent's cluster recorded per workload.

use std::{path::PathBuf, process::ExitCode};

use crate::learn::{self, Run};

/// Merge the runs of one job into the policy that allows what it reaches reliably.
///
/// A destination reached in fewer than --min-runs runs is left out and listed as unstable
/// (on stderr and in the policy's header). Names are merged by name, addresses by address.
///
/// With --endpoint, the runs are the ones the agents recorded for each CI workload of
/// --namespace (every node's WorkloadBaseline objects, merged at query time); one policy per
/// workload.
///
/// Example: pipeguard suggest --from run1.json --from run2.json --from run3.json --min-runs 3 > ci-egress.yaml
///
/// Example: pipeguard suggest --endpoint http://127.0.0.1:9440 --namespace ci --workload gitlab:app/test
#[derive(clap::Args, Debug)]
pub struct SuggestArgs {
    /// A run written by `pipeguard exec --learn-json`; repeatable.
    #[arg(long = "from", required_unless_present = "endpoint", conflicts_with = "endpoint", value_name = "RUN.json", num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// An agent's HTTP address (http://HOST:PORT): suggest from the cluster's baselines.
    #[arg(long, requires = "namespace", value_name = "URL")]
    pub endpoint: Option<String>,
    /// The namespace whose workloads to suggest for (with --endpoint).
    #[arg(long, requires = "endpoint", value_name = "NS")]
    pub namespace: Option<String>,
    /// Only this workload (as the policies' `# workload:` line names it).
    #[arg(long, requires = "endpoint", value_name = "W")]
    pub workload: Option<String>,
    /// File holding the bearer token for the endpoint (the agent's --events-token-file).
    #[arg(long, requires = "endpoint", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Runs a destination must appear in to be allowed. Default: all of them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub min_runs: Option<u64>,
    /// Write the policy here instead of stdout.
    #[arg(long, value_name = "OUT.yaml")]
    pub out: Option<PathBuf>,
}

pub fn run(args: SuggestArgs) -> ExitCode {
    match suggest(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pipeguard: {message}");
            ExitCode::from(2)
        }
    }
}

fn read_run(path: &PathBuf) -> Result<Run, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let run: Run = serde_json::from_str(&text).map_err(|e| format!("{}: not a run: {e}", path.display()))?;
    if run.format != learn::RUN_FORMAT {
        return Err(format!(
            "{}: format {} (this pipeguard reads format {})",
            path.display(),
            run.format,
            learn::RUN_FORMAT
        ));
    }
    Ok(run)
}

fn suggest(args: &SuggestArgs) -> Result<(), String> {
    if let Some(endpoint) = &args.endpoint {
        let text = from_endpoint(endpoint, args)?;
        return write(args, &text);
    }
    let runs = args.runs.iter().map(read_run).collect::<Result<Vec<_>, _>>()?;
    let min_runs = args.min_runs.map_or(runs.len(), |n| n as usize);
    let suggestion = learn::suggest::suggest(&runs, min_runs).map_err(|e| e.to_string())?;
    for (dest, seen_in) in &suggestion.unstable {
        eprintln!(
            "pipeguard: unstable, left out: {dest} (seen in {seen_in} of {} runs)",
            suggestion.runs
        );
    }
    write(args, &suggestion.policy)
}

fn write(args: &SuggestArgs, text: &str) -> Result<(), String> {
    match &args.out {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// `GET /v1/suggest` of the agent at `endpoint`.
fn from_endpoint(endpoint: &str, args: &SuggestArgs) -> Result<String, String> {
    use crate::events::client::{get, query_value};
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut path = format!(
        "/v1/suggest?namespace={}",
        query_value(args.namespace.as_deref().unwrap_or_default())
    );
    if let Some(w) = &args.workload {
        path.push_str(&format!("&workload={}", query_value(w)));
    }
    if let Some(n) = args.min_runs {
        path.push_str(&format!("&min_runs={n}"));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime
        .block_on(get(endpoint, &path, token.as_deref()))
        .map_err(|e| format!("{endpoint}: {e}"))
}
