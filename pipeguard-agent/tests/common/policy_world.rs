//! Generated NetworkPolicy worlds for the parity properties (policy_ingress_props.rs, pure;
//! kernel_parity.rs, through the kernel): ipBlocks with excepts, selector peers, ports by
//! number, range and name, over a small cluster whose addresses all start with `first`
//! (10 for the pure test, 127 for loopback).

use std::net::Ipv4Addr;

use pipeguard::policy::{Cluster, ClusterPod};
use proptest::prelude::*;

/// An address of the world: `first`.{0,1}.{0..3}.{0..7}.
pub fn address(first: u8) -> impl Strategy<Value = Ipv4Addr> {
    (0u8..2, 0u8..4, 0u8..8).prop_map(move |(b, c, d)| Ipv4Addr::new(first, b, c, d))
}

/// One rule: `peers_key` (`from` or `to`: omitted, or ipBlocks and selector peers) and
/// `ports` (omitted, or specs by number, range, name, or a name no pod has).
pub fn rule(first: u8, peers_key: &'static str) -> impl Strategy<Value = String> {
    let block = (
        address(first),
        22u8..=32,
        prop::option::of((address(first), 28u8..=32)),
    )
        .prop_map(|(a, len, except)| {
            let net = ipnet::Ipv4Net::new(a, len).unwrap().trunc();
            match except {
                Some((e, elen)) if net.contains(&e) && elen > len => format!(
                    "{{ipBlock: {{cidr: {net}, except: [{}]}}}}",
                    ipnet::Ipv4Net::new(e, elen).unwrap().trunc()
                ),
                _ => format!("{{ipBlock: {{cidr: {net}}}}}"),
            }
        });
    let pods = prop::sample::select(vec![
        "{podSelector: {matchLabels: {app: cache}}}",
        "{namespaceSelector: {matchLabels: {team: infra}}}",
        "{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}",
    ])
    .prop_map(str::to_string);
    let peer = prop_oneof![3 => block, 1 => pods];
    let port = prop_oneof![
        (1u16..6, 0u16..3).prop_map(|(p, span)| if span == 0 {
            format!("{{port: {p}}}")
        } else {
            format!("{{port: {p}, endPort: {}}}", p + span)
        }),
        Just("{protocol: UDP, port: 3}".to_string()),
        Just("{port: http}".to_string()),
        Just("{port: missing}".to_string()),
    ];
    (
        prop::option::of(prop::collection::vec(peer, 1..3)),
        prop::option::of(prop::collection::vec(port, 1..3)),
    )
        .prop_map(move |(peers, ports)| {
            let mut rule = String::from("  - {");
            if let Some(peers) = peers {
                rule += &format!("{peers_key}: [{}], ", peers.join(", "));
            }
            if let Some(ports) = ports {
                rule += &format!("ports: [{}]", ports.join(", "));
            }
            rule + "}\n"
        })
}

/// A NetworkPolicy in namespace `ci` selecting `selector` (YAML flow mapping); each
/// direction given is in its policyTypes, with its rules (none: an empty list).
pub fn network_policy(
    name: &str,
    selector: &str,
    ingress: Option<&[String]>,
    egress: Option<&[String]>,
) -> String {
    let mut types = Vec::new();
    let mut body = String::new();
    for (kind, key, rules) in [("Ingress", "ingress", ingress), ("Egress", "egress", egress)] {
        let Some(rules) = rules else { continue };
        types.push(kind);
        if rules.is_empty() {
            body += &format!("  {key}: []\n");
        } else {
            body += &format!("  {key}:\n{}", rules.concat());
        }
    }
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: ci}}\nspec:\n  podSelector: {selector}\n  policyTypes: [{}]\n{body}",
        types.join(", ")
    )
}

/// The fixed pods: `ci/runner` (`first`.0.0.1, the guarded one, container port http = TCP 4),
/// `ci/cache`, `tools/web` (http = TCP 5) and `tools/cache`; namespace `tools` is
/// `team: infra`.
pub fn cluster(first: u8) -> Cluster {
    let mut cluster = Cluster::default();
    cluster.add_namespace("ci", Default::default());
    cluster.add_namespace("tools", [("team".to_string(), "infra".to_string())].into());
    let ip = |b, c, d| Ipv4Addr::new(first, b, c, d).to_string();
    cluster.pods = vec![
        pod("ci", "runner", &ip(0, 0, 1), vec![("http".into(), 6, 4)]),
        pod("ci", "cache", &ip(0, 1, 2), Vec::new()),
        pod("tools", "web", &ip(1, 2, 3), vec![("http".into(), 6, 5)]),
        pod("tools", "cache", &ip(1, 3, 4), Vec::new()),
    ];
    cluster
}

/// A pod named after its app and address, with that one address.
pub fn pod(namespace: &str, app: &str, ip: &str, named_ports: Vec<(String, u8, u16)>) -> ClusterPod {
    ClusterPod {
        namespace: namespace.into(),
        name: format!("{app}-{ip}"),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
        named_ports,
    }
}
