//! The real `pipeguard agent` against the list/watch test server, for the abuse tests: a
//! node (cgroup root, server, kubeconfig), the agent process (optionally with a low
//! descriptor limit, its stderr kept for inspection), and plain HTTP over real sockets.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{Bpffs, kube_api::KubeApiServer, test_cgroup};

pub const NODE: &str = "test-node";

pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {}}})
}

pub fn pod(ns: &str, name: &str, uid: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": "runner"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// Egress of `app=runner` pods in `ns` to one address and TCP port.
pub fn allow_only(ns: &str, name: &str, cidr: &str, port: u16) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": port}]}]}
    })
}

/// A pod UID for a number (valid for kubelet's cgroup names).
pub fn uid(n: u32) -> String {
    format!("{n:08x}-1111-2222-3333-444444444444")
}

/// One node: a cgroup root with kubelet's cgroupfs layout, the list/watch server, and a
/// kubeconfig for it. Removed on drop.
pub struct Node {
    pub root: PathBuf,
    pub server: KubeApiServer,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    // Dropped after the server's tasks: declared last.
    pub runtime: tokio::runtime::Runtime,
    _cgroup: pipeguard::cgroup::OwnedCgroup,
}

pub fn node(name: &str) -> Node {
    let cgroup = test_cgroup(name);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(KubeApiServer::start());
    let dir = std::env::temp_dir().join(format!("pg-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = server.kubeconfig(&dir);
    std::fs::create_dir_all(cgroup.path().join("kubepods/besteffort")).unwrap();
    Node {
        root: cgroup.path().to_path_buf(),
        server,
        kubeconfig,
        dir,
        runtime,
        _cgroup: cgroup,
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    /// The pod cgroup (besteffort) with one container cgroup in it; returns the container's.
    pub fn pod_cgroup(&self, uid: &str) -> PathBuf {
        let container = self
            .root
            .join(format!("kubepods/besteffort/pod{uid}"))
            .join("cri-containerd-0123abcd.scope");
        std::fs::create_dir_all(&container).unwrap();
        container
    }
}

/// The agent process, stopped and reaped on drop; its pins live on a private bpffs.
pub struct Agent {
    child: Option<Child>,
    pub listen: String,
    pub stderr: PathBuf,
    _bpffs: Bpffs,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The agent's stdout, when it was started with it piped (the caller owns the pipe).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Peak resident memory in KiB (VmHWM).
    pub fn hwm_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{}/status", self.pid()))
    }

    /// CPU time (user + system) so far.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let t: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(t as f64 / ticks)
    }

    /// Open descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the agent process this test started and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Raises this process's soft descriptor limit to its hard limit (thousands of clients).
pub fn raise_own_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the agent guarding namespace `ci`. `nofile`: soft and hard RLIMIT_NOFILE for it.
pub fn start_agent(n: &Node, extra: &[&str], nofile: Option<u64>) -> Agent {
    start_agent_with_stdout(n, extra, nofile, Stdio::null())
}

/// As [`start_agent`], with the agent's stdout going to `stdout`.
pub fn start_agent_with_stdout(n: &Node, extra: &[&str], nofile: Option<u64>, stdout: Stdio) -> Agent {
    let bpffs = Bpffs::mount("abuse");
    let listen = format!("127.0.0.1:{}", free_port());
    let stderr = n.dir.join(format!("agent-{}.log", free_port()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeguard"));
    cmd.args([
        "agent",
        "--node-name",
        NODE,
        "--guard-namespaces",
        "ci",
        "--listen",
        &listen,
    ])
    .arg("--cgroup-root")
    .arg(&n.root)
    .arg("--kubeconfig")
    .arg(&n.kubeconfig)
    .arg("--pin-dir")
    .arg(bpffs.pin_dir())
    .args(extra)
    .stdout(stdout)
    .stderr(std::fs::File::create(&stderr).unwrap());
    if let Some(limit) = nofile {
        // SAFETY: setrlimit is async-signal-safe; it only lowers this child's limit.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().expect("start pipeguard agent");
    Agent {
        child: Some(child),
        listen,
        stderr,
        _bpffs: bpffs,
    }
}

/// A plain HTTP/1.0 GET over a real socket: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of an unlabelled metric line `name value`.
pub fn metric(agent: &Agent, name: &str) -> Option<f64> {
    let (_, body) = http_get(&agent.listen, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

pub fn wait_ready(agent: &Agent, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some((200, _)) = http_get(&agent.listen, "/readyz") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent never became ready: {:?}\nlog:\n{}",
            http_get(&agent.listen, "/readyz"),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after `within`.
pub fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
