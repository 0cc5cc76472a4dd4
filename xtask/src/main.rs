//! `cargo xtask`: toolchain setup, build, demo, tests, benchmarks.

mod bench;
mod demo;
mod image;
mod packages;
mod test_tools;
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
    /// Install the eBPF toolchain (rust-src for nightly, bpf-linker against its LLVM) and
    /// the tools the tests run (skopeo, umoci, kubectl).
    Setup,
    /// Build the pipeguard binary (release) with its embedded eBPF object.
    Build,
    /// Run a guarded job on loopback: an upload to an allowed name and blocked exfiltration
    /// over TCP, UDP and DNS.
    Demo,
    /// Write an OCI image archive of the release binary (no container daemon needed):
    /// target/image/pipeguard-VERSION.oci.tar.
    Image,
    /// Run every test, including the ones that load programs into the kernel (needs root).
    Test,
    /// Fuzz the policy parser and compiler for a bounded time (installs cargo-fuzz).
    Fuzz {
        /// Seconds per fuzz target.
        #[arg(long, default_value = "60")]
        seconds: u64,
    },
    /// Benchmarks: pipeguard against no enforcement, iptables and nftables (needs root;
    /// results in BENCHMARKS.md).
    Bench {
        /// A short run (under 3 minutes): fewer, shorter rounds.
        #[arg(long)]
        quick: bool,
        /// Write every figure and ratio, with the machine details, as JSON.
        #[arg(long, value_name = "PATH")]
        json: Option<std::path::PathBuf>,
        /// Run one section only: `datapath` (sections 1-4: rates, ns per program run),
        /// `dns` (domain rules: resolve+connect, kernel cost, 10k names), `ingress` (a
        /// guarded server's accept rate and the ingress hook's cost),
        /// or a control-plane section (library, agent, events, agent-load, scale) without the
        /// throughput rounds. Example: `cargo xtask bench --only agent-load`
        #[arg(long, value_name = "SECTION")]
        only: Option<String>,
        /// Interleaved rounds of each rate section (default 12, quick 3): more to pin down a
        /// ratio near its target (the spread of the median shrinks as 1/sqrt(rounds)).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        rounds: Option<u16>,
        /// Only build what the benchmark runs (no root needed); CI does this so it cannot rot.
        #[arg(long, conflicts_with_all = ["quick", "json", "only", "rounds"])]
        no_run: bool,
    },
    /// The benchmark's load generator and servers (started by `bench`).
    #[command(hide = true)]
    BenchWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
            packages::ensure_test_packages()?;
            println!("bpf-linker: {}", tc.bpf_linker.display());
            test_tools::setup(&workspace_root())?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Build => {
            build()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Demo => demo(),
        Task::Image => image::run(&workspace_root()),
        Task::Test => test(),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Bench { no_run: true, .. } => bench::build_all().map(|_| ExitCode::SUCCESS),
        Task::Bench {
            quick,
            json,
            only,
            rounds,
            ..
        } => bench::run(quick, json, only, rounds.map(usize::from)),
        Task::BenchWorker { args } => bench::worker(&args),
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
    // The demo's resolver is the tests' dnsmasq.
    packages::ensure_test_packages()?;
    demo::run(&bin, &workspace_root())
}

fn test() -> Result<ExitCode> {
    let tc = toolchain::setup()?;
    packages::ensure_test_packages()?;
    // skopeo, umoci and kubectl: on a fresh machine the README's test command alone must pass.
    test_tools::setup(&workspace_root())?;
    // Kernel tests share cgroups and the loopback; run them one at a time.
    // Default members only: the eBPF crate builds for bpfel-unknown-none, never for the host.
    status(cargo(&tc, &["test", "--", "--test-threads=1"]))?;
    Ok(ExitCode::SUCCESS)
}

/// Fuzz targets under pipeguard-agent/fuzz; crashes land in its artifacts/ directory and,
/// once fixed, are copied to fuzz/regressions/ where the test suite replays them.
const FUZZ_TARGETS: [&str; 1] = ["policy_compile"];

fn fuzz(seconds: u64) -> Result<ExitCode> {
    let have = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("xtask: installing cargo-fuzz");
        let mut install = Command::new(env!("CARGO"));
        install.args(["install", "cargo-fuzz", "--locked"]);
        status(install)?;
    }
    let root = workspace_root();
    let fuzz_dir = root.join("pipeguard-agent/fuzz");
    for target in FUZZ_TARGETS {
        // New inputs go to an untracked work corpus; the committed seeds stay as they are.
        let work = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work)?;
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&work)
            .arg(fuzz_dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=8192")
            // The fuzzed code is the pure policy layer; no eBPF object is needed.
            .env("AYA_BUILD_SKIP", "1")
            .current_dir(&root);
        status(cmd).with_context(|| {
            format!("fuzz target {target} failed; see pipeguard-agent/fuzz/artifacts/{target}")
        })?;
    }
    Ok(ExitCode::SUCCESS)
}
