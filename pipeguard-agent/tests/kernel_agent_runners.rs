//! Runner pods of each CI system, guarded by the real agent against the list/watch test
//! server with real eBPF enforcement: ARC's workflow pods (container mode `kubernetes`)
//! guarded as their runner pod, with its CI context; `pipeguard events --summary` of that
//! workload from the agent's stream and from its events file. Needs root and cgroup2;
//! fails (never skips) without them.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    agent::{NODE, Node, allow_only, eventually, metric, namespace, node, start_agent, uid, wait_ready},
    listeners, run_probe,
};
use serde_json::{Value, json};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

fn arc_pod(n: &Node, name: &str, uid: &str, labels: Value, annotations: Value) {
    n.server.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "arc-runners", "uid": uid,
                     "labels": labels, "annotations": annotations},
        "spec": {"nodeName": NODE, "containers": [{"name": "job", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.20", "podIPs": [{"ip": "10.0.0.20"}]}
    }));
}

/// A ready agent writing its records to a file (returned) instead of stdout.
fn agent_with_events_file(n: &Node) -> (common::agent::Agent, std::path::PathBuf) {
    let events = n.dir.join("events.jsonl");
    let agent = start_agent(
        n,
        &["--no-events-stdout", "--events-file", events.to_str().unwrap()],
        None,
    );
    wait_ready(&agent, Duration::from_secs(60));
    (agent, events)
}

