//! `cargo xtask bench`: pipeguard side by side with no enforcement, iptables and nftables.
//!
//! Everything runs through the real `pipeguard` binary: each pipeguard configuration is a
//! long-lived `pipeguard exec --policy FILE -- xtask bench-worker client` whose worker takes
//! commands on stdin, so the configurations can be interleaved round by round (A B A B)
//! against a baseline worker that runs outside any guarded cgroup. Traffic stays on
//! loopback and on veth pairs between network namespaces the bench creates (pgb-*); the
//! iptables and nftables rules live only in those namespaces. See BENCHMARKS.md.

mod control_plane;
mod kernel;
mod net;
mod report;

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};

use self::{
    kernel::RunStats,
    net::{PORT_CRR, PORT_RR, PORT_STREAM, PORT_UDP, Sample},
    report::{Json, Summary, Table, summarize},
};

/// The hidden `xtask bench-worker` entry point.
pub fn worker(args: &[String]) -> Result<ExitCode> {
    if let Some(cpu) = std::env::var(PIN_ENV).ok().and_then(|c| c.parse::<usize>().ok()) {
        pin_to(cpu)?;
    }
    match args.first().map(String::as_str) {
        Some("server") => {
            let bind: Ipv4Addr = args.get(1).context("server needs a bind address")?.parse()?;
            net::server(bind)?;
        }
        Some("client") => net::client()?,
        _ => bail!("bench-worker server IP | client"),
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

pub fn run(quick: bool, json_path: Option<PathBuf>) -> Result<ExitCode> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (network namespaces, cgroups, eBPF)");
    }
    let started = Instant::now();
    let Built {
        pipeguard,
        worker_bin,
    } = build_all()?;
    ensure_firewall_tools()?;
    let p = if quick {
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
    let outcome = bench.all(&p);
    // Workers first (they are in the namespaces), then the namespaces (Netns drop in all()).
    bench.stop_workers();
    outcome?;
    // Its own cgroups, list/watch server and agent; after the namespaces are gone.
    let (control_md, control_json) = control_plane::run(p.quick, &bench.dir)?;

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

/// What a run executes: the release `pipeguard`, the load generator, and the control-plane
/// bench (it links the library, so it lives in pipeguard-agent/benches).
pub struct Built {
    pipeguard: PathBuf,
    worker_bin: PathBuf,
}

pub fn build_all() -> Result<Built> {
    let built = Built {
        pipeguard: crate::build()?,
        worker_bin: build_worker()?,
    };
    control_plane::build()?;
    Ok(built)
}

/// The load generator is this xtask, built optimised (cargo xtask itself is a debug build).
fn build_worker() -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--quiet", "--package", "xtask"]);
    crate::status(cmd)?;
    Ok(crate::workspace_root().join("target/release/xtask"))
}

fn have(cmd: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists())
}

fn ensure_firewall_tools() -> Result<()> {
    if have("iptables-legacy-restore") && have("nft") {
        return Ok(());
    }
    eprintln!("bench: installing iptables and nftables from Debian");
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "iptables", "nftables"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if crate::status(cmd).is_err() {
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        crate::status(update)?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "iptables", "nftables"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        crate::status(cmd)?;
    }
    Ok(())
}

