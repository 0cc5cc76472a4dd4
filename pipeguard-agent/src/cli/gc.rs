//! `pipeguard gc`: collect what jobs of a killed `pipeguard exec` left behind.

use std::{path::PathBuf, process::ExitCode};

use crate::job::{self, state};

/// Kill the leftover processes of jobs whose `pipeguard exec` died (SIGKILL, OOM), then
/// remove their cgroups and pinned programs. Jobs whose exec still runs are left alone.
/// Until collected, such leftovers stay guarded by the pinned programs.
///
/// Example: sudo pipeguard gc
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// The --state-dir the jobs were started with.
    #[arg(long, value_name = "DIR", default_value = state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

pub fn run(args: GcArgs) -> ExitCode {
    let cgroup_root = match job::preflight::check() {
        Ok(root) => root,
        Err(error) => {
            eprintln!("pipeguard gc: {error}");
            return ExitCode::FAILURE;
        }
    };
    match state::gc(&args.state_dir, &cgroup_root.join(job::JOB_CGROUP_PARENT)) {
        Ok(collected) => {
            for job in &collected {
                println!(
                    "collected {}{}",
                    job.name,
                    if job.cgroup_removed {
                        " (killed its leftover processes, removed its cgroup)"
                    } else {
                        ""
                    }
                );
            }
            if collected.is_empty() {
                println!("nothing to collect");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("pipeguard gc: {}: {error}", args.state_dir.display());
            ExitCode::FAILURE
        }
    }
}
