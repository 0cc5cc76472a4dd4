//! `cargo xtask`: toolchain setup, build, demo, tests.

mod demo;
mod toolchain;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "pipeguard development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (rust-src for nightly, bpf-linker against its LLVM).
    Setup,
    /// Build the pipeguard binary (release) with its embedded eBPF object.
    Build,
    /// Run a guarded job on loopback: an allowed upload and a blocked exfiltration.
    Demo,
    /// Run every test, including the ones that load programs into the kernel (needs root).
    Test,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.task {
        Task::Setup => {
            let tc = toolchain::setup()?;
            println!("bpf-linker: {}", tc.bpf_linker.display());
            Ok(ExitCode::SUCCESS)
        }
        Task::Build => {
            build()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Demo => demo(),
        Task::Test => test(),
    }
}

fn cargo(tc: &toolchain::Toolchain, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(args);
    tc.apply(&mut cmd);
    cmd
}

fn status(mut cmd: Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn build() -> Result<std::path::PathBuf> {
    let tc = toolchain::setup()?;
    status(cargo(
        &tc,
        &[
            "build",
            "--release",
            "--package",
            "pipeguard-agent",
            "--bin",
            "pipeguard",
        ],
    ))?;
    Ok(workspace_root().join("target/release/pipeguard"))
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn demo() -> Result<ExitCode> {
    let bin = build()?;
    demo::run(&bin, &workspace_root())
}

fn test() -> Result<ExitCode> {
    let tc = toolchain::setup()?;
    // Kernel tests share cgroups and the loopback; run them one at a time.
    // Default members only: the eBPF crate builds for bpfel-unknown-none, never for the host.
    status(cargo(&tc, &["test", "--", "--test-threads=1"]))?;
    Ok(ExitCode::SUCCESS)
}
