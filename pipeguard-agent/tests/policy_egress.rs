//! Egress semantics with a cluster snapshot: selector peers become pod addresses (IPv4 and
//! IPv6), and a named port means each destination pod's own number.

use std::{collections::BTreeMap, net::IpAddr};

use pipeguard::policy::{Cluster, ClusterPod, Egress, PodIdentity, egress_for, evaluate, parse_policies};
use pipeguard_common::PROTO_TCP;

fn pod(ns: &str, name: &str, app: &str, ips: &[&str], http_port: u16) -> ClusterPod {
    ClusterPod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        named_ports: vec![("http".into(), PROTO_TCP, http_port)],
    }
}

#[test]
fn selector_peers_resolve_to_pod_ips_and_named_ports_per_pod() {
    let set = parse_policies(
        "p.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: to-api, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {team: svc}}, podSelector: {matchLabels: {app: api}}}]\n    ports: [{port: http}]\n",
    );
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    let mut cluster = Cluster::default();
    cluster.add_namespace("svc", [("team".to_string(), "svc".to_string())].into());
    cluster.add_namespace("other", BTreeMap::new());
    cluster.pods = vec![
        pod("svc", "api-1", "api", &["10.1.0.1", "fd00::1"], 8080),
        pod("svc", "api-2", "api", &["10.1.0.2"], 9090),
        pod("svc", "db", "db", &["10.1.0.3"], 8080),
        pod("other", "api-3", "api", &["10.2.0.1"], 8080),
    ];
    let job = PodIdentity {
        namespace: "ci".into(),
        name: "job".into(),
        labels: BTreeMap::new(),
    };
    let Egress::Isolated { rules, .. } = egress_for(&set, &job, Some(&cluster)) else {
        panic!("isolated")
    };
    let allows = |ip: &str, port: u16| evaluate(&rules, ip.parse::<IpAddr>().unwrap(), PROTO_TCP, port);
    assert!(
        allows("10.1.0.1", 8080) && allows("fd00::1", 8080),
        "api-1 on its own http port, both families"
    );
    assert!(!allows("10.1.0.1", 9090));
    assert!(
        allows("10.1.0.2", 9090) && !allows("10.1.0.2", 8080),
        "api-2's http is 9090"
    );
    assert!(!allows("10.1.0.3", 8080), "db does not match the pod selector");
    assert!(!allows("10.2.0.1", 8080), "api-3 is not in a team=svc namespace");

    // Without a snapshot the same policy allows nothing, and says so.
    let Egress::Isolated { rules, warnings, .. } = egress_for(&set, &job, None) else {
        panic!("isolated")
    };
    assert!(rules.is_empty());
    assert!(
        warnings.iter().any(|w| w.contains("without a cluster snapshot")),
        "{warnings:?}"
    );
}