/// The records of the agent's events file so far.
fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn an_arc_workflow_pod_is_guarded_by_its_runners_policy_with_its_runners_ci_context() {
    let n = node("agent-arc-workflow");
    let registry = listeners::tcp("127.0.0.1:0");
    let other = listeners::tcp("127.0.0.1:0");
    let (runner_uid, workflow_uid) = (uid(0xa7c1), uid(0xa7c2));
    // Not a guarded namespace: both pods are guarded by their labels alone.
    n.server.apply(namespace("arc-runners"));
    arc_pod(
        &n,
        "linux-x7k2p-runner-9qz",
        &runner_uid,
        json!({"app": "runner", "actions.github.com/scale-set-name": "linux"}),
        json!({"actions.github.com/repository": "org/app", "actions.github.com/workflow": "ci.yml",
               "actions.github.com/job": "build"}),
    );
    // The workflow pod carries none of the runner's labels: only `runner-pod`.
    arc_pod(
        &n,
        "linux-x7k2p-runner-9qz-workflow",
        &workflow_uid,
        json!({"runner-pod": "linux-x7k2p-runner-9qz"}),
        json!({}),
    );
    // The runners' policy selects `app: runner`, which the workflow pod does not carry.
    n.server.apply(allow_only(
        "arc-runners",
        "runner-egress",
        "127.0.0.1/32",
        registry.addr.port(),
    ));
    let workflow = n.pod_cgroup(&workflow_uid);
    n.pod_cgroup(&runner_uid);
    let (agent, events) = agent_with_events_file(&n);
    // `pipeguard events --summary-markdown` follows the stream until told to stop.
    let streamed_md = n.dir.join("stream.md");
    let follower = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["events", "--endpoint", &format!("http://{}", agent.listen)])
        .args(["--namespace", "arc-runners", "--summary-markdown"])
        .arg(&streamed_md)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run pipeguard events");
    eventually(Duration::from_secs(10), "the follower never subscribed", || {
        metric(&agent, "pipeguard_event_subscribers") == Some(1.0)
    });

    // Guarded by the runner's allowlist: the registry passes, anything else is refused.
    let outcomes = run_probe(
        &workflow,
        &[
            format!("wait-denied {}", other.addr),
            format!("tcp {} artifact", registry.addr),
        ],
    );
    assert!(outcomes[0].ok, "never denied: {outcomes:?}");
    assert!(outcomes[1].ok, "the runner's registry refused: {outcomes:?}");
    assert!(other.received.bytes().is_empty());

    // The refusal's event names the workflow pod and carries the runner's job.
    let mut found = Value::Null;
    eventually(Duration::from_secs(10), "no event for the workflow pod", || {
        found = records(&events)
            .into_iter()
            .find(|r| r["pod"]["uid"] == workflow_uid.as_str() && r["verdict"] == "deny")
            .unwrap_or(Value::Null);
        !found.is_null()
    });
    assert_eq!(found["pod"]["name"], "linux-x7k2p-runner-9qz-workflow", "{found}");
    assert_eq!(found["dst_port"], other.addr.port(), "{found}");
    assert_eq!(found["policies"], json!(["arc-runners/runner-egress"]), "{found}");
    assert_eq!(
        found["ci"],
        json!({"system": "actions-runner-controller", "fields": {
            "scale_set": "linux", "repository": "org/app", "workflow": "ci.yml", "job": "build",
            "runner_pod": "linux-x7k2p-runner-9qz"}}),
        "{found}"
    );

    // The finished workload's table: from the stream (ended by SIGTERM) ...
    // SAFETY: signalling the follower this test started and has not reaped.
    unsafe { libc::kill(follower.id() as i32, libc::SIGTERM) };
    let streamed = follower.wait_with_output().unwrap();
    assert!(streamed.status.success(), "{streamed:?}");
    let table = String::from_utf8_lossy(&streamed.stdout).into_owned();
    let row = format!("DENIED   127.0.0.1:{}/tcp ×", other.addr.port());
    assert!(
        table.contains("pipeguard: arc-runners/linux-x7k2p-runner-9qz-workflow [actions-runner-controller"),
        "{table}"
    );
    assert!(table.contains(&row), "{table}");
    let md = std::fs::read_to_string(&streamed_md).unwrap();
    assert!(
        md.contains("### pipeguard egress: `arc-runners/linux-x7k2p-runner-9qz-workflow`"),
        "{md}"
    );
    let md_row = format!("| 127.0.0.1:{}/tcp | **DENIED** |", other.addr.port());
    assert!(md.contains(&md_row), "{md}");
    assert!(md.contains("repository=org/app"), "{md}");

    // ... and from the events file, for one pod.
    let file_md = n.dir.join("file.md");
    let from_file = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["events", "--from"])
        .arg(&events)
        .args(["--pod", "linux-x7k2p-runner-9qz-workflow", "--summary-markdown"])
        .arg(&file_md)
        .output()
        .unwrap();
    assert!(from_file.status.success(), "{from_file:?}");
    let table = String::from_utf8_lossy(&from_file.stdout);
    assert!(table.contains(&row), "{table}");
    let md = std::fs::read_to_string(&file_md).unwrap();
    assert!(md.contains(&md_row), "{md}");
    assert_eq!(md.matches("### pipeguard egress").count(), 1, "one job: {md}");
    // Lines that are not agent records are said to be left out.
    let mixed = n.dir.join("mixed.jsonl");
    std::fs::write(
        &mixed,
        std::fs::read_to_string(&events).unwrap() + "{\"kind\":\"anomaly\"}\nnot json\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["events", "--summary", "--from"])
        .arg(&mixed)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&row), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 lines were not agent records"),
        "{out:?}"
    );
    let missing = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["events", "--summary", "--from"])
        .arg(n.dir.join("no-such-file"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no-such-file"),
        "{missing:?}"
    );
    drop(agent);
}

