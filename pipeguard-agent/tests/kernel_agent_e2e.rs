//! The agent end to end: a test server speaking the Kubernetes list/watch protocol, the
//! real `pipeguard agent` binary, real cgroups in both kubelet layouts, real eBPF
//! enforcement, and probe processes placed in pod cgroups. Needs root and cgroup2; fails
//! (never skips) without them. Prints the latencies it measures.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::rc::Rc;

use common::{
    Bpffs, kube_api::KubeApiServer, listeners, probe::Outcome, probe_command, run_probe, test_cgroup,
};
use serde_json::{Value, json};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

const NODE: &str = "test-node";
const RUNNER_A: &str = "0a0a0a0a-1111-2222-3333-444444444444";
const RUNNER_B: &str = "0b0b0b0b-1111-2222-3333-444444444444";

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, uid: &str, node: &str, labels: Value, ip: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn egress_policy(ns: &str, name: &str, to: Value, ports: Value) -> Value {
    runner_policy(ns, name, "Egress", json!([{"to": to, "ports": ports}]))
}

/// A NetworkPolicy selecting `app: runner` for one direction (`Egress` or `Ingress`).
fn runner_policy(ns: &str, name: &str, direction: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}}, "policyTypes": [direction],
                 direction.to_lowercase(): rules}
    })
}

fn tcp_port(port: u16) -> Value {
    json!([{"protocol": "TCP", "port": port}])
}

fn ip_block(cidr: &str) -> Value {
    json!([{"ipBlock": {"cidr": cidr}}])
}

/// One node's worth of test fixtures: a cgroup root for kubelet's layouts, a server
/// speaking the list/watch protocol, and a kubeconfig for it. Removed on drop.
struct Node {
    root: PathBuf,
    server: KubeApiServer,
    kubeconfig: PathBuf,
    dir: PathBuf,
    // Dropped after the server's tasks: declared last.
    runtime: tokio::runtime::Runtime,
    _cgroup: pipeguard::cgroup::OwnedCgroup,
}