fn run_quiet(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The bench's network namespaces; deleting them removes their veths and firewall rules.
struct Netns {
    names: Vec<&'static str>,
}

impl Netns {
    fn setup() -> Result<Self> {
        let all = [NS_SERVER, NS_CLIENT, NS_IPT, NS_NFT];
        for ns in all {
            // Left over from an interrupted run.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let mut me = Self { names: Vec::new() };
        for ns in all {
            run_quiet(&["ip", "netns", "add", ns])?;
            me.names.push(ns);
            run_quiet(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        for (ns, i) in CLIENT_NETNS {
            let (srv_if, cli_if) = (format!("pgb{i}s"), format!("pgb{i}c"));
            run_quiet(&[
                "ip", "-n", NS_SERVER, "link", "add", &srv_if, "type", "veth", "peer", "name", &cli_if,
                "netns", ns,
            ])?;
            run_quiet(&[
                "ip",
                "-n",
                NS_SERVER,
                "addr",
                "add",
                &format!("10.203.{i}.1/24"),
                "dev",
                &srv_if,
            ])?;
            run_quiet(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.203.{i}.2/24"),
                "dev",
                &cli_if,
            ])?;
            run_quiet(&["ip", "-n", NS_SERVER, "link", "set", &srv_if, "up"])?;
            run_quiet(&["ip", "-n", ns, "link", "set", &cli_if, "up"])?;
        }
        Ok(me)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.names.drain(..).rev() {
            if let Err(e) = run_quiet(&["ip", "netns", "del", ns]) {
                eprintln!("bench: cleanup: {e:#}");
            }
        }
    }
}

/// A long-lived worker process talking line by line over stdin/stdout.
struct Worker {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr_path: PathBuf,
    finished: bool,
}

impl Worker {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Self> {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = fs::File::create(&stderr_path)?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting worker {name}: {cmd:?}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut w = Self {
            name: name.to_string(),
            child,
            stdin,
            stdout,
            stderr_path,
            finished: false,
        };
        let line = w.read_line()?;
        if line != "ready" {
            bail!("worker {name} said {line:?} instead of ready");
        }
        Ok(w)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
            bail!("worker {} exited; its stderr:\n{}", self.name, stderr.trim_end());
        }
        Ok(line.trim_end().to_string())
    }

    fn ask(&mut self, command: &str) -> Result<Sample> {
        let stdin = self.stdin.as_mut().context("worker already closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        let line = self.read_line()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["ok", ops, secs, bytes] => Ok(Sample {
                ops: ops.parse()?,
                secs: secs.parse()?,
                bytes: bytes.parse()?,
            }),
            _ => bail!("worker {} on {command:?}: {line}", self.name),
        }
    }

    /// Closes stdin (the worker exits), waits, and returns what it wrote on stderr.
    fn finish(mut self) -> Result<String> {
        self.stdin = None;
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))?;
        self.finished = true;
        let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        match status {
            Some(_) => Ok(stderr),
            None => bail!("worker {} did not exit", self.name),
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.stdin = None;
        let pid = self.child.id() as i32;
        // EOF first, then TERM (pipeguard forwards it and removes its cgroup), then KILL;
        // only ever our own child.
        for sig in [0, libc::SIGTERM, libc::SIGKILL] {
            if sig != 0 {
                // SAFETY: signalling our own, not yet reaped, child.
                unsafe { libc::kill(pid, sig) };
            }
            if let Ok(Some(_)) = wait_timeout(&mut self.child, Duration::from_secs(5)) {
                return;
            }
        }
        let _ = self.child.wait();
    }
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

/// The CIDR sets: seeded, so every run walks the same tries.
struct Rules {
    random: Vec<(u32, u8)>,
}

impl Rules {
    fn generate(n: usize) -> Self {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut seen = HashSet::new();
        let mut random = Vec::with_capacity(n);
        while random.len() < n {
            let r = next();
            let len = 16 + (r % 17) as u8;
            let addr = (10u32 << 24) | ((r >> 8) as u32 & 0x00ff_ffff);
            let mask = if len == 32 { u32::MAX } else { !(u32::MAX >> len) };
            let addr = addr & mask;
            // Keep 10.203.0.0/16 (the bench's own addresses) out, so the destination is
            // matched by its own rule, last in the iptables chain.
            if (addr >> 16) & 0xff == 203 {
                continue;
            }
            if seen.insert((addr, len)) {
                random.push((addr, len));
            }
        }
        Self { random }
    }

    fn cidrs(&self, n: usize) -> impl Iterator<Item = String> + '_ {
        self.random
            .iter()
            .take(n)
            .map(|&(a, l)| format!("{}/{l}", Ipv4Addr::from(a)))
    }
}

fn policy_yaml(name: &str, cidrs: impl Iterator<Item = String>, extra: &[&str]) -> String {
    let mut y = String::with_capacity(1 << 20);
    let _ = write!(
        y,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n"
    );
    for c in cidrs.chain(extra.iter().map(|s| s.to_string())) {
        let _ = writeln!(y, "    - ipBlock: {{cidr: \"{c}\"}}");
    }
    y
}

/// Sizes of the pipeguard configurations, by key.
const PG_CONFIGS: [(&str, usize); 4] = [
    ("pg-allow", 0),
    ("pg-1k", 1_000),
    ("pg-10k", 10_000),
    ("pg-100k", 100_000),
];

