//! Runner pods of each CI system, guarded by the real agent against the list/watch test
//! server with real eBPF enforcement: ARC's workflow pods (container mode `kubernetes`)
//! guarded as their runner pod, with its CI context. Needs root and cgroup2; fails (never
//! skips) without them.

mod common;

use std::time::Duration;

use common::{
    agent::{NODE, Node, allow_only, eventually, namespace, node, start_agent, uid, wait_ready},
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
    let events = n.dir.join("events.jsonl");
    let agent = start_agent(
        &n,
        &["--no-events-stdout", "--events-file", events.to_str().unwrap()],
        None,
    );
    wait_ready(&agent, Duration::from_secs(60));

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
    drop(agent);
}