fn node(name: &str) -> Node {
    let cgroup = test_cgroup(name);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(KubeApiServer::start());
    let dir = std::env::temp_dir().join(format!("pg-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = server.kubeconfig(&dir);
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

/// The agent process, stopped and reaped on drop; its pins live on a private bpffs that
/// goes with the last agent using it.
struct Agent {
    child: Option<Child>,
    listen: String,
    _bpffs: Rc<Bpffs>,
}

impl Agent {
    fn stop(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the agent process this test started and has not reaped.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_agent(root: &Path, kubeconfig: &Path, extra: &[&str]) -> Agent {
    start_agent_on(root, kubeconfig, extra, Rc::new(Bpffs::mount("agent")))
}

fn start_agent_on(root: &Path, kubeconfig: &Path, extra: &[&str], bpffs: Rc<Bpffs>) -> Agent {
    let listen = format!("127.0.0.1:{}", free_port());
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
        .arg("--cgroup-root")
        .arg(root)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--pin-dir")
        .arg(bpffs.pin_dir())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pipeguard agent");
    Agent {
        child: Some(child),
        listen,
        _bpffs: bpffs,
    }
}

/// A plain HTTP/1.0 GET over a real socket: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
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

fn wait_ready(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = http_get(&agent.listen, "/readyz") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent never became ready: {:?}",
            http_get(&agent.listen, "/readyz")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates the pod cgroup and a container cgroup inside it; returns the container cgroup.
fn pod_cgroup(root: &Path, relative: &str) -> PathBuf {
    let container = root.join(relative).join("cri-containerd-0123abcd.scope");
    std::fs::create_dir_all(&container).unwrap();
    container
}

fn once(cgroup: &Path, action: String) -> Outcome {
    run_probe(cgroup, &[action]).pop().expect("one outcome")
}

/// Runs a `wait-*` probe until the verdict flips.
fn until(cgroup: &Path, action: String) {
    let o = once(cgroup, action);
    assert!(o.ok, "the verdict never changed: {o:?}");
}

/// Like [`until`], for a change seen only after a re-list: the watcher first waits out two
/// backoff delays (the cut, then the 410), each up to 2 × 10 s once earlier cuts stretched it.
fn until_relisted(cgroup: &Path, action: String) {
    let mut tries = (0..5).map(|_| once(cgroup, action.clone()));
    let last = tries.find(|o| o.ok);
    assert!(last.is_some(), "the verdict never changed within 50 s: {action}");
}

/// Time from `since` (just before the change) until a probe saw the new verdict: an upper
/// bound on the lag, as it includes starting the probe process.
fn until_since(since: Instant, cgroup: &Path, action: String) -> Duration {
    until(cgroup, action);
    since.elapsed()
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} min={:?} p50={:?} max={:?}",
        samples.len(),
        samples[0],
        at(0.5),
        samples[samples.len() - 1]
    )
}

#[test]
fn agent_enforces_cluster_policies_on_pod_cgroups() {
    let n = node("agent-e2e");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    std::fs::create_dir_all(root.join("kubepods/burstable")).unwrap();
    std::fs::create_dir_all(root.join("kubepods.slice/kubepods-besteffort.slice")).unwrap();

    let registry = listeners::tcp("127.0.0.1:0");
    let mirror = listeners::tcp("127.0.0.1:0");
    let svc = listeners::tcp("127.0.0.3:0");
    let (r, m, s) = (registry.addr, mirror.addr, svc.addr);

    server.apply(namespace("ci", json!({})));
    server.apply(namespace("svc", json!({"env": "prod"})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    server.apply(pod(
        "svc",
        "staging-api",
        "0c0c0c0c-1111-2222-3333-444444444444",
        "other-node",
        json!({"app": "api"}),
        "127.0.0.3",
        json!([{"name": "api-http", "containerPort": s.port(), "protocol": "TCP"}]),
    ));
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(r.port()),
    ));

    let a = pod_cgroup(&root, &format!("kubepods/burstable/pod{RUNNER_A}"));
    let agent = start_agent(&root, &kubeconfig, &[]);
    wait_ready(&agent);

    // 1. The policy from the API is enforced on the cgroupfs-layout pod.
    assert!(once(&a, format!("tcp {r} up")).ok, "the registry is allowed");
    assert!(
        once(&a, format!("tcp {m} leak")).denied_with_eperm(),
        "the mirror is not"
    );

    // 2. Policy changes reach the kernel: flip the allowed port back and forth.
    let mut samples = Vec::new();
    for i in 0..10 {
        let (to, from) = if i % 2 == 0 { (m, r) } else { (r, m) };
        let t0 = Instant::now();
        server.apply(egress_policy(
            "ci",
            "registry",
            ip_block("127.0.0.1/32"),
            tcp_port(to.port()),
        ));
        samples.push(until_since(t0, &a, format!("wait-allowed {to}")));
        assert!(
            once(&a, format!("tcp {from} leak")).denied_with_eperm(),
            "the old allow is revoked"
        );
    }
    eprintln!(
        "LATENCY policy change → enforcement (API event to a probe seeing it): {}",
        summary(samples)
    );
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(m.port()),
    ));
    until(&a, format!("wait-allowed {m}"));

    // 3. A new pod whose cgroup appears after the pod object (systemd layout).
    server.apply(pod(
        "ci",
        "runner-b",
        RUNNER_B,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.11",
        json!([]),
    ));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let b = pod_cgroup(
        &root,
        &format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            RUNNER_B.replace('-', "_")
        ),
    );
    let new_pod = until_since(t0, &b, format!("wait-denied {r}"));
    eprintln!("LATENCY new pod cgroup → enforcement (--unknown-pods allow: open for at most): {new_pod:?}");
    assert!(
        once(&b, format!("tcp {m} ok")).ok,
        "runner-b gets the same policy"
    );

    // 4. A namespace label change flips a namespaceSelector peer with a named port.
    let ns_peer = json!([{"namespaceSelector": {"matchLabels": {"env": "staging"}}, "podSelector": {"matchLabels": {"app": "api"}}}]);
    server.apply(egress_policy(
        "ci",
        "staging-api",
        ns_peer,
        json!([{"protocol": "TCP", "port": "api-http"}]),
    ));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        once(&a, format!("tcp {s} no")).denied_with_eperm(),
        "svc is env=prod: not selected"
    );
    let t0 = Instant::now();
    server.apply(namespace("svc", json!({"env": "staging"})));
    let flip = until_since(t0, &a, format!("wait-allowed {s}"));
    eprintln!("LATENCY namespace label change → enforcement: {flip:?}");

    // 5. The server drops every watch, and later forgets its history (410 Gone on resume):
    //    the agent re-watches / re-lists and keeps following changes, never opening egress.
    server.drop_watches();
    assert!(
        once(&a, format!("tcp {r} leak")).denied_with_eperm(),
        "still enforced while watches are down"
    );
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(r.port()),
    ));
    until(&a, format!("wait-allowed {r}"));
    server.expire_history();
    server.drop_watches();
    server.delete("NetworkPolicy", Some("ci"), "staging-api");
    until_relisted(&a, format!("wait-denied {s}"));

    // The agent really watched, with bookmarks, and re-listed after the 410.
    let log = server.request_log();
    let watches = log.iter().filter(|l| l.contains("watch=true")).count();
    assert!(
        watches >= 6,
        "three kinds watched, and watched again after the drop: {log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("allowWatchBookmarks=true")),
        "{log:#?}"
    );
    // Each watcher re-lists after its 410, after two backoff delays (the cut, then the 410);
    // earlier cuts in this test have stretched each to its maximum, 10 s plus up to 100 %.
    let deadline = Instant::now() + Duration::from_secs(45);
    for path in [
        "GET /api/v1/pods?",
        "GET /api/v1/namespaces?",
        "GET /apis/networking.k8s.io/v1/networkpolicies?",
    ] {
        loop {
            let lists = server
                .request_log()
                .iter()
                .filter(|l| l.starts_with(path) && !l.contains("watch=true"))
                .count();
            if lists >= 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{path} was not listed again after 410 Gone: {:#?}",
                server.request_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // 6. Deleting the last egress policy leaves the guarded pod unrestricted (NetworkPolicy
    //    semantics without --default-deny-egress).
    server.delete("NetworkPolicy", Some("ci"), "registry");
    until(&a, format!("wait-allowed {m}"));

    // 7. Health and metrics over a real socket.
    let (status, body) = http_get(&agent.listen, "/healthz").expect("healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, metrics) = http_get(&agent.listen, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        !metrics.contains("pipeguard_denied_destinations"),
        "per-destination series are opt-in"
    );
    for needle in [
        "pipeguard_ready 1",
        "pipeguard_pods{state=\"unrestricted\"} 2",
        "pipeguard_build_info",
        "pipeguard_sync_duration_seconds",
        "pipeguard_packets_total{",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
    drop(agent);
}

/// The value of one series in a scrape (0 when the series is not there yet).
fn metric(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{series}: {v:?}: {e}"))
        })
        .unwrap_or(0)
}

/// /metrics is read at scrape time: denials made right before a scrape are in it, without
/// waiting for the sync loop (which, with nothing changing, wakes only every 10 s).
#[test]
fn metrics_show_denials_at_scrape_time() {
    const DENY: &str = r#"pipeguard_packets_total{namespace="ci",pod="runner-a",verdict="deny"}"#;
    const ATTEMPTS: &str = "pipeguard_event_attempts_total";
    let n = node("agent-scrape");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    let registry = listeners::tcp("127.0.0.1:0");
    let attacker = listeners::tcp("127.0.0.1:0");
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(registry.addr.port()),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_A}"));
    let agent = start_agent(&root, &kubeconfig, &["--no-events-stdout"]);
    wait_ready(&agent);
    let (_, before) = http_get(&agent.listen, "/metrics").expect("metrics");

    let outcomes = run_probe(&a, &vec![format!("tcp {} leak", attacker.addr); 4]);
    assert!(outcomes.iter().all(Outcome::denied_with_eperm), "{outcomes:?}");
    // Right away: the kernel counters are read by the scrape itself.
    let (status, after) = http_get(&agent.listen, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metric(&after, DENY) >= metric(&before, DENY) + 4,
        "4 denials not in the scrape right after them:\nbefore:\n{before}\nafter:\n{after}"
    );
    // The event pipeline reads the ring buffer on its own task: give it a moment, far
    // less than the sync loop's 10 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, now) = http_get(&agent.listen, "/metrics").expect("metrics");
        if metric(&now, ATTEMPTS) >= metric(&before, ATTEMPTS) + 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ATTEMPTS} did not count the 4 denials within 2 s:\nbefore:\n{before}\nnow:\n{now}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(agent);
}

