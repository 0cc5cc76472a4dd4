//! Property (issue 16, parity): for generated ingress policies (ipBlock with except, pod
//! selectors resolved through a cluster snapshot, ports by number, range and the pod's own
//! named ports) and sources, the compiled allowlist (`ingress_for` → trie entries, what the
//! kernel looks up) admits exactly what `pipeguard check`'s evaluation (`policy_admits`)
//! admits.

use std::net::{IpAddr, Ipv4Addr};

use pipeguard::policy::{
    Cluster, ClusterPod, Ingress, PodIdentity, Source, ingress_for, lookup, lpm_entries, parse_policies,
    policy_admits,
};
use proptest::prelude::*;

fn source() -> impl Strategy<Value = Ipv4Addr> {
    (0u8..2, 0u8..4, 0u8..8).prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d))
}

/// One rule: `from` (omitted, or ipBlocks and selector peers) and `ports` (omitted, or specs).
fn rule() -> impl Strategy<Value = String> {
    let block =
        (source(), 22u8..=32, prop::option::of((source(), 28u8..=32))).prop_map(|(a, len, except)| {
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
        .prop_map(|(from, ports)| {
            let mut rule = String::from("  - {");
            if let Some(from) = from {
                rule += &format!("from: [{}], ", from.join(", "));
            }
            if let Some(ports) = ports {
                rule += &format!("ports: [{}]", ports.join(", "));
            }
            rule + "}\n"
        })
}

fn cluster() -> Cluster {
    let mut cluster = Cluster::default();
    cluster.add_namespace("ci", Default::default());
    cluster.add_namespace("tools", [("team".to_string(), "infra".to_string())].into());
    let pod = |ns: &str, app: &str, ip: &str, ports: Vec<(String, u8, u16)>| ClusterPod {
        namespace: ns.into(),
        name: format!("{app}-{ip}"),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
        named_ports: ports,
    };
    cluster.pods = vec![
        pod("ci", "runner", "10.0.0.1", vec![("http".into(), 6, 4)]),
        pod("ci", "cache", "10.0.1.2", Vec::new()),
        pod("tools", "web", "10.1.2.3", Vec::new()),
        pod("tools", "cache", "10.1.3.4", Vec::new()),
    ];
    cluster
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn compiled_ingress_admits_what_check_admits(
        rules in prop::collection::vec(rule(), 0..3),
        probes in prop::collection::vec((source(), 0u16..8, prop::bool::ANY), 1..24),
    ) {
        let text = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: in, namespace: ci}}\nspec:\n  podSelector: {{matchLabels: {{app: runner}}}}\n  policyTypes: [Ingress]\n  ingress:{}",
            if rules.is_empty() { " []\n".to_string() } else { format!("\n{}", rules.concat()) }
        );
        let set = parse_policies("p.yaml", &text);
        prop_assert!(set.errors.is_empty(), "{:?}\n{}", set.errors, text);
        let cluster = cluster();
        let runner = &cluster.pods[0];
        let identity = PodIdentity {
            namespace: runner.namespace.clone(),
            name: runner.name.clone(),
            labels: runner.labels.clone(),
        };
        let Ingress::Isolated { rules, .. } = ingress_for(&set, &identity, &runner.named_ports, Some(&cluster)) else {
            panic!("the policy selects the runner");
        };
        let entries = lpm_entries(&rules).expect("compiles");
        for (ip, port, udp) in probes {
            let ip = IpAddr::V4(ip);
            let protocol = if udp { 17 } else { 6 };
            let source = Source {
                ip,
                pod: cluster.pods.iter().find(|p| p.ips.contains(&ip)),
            };
            let check = set.policies.iter().any(|p| policy_admits(p, &cluster, &source, runner, protocol, port));
            let kernel = lookup(&entries, ip).is_some_and(|p| p.allows(protocol, port));
            prop_assert_eq!(kernel, check, "{} port {}/{}\n{}", ip, port, protocol, text);
        }
    }
}