fn label(cfg: &str) -> &'static str {
    match cfg {
        "base" => "no enforcement",
        "pg-allow" => "pipeguard allow-all",
        "pg-1k" => "pipeguard 1k CIDRs",
        "pg-10k" => "pipeguard 10k CIDRs",
        "pg-100k" => "pipeguard 100k CIDRs",
        "ipt-10k" => "iptables chain 10k",
        "nft-10k" => "nftables set 10k",
        "empty" => "empty programs",
        _ => "?",
    }
}

fn addr(path: &str, cfg: &str, port: u16) -> String {
    let ip = match (path, cfg) {
        ("loopback", _) => "127.0.0.1",
        (_, "ipt-10k") => "10.203.1.1",
        (_, "nft-10k") => "10.203.2.1",
        _ => "10.203.0.1",
    };
    format!("{ip}:{port}")
}

impl Bench {
    fn policy_path(&self, cfg: &str) -> PathBuf {
        self.dir.join(format!("{cfg}.yaml"))
    }

    fn in_netns(ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// A client worker in netns `ns`, under `pipeguard exec` when a policy is given.
    /// pipeguard runs outside the namespace (`ip netns exec` remounts /sys, which hides
    /// the cgroup2 mount on hosts that have it under /sys/fs/cgroup/unified) and starts
    /// `ip netns exec NS worker` as the job; the cgroup is kept across setns.
    fn client(&self, ns: &str, policy: Option<&Path>, events: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.pipeguard);
        match policy {
            Some(policy) => {
                cmd.args(["exec", "--namespace", "default", "--policy"])
                    .arg(policy);
                if let Some(ev) = events {
                    cmd.arg("--events").arg(ev);
                }
                cmd.args(["--", "ip", "netns", "exec", ns]).arg(&self.worker_bin);
            }
            None => cmd = Self::in_netns(ns, &self.worker_bin),
        }
        cmd.args(["bench-worker", "client"]);
        if cpus() >= 2 {
            cmd.env(PIN_ENV, (cpus() - 1).to_string());
        }
        cmd
    }

    fn spawn(&mut self, key: &'static str, cmd: Command) -> Result<()> {
        let t = Instant::now();
        let w = Worker::spawn(key, cmd, &self.dir)?;
        eprintln!(
            "bench: worker {key} ready in {:.2} s (pid {})",
            t.elapsed().as_secs_f64(),
            w.pid()
        );
        self.workers.insert(key, w);
        Ok(())
    }

    fn stop_workers(&mut self) {
        // Clients before servers.
        let keys: Vec<_> = self.workers.keys().copied().collect();
        for k in keys.iter().filter(|k| !k.starts_with("srv")) {
            drop(self.workers.remove(k));
        }
        self.workers.clear();
    }

