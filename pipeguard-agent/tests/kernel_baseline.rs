//! The workload baseline on the cluster path (issue 17): the real agent with `--baseline`,
//! real eBPF flow statistics of pod cgroups, and `WorkloadBaseline` objects written to the
//! list/watch test server. A guarded pod's allowed traffic lands in its workload's baseline,
//! the baseline outlives a SIGKILLed agent (the next one serves it through
//! `suggest --endpoint`), and a later run raises new_destination for what the baseline does
//! not have, and only for that. Needs root and cgroup2; fails (never skips) without them.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{
    agent::{Agent, NODE, eventually, http_get, node, start_agent, uid, wait_ready},
    listeners, once,
};
use serde_json::{Value, json};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

const WORKLOAD: &str = "tekton:release/build";

/// A run of the Tekton task `release/build`: its labels differ per run only in the TaskRun.
fn task_pod(n: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("release-{n}-build-pod"), "namespace": "ci", "uid": uid(n),
                     "labels": {"app": "runner", "tekton.dev/pipeline": "release",
                                "tekton.dev/pipelineTask": "build",
                                "tekton.dev/taskRun": format!("release-{n}-build")}},
        "spec": {"nodeName": NODE, "containers": [{"name": "step", "image": "x"}]},
        "status": {"phase": "Running", "podIP": format!("10.0.0.{n}"), "podIPs": [{"ip": format!("10.0.0.{n}")}]}
    })
}

/// A Deployment's pod with no CI labels: its workload is its controlling owner's owner.
fn deployment_pod(n: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("web-5d8f7c6b9-x9k2{n}"), "namespace": "ci", "uid": uid(n),
                     "labels": {"app": "web", "pod-template-hash": "5d8f7c6b9"},
                     "ownerReferences": [
                         {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-the-controller", "uid": "u1"},
                         {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f7c6b9",
                          "uid": "u2", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"nodeName": NODE, "containers": [{"name": "web", "image": "x"}]},
        "status": {"phase": "Running", "podIP": format!("10.0.0.{n}"), "podIPs": [{"ip": format!("10.0.0.{n}")}]}
    })
}

/// The runners may reach all of 127.0.0.0/8.
fn loopback_policy() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "loopback", "namespace": "ci"},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": "127.0.0.0/8"}}]}]}
    })
}

/// `pipeguard suggest --endpoint` against `agent`: (exit success, stdout, stderr).
fn suggest(agent: &Agent) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args([
            "suggest",
            "--endpoint",
            &format!("http://{}", agent.listen),
            "--namespace",
            "ci",
            "--workload",
            WORKLOAD,
        ])
        .output()
        .expect("run pipeguard suggest");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until `suggest --endpoint` prints `needle`; panics with what it printed and the
/// agent's log.
fn wait_suggest(agent: &Agent, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, err) = suggest(agent);
        if out.contains(needle) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "suggest never printed {needle:?}:\n{out}{err}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn anomalies(events: &Path, signal: &str) -> Vec<Value> {
    std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "anomaly" && r["signal"] == signal)
        .collect()
}

