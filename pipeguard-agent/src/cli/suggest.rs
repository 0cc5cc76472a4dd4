//! `pipeguard suggest`: several runs of one job (`exec --learn-json`) → one policy.

use std::{path::PathBuf, process::ExitCode};

use crate::learn::{self, Run};

/// Merge the runs of one job into the policy that allows what it reaches reliably.
///
/// A destination reached in fewer than --min-runs runs is left out and listed as unstable
/// (on stderr and in the policy's header). Names are merged by name, addresses by address.
///
/// Example: pipeguard suggest --from run1.json --from run2.json --from run3.json --min-runs 3 > ci-egress.yaml
#[derive(clap::Args, Debug)]
pub struct SuggestArgs {
    /// A run written by `pipeguard exec --learn-json`; repeatable.
    #[arg(long = "from", required = true, value_name = "RUN.json", num_args = 1..)]
    pub runs: Vec<PathBuf>,
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
    let runs = args.runs.iter().map(read_run).collect::<Result<Vec<_>, _>>()?;
    let min_runs = args.min_runs.map_or(runs.len(), |n| n as usize);
    let suggestion = learn::suggest::suggest(&runs, min_runs).map_err(|e| e.to_string())?;
    for (dest, seen_in) in &suggestion.unstable {
        eprintln!(
            "pipeguard: unstable, left out: {dest} (seen in {seen_in} of {} runs)",
            suggestion.runs
        );
    }
    match &args.out {
        Some(path) => std::fs::write(path, &suggestion.policy)
            .map_err(|e| format!("writing {}: {e}", path.display()))?,
        None => print!("{}", suggestion.policy),
    }
    Ok(())
}
