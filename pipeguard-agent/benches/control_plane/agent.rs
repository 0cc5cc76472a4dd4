//! Policy change → enforcement and memory, through the real `pipeguard agent` binary.
//!
//! A list/watch server holds one guarded runner pod and a NetworkPolicy of N CIDRs; a
//! prober (this binary, re-executed in the pod's container cgroup) connects a UDP socket to
//! 127.0.0.1:9 every 100 µs and reports each change of verdict. A change adds or removes
//! 127.0.0.1/32 from the policy: alone (incremental), or together with every other CIDR
//! (full rebuild). The lag runs from the server having emitted the watch event to the line
//! in which the prober reports the new verdict.

use std::{
    io::{BufRead, BufReader, Write},
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    library::cidrs,
    report::{Report, mib, ms, summarize},
};
use crate::common::{Bpffs, kube_api::KubeApiServer, start_in_cgroup, test_cgroup};

pub const PROBER_ENV: &str = "PG_BENCH_PROBER";
const NODE: &str = "bench-node";
const UID: &str = "0e0e0e0e-1111-2222-3333-444444444444";
const PROBE_CIDR: &str = "127.0.0.1/32";

/// The prober's loop; never returns (the bench kills it by pid).
pub fn prober(target: &str) -> ! {
    let mut last = None;
    let mut out = std::io::stdout();
    loop {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let allowed = match socket.connect(target) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => false,
            Err(e) => panic!("prober: connect {target}: {e}"),
        };
        if last != Some(allowed) {
            let _ = writeln!(out, "{}", if allowed { "allowed" } else { "denied" });
            let _ = out.flush();
            last = Some(allowed);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn policy(cidrs: &[String], with_probe: bool) -> Value {
    // Never an empty `to`: that would allow every destination.
    let mut to: Vec<Value> = std::iter::once("192.0.2.0/24")
        .chain(cidrs.iter().map(String::as_str))
        .map(|c| json!({"ipBlock": {"cidr": c}}))
        .collect();
    if with_probe {
        to.push(json!({"ipBlock": {"cidr": PROBE_CIDR}}));
    }
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bulk", "namespace": "ci"},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": to}]}
    })
}

/// A child process killed (by pid) and reaped on drop.
pub struct Owned(Child);

impl Owned {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent, stopped with SIGTERM (then SIGKILL) on drop.
struct AgentProcess {
    child: Option<Child>,
    listen: String,
    log: PathBuf,
}

impl AgentProcess {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the agent this bench started and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One node: cgroup tree, list/watch server, bpffs for pins, the agent, the prober.
/// Fields drop in order: prober, agent, server, runtime, bpffs, cgroup.
struct Node {
    verdicts: mpsc::Receiver<(Instant, bool)>,
    _prober: Owned,
    agent: AgentProcess,
    server: KubeApiServer,
    _runtime: tokio::runtime::Runtime,
    _bpffs: Bpffs,
    _dir: TempDir,
    _cgroup: pipeguard::cgroup::OwnedCgroup,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// (status, body) of a plain HTTP/1.0 GET.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The agent's own sync histogram: (seconds summed, syncs). A sync is one recompute of
/// every pod's allowlist and the map writes; the rest of a change's lag is the watch
/// stream and its decoding.
fn sync_totals(addr: &str) -> (f64, f64) {
    let (_, body) = http_get(addr, "/metrics").expect("the agent's /metrics");
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    (
        value("pipeguard_sync_duration_seconds_sum"),
        value("pipeguard_sync_duration_seconds_count"),
    )
}

fn mean_sync_ms(before: (f64, f64), after: (f64, f64)) -> f64 {
    let syncs = (after.1 - before.1).max(1.0);
    (after.0 - before.0) / syncs * 1e3
}

impl Node {
    fn start(initial_policy: Value) -> Self {
        let cgroup = test_cgroup("bench-control-plane");
        let root = cgroup.path().to_path_buf();
        let container = root
            .join("kubepods/burstable")
            .join(format!("pod{UID}"))
            .join("cri-containerd-0123abcd.scope");
        std::fs::create_dir_all(&container).expect("create the pod cgroup");
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let server = runtime.block_on(KubeApiServer::start());
        server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ci"}}));
        server.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "runner", "namespace": "ci", "uid": UID, "labels": {"app": "runner"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.10", "podIPs": [{"ip": "10.0.0.10"}]}
        }));
        server.apply(initial_policy);
        let dir = std::env::temp_dir().join(format!("pg-bench-cp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let kubeconfig = server.kubeconfig(&dir);
        let bpffs = Bpffs::mount("bench-cp");
        let listen = format!("127.0.0.1:{}", free_port());
        let log = dir.join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
            .args([
                "agent",
                "--node-name",
                NODE,
                "--guard-namespaces",
                "ci",
                "--listen",
                &listen,
            ])
            .args(["--no-kube-events", "--no-events-stdout"])
            .arg("--cgroup-root")
            .arg(&root)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--pin-dir")
            .arg(bpffs.pin_dir())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the agent log"))
            .spawn()
            .expect("start pipeguard agent");
        let agent = AgentProcess {
            child: Some(child),
            listen,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(&agent.listen, "/readyz").map(|(status, _)| status) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "the agent never became ready:\n{}",
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (prober, verdicts) = spawn_prober(&container);
        Self {
            verdicts,
            _prober: prober,
            agent,
            server,
            _runtime: runtime,
            _bpffs: bpffs,
            _dir: TempDir(dir),
            _cgroup: cgroup,
        }
    }

    /// Waits for the prober to report `allowed`; returns when it did.
    fn wait_for(&self, allowed: bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.verdicts.recv_timeout(left) {
                Ok((at, v)) if v == allowed => return at,
                Ok(_) => continue,
                Err(_) => panic!(
                    "the prober never saw allowed={allowed}; agent log:\n{}",
                    self.agent.log_tail()
                ),
            }
        }
    }

    /// Applies `policy` and returns the lag until the prober sees `allowed`.
    fn change(&self, policy: Value, allowed: bool) -> Duration {
        while self.verdicts.try_recv().is_ok() {}
        self.server.apply(policy);
        let emitted = Instant::now();
        self.wait_for(allowed).saturating_duration_since(emitted)
    }
}

pub fn spawn_prober(cgroup: &Path) -> (Owned, mpsc::Receiver<(Instant, bool)>) {
    let mut cmd = Command::new(std::env::current_exe().expect("this binary"));
    cmd.env(PROBER_ENV, "127.0.0.1:9")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    start_in_cgroup(&mut cmd, cgroup);
    let mut child = cmd.spawn().expect("start the prober");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line == "allowed")).is_err() {
                return;
            }
        }
    });
    (Owned(child), rx)
}