    fn all(&mut self, p: &Params) -> Result<()> {
        let t = Instant::now();
        let rules = Rules::generate(100_000);
        for (cfg, n) in PG_CONFIGS {
            let extra: &[&str] = if n == 0 {
                &["0.0.0.0/0", "::/0"]
            } else {
                &["10.203.0.1/32", "127.0.0.1/32"]
            };
            fs::write(
                self.policy_path(cfg),
                policy_yaml(&format!("bench-{cfg}"), rules.cidrs(n), extra),
            )?;
        }
        let netns = Netns::setup()?;
        self.firewalls(&rules)?;
        eprintln!(
            "bench: policies, namespaces and firewall rules ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );

        let (srv, lo) = (
            Self::in_netns(NS_SERVER, &self.worker_bin),
            Self::in_netns(NS_CLIENT, &self.worker_bin),
        );
        let mut srv = srv;
        srv.args(["bench-worker", "server", "0.0.0.0"]);
        let mut lo = lo;
        lo.args(["bench-worker", "server", "127.0.0.1"]);
        if cpus() >= 2 {
            srv.env(PIN_ENV, (cpus() - 1).to_string());
            lo.env(PIN_ENV, (cpus() - 1).to_string());
        }
        self.spawn("srv-veth", srv)?;
        self.spawn("srv-lo", lo)?;
        self.spawn("base", self.client(NS_CLIENT, None, None))?;
        self.spawn("ipt-10k", self.client(NS_IPT, None, None))?;
        self.spawn("nft-10k", self.client(NS_NFT, None, None))?;
        for (cfg, _) in PG_CONFIGS {
            let policy = self.policy_path(cfg);
            self.spawn(cfg, self.client(NS_CLIENT, Some(&policy), None))?;
        }
        self.memory("idle")?;

        self.throughput(p)?;
        self.memory("after load")?;
        self.kernel_cost(p)?;
        self.control_plane(p)?;
        self.table.section(
            "5b. pipeguard exec process memory (RSS) and the BPF memory it holds (fdinfo memlock)",
            &[
                "configuration",
                "when",
                "VmRSS",
                "VmHWM",
                "BPF maps",
                "BPF programs",
            ],
        );
        for row in std::mem::take(&mut self.memory_rows) {
            self.table.row(row);
        }
        self.events(p)?;
        self.stop_workers();
        drop(netns);
        Ok(())
    }

    fn firewalls(&self, rules: &Rules) -> Result<()> {
        // iptables (legacy x_tables): a linear OUTPUT chain, replies of known connections
        // first as any real ruleset has them, then 10k ACCEPTs, the destination last.
        let mut ipt = String::from(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n-A OUTPUT -o lo -j ACCEPT\n-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n",
        );
        for c in rules.cidrs(10_000) {
            let _ = writeln!(ipt, "-A OUTPUT -d {c} -j ACCEPT");
        }
        ipt.push_str("-A OUTPUT -d 10.203.1.1/32 -j ACCEPT\nCOMMIT\n");
        let ipt_path = self.dir.join("iptables.rules");
        fs::write(&ipt_path, ipt)?;
        run_quiet(&[
            "ip",
            "netns",
            "exec",
            NS_IPT,
            "iptables-legacy-restore",
            ipt_path.to_str().context("path")?,
        ])?;

        // nftables: the same prefixes as one interval set (auto-merge folds the overlaps).
        let mut nft = String::from(
            "table inet pgbench {\n  set allow4 {\n    type ipv4_addr\n    flags interval\n    auto-merge\n    elements = {\n",
        );
        for c in rules.cidrs(10_000) {
            let _ = writeln!(nft, "      {c},");
        }
        nft.push_str("      10.203.2.1/32\n    }\n  }\n  chain out {\n    type filter hook output priority filter; policy drop;\n    oif \"lo\" accept\n    ct state established,related accept\n    ip daddr @allow4 accept\n  }\n}\n");
        let nft_path = self.dir.join("nftables.nft");
        fs::write(&nft_path, nft)?;
        run_quiet(&[
            "ip",
            "netns",
            "exec",
            NS_NFT,
            "nft",
            "-f",
            nft_path.to_str().context("path")?,
        ])?;
        Ok(())
    }

    fn worker(&mut self, key: &str) -> Result<&mut Worker> {
        self.workers
            .get_mut(key)
            .with_context(|| format!("no worker {key}"))
    }

    /// Interleaved rounds: every round runs each configuration once, in a rotated order.
    #[allow(clippy::too_many_arguments)]
    fn interleave(
        &mut self,
        verb: &str,
        path: &str,
        port: u16,
        configs: &[&str],
        secs: f64,
        rounds: usize,
        metric: fn(&Sample) -> f64,
    ) -> Result<BTreeMap<String, Vec<f64>>> {
        let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        // One warm-up round, not counted.
        for cfg in configs {
            let a = addr(path, cfg, port);
            self.worker(cfg)?.ask(&format!("{verb} {a} {}", secs / 2.0))?;
        }
        for r in 0..rounds {
            for i in 0..configs.len() {
                let cfg = configs[(i + r) % configs.len()];
                let a = addr(path, cfg, port);
                let s = self.worker(cfg)?.ask(&format!("{verb} {a} {secs}"))?;
                out.entry(cfg.to_string()).or_default().push(metric(&s));
            }
        }
        Ok(out)
    }

    /// Records one test: absolute figures, per-round ratios to the baseline, table rows.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        test: &str,
        path: &str,
        unit: &str,
        values: &BTreeMap<String, Vec<f64>>,
        configs: &[&str],
        scale: f64,
        comparisons: &[(&str, &str)],
    ) {
        let base = &values["base"];
        for cfg in configs {
            let v = &values[*cfg];
            let abs = summarize(v);
            let ratios: Vec<f64> = v.iter().zip(base).map(|(a, b)| a / b).collect();
            let ratio = summarize(&ratios);
            let mut o = Json::obj();
            o.set("test", test)
                .set("path", path)
                .set("config", *cfg)
                .set("label", label(cfg))
                .set("unit", unit)
                .set("rounds", v.clone())
                .set("summary", abs);
            if *cfg != "base" {
                o.set("ratio_to_baseline_rounds", ratios.clone())
                    .set("ratio_to_baseline", ratio);
            }
            self.results.push(o);
            let scaled = Summary {
                median: abs.median * scale,
                min: abs.min * scale,
                max: abs.max * scale,
                ..abs
            };
            self.table.row(vec![
                path.to_string(),
                label(cfg).to_string(),
                report::abs(&scaled, unit),
                if *cfg == "base" {
                    "1".to_string()
                } else {
                    report::ratio(&ratio)
                },
            ]);
        }
        for (a, b) in comparisons {
            let ratios: Vec<f64> = values[*a].iter().zip(&values[*b]).map(|(x, y)| x / y).collect();
            let s = summarize(&ratios);
            let mut o = Json::obj();
            o.set("test", test)
                .set("path", path)
                .set("config", format!("{a}/{b}"))
                .set("label", format!("{} ÷ {}", label(a), label(b)))
                .set("ratio_rounds", ratios)
                .set("ratio", s);
            self.results.push(o);
            self.table.row(vec![
                path.to_string(),
                format!("**{} ÷ {}**", label(a), label(b)),
                String::new(),
                report::ratio(&s),
            ]);
        }
    }