/// The agent feeds dns_tunnel the DNS questions its kernel refuses, and those a wildcard
/// rule allows (which leave, so matter most): a runner sending base32 chunks in long labels
/// raises one anomaly per domain on the events file, with the pod and CI context; its
/// ordinary refused name raises none, and its allowed queries are no records.
#[test]
fn the_agent_raises_dns_tunnel_for_a_runners_encoded_queries() {
    let n = node("agent-dns-tunnel");
    let resolver_ip = common::own_ip(57);
    let dns = common::dnsmasq::Dnsmasq::start("agent-tunnel", &resolver_ip, "127.0.0.1 build.pg.test\n", 60);
    let r = dns.addr;
    let runner_uid = uid(0xd5a1);
    n.server.install_crds();
    n.server.apply(namespace("arc-runners"));
    arc_pod(
        &n,
        "linux-runner-dns",
        &runner_uid,
        json!({"app": "runner", "actions.github.com/scale-set-name": "linux"}),
        json!({"actions.github.com/repository": "org/app"}),
    );
    n.server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "dns", "namespace": "arc-runners"},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": format!("{resolver_ip}/32")}}],
                             "ports": [{"protocol": "UDP", "port": 53}]}]}
    }));
    n.server.apply(json!({
        "apiVersion": "pipeguard.dev/v1alpha1", "kind": "DomainPolicy",
        "metadata": {"name": "names", "namespace": "arc-runners"},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}},
                 "egress": [{"domains": ["build.pg.test", "*.tunnel.test"], "ports": [{"port": 443}]}]}
    }));
    let runner = n.pod_cgroup(&runner_uid);
    let (agent, events) = agent_with_events_file(&n);
    // DNS-filtered once its ordinary refused name fails with EPERM.
    eventually(
        Duration::from_secs(30),
        "the runner's DNS was never filtered",
        || run_probe(&runner, &[format!("dns-udp {r} telemetry.exfil.test")])[0].denied_with_eperm(),
    );
    let chunk = "mzxw6ytboi2dkmrtgq3tqnzsgeydmobqgiztinjwg4ydembqgi3tsnzq";
    let outcomes = run_probe(
        &runner,
        &[
            format!("dns-udp {r} build.pg.test"),
            format!("dns-udp {r} {chunk}.0.t.exfil.test"),
            format!("dns-udp {r} {chunk}.1.t.exfil.test"),
        ],
    );
    assert!(outcomes[0].ok, "{outcomes:?}");
    assert!(
        outcomes[1].denied_with_eperm() && outcomes[2].denied_with_eperm(),
        "{outcomes:?}"
    );

    let tunnel = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["kind"] == "anomaly" && r["signal"] == "dns_tunnel")
            .cloned()
            .collect()
    };
    let mut found = Vec::new();
    eventually(Duration::from_secs(10), "no dns_tunnel anomaly", || {
        found = tunnel(&records(&events));
        !found.is_empty()
    });
    assert_eq!(found.len(), 1, "once per domain per window: {found:?}");
    let a = found[0].clone();
    assert_eq!(a["pod"]["name"], "linux-runner-dns", "{a}");
    assert_eq!(a["ci"]["fields"]["repository"], "org/app", "{a}");
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .contains("56-character label under exfil.test"),
        "{a}"
    );
    assert!(
        records(&events)
            .iter()
            .any(|r| r["query"] == "telemetry.exfil.test" && r["verdict"] == "deny"),
        "the ordinary refusal is a record, not an anomaly"
    );

    // Allowed by `*.tunnel.test`: the queries leave (NXDOMAIN), and are judged all the same.
    let allowed = format!("{chunk}.0.t.tunnel.test");
    let outcomes = run_probe(
        &runner,
        &[
            format!("dns-udp {r} {allowed}"),
            format!("dns-udp {r} {chunk}.1.t.tunnel.test"),
        ],
    );
    assert!(outcomes.iter().all(|o| !o.denied_with_eperm()), "{outcomes:?}");
    eventually(
        Duration::from_secs(10),
        "no dns_tunnel anomaly for tunnel.test",
        || {
            found = tunnel(&records(&events));
            found.len() == 2
        },
    );
    assert!(
        found[1]["reason"]
            .as_str()
            .unwrap()
            .contains("56-character label under tunnel.test"),
        "{found:?}"
    );
    assert_eq!(
        (&found[0]["domain"], &found[1]["domain"]),
        (&json!("exfil.test"), &json!("tunnel.test")),
        "each record names its domain"
    );
    assert!(
        !records(&events).iter().any(|r| r["query"] == allowed.as_str()),
        "an allowed query is not a record"
    );
    let (_, metrics) = common::agent::http_get(&agent.listen, "/metrics").unwrap();
    assert!(
        metrics.contains("pipeguard_anomalies_total{signal=\"dns_tunnel\"} 2"),
        "{metrics}"
    );
    drop(agent);
}
