//! Property (issue 16, parity): for generated ingress policies (ipBlock with except, pod
//! selectors resolved through a cluster snapshot, ports by number, range and the pod's own
//! named ports) and sources, the compiled allowlist (`ingress_for` → trie entries, what the
//! kernel looks up) admits exactly what `pipeguard check`'s evaluation (`policy_admits`)
//! admits. kernel_parity.rs checks the same against the kernel itself.

mod common;

use std::net::IpAddr;

use common::policy_world::{address, cluster, network_policy, rule};
use pipeguard::policy::{
    Ingress, PodIdentity, Source, ingress_for, lookup, lpm_entries, parse_policies, policy_admits,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn compiled_ingress_admits_what_check_admits(
        rules in prop::collection::vec(rule(10, "from"), 0..3),
        probes in prop::collection::vec((address(10), 0u16..8, prop::bool::ANY), 1..24),
    ) {
        let text = network_policy("in", "{matchLabels: {app: runner}}", Some(&rules), None);
        let set = parse_policies("p.yaml", &text);
        prop_assert!(set.errors.is_empty(), "{:?}\n{}", set.errors, text);
        let cluster = cluster(10);
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