#[test]
fn the_baseline_survives_an_agent_restart_and_a_new_destination_is_raised() {
    let n = node("baseline");
    n.server.install_crds();
    let known = listeners::tcp("127.0.0.1:0");
    let new = listeners::tcp("127.0.0.1:0");
    let (k, d) = (known.addr, new.addr);
    n.server.apply(common::agent::namespace("ci"));
    n.server.apply(loopback_policy());
    for i in 1..=3 {
        n.server.apply(task_pod(i));
    }
    let cgroups: Vec<_> = (1..=3).map(|i| n.pod_cgroup(&uid(i))).collect();
    let events = n.dir.join("events.jsonl");
    let events_arg = events.display().to_string();
    let args = [
        "--baseline",
        "--baseline-interval",
        "200ms",
        "--no-events-stdout",
        "--events-file",
        &events_arg,
    ];

    // Two runs of the task reach the known destination with the first agent.
    let first = start_agent(&n, &args, None);
    wait_ready(&first, Duration::from_secs(60));
    for (i, c) in cgroups[..2].iter().enumerate() {
        assert!(once(c, format!("tcp {k} run{i}")).ok, "run {i}: {}", first.log());
    }
    wait_suggest(&first, "seen in 2 of 2 runs");
    let objects = n.server.objects("WorkloadBaseline");
    assert_eq!(objects.len(), 1, "one object per workload and node: {objects:?}");
    assert_eq!(objects[0]["spec"]["workload"], WORKLOAD);
    assert_eq!(objects[0]["spec"]["node"], NODE);
    assert_eq!(objects[0]["metadata"]["labels"]["pipeguard.dev/node"], NODE);

    // SIGKILL: nothing is flushed on the way out. The next agent starts on fresh maps.
    // SAFETY: signalling the agent process this test started.
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    drop(first);
    let second = start_agent(&n, &args, None);
    wait_ready(&second, Duration::from_secs(60));
    let (ok, policy, stderr) = suggest(&second);
    assert!(ok, "{stderr}");
    assert!(
        policy.starts_with(&format!("# workload: {WORKLOAD} (2 runs)\n")),
        "{policy}"
    );
    assert!(
        policy.contains("ipBlock: {cidr: 127.0.0.1/32}") && policy.contains(&format!("port: {}", k.port())),
        "{policy}"
    );
    assert!(policy.contains("seen in 2 of 2 runs"), "{policy}");
    assert!(
        policy.contains("\"tekton.dev/pipeline\": \"release\"") && !policy.contains("taskRun"),
        "the policy selects the task's pods by what every run shares: {policy}"
    );
    let parsed = pipeguard::policy::parse_policies("suggested.yaml", &policy);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);

    // A third run reaches the known destination and a new one: only the new one is raised.
    assert!(once(&cgroups[2], format!("tcp {k} run2")).ok);
    assert!(once(&cgroups[2], format!("tcp {d} run2")).ok);
    eventually(Duration::from_secs(30), "no new_destination raised", || {
        !anomalies(&events, "new_destination").is_empty()
    });
    wait_suggest(&second, "(3 runs)");
    let raised = anomalies(&events, "new_destination");
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(raised[0]["dst_port"], d.port(), "{raised:?}");
    assert_eq!(raised[0]["pod"]["name"], "release-3-build-pod");
    assert_eq!(raised[0]["ci"]["system"], "tekton");
    // The anomaly reaches the Kubernetes Event sink too, on the pod.
    let port = format!("127.0.0.1:{}/tcp", d.port());
    eventually(Duration::from_secs(10), "no PipeguardAnomaly Event", || {
        n.server.events().iter().any(|e| {
            e["reason"] == "PipeguardAnomaly"
                && e["type"] == "Warning"
                && e["involvedObject"]["uid"] == uid(3).as_str()
                && e["message"].as_str().is_some_and(|m| {
                    m.starts_with("pipeguard raised new_destination 1 time(s): ") && m.contains(&port)
                })
        })
    });
    let (_, metrics) = http_get(&second.listen, "/metrics").unwrap();
    assert!(
        metrics.contains("pipeguard_anomalies_total{signal=\"new_destination\"} 1"),
        "{metrics}"
    );
    // The restarted agent kept the earlier runs: three runs, the known port in all.
    let policy = suggest(&second).1;
    println!(
        "suggest --endpoint after the restart and a third run:\n{policy}\nraised: {}",
        raised[0]
    );
    assert!(policy.contains("seen in 3 of 3 runs"), "{policy}");
    assert!(
        policy.contains(&format!(
            "unstable, left out: 127.0.0.1:{}/tcp (seen in 1 of 3 runs)",
            d.port()
        )),
        "{policy}"
    );
}