/// (VmRSS, VmHWM) in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The memlock of the BPF maps the process holds, in KiB.
pub fn bpf_map_kib(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let mut bytes = 0u64;
    for fd in fds.flatten() {
        let is_map = std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))
                .unwrap_or_default();
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    bytes / 1024
}

pub fn run(quick: bool, report: &mut Report) {
    let sizes: [usize; 3] = [0, 10_000, 100_000];
    let (incremental_n, rebuild_n) = if quick { (4, 2) } else { (40, 10) };
    let mut rows = Vec::new();
    let mut memory_rows = Vec::new();
    let mut figures = Vec::new();
    for n in sizes {
        let (a, b) = (cidrs(n, 1), cidrs(n, 2));
        let node = Node::start(policy(&a, false));
        node.wait_for(false);
        std::thread::sleep(Duration::from_millis(500));
        let pid = node.agent.pid();
        let (idle_rss, _) = memory_kib(pid);
        let maps = bpf_map_kib(pid);

        // Incremental: 127.0.0.1/32 in and out of the same N CIDRs.
        let before = sync_totals(&node.agent.listen);
        let mut incremental = Vec::new();
        for i in 0..incremental_n {
            let allow = i % 2 == 0;
            let next = policy(&a, allow);
            incremental.push(node.change(next, allow));
        }
        let after_incremental = sync_totals(&node.agent.listen);
        // Full rebuild: every CIDR changes (set a ↔ set b), and 127.0.0.1/32 with them.
        let mut rebuild = Vec::new();
        if n > 0 {
            let mut allow = incremental_n % 2 == 0;
            for i in 0..rebuild_n {
                let set = if i % 2 == 0 { &b } else { &a };
                let next = policy(set, allow);
                rebuild.push(node.change(next, allow));
                allow = !allow;
            }
        }
        let after_rebuild = sync_totals(&node.agent.listen);
        let sync_incremental = mean_sync_ms(before, after_incremental);
        let sync_rebuild = (!rebuild.is_empty()).then(|| mean_sync_ms(after_incremental, after_rebuild));
        let (rss, hwm) = memory_kib(pid);
        let inc = summarize(&incremental);
        let label = if n == 0 {
            "1".to_string()
        } else {
            format!("{}k", n / 1000)
        };
        let reb = (!rebuild.is_empty()).then(|| summarize(&rebuild));
        rows.push(vec![
            label.clone(),
            format!("{}", inc.n),
            ms(inc.p50),
            ms(inc.p99),
            ms(sync_incremental),
            reb.map_or("—".into(), |r| format!("{}", r.n)),
            reb.map_or("—".into(), |r| ms(r.p50)),
            reb.map_or("—".into(), |r| ms(r.p99)),
            sync_rebuild.map_or("—".into(), ms),
        ]);
        memory_rows.push(vec![label, mib(idle_rss), mib(rss), mib(hwm), mib(maps)]);
        figures.push(json!({
            "cidrs": n,
            "incremental": inc.json(),
            "full_rebuild": reb.map(|r| r.json()),
            "agent_sync_mean_ms_incremental": sync_incremental,
            "agent_sync_mean_ms_full_rebuild": sync_rebuild,
            "agent_rss_kib_synced_idle": idle_rss,
            "agent_rss_kib_after_changes": rss,
            "agent_hwm_kib": hwm,
            "bpf_map_memlock_kib": maps,
        }));
    }
    report.section(
        "5d. Policy change → enforcement through `pipeguard agent` (watch event emitted → a prober in the pod's cgroup sees the new verdict)",
        &[
            "CIDRs in the policy",
            "incremental changes",
            "incremental p50",
            "incremental p99",
            "of which agent sync, mean",
            "full rebuilds",
            "full rebuild p50",
            "full rebuild p99",
            "of which agent sync, mean",
        ],
    );
    for row in rows {
        report.row(row);
    }
    report.section(
        "5e. `pipeguard agent` memory (VmRSS) with the policy synced, and the BPF map memory it holds",
        &[
            "CIDRs in the policy",
            "RSS, synced and idle",
            "RSS after the changes above",
            "VmHWM",
            "BPF maps (memlock)",
        ],
    );
    for row in memory_rows {
        report.row(row);
    }
    report.figure("agent", json!(figures));
}
