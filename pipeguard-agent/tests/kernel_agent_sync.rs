//! The sync loop's paths (issue 12): a new pod cgroup is enforced by the incremental path
//! (its entry alone, from the last full sync's inputs), and so is a finished pod's removed
//! cgroup (its entry goes, nothing is recomputed); a policy change still reaches every pod,
//! and an idle agent does not sync at all. Real agent binary, real
//! cgroups and eBPF, the list/watch test server (without the domain policy CRDs, whose
//! missing lists once woke the loop several times a second).

mod common;

use std::time::Duration;

use common::{
    agent::{self, Node, allow_only, eventually, metric, namespace, node, pod, start_agent, uid, wait_ready},
    listeners, once,
};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

fn syncs(agent: &agent::Agent, path: &str) -> f64 {
    metric(agent, &format!("pipeguard_syncs_total{{path=\"{path}\"}}")).unwrap_or(0.0)
}

fn triggers(agent: &agent::Agent, source: &str) -> f64 {
    metric(
        agent,
        &format!("pipeguard_sync_triggers_total{{source=\"{source}\"}}"),
    )
    .unwrap_or(0.0)
}

/// What kubelet does with a finished pod's cgroups: the container's, then the pod's.
fn kubelet_removes(container: &std::path::Path) {
    std::fs::remove_dir(container).unwrap();
    std::fs::remove_dir(container.parent().unwrap()).unwrap();
}

/// Pods already on the node when the agent starts.
const PODS: u32 = 12;

fn runners(n: &Node) -> Vec<std::path::PathBuf> {
    (0..PODS)
        .map(|i| {
            let id = uid(0x5e00_0000 + i);
            n.server.apply(pod(
                "ci",
                &format!("runner-{i}"),
                &id,
                &format!("10.3.0.{}", i + 1),
            ));
            n.pod_cgroup(&id)
        })
        .collect()
}

/// The runners, allowed only `127.0.0.1:port`, and an agent that enforces them all.
fn enforced_runners(n: &Node, port: u16) -> (Vec<std::path::PathBuf>, agent::Agent) {
    n.server.apply(namespace("ci"));
    n.server.apply(allow_only("ci", "registry", "127.0.0.1/32", port));
    let cgroups = runners(n);
    let agent = start_agent(n, &["--no-events-stdout"], None);
    wait_ready(&agent, Duration::from_secs(60));
    eventually(
        Duration::from_secs(30),
        "the runners were never all enforced",
        || metric(&agent, "pipeguard_pods{state=\"enforced\"}") == Some(f64::from(PODS)),
    );
    (cgroups, agent)
}

#[test]
fn a_new_pod_takes_the_incremental_path_and_a_policy_change_still_reaches_every_pod() {
    let n = node("sync-incremental");
    let registry = listeners::tcp("127.0.0.1:0");
    let mirror = listeners::tcp("127.0.0.1:0");
    let (mut cgroups, agent) = enforced_runners(&n, registry.addr.port());

    // Idle: nothing changes, so nothing syncs (the periodic resync, if it falls in here,
    // stops after its scan). The missing CRDs' retries wake nothing.
    let (full, crd) = (syncs(&agent, "full"), triggers(&agent, "DomainPolicy"));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(syncs(&agent, "full"), full, "an idle agent ran a full sync");
    assert_eq!(
        triggers(&agent, "DomainPolicy"),
        crd,
        "a missing CRD's list retries woke the loop"
    );

    // A pod elsewhere that no guarded pod's policy can see: nothing is recomputed.
    let unaffected = syncs(&agent, "unaffected");
    n.server.apply(namespace("web"));
    let mut elsewhere = pod("web", "frontend", &uid(0x5e20_0000), "10.9.0.1");
    elsewhere["spec"]["nodeName"] = "another-node".into();
    n.server.apply(elsewhere);
    eventually(Duration::from_secs(30), "the pod elsewhere never arrived", || {
        syncs(&agent, "unaffected") > unaffected
    });
    // The pod object first (the scheduler binds before kubelet starts it): the local pods
    // are recomputed, no full sync.
    let changed = syncs(&agent, "changed");
    let id = uid(0x5e10_0000);
    n.server.apply(pod("ci", "runner-new", &id, "10.3.1.1"));
    eventually(Duration::from_secs(30), "the new pod object never synced", || {
        syncs(&agent, "changed") > changed
    });
    assert_eq!(syncs(&agent, "full"), full, "a pod object took a full sync");
    let incremental = syncs(&agent, "new_pods");
    // Then its cgroup: only its entry is written.
    let cg = n.pod_cgroup(&id);
    let o = once(&cg, format!("wait-denied {}", mirror.addr));
    assert!(
        o.ok,
        "the new pod was never enforced: {o:?}\nlog:\n{}",
        agent.log()
    );
    assert!(once(&cg, format!("tcp {} ok", registry.addr)).ok);
    eventually(Duration::from_secs(10), "the new pod was never counted", || {
        metric(&agent, "pipeguard_pods{state=\"enforced\"}") == Some(f64::from(PODS + 1))
    });
    assert_eq!(
        syncs(&agent, "new_pods"),
        incremental + 1.0,
        "the new pod cgroup did not take the incremental path"
    );
    assert_eq!(
        syncs(&agent, "full"),
        full,
        "a full sync ran for the new pod cgroup"
    );
    cgroups.push(cg);

    // A policy change reaches every pod, the incrementally added one included, without a
    // full sync (only the pods of the policy's namespace are recomputed).
    let changed = syncs(&agent, "changed");
    n.server
        .apply(allow_only("ci", "registry", "127.0.0.1/32", mirror.addr.port()));
    for (i, cg) in cgroups.iter().enumerate() {
        let o = once(cg, format!("wait-allowed {}", mirror.addr));
        assert!(o.ok, "pod {i} never got the changed policy: {o:?}");
        let o = once(cg, format!("tcp {} revoked", registry.addr));
        assert!(o.denied_with_eperm(), "pod {i} kept the old policy: {o:?}");
    }
    assert!(
        syncs(&agent, "changed") > changed,
        "the policy change was not recomputed"
    );
    assert_eq!(syncs(&agent, "full"), full, "the policy change took a full sync");
}