    fn throughput(&mut self, p: &Params) -> Result<()> {
        let (rounds, secs) = (p.rounds, p.secs);
        let header = [
            "path",
            "configuration",
            "absolute, median (min–max)",
            "ratio to no enforcement, median (min–max)",
        ];
        let rate: fn(&Sample) -> f64 = Sample::rate;
        let bits: fn(&Sample) -> f64 = |s| s.byte_rate() * 8.0;

        self.table.section(
            "1. New TCP connections per second (connect, 1-byte request and response, close)",
            &header,
        );
        let lo = ["base", "pg-allow", "pg-10k", "pg-100k"];
        let v = self.interleave("crr", "loopback", PORT_CRR, &lo, secs, rounds, rate)?;
        self.record("conn_rate", "loopback", "/s", &v, &lo, 1.0, &[]);
        let veth = ["base", "pg-allow", "pg-10k", "pg-100k", "ipt-10k", "nft-10k"];
        let v = self.interleave("crr", "veth", PORT_CRR, &veth, secs, rounds, rate)?;
        self.record(
            "conn_rate",
            "veth",
            "/s",
            &v,
            &veth,
            1.0,
            &[("pg-10k", "ipt-10k"), ("pg-10k", "nft-10k")],
        );

        let pair = ["base", "pg-10k"];
        for (title, test, verb, port, unit, metric) in [
            (
                "2a. Request/response on one connection (1-byte ping-pong), transactions per second",
                "rr",
                "rr",
                PORT_RR,
                "/s",
                rate,
            ),
            (
                "2b. Single-stream throughput (64 KiB writes)",
                "stream",
                "stream",
                PORT_STREAM,
                "bit/s",
                bits,
            ),
            (
                "3. Unconnected UDP sendto (64-byte datagrams), datagrams per second",
                "udp_sendto",
                "udp",
                PORT_UDP,
                "/s",
                rate,
            ),
        ] {
            self.table.section(title, &header);
            for path in ["loopback", "veth"] {
                let v = self.interleave(verb, path, port, &pair, secs, rounds, metric)?;
                self.record(test, path, unit, &v, &pair, 1.0, &[]);
            }
        }
        Ok(())
    }

    /// RSS of each pipeguard exec and the BPF memory it holds.
    fn memory(&mut self, when: &str) -> Result<()> {
        let mut arr = Json::Arr(Vec::new());
        for (cfg, n) in PG_CONFIGS {
            let pid = self.worker(cfg)?.pid();
            let (rss, hwm) = kernel::process_rss_kib(pid)?;
            let (maps, progs, nmaps) = kernel::process_bpf_memory(pid)?;
            let mut o = Json::obj();
            o.set("config", cfg)
                .set("cidrs", n)
                .set("when", when)
                .set("vm_rss_kib", rss)
                .set("vm_hwm_kib", hwm)
                .set("bpf_map_memlock_bytes", maps)
                .set("bpf_prog_memlock_bytes", progs)
                .set("bpf_maps", nmaps);
            arr.push(o);
            self.memory_rows.push(vec![
                label(cfg).to_string(),
                when.to_string(),
                format!("{:.1} MiB", rss as f64 / 1024.0),
                format!("{:.1} MiB", hwm as f64 / 1024.0),
                format!("{:.1} MiB ({nmaps} maps)", maps as f64 / 1048576.0),
                format!("{:.2} MiB", progs as f64 / 1048576.0),
            ]);
        }
        self.figures
            .set(&format!("memory_{}", when.replace(' ', "_")), arr);
        Ok(())
    }