#[test]
fn an_invalid_policy_fails_closed_and_is_reported() {
    let n = node("agent-invalid");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    let registry = listeners::tcp("127.0.0.1:0");
    let r = registry.addr;
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(r.port()),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_A}"));
    let agent = start_agent(&root, &kubeconfig, &[]);
    wait_ready(&agent);
    assert!(once(&a, format!("tcp {r} ok")).ok);

    // An object the real API server would reject reaches the agent anyway: the pod keeps its
    // last good allowlist; it does not become unrestricted.
    let other = listeners::tcp("127.0.0.1:0");
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/33"),
        tcp_port(r.port()),
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        once(&a, format!("tcp {} leak", other.addr)).denied_with_eperm(),
        "fails closed"
    );
    assert!(
        once(&a, format!("tcp {r} ok")).ok,
        "keeps its last good allowlist"
    );
    let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
    assert!(
        metrics.contains("pipeguard_policy_compiled{namespace=\"ci\",name=\"registry\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pipeguard_pods{state=\"failed_closed\"} 1"),
        "{metrics}"
    );

    // ...and on the pod itself, as a Kubernetes Event.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .events()
        .iter()
        .any(|e| e["reason"] == "EgressPolicyFailedClosed" && e["involvedObject"]["uid"] == RUNNER_A)
    {
        assert!(
            Instant::now() < deadline,
            "no EgressPolicyFailedClosed event: {:?}",
            server.events()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A pod that never had an allowlist gets deny-all.
    server.apply(pod(
        "ci",
        "runner-b",
        RUNNER_B,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.11",
        json!([]),
    ));
    let b = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_B}"));
    until(&b, format!("wait-denied {r}"));
    drop(agent);
}

#[test]
fn unknown_pods_deny_closes_the_window_before_a_pod_is_matched() {
    let n = node("agent-unknown");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    std::fs::create_dir_all(root.join("kubepods/besteffort")).unwrap();
    let registry = listeners::tcp("127.0.0.1:0");
    let r = registry.addr;
    server.apply(namespace("ci", json!({})));
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(r.port()),
    ));
    let agent = start_agent(&root, &kubeconfig, &["--unknown-pods", "deny"]);
    wait_ready(&agent);

    // A pod cgroup the agent cannot match to any pod gets no egress at all.
    let stray = pod_cgroup(
        &root,
        "kubepods/besteffort/pod0e0e0e0e-1111-2222-3333-444444444444",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        once(&stray, format!("tcp {r} no")).denied_with_eperm(),
        "an unmatched pod cgroup is denied"
    );

    // A new runner pod: denied until matched, then its policy applies. The window is the
    // time from its cgroup appearing to its first allowed connection.
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    let t0 = Instant::now();
    let a = pod_cgroup(&root, &format!("kubepods/besteffort/pod{RUNNER_A}"));
    let window = until_since(t0, &a, format!("wait-allowed {r}"));
    eprintln!("LATENCY new pod cgroup → enforcement (--unknown-pods deny: denied for at most): {window:?}");
    drop(agent);
}

#[test]
fn enforcement_survives_sigkill_and_a_new_agent_adopts_it() {
    let n = node("agent-restart");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    let registry = listeners::tcp("127.0.0.1:0");
    let attacker = listeners::tcp("127.0.0.1:0");
    let (r, d) = (registry.addr, attacker.addr);
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(r.port()),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_A}"));
    let bpffs = Rc::new(Bpffs::mount("restart"));

    let mut first = start_agent_on(&root, &kubeconfig, &[], bpffs.clone());
    wait_ready(&first);
    assert!(once(&a, format!("tcp {d} before")).denied_with_eperm());
    // The hammer tries the denied destination without pause through the kill and restart.
    let hammer = probe_command(&a, &[format!("hammer {d} 3000")]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    first.stop(libc::SIGKILL);
    assert!(
        once(&a, format!("tcp {r} during")).ok,
        "allowed traffic keeps working with no agent running"
    );
    assert!(
        once(&a, format!("tcp {d} during")).denied_with_eperm(),
        "denied traffic stays denied with no agent"
    );

    // The policy changes while no agent runs: a different prefix with a hole, another port.
    let mirror = listeners::tcp("127.0.0.1:0");
    let m = mirror.addr;
    server.apply(egress_policy(
        "ci",
        "registry",
        json!([{"ipBlock": {"cidr": "127.0.0.0/8", "except": ["127.0.0.2/32"]}}]),
        tcp_port(m.port()),
    ));

    let second = start_agent_on(&root, &kubeconfig, &[], bpffs.clone());
    wait_ready(&second);
    until(&a, format!("wait-allowed {m}"));
    // The adopted allowlist was replaced, not overwritten in place: nothing of it is left
    // to allow the registry port the new policy no longer has.
    assert!(
        once(&a, format!("tcp {r} stale")).denied_with_eperm(),
        "a stale entry of the old allowlist survived"
    );
    let output = hammer.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "a denied connection got through during the restart: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(attacker.received.bytes().is_empty());
    // Counters survive: denials from before the restart still count.
    let (_, metrics) = http_get(&second.listen, "/metrics").unwrap();
    let denied = metrics
        .lines()
        .find(|l| l.starts_with("pipeguard_packets_total{") && l.contains("verdict=\"deny\""))
        .unwrap_or_else(|| panic!("no deny counter after restart:\n{metrics}"));
    assert!(!denied.ends_with(" 0"), "{denied}");
    // The adopted state still follows changes.
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(d.port()),
    ));
    until(&a, format!("wait-allowed {d}"));
    drop(second);

    // Still enforced after a clean stop; --uninstall removes it all.
    assert!(
        once(&a, format!("tcp {m} stopped")).denied_with_eperm(),
        "a stopped agent leaves enforcement in place"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["agent", "--uninstall", "--pin-dir"])
        .arg(bpffs.pin_dir())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!bpffs.pin_dir().exists(), "uninstall leaves nothing pinned");
    let after = once(&a, format!("tcp {m} uninstalled"));
    assert!(
        after.ok,
        "nothing is enforced once --uninstall returned: {after:?}"
    );
}