/// new_destination off, upload_volume at 4 KiB: small runs raise nothing, a large upload
/// to a baseline destination raises upload_volume.
#[test]
fn new_destination_can_be_switched_off_and_upload_volume_is_raised() {
    let n = node("baseline-off");
    n.server.install_crds();
    let known = listeners::tcp("127.0.0.1:0");
    let k = known.addr;
    n.server.apply(common::agent::namespace("ci"));
    for i in 11..=13 {
        n.server.apply(task_pod(i));
    }
    n.server.apply(deployment_pod(14));
    let cgroups: Vec<_> = (11..=14).map(|i| n.pod_cgroup(&uid(i))).collect();
    let events = n.dir.join("events.jsonl");
    let events_arg = events.display().to_string();
    let agent = start_agent(
        &n,
        &[
            "--baseline",
            "--baseline-interval",
            "200ms",
            "--baseline-stable-runs",
            "1",
            "--anomaly",
            "new_destination=off",
            "--anomaly",
            "upload_volume=4KiB",
            "--no-events-stdout",
            "--events-file",
            &events_arg,
        ],
        None,
    );
    wait_ready(&agent, Duration::from_secs(60));
    assert!(once(&cgroups[0], format!("tcp {k} first")).ok);
    wait_suggest(&agent, "(1 runs)");
    let other = listeners::tcp("127.0.0.1:0");
    assert!(once(&cgroups[1], format!("tcp {} second", other.addr)).ok);
    wait_suggest(&agent, "(2 runs)");
    assert!(anomalies(&events, "new_destination").is_empty(), "switched off");
    assert!(anomalies(&events, "upload_volume").is_empty(), "small runs");
    assert!(once(&cgroups[2], format!("tcp {k} {}", "x".repeat(8000))).ok);
    eventually(Duration::from_secs(30), "no upload_volume raised", || {
        !anomalies(&events, "upload_volume").is_empty()
    });
    let raised = anomalies(&events, "upload_volume");
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(raised[0]["dst_port"], k.port(), "{raised:?}");
    assert_eq!(raised[0]["pod"]["name"], "release-13-build-pod");
    assert!(raised[0]["count"].as_u64().unwrap() > 8000, "{raised:?}");
    let (_, metrics) = http_get(&agent.listen, "/metrics").unwrap();
    assert!(
        metrics.contains("pipeguard_anomalies_total{signal=\"new_destination\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pipeguard_anomalies_total{signal=\"upload_volume\"} 1"),
        "{metrics}"
    );

    // A pod without CI labels lands under its controlling owner: the ReplicaSet's
    // Deployment (the pod-template-hash suffix dropped), not its app label or name.
    assert!(once(&cgroups[3], format!("tcp {k} web")).ok);
    eventually(Duration::from_secs(30), "no baseline of Deployment/web", || {
        n.server
            .objects("WorkloadBaseline")
            .iter()
            .any(|o| o["spec"]["workload"] == "Deployment/web")
    });
    let workloads: Vec<Value> = n
        .server
        .objects("WorkloadBaseline")
        .iter()
        .map(|o| o["spec"]["workload"].clone())
        .collect();
    assert_eq!(workloads.len(), 2, "{workloads:?}");
    assert!(workloads.contains(&json!(WORKLOAD)), "{workloads:?}");
}

/// The agent's runs name what pods resolved (the kernel reads their answers while the
/// baseline records, domain rules or not), so `suggest --endpoint` asks for the name in a
/// DomainPolicy and keeps the resolver as an address.
#[test]
fn the_agents_runs_name_the_hosts_pods_resolved() {
    let n = node("baseline-names");
    n.server.install_crds();
    let registry = listeners::tcp("127.0.0.1:0");
    let port = registry.addr.port();
    let resolver_ip = common::own_ip(62);
    let dns =
        common::dnsmasq::Dnsmasq::start("baseline-names", &resolver_ip, "127.0.0.1 registry.pg.test\n", 60);
    n.server.apply(common::agent::namespace("ci"));
    n.server.apply(loopback_policy());
    n.server.apply(task_pod(1));
    let cgroup = n.pod_cgroup(&uid(1));
    let agent = start_agent(
        &n,
        &["--baseline", "--baseline-interval", "200ms", "--no-events-stdout"],
        None,
    );
    wait_ready(&agent, Duration::from_secs(60));
    let r = dns.addr;
    assert!(
        once(
            &cgroup,
            format!("dns-connect {r} registry.pg.test {port} artifact")
        )
        .ok,
        "{}",
        agent.log()
    );
    let policy = wait_suggest(&agent, "registry.pg.test");
    assert!(
        policy.contains("kind: DomainPolicy") && policy.contains("- \"registry.pg.test\""),
        "{policy}"
    );
    assert!(
        !policy.contains("ipBlock: {cidr: 127.0.0.1/32}"),
        "the named host is not an address rule:\n{policy}"
    );
    assert!(
        policy.contains(&format!("ipBlock: {{cidr: {resolver_ip}/32}}")),
        "{policy}"
    );
}