    /// ns per program run from the kernel's run-time statistics, net of empty programs.
    fn kernel_cost(&mut self, p: &Params) -> Result<()> {
        let _stats = kernel::BpfStats::enable()?;
        let cgroup = kernel::ScratchCgroup::create(&format!("pgbench-{}", std::process::id()))?;
        let empty = kernel::EmptyPrograms::attach(&cgroup.path)?;
        let mut cmd = self.client(NS_CLIENT, None, None);
        let procs = std::ffi::CString::new(
            cgroup
                .path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )?;
        // SAFETY: open/write/close only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.spawn("empty", cmd)?;

        let configs = ["empty", "pg-allow", "pg-1k", "pg-10k", "pg-100k"];
        // (config, hook) → per-round ns/run, and totals.
        let mut per_round: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
        let mut totals: BTreeMap<(String, String), RunStats> = BTreeMap::new();
        let stats_of = |me: &mut Self, cfg: &str| -> Result<BTreeMap<String, RunStats>> {
            if cfg == "empty" {
                empty.stats()
            } else {
                let pid = me.worker(cfg)?.pid();
                Ok(kernel::process_prog_stats(pid)?
                    .into_iter()
                    .filter_map(|(name, s)| kernel::hook_of(&name).map(|h| (h.to_string(), s)))
                    .collect())
            }
        };
        for r in 0..p.kernel_rounds {
            for i in 0..configs.len() {
                let cfg = configs[(i + r) % configs.len()];
                let before = stats_of(self, cfg)?;
                let w = self.worker(cfg)?;
                w.ask(&format!("crr {} {}", addr("veth", cfg, PORT_CRR), p.kernel_secs))?;
                w.ask(&format!(
                    "udp {} {}",
                    addr("veth", cfg, PORT_UDP),
                    p.kernel_secs / 2.0
                ))?;
                let after = stats_of(self, cfg)?;
                for (hook, a) in &after {
                    let d = a.since(before.get(hook).copied().unwrap_or_default());
                    if d.run_cnt == 0 {
                        continue;
                    }
                    let key = (cfg.to_string(), hook.clone());
                    per_round
                        .entry(key.clone())
                        .or_default()
                        .push(d.run_time_ns as f64 / d.run_cnt as f64);
                    let t = totals.entry(key).or_default();
                    t.run_time_ns += d.run_time_ns;
                    t.run_cnt += d.run_cnt;
                }
            }
        }
        if let Some(w) = self.workers.remove("empty") {
            w.finish()?;
        }
        drop(empty);
        drop(cgroup);

        self.table.section(
            "4. Kernel cost per program run (kernel.bpf_stats_enabled; veth connect loop + UDP sendto)",
            &[
                "configuration",
                "hook",
                "runs",
                "ns/run raw, median (min–max)",
                "ns/run net of empty program",
            ],
        );
        let mut arr = Json::Arr(Vec::new());
        let empty_ns: BTreeMap<String, f64> = totals
            .iter()
            .filter(|((c, _), _)| c == "empty")
            .map(|((_, h), t)| (h.clone(), t.run_time_ns as f64 / t.run_cnt as f64))
            .collect();
        for cfg in configs {
            for ((c, hook), t) in totals.iter().filter(|((c, _), _)| c == cfg) {
                let raw = t.run_time_ns as f64 / t.run_cnt as f64;
                let s = summarize(&per_round[&(c.clone(), hook.clone())]);
                let net = if cfg == "empty" {
                    None
                } else {
                    empty_ns.get(hook).map(|e| raw - e)
                };
                let mut o = Json::obj();
                o.set("config", cfg)
                    .set("hook", hook.as_str())
                    .set("run_cnt", t.run_cnt)
                    .set("run_time_ns", t.run_time_ns)
                    .set("ns_per_run", raw)
                    .set("ns_per_run_rounds", s)
                    .set("ns_per_run_net_of_empty", net);
                arr.push(o);
                self.table.row(vec![
                    label(cfg).to_string(),
                    hook.clone(),
                    t.run_cnt.to_string(),
                    format!("{raw:.0} ({:.0}–{:.0})", s.min, s.max),
                    match net {
                        Some(n) => format!("{n:.0}"),
                        None if cfg == "empty" => "—".to_string(),
                        None => "no empty counterpart (raw)".to_string(),
                    },
                ]);
            }
        }
        self.figures.set("kernel_ns_per_run", arr);
        Ok(())
    }