#[test]
fn a_finished_pods_cgroup_takes_the_incremental_path() {
    let n = node("sync-removed");
    let registry = listeners::tcp("127.0.0.1:0");
    let (cgroups, agent) = enforced_runners(&n, registry.addr.port());
    let enforced = || metric(&agent, "pipeguard_pods{state=\"enforced\"}");
    let counters = || metric(&agent, "pipeguard_map_entries{map=\"counters\"}").unwrap_or(0.0);
    // Two of the pods are counted (an allowed and a refused connection each).
    for cg in &cgroups[..2] {
        assert!(once(cg, format!("tcp {} ok", registry.addr)).ok);
        assert!(once(cg, "tcp 127.0.0.1:9 refused".to_string()).denied_with_eperm());
    }
    let counted = counters();
    assert_eq!(counted, f64::from(PODS), "one counter slot per enforced pod");
    let (full, removed) = (syncs(&agent, "full"), syncs(&agent, "removed_pods"));

    // Kubelet removes a finished pod's cgroup, then the API its object.
    let gone = &cgroups[0];
    kubelet_removes(gone);
    eventually(Duration::from_secs(10), "the finished pod's entry stayed", || {
        enforced() == Some(f64::from(PODS - 1))
    });
    n.server.delete("Pod", Some("ci"), "runner-0");
    assert_eq!(
        syncs(&agent, "removed_pods"),
        removed + 1.0,
        "the removed pod cgroup did not take the incremental path"
    );
    assert_eq!(
        syncs(&agent, "full"),
        full,
        "a full sync ran for the removed pod cgroup"
    );
    // Its pod entry went, and with it its counter slot (zeroed for the next pod that gets it).
    let left = counters();
    assert_eq!(left, counted - 1.0, "counter slots left of {counted}");
    // The others keep their policy.
    let o = once(&cgroups[1], format!("tcp {} ok", registry.addr));
    assert!(o.ok, "{o:?}");
}

/// The API can delete a pod's object before kubelet removes its cgroup: the cgroup is then
/// unmatched when it goes. It must leave with it, also when pod events keep the loop busy
/// (under churn no periodic scan runs to drop it; it was rechecked on every sync, so each
/// sync of a busy node cost more than the last).
#[test]
fn a_pod_cgroup_removed_after_its_object_is_not_checked_again() {
    let n = node("sync-object-first");
    let registry = listeners::tcp("127.0.0.1:0");
    let (cgroups, agent) = enforced_runners(&n, registry.addr.port());
    let unmatched = || metric(&agent, "pipeguard_unmatched_pod_cgroups");
    assert_eq!(unmatched(), Some(0.0));

    n.server.delete("Pod", Some("ci"), "runner-0");
    eventually(
        Duration::from_secs(10),
        "the cgroup never became unmatched",
        || unmatched() == Some(1.0),
    );
    let gone = &cgroups[0];
    kubelet_removes(gone);
    // Pod events elsewhere, each sooner than the recheck interval: as on a busy cluster.
    let mut left = unmatched();
    for i in 0..20 {
        n.server.apply(pod(
            "elsewhere",
            &format!("busy-{i}"),
            &uid(0x5000_0000 + i),
            &format!("10.9.0.{}", i + 1),
        ));
        std::thread::sleep(Duration::from_millis(200));
        left = unmatched();
        if left == Some(0.0) {
            break;
        }
    }
    assert_eq!(
        left,
        Some(0.0),
        "the removed cgroup is still waiting to be matched"
    );
    let o = once(&cgroups[1], format!("tcp {} ok", registry.addr));
    assert!(o.ok, "{o:?}");
}