#[test]
fn not_ready_while_the_api_is_unreachable_and_it_says_why() {
    let test_root = test_cgroup("agent-unreachable");
    let root = test_root.path().to_path_buf();
    std::fs::create_dir_all(root.join("kubepods")).unwrap();
    let dir = std::env::temp_dir().join(format!("pg-agent-unreachable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A kubeconfig pointing at a loopback port nothing listens on.
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\nusers:\n- name: t\n  user: {{}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: t}}\ncurrent-context: t\n",
            free_port()
        ),
    )
    .unwrap();
    let agent = start_agent(&root, &kubeconfig, &["--sync-deadline", "1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((status, body)) = http_get(&agent.listen, "/readyz")
            && body.contains("caches not synced")
        {
            assert_eq!(status, 503);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never explained: {:?}",
            http_get(&agent.listen, "/readyz")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        http_get(&agent.listen, "/healthz").map(|r| r.0),
        Some(200),
        "alive, just not ready"
    );
    let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
    assert!(metrics.contains("pipeguard_ready 0"), "{metrics}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_flood_of_denied_connects_is_aggregated_counted_exactly_and_the_agent_stays_responsive() {
    use pipeguard::events::{
        client::{Request, follow},
        record::{Kind, Record},
    };
    const ATTEMPTS: u64 = 200_000;
    let n = node("agent-flood");
    let (root, server, kubeconfig, runtime) = (n.root.clone(), &n.server, n.kubeconfig.clone(), &n.runtime);
    let registry = listeners::tcp("127.0.0.1:0");
    let attacker = listeners::tcp("127.0.0.1:0");
    let d = attacker.addr;
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner", "tekton.dev/taskRun": "build-7"}),
        "10.0.0.10",
        json!([]),
    ));
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(registry.addr.port()),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_A}"));
    let agent = start_agent(
        &root,
        &kubeconfig,
        &["--no-events-stdout", "--metrics-per-destination"],
    );
    wait_ready(&agent);

    // `pipeguard events` follows the stream and prints it for people.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args([
            "events",
            "--endpoint",
            &format!("http://{}", agent.listen),
            "--namespace",
            "ci",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // A subscriber on the agent's stream (loopback: no token needed).
    let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Record>::new()));
    let (endpoint, sink) = (format!("http://{}", agent.listen), records.clone());
    runtime.spawn(async move {
        let req = Request {
            endpoint: &endpoint,
            token: None,
            namespace: Some("ci"),
            sse: false,
        };
        let _ = follow(&req, |line| {
            sink.lock()
                .unwrap()
                .push(serde_json::from_str(line).expect("a record"));
            true
        })
        .await;
    });
    std::thread::sleep(Duration::from_millis(200));

    let mut flood = probe_command(&a, &[format!("flood {d} {ATTEMPTS}")])
        .spawn()
        .unwrap();
    let mut health_checks = 0;
    while flood.try_wait().unwrap().is_none() {
        assert_eq!(
            http_get(&agent.listen, "/healthz").map(|r| r.0),
            Some(200),
            "the agent answers during the flood"
        );
        health_checks += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = flood.wait_with_output().unwrap();
    let outcome = common::parse_outcomes(&output).pop().expect("flood outcome");
    assert!(outcome.ok, "{outcome:?}");
    eprintln!(
        "FLOOD {ATTEMPTS} denied connects in {} ms; {health_checks} health checks answered meanwhile",
        outcome.elapsed_ms
    );

    // Every attempt is accounted for: in a record's count, or in a reported drop.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (violations, drops, n_records) = loop {
        let got = records.lock().unwrap().clone();
        let violations: u64 = got
            .iter()
            .filter(|r| r.kind == Kind::Violation && r.dst_port == Some(d.port()))
            .map(|r| r.count)
            .sum();
        let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
        let drops: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("pipeguard_event_ring_drops_total "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        if violations + drops >= ATTEMPTS || Instant::now() > deadline {
            break (violations, drops, got.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("FLOOD stream: {n_records} records for {violations} attempts, {drops} reported as dropped");
    assert_eq!(
        violations + drops,
        ATTEMPTS,
        "records' counts plus reported drops must equal the attempts"
    );
    assert!(n_records < 200, "the stream stays bounded: {n_records} records");
    let sample = records
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.kind == Kind::Violation)
        .cloned()
        .unwrap();
    eprintln!("FLOOD sample record: {}", serde_json::to_string(&sample).unwrap());
    let pod = sample.pod.clone().expect("enriched with the pod");
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
        ("ci", "runner-a", RUNNER_A)
    );
    assert_eq!(sample.ci.as_ref().map(|c| c.system.as_str()), Some("tekton"));
    assert_eq!(sample.policies, vec!["ci/registry".to_string()]);
    assert!(
        sample
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("no egress rule of ci/registry allows"),
        "{sample:?}"
    );
    assert_eq!(sample.node, NODE);
    assert!(sample.exe.is_some() || sample.comm.is_some());

    // The flood is a burst of denials: one deny_burst anomaly per 10 s window, on the stream
    // with the pod and its CI context, and in the metrics.
    let bursts: Vec<Record> = records
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.kind == Kind::Anomaly)
        .cloned()
        .collect();
    let windows = outcome.elapsed_ms / 10_000 + 1;
    assert!(
        !bursts.is_empty() && bursts.len() as u64 <= windows,
        "{} anomalies for a flood of {} ms: {bursts:?}",
        bursts.len(),
        outcome.elapsed_ms
    );
    assert_eq!(bursts[0].signal.as_deref(), Some("deny_burst"));
    assert_eq!(bursts[0].pod.as_ref().map(|p| p.name.as_str()), Some("runner-a"));
    assert_eq!(bursts[0].ci.as_ref().map(|c| c.system.as_str()), Some("tekton"));
    let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "pipeguard_anomalies_total{{signal=\"deny_burst\"}} {}",
            bursts.len()
        )),
        "{metrics}"
    );

    // The opt-in per-destination metric counts what the records count.
    let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
    let per_dest = format!(
        "pipeguard_denied_destinations_total{{namespace=\"ci\",pod=\"runner-a\",destination=\"{}:{}/tcp\"}} {violations}",
        d.ip(),
        d.port()
    );
    assert!(metrics.contains(&per_dest), "{per_dest} missing:\n{metrics}");
    assert!(
        metrics.contains("pipeguard_map_capacity{map=\"allow_v4\"} 262144"),
        "{metrics}"
    );
    // The socket table: how full it is, against its capacity.
    assert!(
        metrics.contains("pipeguard_map_capacity{map=\"sockets\"} 65536")
            && metrics.contains("pipeguard_map_entries{map=\"sockets\"} "),
        "{metrics}"
    );

    // The follower printed the first record readably.
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(follower.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    // SAFETY: stopping the follower process this test started.
    unsafe { libc::kill(follower.id() as i32, libc::SIGTERM) };
    let _ = follower.wait();
    assert!(first.contains("DENIED ci/runner-a"), "{first}");
    assert!(
        first.contains(&format!("→ {}:{}/tcp via connect4", d.ip(), d.port())),
        "{first}"
    );

    // The blocked attempts show up as a Kubernetes Event on the pod.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = server.events();
        if let Some(e) = events
            .iter()
            .find(|e| e["involvedObject"]["uid"] == RUNNER_A && e["reason"] == "EgressDenied")
        {
            assert!(
                e["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("{}:{}/tcp", d.ip(), d.port())),
                "{e}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Kubernetes Event was posted: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And so does the deny_burst it raised, on the same pod.
    let burst = wait_event(server, "PipeguardAnomaly", |e| {
        e["involvedObject"]["uid"] == RUNNER_A && e["reason"] == "PipeguardAnomaly"
    });
    assert_eq!(burst["type"], "Warning");
    assert_eq!(burst["involvedObject"]["kind"], "Pod");
    assert!(
        burst["message"]
            .as_str()
            .unwrap()
            .starts_with("pipeguard raised deny_burst "),
        "{burst}"
    );
    drop(agent);
}

#[test]
fn a_privileged_runner_pod_is_reported_and_denied_with_refuse_privileged() {
    let n = node("agent-privileged");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    let registry = listeners::tcp("127.0.0.1:0");
    let r = registry.addr;
    server.apply(namespace("ci", json!({})));
    // A docker-in-docker runner: privileged, so it could step around any node-level guard.
    let mut dind = pod(
        "ci",
        "dind",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    );
    dind["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    server.apply(dind);
    server.apply(egress_policy(
        "ci",
        "registry",
        ip_block("127.0.0.1/32"),
        tcp_port(r.port()),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_A}"));

    // Default: reported (metric, /readyz, an Event on the pod); its policy still applies.
    let agent = start_agent(&root, &kubeconfig, &[]);
    wait_ready(&agent);
    assert!(once(&a, format!("tcp {r} ok")).ok, "reported, not refused");
    let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
    assert!(
        metrics.contains("pipeguard_pods{state=\"escape_capable\"} 1"),
        "{metrics}"
    );
    let (status, readyz) = http_get(&agent.listen, "/readyz").unwrap();
    assert_eq!(status, 200, "{readyz}");
    assert!(
        readyz.contains("escape-capable pod ci/dind: container \"main\" is privileged"),
        "{readyz}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .events()
        .iter()
        .any(|e| e["reason"] == "EgressGuardBypassable" && e["involvedObject"]["uid"] == RUNNER_A)
    {
        assert!(
            Instant::now() < deadline,
            "no EgressGuardBypassable event: {:?}",
            server.events()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agent);

    // --refuse-privileged: fail closed, all its egress denied, the allowed registry too.
    let agent = start_agent(&root, &kubeconfig, &["--refuse-privileged"]);
    wait_ready(&agent);
    until(&a, format!("wait-denied {r}"));
    let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
    assert!(
        metrics.contains("pipeguard_pods{state=\"refused_privileged\"} 1"),
        "{metrics}"
    );
    let (_, readyz) = http_get(&agent.listen, "/readyz").unwrap();
    assert!(readyz.contains("all its egress is denied"), "{readyz}");
    drop(agent);
}

fn domain_policy(ns: &str, name: &str, domains: Value) -> Value {
    json!({
        "apiVersion": "pipeguard.dev/v1alpha1", "kind": "DomainPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}},
                 "egress": [{"domains": domains, "ports": [{"port": 443}]}]}
    })
}

fn cluster_domain_policy(name: &str, domains: Value) -> Value {
    json!({
        "apiVersion": "pipeguard.dev/v1alpha1", "kind": "ClusterDomainPolicy",
        "metadata": {"name": name},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}},
                 "podSelector": {"matchLabels": {"app": "runner"}},
                 "egress": [{"domains": domains}]}
    })
}

/// Waits until /metrics has every line of `lines`.
fn wait_metrics(agent: &Agent, lines: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = http_get(&agent.listen, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        if lines.iter().all(|l| metrics.lines().any(|m| m == *l)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "missing some of {lines:?} in:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until each series of `series` is in /metrics with at least its value.
fn wait_metrics_at_least(agent: &Agent, series: &[(&str, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = http_get(&agent.listen, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        let value = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
        };
        if series
            .iter()
            .all(|(name, min)| value(name).is_some_and(|v| v >= *min))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "some of {series:?} missing or too low in:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_event(server: &KubeApiServer, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = server.events().into_iter().find(&matches) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} event: {:?}",
            server.events()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn domain_policies_are_watched_reach_the_kernel_and_invalid_ones_fail_closed() {
    let n = node("agent-domains");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    let web = listeners::tcp("127.0.0.1:0");
    let other = listeners::tcp("127.0.0.1:0");
    let (w, o) = (web.addr, other.addr);
    // The cluster's resolver: a real dnsmasq on a loopback address of this test's own.
    let resolver_ip = common::own_ip(54);
    let dns = common::dnsmasq::Dnsmasq::start(
        "agent-domains",
        &resolver_ip,
        "127.0.0.1 build.pg.test\n127.0.0.1 token.exfil.test\n127.0.0.1 before.exfil.test\n127.0.0.1 after.exfil.test\n",
        60,
    );
    let r = dns.addr;
    let a = runner_with_dns(&n, &resolver_ip);
    let agent = start_agent(&root, &kubeconfig, &[]);
    wait_ready(&agent);
    wait_metrics(
        &agent,
        &[
            "pipeguard_domain_crd_missing{kind=\"DomainPolicy\"} 0",
            "pipeguard_domain_crd_missing{kind=\"ClusterDomainPolicy\"} 0",
        ],
    );
    // Not DNS-filtered yet: any name resolves; its address is not allowed.
    assert!(once(&a, format!("dns-udp {r} before.exfil.test")).ok);
    assert!(once(&a, format!("dns-connect {r} build.pg.test {} early", w.port())).denied_with_eperm());

    // Through the watch: a DomainPolicy allows build.pg.test on the web port. The answer
    // teaches the kernel its address; other names never reach the resolver.
    server.apply(names_policy(json!(["build.pg.test"]), w.port()));
    wait_metrics(
        &agent,
        &[
            "pipeguard_domain_policies{state=\"compiled\"} 1",
            "pipeguard_pods{state=\"enforced\"} 1",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !once(&a, format!("dns-connect {r} build.pg.test {} by-name", w.port())).ok {
        assert!(Instant::now() < deadline, "the allowed name never worked");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(web.received.wait_for(b"by-name", Duration::from_secs(3)));
    assert!(once(&a, format!("dns-udp {r} token.exfil.test")).denied_with_eperm());
    assert!(once(&a, format!("tcp {o} leak")).denied_with_eperm(), "isolated");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dns.saw("build.pg.test") && dns.saw("before.exfil.test"),
        "{}",
        dns.log()
    );
    assert!(
        !dns.saw("token.exfil.test"),
        "a refused query reached the resolver:\n{}",
        dns.log()
    );
    // /metrics: the pod's allowed and refused queries, what was learned, and its capacity.
    wait_metrics_at_least(
        &agent,
        &[
            (
                "pipeguard_dns_queries_total{namespace=\"ci\",pod=\"runner-a\",verdict=\"allow\"}",
                1,
            ),
            (
                "pipeguard_dns_queries_total{namespace=\"ci\",pod=\"runner-a\",verdict=\"deny\"}",
                1,
            ),
            ("pipeguard_map_entries{map=\"dns_learned\"}", 1),
            // The periodic sweep ran at start-up (nothing had expired yet).
            ("pipeguard_dns_swept_total{map=\"dns_learned\"}", 0),
            ("pipeguard_dns_swept_total{map=\"dns_queries\"}", 0),
        ],
    );
    wait_metrics(&agent, &["pipeguard_map_capacity{map=\"dns_learned\"} 131072"]);

    // An invalid DomainPolicy: its namespace fails closed (last good kept, DNS still
    // filtered), it is counted, and a Warning Event lands on the object itself.
    server.apply(domain_policy("ci", "broken", json!(["ok.example", "bad..name"])));
    wait_metrics(
        &agent,
        &[
            "pipeguard_domain_policies{state=\"failed\"} 1",
            "pipeguard_pods{state=\"failed_closed\"} 1",
        ],
    );
    assert!(
        once(&a, format!("dns-connect {r} build.pg.test {} kept", w.port())).ok,
        "keeps its last good allowlist"
    );
    assert!(
        once(&a, format!("dns-udp {r} token.exfil.test")).denied_with_eperm(),
        "DNS stays filtered"
    );
    assert!(
        once(&a, format!("tcp {o} leak")).denied_with_eperm(),
        "never opens"
    );
    let event = wait_event(server, "PolicyRejected", |e| {
        e["reason"] == "PolicyRejected" && e["involvedObject"]["name"] == "broken"
    });
    assert_eq!(event["involvedObject"]["kind"], "DomainPolicy");
    assert_eq!(event["involvedObject"]["apiVersion"], "pipeguard.dev/v1alpha1");
    assert_eq!(event["involvedObject"]["uid"], "uid-domainpolicy-ci-broken");
    let message = event["message"].as_str().unwrap();
    assert!(
        message
            .contains("domainpolicy ci/broken: spec.egress[0].domains[1]: \"bad..name\" has an empty label"),
        "{message}"
    );
    server.delete("DomainPolicy", Some("ci"), "broken");
    wait_metrics(&agent, &["pipeguard_pods{state=\"enforced\"} 1"]);

    // An invalid ClusterDomainPolicy: the pods its selectors select fail closed; its Event
    // goes to the default namespace.
    server.apply(cluster_domain_policy("platform", json!(["*"])));
    wait_metrics(&agent, &["pipeguard_pods{state=\"failed_closed\"} 1"]);
    let event = wait_event(server, "PolicyRejected", |e| {
        e["involvedObject"]["kind"] == "ClusterDomainPolicy"
    });
    assert_eq!(event["metadata"]["namespace"], "default");
    assert!(once(&a, format!("tcp {o} leak")).denied_with_eperm());
    // Fixed: enforced again, and its name is allowed too.
    server.apply(cluster_domain_policy("platform", json!(["token.exfil.test"])));
    wait_metrics(
        &agent,
        &[
            "pipeguard_pods{state=\"enforced\"} 1",
            "pipeguard_domain_policies{state=\"compiled\"} 2",
            "pipeguard_domain_policies{state=\"failed\"} 0",
        ],
    );
    assert!(
        once(&a, format!("dns-udp {r} token.exfil.test")).ok,
        "a ClusterDomainPolicy's name"
    );

    // Every policy gone: unrestricted and unfiltered again.
    server.delete("ClusterDomainPolicy", None, "platform");
    server.delete("DomainPolicy", Some("ci"), "names");
    server.delete("NetworkPolicy", Some("ci"), "dns");
    until(&a, format!("wait-allowed {o}"));
    assert!(once(&a, format!("dns-udp {r} after.exfil.test")).ok);
    drop(agent);
}

#[test]
fn a_missing_domain_crd_does_not_hold_the_agent_up() {
    let n = node("agent-nocrd");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    let other = listeners::tcp("127.0.0.1:0");
    let o = other.addr;
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_A}"));
    let agent = start_agent(&root, &kubeconfig, &[]);
    wait_ready(&agent);
    wait_metrics(
        &agent,
        &[
            "pipeguard_domain_crd_missing{kind=\"DomainPolicy\"} 1",
            "pipeguard_domain_crd_missing{kind=\"ClusterDomainPolicy\"} 1",
        ],
    );
    assert!(once(&a, format!("tcp {o} ok")).ok);
    assert!(
        server
            .request_log()
            .iter()
            .any(|r| r.starts_with("GET /apis/pipeguard.dev/v1alpha1/domainpolicies")),
        "the agent asked for the CRD's objects"
    );

    // Installed later: the watcher's retry finds it, and its objects take effect.
    server.install_crds();
    server.apply(domain_policy("ci", "names", json!(["github.com"])));
    wait_metrics(&agent, &["pipeguard_domain_crd_missing{kind=\"DomainPolicy\"} 0"]);
    until(&a, format!("wait-denied {o}"));
    drop(agent);
}

/// A runner pod in `ci` that may use DNS at `resolver_ip` (as in the examples, a
/// NetworkPolicy's business), with the domain CRDs installed; returns its container cgroup.
fn runner_with_dns(n: &Node, resolver_ip: &str) -> PathBuf {
    let server = &n.server;
    server.install_crds();
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "dns", "namespace": "ci"},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": ip_block(&format!("{resolver_ip}/32")),
                             "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}
    }));
    pod_cgroup(&n.root, &format!("kubepods/pod{RUNNER_A}"))
}

/// The DomainPolicy `ci/names`: `app=runner` pods may reach `domains` on TCP `port`.
fn names_policy(domains: Value, port: u16) -> Value {
    json!({
        "apiVersion": "pipeguard.dev/v1alpha1", "kind": "DomainPolicy",
        "metadata": {"name": "names", "namespace": "ci"},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}},
                 "egress": [{"domains": domains, "ports": [{"port": port}]}]}
    })
}

/// The kernel state alone keeps DNS working and filtered: with the agent SIGKILLed, a name
/// never resolved before still resolves, teaches its address and connects, and refused
/// names still never reach the resolver; a new agent adopts it all without a gap. A probe
/// resolves, connects and sends a refused query without pause through the kill and restart.
#[test]
fn dns_keeps_working_and_filtered_through_sigkill_and_restart() {
    let n = node("agent-dns-kill");
    let at = common::own_ip;
    let resolver_ip = at(71);
    let (before, after, restarted) = (at(72), at(73), at(74));
    let web = listeners::tcp(&format!("{before}:0"));
    let port = web.addr.port();
    let web_after = listeners::tcp(&format!("{after}:{port}"));
    let web_restarted = listeners::tcp(&format!("{restarted}:{port}"));
    let dns = common::dnsmasq::Dnsmasq::start(
        "agent-dns-kill",
        &resolver_ip,
        &format!(
            "{before} before.build.test\n{after} after.build.test\n{restarted} restarted.build.test\n127.0.0.1 leak.exfil.test\n"
        ),
        60,
    );
    let r = dns.addr;
    let a = runner_with_dns(&n, &resolver_ip);
    n.server.apply(names_policy(json!(["*.build.test"]), port));
    let bpffs = Rc::new(Bpffs::mount("dns-kill"));
    let mut first = start_agent_on(&n.root, &n.kubeconfig, &[], bpffs.clone());
    wait_ready(&first);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !once(&a, format!("dns-connect {r} before.build.test {port} by-name")).ok {
        assert!(Instant::now() < deadline, "the allowed name never worked");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(once(&a, format!("dns-udp {r} a.leak.exfil.test")).denied_with_eperm());

    let stop = n.dir.join("hammer-stop");
    let hammer = probe_command(
        &a,
        &[format!(
            "dns-hammer {r} before.build.test h.leak.exfil.test {port} {}",
            stop.display()
        )],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    first.stop(libc::SIGKILL);
    assert!(
        once(&a, format!("dns-connect {r} after.build.test {port} no-agent")).ok,
        "a name first resolved with no agent running resolves and connects"
    );
    assert!(web_after.received.wait_for(b"no-agent", Duration::from_secs(3)));
    assert!(
        once(&a, format!("dns-udp {r} b.leak.exfil.test")).denied_with_eperm(),
        "refused with no agent running"
    );

    let second = start_agent_on(&n.root, &n.kubeconfig, &[], bpffs.clone());
    wait_ready(&second);
    wait_metrics(&second, &["pipeguard_pods{state=\"enforced\"} 1"]);
    assert!(
        once(&a, format!("dns-connect {r} restarted.build.test {port} adopted")).ok,
        "resolves and connects under the new agent"
    );
    assert!(
        web_restarted
            .received
            .wait_for(b"adopted", Duration::from_secs(3))
    );
    assert!(once(&a, format!("dns-udp {r} c.leak.exfil.test")).denied_with_eperm());
    std::fs::write(&stop, "").unwrap();
    let output = hammer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let outcomes = common::parse_outcomes(&output);
    assert!(
        output.status.success() && outcomes.len() == 1 && outcomes[0].ok,
        "a cycle broke through the kill and restart: {outcomes:?}\n{stdout}"
    );
    println!(
        "{}",
        stdout
            .lines()
            .find(|l| l.contains("PG_HAMMER"))
            .unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = dns.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("query[") && l.contains("leak.exfil.test")),
        "a refused query reached the resolver:\n{log}"
    );
    assert!(
        dns.saw("after.build.test") && dns.saw("restarted.build.test"),
        "{log}"
    );
    drop(second);
}

fn ingress_policy(ns: &str, name: &str, from: Value, ports: Value) -> Value {
    runner_policy(ns, name, "Ingress", json!([{"from": from, "ports": ports}]))
}

/// The runner listens (`tcp-accept-one`) on `port`; returns the probe once it listens.
fn listen_in(cgroup: &Path, dir: &Path, port: u16) -> Child {
    let port_file = dir.join(format!("port-{port}"));
    let child = probe_command(
        cgroup,
        &[format!("tcp-accept-one 127.0.0.1:{port} {}", port_file.display())],
    )
    .spawn()
    .expect("spawn the runner's listener");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !port_file.exists() {
        assert!(Instant::now() < deadline, "the runner never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn accepted_line(child: Child) -> String {
    let output = child.wait_with_output().unwrap();
    common::parse_outcomes(&output)
        .into_iter()
        .find_map(|o| o.action.strip_prefix("accepted:").map(str::to_string))
        .expect("the listener accepted a connection")
}

/// Ingress policies from the API reach the kernel: the runner's named port admits only the
/// allowed source; a policy change moves the admission to another source and port; the
/// refusals are ingress events and metrics.
#[test]
fn ingress_policies_and_their_changes_reach_the_kernel() {
    use common::inbound::connect_from;
    let n = node("agent-ingress");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    std::fs::create_dir_all(root.join("kubepods/burstable")).unwrap();
    let (named, other) = (free_port(), free_port());
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([{"name": "cache", "containerPort": named, "protocol": "TCP"}]),
    ));
    server.apply(ingress_policy(
        "ci",
        "cache-clients",
        ip_block("127.0.0.2/32"),
        json!([{"protocol": "TCP", "port": "cache"}]),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/burstable/pod{RUNNER_A}"));
    // The node is an address of its own here, so loopback sources are judged by the policy.
    let agent = start_agent(&root, &kubeconfig, &["--ingress-from-node", "127.0.0.9"]);
    wait_ready(&agent);

    // 1. Only 127.0.0.2 reaches the runner's named port.
    let listener = listen_in(&a, &n.dir, named);
    let to_named = format!("127.0.0.1:{named}").parse().unwrap();
    let refused = connect_from("127.0.0.3".parse().unwrap(), to_named).expect_err("not allowed");
    assert_eq!(refused.kind(), std::io::ErrorKind::TimedOut, "{refused}");
    let mut ok = connect_from("127.0.0.2".parse().unwrap(), to_named).expect("allowed");
    ok.write_all(b"first\n").unwrap();
    assert_eq!(accepted_line(listener), "first");

    // 2. A change: now 127.0.0.3 on another port. Refused from the old source either way.
    server.apply(ingress_policy(
        "ci",
        "cache-clients",
        ip_block("127.0.0.3/32"),
        tcp_port(other),
    ));
    let listener = listen_in(&a, &n.dir, other);
    let to_other = format!("127.0.0.1:{other}").parse().unwrap();
    connect_from("127.0.0.2".parse().unwrap(), to_other).expect_err("the old source");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut late = loop {
        match connect_from("127.0.0.3".parse().unwrap(), to_other) {
            Ok(stream) => break stream,
            Err(error) => assert!(
                Instant::now() < deadline,
                "the change never reached the kernel: {error}"
            ),
        }
    };
    late.write_all(b"late\n").unwrap();
    assert_eq!(accepted_line(listener), "late");

    let (_, scrape) = http_get(&agent.listen, "/metrics").expect("metrics");
    let denied = scrape
        .lines()
        .find(|l| l.starts_with("pipeguard_ingress_total{") && l.contains("verdict=\"deny\""))
        .unwrap_or_else(|| panic!("ingress denials are counted: {scrape}"));
    assert!(!denied.ends_with(" 0"), "{denied}");
}

/// A client from `allowed` connects and one from `refused` starts a connection, over and
/// over until stopped: every allowed connection must complete and no refused one ever may.
/// Returns (allowed connections, refused attempts), or the first breach.
struct IngressHammer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<(u32, u32), String>>,
}

impl IngressHammer {
    fn start(allowed: &str, refused: &str, dest: std::net::SocketAddr) -> Self {
        use common::inbound::{connect_from, connected, start_connect};
        let (allowed, refused) = (allowed.parse().unwrap(), refused.parse().unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut attempts) = (0, 0);
            // Refused attempts stay open a while: a handshake let through would complete.
            let mut pending = std::collections::VecDeque::new();
            let breached = |s: &TcpStream| connected(s).then(|| "a refused connection completed".to_string());
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                connect_from(allowed, dest)
                    .map_err(|e| format!("the allowed source was refused after {ok} connections: {e}"))?;
                ok += 1;
                pending.push_back(start_connect(refused, dest).map_err(|e| e.to_string())?);
                attempts += 1;
                while pending.len() > 20 {
                    if let Some(breach) = breached(&pending.pop_front().unwrap()) {
                        return Err(breach);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            match pending.iter().find_map(breached) {
                Some(breach) => Err(breach),
                None => Ok((ok, attempts)),
            }
        });
        Self { stop, thread }
    }

    fn finish(self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .unwrap()
            .unwrap_or_else(|breach| panic!("during the kill and restart: {breach}"))
    }
}

/// The pinned state alone keeps ingress enforced: with the agent SIGKILLed, the allowed
/// source still connects and the refused one still never does; a new agent adopts it
/// without a gap and follows a policy change made while none ran. A client hammers both
/// sources through the kill and the restart.
#[test]
fn ingress_stays_enforced_through_sigkill_and_restart() {
    use common::inbound::connect_from;
    let n = node("agent-ingress-kill");
    let (root, server, kubeconfig) = (n.root.clone(), &n.server, n.kubeconfig.clone());
    let port = free_port();
    server.apply(namespace("ci", json!({})));
    server.apply(pod(
        "ci",
        "runner-a",
        RUNNER_A,
        NODE,
        json!({"app": "runner"}),
        "10.0.0.10",
        json!([]),
    ));
    server.apply(ingress_policy(
        "ci",
        "clients",
        ip_block("127.0.0.2/32"),
        tcp_port(port),
    ));
    let a = pod_cgroup(&root, &format!("kubepods/pod{RUNNER_A}"));
    let bpffs = Rc::new(Bpffs::mount("ingress-kill"));
    // The node is an address of its own here, so loopback sources are judged by the policy.
    let flags = ["--ingress-from-node", "127.0.0.9"];
    let mut first = start_agent_on(&root, &kubeconfig, &flags, bpffs.clone());
    wait_ready(&first);

    let (port_file, stop_file) = (n.dir.join("port"), n.dir.join("stop"));
    let listener = probe_command(
        &a,
        &[format!(
            "tcp-accept-all 127.0.0.1:{port} {} {}",
            port_file.display(),
            stop_file.display()
        )],
    )
    .spawn()
    .expect("spawn the runner's listener");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !port_file.exists() {
        assert!(Instant::now() < deadline, "the runner never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let dest: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    connect_from("127.0.0.2".parse().unwrap(), dest).expect("allowed before the kill");
    connect_from("127.0.0.3".parse().unwrap(), dest).expect_err("refused before the kill");

    let hammer = IngressHammer::start("127.0.0.2", "127.0.0.3", dest);
    std::thread::sleep(Duration::from_millis(300));
    first.stop(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    // Changed while no agent runs: 127.0.0.4 is admitted too.
    server.apply(runner_policy(
        "ci",
        "clients",
        "Ingress",
        json!([{"from": [{"ipBlock": {"cidr": "127.0.0.2/32"}}, {"ipBlock": {"cidr": "127.0.0.4/32"}}],
                "ports": tcp_port(port)}]),
    ));
    connect_from("127.0.0.4".parse().unwrap(), dest).expect_err("the change waits for an agent");

    let second = start_agent_on(&root, &kubeconfig, &flags, bpffs.clone());
    wait_ready(&second);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(error) = connect_from("127.0.0.4".parse().unwrap(), dest) {
        assert!(
            Instant::now() < deadline,
            "the new agent never applied the change: {error}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let (allowed, refused) = hammer.finish();
    println!(
        "INGRESS HAMMER through SIGKILL and restart: {allowed} allowed connections, {refused} refused attempts"
    );
    assert!(allowed > 0 && refused > 0);

    std::fs::write(&stop_file, "").unwrap();
    let output = listener.wait_with_output().unwrap();
    let accepted = |source: &str| -> u32 {
        common::parse_outcomes(&output)
            .iter()
            .find_map(|o| o.action.strip_prefix(&format!("accepted-from:{source}:")))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(accepted("127.0.0.3"), 0, "a refused source reached accept()");
    assert!(
        accepted("127.0.0.2") >= allowed,
        "every allowed connection reached accept(): {} of {allowed}",
        accepted("127.0.0.2")
    );
    // The refusals made while no agent ran are counted and adopted with the maps.
    let (_, scrape) = http_get(&second.listen, "/metrics").expect("metrics");
    let denied = scrape
        .lines()
        .find(|l| l.starts_with("pipeguard_ingress_total{") && l.contains("verdict=\"deny\""))
        .unwrap_or_else(|| panic!("ingress denials are counted: {scrape}"));
    assert!(!denied.ends_with(" 0"), "{denied}");
    drop(second);
}