    /// End-to-end `pipeguard exec --policy P -- true`: load, parse, compile, sync, attach,
    /// run, tear down. The difference to allow-all is parse + compile + sync of the CIDRs.
    fn control_plane(&mut self, p: &Params) -> Result<()> {
        self.table.section(
            "5a. `pipeguard exec --policy P -- sleep 0.3`, wall time minus the 0.3 s job (load + parse + compile + sync + attach + teardown)",
            &["policy", "wall time, median (min–max)", "minus allow-all", "VmHWM of pipeguard"],
        );
        let mut arr = Json::Arr(Vec::new());
        let mut allow_median = 0.0;
        for (cfg, n) in PG_CONFIGS {
            let mut times = Vec::new();
            let mut hwm = 0;
            for _ in 0..p.control_reps {
                let t = Instant::now();
                let mut child = Command::new(&self.pipeguard)
                    .args(["exec", "--namespace", "default", "--policy"])
                    .arg(self.policy_path(cfg))
                    .args(["--", "sleep", "0.3"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                // Sample the high-water mark while the job runs (after compile and sync).
                let pid = child.id();
                let mut last = 0;
                while child.try_wait()?.is_none() {
                    if let Ok((_, h)) = kernel::process_rss_kib(pid) {
                        last = last.max(h);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let st = child.wait()?;
                if !st.success() {
                    bail!("pipeguard exec --policy {cfg} -- sleep failed: {st}");
                }
                times.push(t.elapsed().as_secs_f64() - 0.3);
                hwm = hwm.max(last);
            }
            let s = summarize(&times);
            if n == 0 {
                allow_median = s.median;
            }
            let mut o = Json::obj();
            o.set("config", cfg)
                .set("cidrs", n)
                .set("exec_seconds_minus_job", s)
                .set("minus_allow_all_seconds", s.median - allow_median)
                .set("vm_hwm_kib", hwm);
            arr.push(o);
            self.table.row(vec![
                label(cfg).to_string(),
                format!("{:.0} ms ({:.0}–{:.0})", s.median * 1e3, s.min * 1e3, s.max * 1e3),
                format!("{:.0} ms", (s.median - allow_median) * 1e3),
                format!("{:.1} MiB", hwm as f64 / 1024.0),
            ]);
        }
        self.figures.set("control_plane", arr);
        Ok(())
    }

    /// Denied connects as fast as one process can make them, then paced ones for latency.
    fn events(&mut self, p: &Params) -> Result<()> {
        let policy = self.policy_path("pg-10k");
        let file = self.dir.join("events.jsonl");
        let _ = fs::remove_file(&file);
        let cmd = self.client(NS_CLIENT, Some(&policy), Some(&file));
        self.spawn("events", cmd)?;
        let s = self
            .worker("events")?
            .ask(&format!("deny {DENIED} {}", p.events))?;
        let stderr = self.workers.remove("events").context("events worker")?.finish()?;
        let lines = fs::read_to_string(&file).unwrap_or_default().lines().count() as u64;
        let (delivered, lost) = parse_event_summary(&stderr)
            .with_context(|| format!("no events summary in pipeguard's stderr:\n{stderr}"))?;
        let attempts = parse_denied_attempts(&stderr);

        // Delivery latency: one denied connect per millisecond, the file tailed here.
        let file2 = self.dir.join("events-paced.jsonl");
        let _ = fs::remove_file(&file2);
        fs::write(&file2, "")?;
        let cmd = self.client(NS_CLIENT, Some(&policy), Some(&file2));
        self.spawn("events-paced", cmd)?;
        let tail = {
            let path = file2.clone();
            let expect = p.paced_events;
            std::thread::spawn(move || tail_latencies(&path, expect, Duration::from_secs(60)))
        };
        self.worker("events-paced")?
            .ask(&format!("paced-deny {DENIED} {}", p.paced_events))?;
        let latencies = tail.join().map_err(|_| anyhow::anyhow!("tail thread"))??;
        self.workers
            .remove("events-paced")
            .context("events worker")?
            .finish()?;
        let lat = summarize(&latencies);
        let pct = |q: f64| -> f64 {
            let mut v = latencies.clone();
            v.sort_by(|a, b| a.total_cmp(b));
            if v.is_empty() {
                return f64::NAN;
            }
            v[((v.len() - 1) as f64 * q).round() as usize]
        };

        self.table.section(
            "6. Denied-attempt events (`pipeguard exec --events FILE`, one process making denied connects)",
            &["figure", "value"],
        );
        let rate = s.ops as f64 / s.secs;
        // Events the ring buffer holds without a reader (88-byte record + 8-byte header).
        let ring_capacity = (1u64 << 22) / 96;
        let reader_floor = lines.saturating_sub(ring_capacity) as f64 / s.secs;
        let mut o = Json::obj();
        o.set("denied_connects", s.ops)
            .set("seconds", s.secs)
            .set("denied_per_second", rate)
            .set("lines_in_file", lines)
            .set("delivered_reported", delivered)
            .set("lost_reported", lost)
            .set("kernel_denied_attempts", attempts)
            .set("delivered_per_second", lines as f64 / s.secs)
            .set("ring_capacity_events", ring_capacity)
            .set("reader_events_per_second_at_least", reader_floor)
            .set("unreported_drops", s.ops as i64 as f64 - (lines + lost) as f64)
            .set("paced_events", p.paced_events)
            .set("latency_seconds", lat)
            .set("latency_p50_seconds", pct(0.5))
            .set("latency_p99_seconds", pct(0.99))
            .set("latency_samples", latencies.len());
        self.figures.set("events", o);
        for (k, v) in [
            (
                "denied connects made",
                format!("{} in {:.2} s ({}/s)", s.ops, s.secs, report::si(rate)),
            ),
            ("event lines in the file", lines.to_string()),
            (
                "events delivered per second (file lines ÷ generation time)",
                report::si(lines as f64 / s.secs),
            ),
            (
                "ring buffer reader, at least (lines beyond the 4 MiB ring's ~43.7k ÷ time)",
                format!("{}/s", report::si(reader_floor)),
            ),
            ("pipeguard summary", format!("{delivered} delivered, {lost} lost")),
            (
                "kernel deny counter",
                attempts.map_or("?".to_string(), |a| a.to_string()),
            ),
            (
                "unreported drops (connects − lines − lost)",
                format!("{}", s.ops as i64 - (lines + lost) as i64),
            ),
            (
                "delivery latency, 1 event/ms (kernel timestamp → line in file)",
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
                    pct(0.5) * 1e3,
                    pct(0.99) * 1e3,
                    lat.max * 1e3,
                    latencies.len()
                ),
            ),
        ] {
            self.table.row(vec![k.to_string(), v]);
        }
        Ok(())
    }
}

fn parse_event_summary(stderr: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().find(|l| l.trim_start().starts_with("events:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    // events: X delivered, Y lost (ring buffer full)
    Some((words.get(1)?.parse().ok()?, words.get(3)?.parse().ok()?))
}

fn parse_denied_attempts(stderr: &str) -> Option<u64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("DENIED") && l.contains(DENIED))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words.get(2)?.parse().ok()
}

/// Follows an events file and returns, per line, now − the event's kernel timestamp.
fn tail_latencies(path: &Path, expect: u64, timeout: Duration) -> Result<Vec<f64>> {
    let mut f = fs::File::open(path)?;
    let mut pending = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut pos = 0u64;
    while (out.len() as u64) < expect && Instant::now() < deadline {
        f.seek(SeekFrom::Start(pos))?;
        let mut chunk = String::new();
        let n = f.read_to_string(&mut chunk)?;
        if n == 0 {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs_f64();
        pos += n as u64;
        pending.push_str(&chunk);
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            if let Some(t) = event_time(&line) {
                out.push(now - t);
            }
        }
    }
    Ok(out)
}

/// `"time":"2026-11-23T05:32:02.257522Z"` → seconds since the epoch.
fn event_time(line: &str) -> Option<f64> {
    let start = line.find("\"time\":\"")? + 8;
    let s = line.get(start..start + 27)?;
    let num = |a: usize, b: usize| -> Option<i64> { s.get(a..b)?.parse().ok() };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let frac: f64 = format!("0{}", s.get(19..26)?).parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + mi * 60 + sec) as f64 + frac)
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
