//! `cargo xtask bench`: pipeguard side by side with no enforcement, iptables and nftables.
//!
//! Everything runs through the real `pipeguard` binary: each pipeguard configuration is a
//! long-lived `pipeguard exec --policy FILE -- xtask bench-worker client` whose worker takes
//! commands on stdin, so the configurations can be interleaved round by round (A B A B)
//! against a baseline worker that runs outside any guarded cgroup. Traffic stays on
//! loopback and on veth pairs between network namespaces the bench creates (pgb-*); the
//! iptables and nftables rules live only in those namespaces. See BENCHMARKS.md.

mod configs;
mod control_plane;
mod dns;
mod dns_worker;
mod event_latency;
mod exec_cost;
mod ingress;
mod kernel;
mod kernel_cost;
mod net;
mod netns;
mod report;
mod rounds;
mod throughput;
mod workers;

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use self::{
    netns::ensure_firewall_tools,
    report::{Json, Table},
    workers::Worker,
};

/// The hidden `xtask bench-worker` entry point.
pub fn worker(args: &[String]) -> Result<ExitCode> {
    if let Some(cpu) = std::env::var(PIN_ENV).ok().and_then(|c| c.parse::<usize>().ok()) {
        pin_to(cpu)?;
    }
    match args.first().map(String::as_str) {
        Some("server") => {
            let binds = args[1..]
                .iter()
                .map(|a| a.parse().with_context(|| format!("bind address {a:?}")))
                .collect::<Result<Vec<Ipv4Addr>>>()?;
            if binds.is_empty() {
                bail!("server needs a bind address");
            }
            net::server(&binds)?;
        }
        Some("client") => net::client()?,
        _ => bail!("bench-worker server IP... | client"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Servers and clients all run on the last CPU: no migrations, no cross-CPU wakeups, so
/// a round measures the CPU cost per operation (what the hooks add to), and the other CPU
/// absorbs the rest of the machine.
const PIN_ENV: &str = "PGB_CPU";

fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t filled by CPU_SET, for this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity({cpu}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

const NS_SERVER: &str = "pgb-srv";
const NS_CLIENT: &str = "pgb-c0";
const NS_IPT: &str = "pgb-ipt";
const NS_NFT: &str = "pgb-nft";
/// Server side of each client namespace's veth pair: 10.203.{0,1,2}.1, client .2.
const CLIENT_NETNS: [(&str, u8); 3] = [(NS_CLIENT, 0), (NS_IPT, 1), (NS_NFT, 2)];
/// A destination no bench policy allows (events).
const DENIED: &str = "127.0.0.3:9";

struct Params {
    quick: bool,
    rounds: usize,
    secs: f64,
    kernel_rounds: usize,
    kernel_secs: f64,
    control_reps: usize,
    events: u64,
    paced_events: u64,
}

pub fn run(
    quick: bool,
    json_path: Option<PathBuf>,
    only: Option<String>,
    rounds: Option<usize>,
) -> Result<ExitCode> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (network namespaces, cgroups, eBPF)");
    }
    if let Some(section) = only.as_deref()
        && CONTROL_PLANE_SECTIONS.contains(&section)
    {
        return control_plane_only(quick, json_path, section);
    }
    let started = Instant::now();
    let Built {
        pipeguard,
        worker_bin,
    } = if only.is_some() {
        // A selected section runs no control-plane bench: skip its (long) build.
        Built {
            pipeguard: pipeguard_bin()?,
            worker_bin: build_worker()?,
        }
    } else {
        build_all()?
    };
    ensure_firewall_tools()?;
    let mut p = if quick {
        Params {
            quick,
            rounds: 3,
            secs: 0.25,
            kernel_rounds: 1,
            kernel_secs: 0.5,
            control_reps: 1,
            events: 50_000,
            paced_events: 300,
        }
    } else {
        Params {
            quick,
            rounds: 12,
            secs: 1.0,
            kernel_rounds: 5,
            kernel_secs: 1.0,
            control_reps: 3,
            events: 300_000,
            paced_events: 2_000,
        }
    };
    if let Some(rounds) = rounds {
        p.rounds = rounds;
    }
    let dir = crate::workspace_root().join("target/bench");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;

    let mut bench = Bench {
        pipeguard,
        worker_bin,
        dir,
        workers: BTreeMap::new(),
        results: Json::Arr(Vec::new()),
        table: Table::default(),
        figures: Json::obj(),
        memory_rows: Vec::new(),
    };
    let outcome = match only.as_deref() {
        None => bench.all(&p),
        Some("dns") => bench.dns(&p),
        Some("datapath") => bench.data_path(&p),
        Some("ingress") => bench.ingress(&p),
        Some(other) => Err(anyhow::anyhow!(
            "--only {other}: the selectable sections are datapath, dns, ingress, {}",
            CONTROL_PLANE_SECTIONS.join(", ")
        )),
    };
    // Workers first (they are in the namespaces), then the namespaces (Netns drop in all()).
    bench.stop_workers();
    outcome?;
    // Its own cgroups, list/watch server and agent; after the namespaces are gone.
    let (control_md, control_json) = match only {
        None => control_plane::run(p.quick, &bench.dir, None)?,
        Some(_) => (String::new(), "null".to_string()),
    };

    let mut doc = Json::obj();
    doc.set("machine", machine()?);
    doc.set("quick", p.quick)
        .set("rounds", p.rounds)
        .set("seconds_per_round", p.secs)
        .set("wall_seconds", started.elapsed().as_secs_f64());
    doc.set("throughput", bench.results.clone());
    doc.set("figures", bench.figures.clone());
    doc.set("control_plane", Json::Raw(control_json.trim().to_string()));
    let md = bench.table.markdown() + &control_md;
    fs::write(bench.dir.join("table.md"), &md)?;
    if let Some(path) = json_path {
        fs::write(&path, doc.render()).with_context(|| format!("writing {}", path.display()))?;
        println!("\nbench: JSON written to {}", path.display());
    }
    println!(
        "bench: done in {:.0} s; Markdown table in {}",
        started.elapsed().as_secs_f64(),
        bench.dir.join("table.md").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The control-plane bench's own sections (`--only` runs one alone).
const CONTROL_PLANE_SECTIONS: [&str; 5] = ["library", "agent", "events", "agent-load", "scale"];

/// One control-plane section alone: its tables on stdout, its figures as JSON.
fn control_plane_only(quick: bool, json_path: Option<PathBuf>, section: &str) -> Result<ExitCode> {
    // The bench runs the `pipeguard` cargo builds for it (CARGO_BIN_EXE_pipeguard).
    control_plane::build()?;
    let dir = crate::workspace_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let (md, json) = control_plane::run(quick, &dir, Some(section))?;
    let mut doc = Json::obj();
    doc.set("machine", machine()?).set("quick", quick);
    doc.set("control_plane", Json::Raw(json.trim().to_string()));
    print!("{md}");
    if let Some(path) = json_path {
        fs::write(&path, doc.render()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What a run executes: the release `pipeguard`, the load generator, and the control-plane
/// bench (it links the library, so it lives in pipeguard-agent/benches).
pub struct Built {
    pipeguard: PathBuf,
    worker_bin: PathBuf,
}

pub fn build_all() -> Result<Built> {
    let built = Built {
        pipeguard: pipeguard_bin()?,
        worker_bin: build_worker()?,
    };
    control_plane::build()?;
    Ok(built)
}

/// The `pipeguard` the data path runs: this tree's release build, or the binary named by
/// `PIPEGUARD_BENCH_BIN` (a build of another commit, for a before/after comparison).
fn pipeguard_bin() -> Result<PathBuf> {
    match std::env::var_os("PIPEGUARD_BENCH_BIN") {
        Some(path) => Ok(PathBuf::from(path)),
        None => crate::build(),
    }
}

/// The load generator is this xtask, built optimised (cargo xtask itself is a debug build).
fn build_worker() -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--quiet", "--package", "xtask"]);
    crate::status(cmd)?;
    Ok(crate::workspace_root().join("target/release/xtask"))
}

struct Bench {
    pipeguard: PathBuf,
    worker_bin: PathBuf,
    dir: PathBuf,
    workers: BTreeMap<&'static str, Worker>,
    results: Json,
    table: Table,
    figures: Json,
    memory_rows: Vec<Vec<String>>,
}

fn machine() -> Result<Json> {
    let mut m = Json::obj();
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cmd = |prog: &str, args: &[&str]| -> String {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    m.set("kernel", read("/proc/sys/kernel/osrelease"))
        .set(
            "nproc",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        )
        .set("cpu_model", model)
        .set("mem_total", {
            read("/proc/meminfo")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .set("date", cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
        .set(
            "git_commit",
            cmd(
                "git",
                &[
                    "-C",
                    crate::workspace_root().to_str().unwrap_or("."),
                    "rev-parse",
                    "HEAD",
                ],
            ),
        )
        .set("iptables", cmd("iptables-legacy", &["--version"]))
        .set("nft", cmd("nft", &["--version"]));
    Ok(m)
}
