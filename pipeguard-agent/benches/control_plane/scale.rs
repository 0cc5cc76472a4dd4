//! Control-plane scale (issue 15 item 3): the real `pipeguard agent` against the list/watch
//! server holding a large cluster (50,000 pods in 2,000 namespaces, 5,000 NetworkPolicies
//! with pod and namespace selector peers) and 110 guarded pods on this node:
//!
//! - start → ready (and from the last initial list the server wrote to the agent, which
//!   leaves out the lists' transfer), → all 110 enforced, RSS, VmHWM, idle CPU;
//! - policy change → enforced (watch event emitted → a prober in a local pod sees the verdict);
//! - churn: pods elsewhere created (and as many older ones deleted) at 100/s; meanwhile two
//!   new local pods every second: new pod → enforced, agent CPU per step and RSS at each
//!   minute. 60 s by default; `PIPEGUARD_BENCH_CHURN_SECS=1800` for the 30-minute run. New
//!   pod → enforced is measured from the pod cgroup's mkdir twice: to the first refusal of a
//!   running prober moved into it (the agent's part), and to that of a prober started in it
//!   (fork and exec included, and whether its very first probe was already refused).
//!
//! Reported, never asserted.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{
    agent::{bpf_map_kib, spawn_prober},
    agent_load::{cpu_ms, enforced, first_denial, idle_cpu, move_prober, setup, staged_prober, syncs},
    report::{Report, mib, ms, summarize},
};
use crate::common::agent::{
    Agent, eventually, namespace, node, pod, raise_own_fd_limit, start_agent, uid, wait_ready,
};

/// Guarded pods on this node (kubelet's default maximum).
const LOCAL: u32 = 110;
/// Seconds of churn instead of the default (60; 10 with `--quick`).
const CHURN_SECS_ENV: &str = "PIPEGUARD_BENCH_CHURN_SECS";
/// Label values: pods carry `app: a<i % APPS>`, namespaces `team: t<i % TEAMS>`.
const APPS: usize = 50;
const TEAMS: usize = 20;

fn cluster_namespace(i: usize) -> Value {
    let mut ns = namespace(&format!("ns-{i}"));
    ns["metadata"]["labels"] = json!({"team": format!("t{}", i % TEAMS)});
    ns
}

/// Pod `i` of the cluster, on some other node.
fn cluster_pod(i: usize, namespaces: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("p-{i}"), "namespace": format!("ns-{}", i % namespaces),
                     "uid": format!("{i:08x}-aaaa-bbbb-cccc-dddddddddddd"),
                     "labels": {"app": format!("a{}", i % APPS)}},
        "spec": {"nodeName": format!("node-{}", i % 500), "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", 100 + (i >> 16) % 100, (i >> 8) & 255, i & 255)}
    })
}

/// Policy `i`: egress of one app in one namespace to another app in a team's namespaces,
/// and to a CIDR.
fn cluster_policy(i: usize, namespaces: usize) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("np-{i}"), "namespace": format!("ns-{}", i % namespaces)},
        "spec": {"podSelector": {"matchLabels": {"app": format!("a{}", i % APPS)}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"podSelector": {"matchLabels": {"app": format!("a{}", (i + 1) % APPS)}},
                                     "namespaceSelector": {"matchLabels": {"team": format!("t{}", i % TEAMS)}}},
                                    {"ipBlock": {"cidr": format!("172.{}.{}.0/24", 16 + i % 16, i % 256)}}],
                             "ports": [{"protocol": "TCP", "port": 443}]}]}
    })
}

/// The UDP port the probers connect to (127.0.0.1:9) allowed, or another one.
fn probe_policy(allowed: bool) -> Value {
    let port = if allowed { 9 } else { 10 };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "probe", "namespace": "ci"},
        "spec": {"podSelector": {"matchLabels": {"app": "runner"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": "127.0.0.1/32"}}], "ports": [{"protocol": "UDP", "port": port}]}]}
    })
}

pub fn run(quick: bool, report: &mut Report) {
    raise_own_fd_limit();
    let (pods, namespaces, policies, churn_secs, changes) = if quick {
        (10_000, 400, 1_000, 10u64, 10)
    } else {
        (50_000, 2_000, 5_000, 60, 40)
    };
    // The long churn run (30 minutes: `CHURN_SECS_ENV=1800`) is asked for, not default.
    let churn_secs = std::env::var(CHURN_SECS_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(churn_secs);
    let n = node("bench-scale");
    let _registry = setup(&n);
    n.server.apply(probe_policy(false));
    let filled = Instant::now();
    for i in 0..namespaces {
        n.server.apply(cluster_namespace(i));
    }
    for i in 0..pods {
        n.server.apply(cluster_pod(i, namespaces));
    }
    for i in 0..policies {
        n.server.apply(cluster_policy(i, namespaces));
    }
    let mut local_cgroups = Vec::new();
    for i in 0..LOCAL {
        let id = uid(0x3000_0000 + i);
        n.server.apply(pod(
            "ci",
            &format!("runner-{i}"),
            &id,
            &format!("10.4.{}.{}", i / 250, i % 250 + 1),
        ));
        local_cgroups.push(n.pod_cgroup(&id));
    }
    eprintln!("scale: cluster filled in {:?}", filled.elapsed());

    let started = Instant::now();
    let agent = start_agent(&n, &["--no-events-stdout"], None);
    wait_ready(&agent, Duration::from_secs(600));
    let ready_at = Instant::now();
    let ready = started.elapsed();
    // The agent's own work: from the last of its initial lists written to it until ready.
    let lists_done = ["Namespace", "Pod", "NetworkPolicy"]
        .iter()
        .filter_map(|k| n.server.list_served(k))
        .max();
    let after_lists = lists_done.map(|t| ready_at.saturating_duration_since(t));
    eventually(
        Duration::from_secs(600),
        "the local pods were never all enforced",
        || enforced(&agent) == Some(LOCAL),
    );
    let all_enforced = started.elapsed();
    let start_cpu = agent.cpu();
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm, maps) = (agent.rss_kib(), agent.hwm_kib(), bpf_map_kib(agent.pid()));
    let idle_secs = if quick { 10 } else { 30 };
    let idle = idle_cpu(&agent, idle_secs);

    // Policy change → enforced, in one local pod.
    let (prober, verdicts) = spawn_prober(&local_cgroups[0]);
    wait_verdict(&verdicts, false, &agent);
    let full_before = syncs(&agent, "full");
    let mut lags = Vec::new();
    for i in 0..changes {
        let allow = i % 2 == 0;
        while verdicts.try_recv().is_ok() {}
        n.server.apply(probe_policy(allow));
        let emitted = Instant::now();
        lags.push(wait_verdict(&verdicts, allow, &agent).saturating_duration_since(emitted));
    }
    drop(prober);
    let change_syncs = syncs(&agent, "full") - full_before;
    let change = summarize(&lags);
    if changes % 2 == 1 {
        n.server.apply(probe_policy(false));
    }

    // Outside kubepods: unguarded. A running prober waits here to be moved into a new pod.
    // Made first: a new directory at the cgroup root makes the agent rescan (a full sync).
    let staging = n.root.join("bench-staging");
    std::fs::create_dir_all(&staging).expect("a staging cgroup");
    std::thread::sleep(Duration::from_secs(2));
    // Churn elsewhere at 100 creations/s (and as many deletions), two new local pods a second.
    let (churn_cpu0, churn_rss0, churn_t0) = (agent.cpu(), agent.rss_kib(), Instant::now());
    let full0 = syncs(&agent, "full");
    let mut next = pods;
    let (mut moved_lags, mut started_lags, mut refused_at_first_try) = (Vec::new(), Vec::new(), 0);
    let mut rss_by_minute = vec![churn_rss0];
    // Agent CPU per churn step in each minute: a slope means something the churn feeds grows.
    let (mut cpu_by_minute, mut minute_cpu0) = (Vec::new(), churn_cpu0);
    let mut previous_local = Vec::new();
    for s in 0..churn_secs {
        if s > 0 && s % 60 == 0 {
            rss_by_minute.push(agent.rss_kib());
            let cpu = agent.cpu();
            cpu_by_minute.push((cpu - minute_cpu0) / 60);
            minute_cpu0 = cpu;
        }
        let second = Instant::now();
        let staged = staged_prober(&staging);
        for _ in 0..100 {
            n.server.apply(cluster_pod(next, namespaces));
            let old = next - pods;
            n.server.delete(
                "Pod",
                Some(&format!("ns-{}", old % namespaces)),
                &format!("p-{old}"),
            );
            next += 1;
        }
        // One pod for the moved prober, one for the started one.
        let ids = [uid(0x4000_0000 + 2 * s as u32), uid(0x4000_0001 + 2 * s as u32)];
        let names = [format!("churn-{s}-moved"), format!("churn-{s}-started")];
        for (k, (id, name)) in ids.iter().zip(&names).enumerate() {
            let host = 2 * s + k as u64;
            n.server.apply(pod(
                "ci",
                name,
                id,
                &format!("10.5.{}.{}", host / 250 % 250, host % 250 + 1),
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
        let created = Instant::now();
        let moved_into = n.pod_cgroup(&ids[0]);
        move_prober(&staged.0, &moved_into);
        let (_, denied_at) = first_denial(&staged.1, &agent);
        moved_lags.push(denied_at.saturating_duration_since(created));
        drop(staged);
        let created = Instant::now();
        let started_in = n.pod_cgroup(&ids[1]);
        let (prober, verdicts) = spawn_prober(&started_in);
        let (first, denied_at) = first_denial(&verdicts, &agent);
        refused_at_first_try += u32::from(first);
        started_lags.push(denied_at.saturating_duration_since(created));
        drop(prober);
        // The node keeps LOCAL + 2 pods: last second's local pods go, as kubelet removes a
        // finished job's pod and cgroup, so growth in RSS is the agent's, not the node's.
        let current = names.into_iter().zip([moved_into, started_in]).collect();
        for (name, cgroup) in std::mem::replace(&mut previous_local, current) {
            n.server.delete("Pod", Some("ci"), &name);
            remove_pod_cgroup(&cgroup);
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(second.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let churn_elapsed = churn_t0.elapsed();
    let churn_cpu = agent.cpu() - churn_cpu0;
    let last_secs = churn_secs - cpu_by_minute.len() as u64 * 60;
    if last_secs > 0 {
        cpu_by_minute.push((agent.cpu() - minute_cpu0) / last_secs as u32);
    }
    let churn_full = syncs(&agent, "full") - full0;
    let churn_rss1 = agent.rss_kib();
    rss_by_minute.push(churn_rss1);
    let rss_per_min = (churn_rss1 as f64 - churn_rss0 as f64) * 60.0 / churn_elapsed.as_secs_f64();
    let (moved, started) = (summarize(&moved_lags), summarize(&started_lags));
    let hwm_end = agent.hwm_kib();
    let _ = std::fs::remove_dir(&staging);

    report.section(
        "5i. `pipeguard agent` at control-plane scale: a cluster of N pods, namespaces and NetworkPolicies, 110 guarded pods on the node",
        &[
            "cluster (pods / namespaces / policies)",
            "start → ready",
            "last initial list written → ready",
            "→ 110 enforced",
            "RSS",
            "VmHWM",
            "BPF maps (memlock)",
            &format!("idle CPU in {idle_secs} s"),
            "policy change → enforced p50",
            "p99",
            "full syncs for the changes",
        ],
    );
    report.row(vec![
        format!("{pods} / {namespaces} / {policies}"),
        ms(ready.as_secs_f64() * 1e3),
        after_lists.map_or("—".to_string(), |d| ms(d.as_secs_f64() * 1e3)),
        ms(all_enforced.as_secs_f64() * 1e3),
        mib(rss),
        mib(hwm),
        mib(maps),
        cpu_ms(idle),
        ms(change.p50),
        ms(change.p99),
        format!("{change_syncs} for {changes}"),
    ]);
    report.section(
        "5j. The same agent under churn elsewhere: 100 pod creations and 100 deletions a second, two new local pods each second",
        &[
            "churn",
            "new local pod → enforced, prober moved in (the agent's part) p50",
            "p99",
            "max",
            "prober started in it p50",
            "p99",
            "its first probe refused",
            "agent CPU per churn step (100 + 100 pods, two local pods)",
            "the same, each minute (ms)",
            "full syncs",
            "RSS before → after",
            "RSS growth per minute",
            "RSS at each minute",
            "VmHWM",
        ],
    );
    report.row(vec![
        format!("{churn_secs} s ({} pods created)", churn_secs * 100),
        ms(moved.p50),
        ms(moved.p99),
        ms(moved.max),
        ms(started.p50),
        ms(started.p99),
        format!("{refused_at_first_try} of {churn_secs}"),
        cpu_ms(churn_cpu / churn_secs as u32),
        cpu_by_minute
            .iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(" "),
        format!("{churn_full}"),
        format!("{} → {}", mib(churn_rss0), mib(churn_rss1)),
        format!("{:+.1} MiB", rss_per_min / 1024.0),
        rss_by_minute
            .iter()
            .map(|k| format!("{:.0}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" "),
        mib(hwm_end),
    ]);
    report.figure(
        "agent_scale",
        json!({
            "pods": pods, "namespaces": namespaces, "policies": policies, "local_pods": LOCAL,
            "ready_ms": ready.as_secs_f64() * 1e3,
            "ready_after_lists_ms": after_lists.map(|d| d.as_secs_f64() * 1e3),
            "all_enforced_ms": all_enforced.as_secs_f64() * 1e3,
            "cpu_ms_to_enforced": (start_cpu).as_secs_f64() * 1e3,
            "rss_kib": rss, "hwm_kib": hwm, "bpf_map_memlock_kib": maps,
            "idle_seconds": idle_secs, "idle_cpu_ms": idle.as_secs_f64() * 1e3,
            "policy_change": change.json(), "policy_change_full_syncs": change_syncs,
            "churn_seconds": churn_secs, "churn_new_pod_to_enforced": moved.json(),
            "churn_new_pod_started_prober": started.json(),
            "churn_started_prober_refused_at_first_try": refused_at_first_try,
            "churn_cpu_ms": churn_cpu.as_secs_f64() * 1e3, "churn_full_syncs": churn_full,
            "churn_rss_kib_before": churn_rss0, "churn_rss_kib_after": churn_rss1,
            "churn_rss_kib_per_minute": rss_per_min, "hwm_kib_end": hwm_end,
            "churn_rss_kib_each_minute": rss_by_minute,
            "churn_cpu_ms_per_step_each_minute":
                cpu_by_minute.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        }),
    );
}

/// Waits until the prober reports `allowed`; when.
fn wait_verdict(
    verdicts: &std::sync::mpsc::Receiver<(Instant, bool)>,
    allowed: bool,
    agent: &Agent,
) -> Instant {
    loop {
        match verdicts.recv_timeout(Duration::from_secs(120)) {
            Ok((at, v)) if v == allowed => return at,
            Ok(_) => {}
            Err(_) => panic!(
                "the prober never saw allowed={allowed}; agent log:\n{}",
                agent.log()
            ),
        }
    }
}

/// A container cgroup and its pod cgroup, once their processes are gone.
fn remove_pod_cgroup(container: &std::path::Path) {
    let removed = std::fs::remove_dir(container)
        .and_then(|()| std::fs::remove_dir(container.parent().expect("the pod cgroup")));
    if let Err(e) = removed {
        eprintln!("scale: remove {}: {e}", container.display());
    }
}
