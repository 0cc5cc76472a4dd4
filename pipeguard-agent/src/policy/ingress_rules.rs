//! NetworkPolicy ingress for one pod, compiled for the kernel: which policies isolate it
//! for ingress, and the union of what their rules admit, as source ranges on the pod's own
//! ports. The same [`AllowRule`]s as egress (the address is the source, not the
//! destination), so `lpm` compiles them into the same tries.
//!
//! Named ports name the pod's own container ports (`own_ports`); a rule whose ports are all
//! names the pod does not have admits nothing, as in `pipeguard check`.

use ipnet::IpNet;

use super::{
    AllowRule, Ports,
    cluster::Cluster,
    egress::PodIdentity,
    load::PolicySet,
    validate::{Peer, Policy, PortRef, PortSpec, Rule},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// No policy with Ingress in its policyTypes selects the pod.
    Unrestricted,
    /// Inbound connections only from what some rule admits. `policies`: "ns/name" of the
    /// selecting policies; `warnings`: what the user should know.
    Isolated {
        rules: Vec<AllowRule>,
        policies: Vec<String>,
        warnings: Vec<String>,
    },
}

/// `own_ports`: the pod's named container ports (name, protocol number, port).
pub fn ingress_for(
    set: &PolicySet,
    pod: &PodIdentity,
    own_ports: &[(String, u8, u16)],
    cluster: Option<&Cluster>,
) -> Ingress {
    let selecting: Vec<&Policy> = set
        .policies
        .iter()
        .map(|p| &**p)
        .filter(|p| {
            p.namespace == pod.namespace && p.ingress.is_some() && p.pod_selector.matches(&pod.labels)
        })
        .collect();
    if selecting.is_empty() {
        return Ingress::Unrestricted;
    }
    let mut rules = Vec::new();
    let mut warnings = Vec::new();
    for policy in &selecting {
        warnings.extend(policy.warnings.iter().cloned());
        for rule in policy.ingress.iter().flatten() {
            compile_rule(policy, rule, own_ports, cluster, &mut rules, &mut warnings);
        }
    }
    Ingress::Isolated {
        rules,
        policies: selecting.iter().map(|p| p.key()).collect(),
        warnings,
    }
}

fn compile_rule(
    policy: &Policy,
    rule: &Rule,
    own_ports: &[(String, u8, u16)],
    cluster: Option<&Cluster>,
    out: &mut Vec<AllowRule>,
    warnings: &mut Vec<String>,
) {
    let Some(ports) = ports(policy, rule.ports.as_deref(), own_ports, warnings) else {
        return;
    };
    let mut push = |cidr: IpNet, except: Vec<IpNet>| {
        out.push(AllowRule {
            cidr,
            except,
            ports: ports.clone(),
        });
    };
    let Some(peers) = &rule.peers else {
        // No `from`: every source.
        push("0.0.0.0/0".parse().expect("valid"), Vec::new());
        push("::/0".parse().expect("valid"), Vec::new());
        return;
    };
    for peer in peers {
        match peer {
            Peer::IpBlock { cidr, except } => push(*cidr, except.clone()),
            Peer::Pods { pods, namespaces } => {
                let Some(cluster) = cluster else {
                    warnings.push(format!(
                        "{}: a podSelector/namespaceSelector peer matches nothing without a cluster snapshot (--cluster)",
                        policy.key()
                    ));
                    continue;
                };
                for source in &cluster.pods {
                    let ns_ok = match namespaces {
                        Some(sel) => sel.matches(&cluster.namespace_labels(&source.namespace)),
                        None => source.namespace == policy.namespace,
                    };
                    if ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&source.labels)) {
                        for ip in &source.ips {
                            push(IpNet::from(super::canonical(*ip)), Vec::new());
                        }
                    }
                }
            }
        }
    }
}

/// The rule's ports on this pod; `None` when it names ports and none of them exists here
/// (the rule admits nothing).
fn ports(
    policy: &Policy,
    specs: Option<&[PortSpec]>,
    own_ports: &[(String, u8, u16)],
    warnings: &mut Vec<String>,
) -> Option<Ports> {
    let Some(specs) = specs else {
        return Some(Ports::All);
    };
    let mut list = Vec::new();
    for spec in specs {
        match &spec.port {
            PortRef::Any => list.push((spec.protocol, 0, u16::MAX)),
            PortRef::Range(lo, hi) => list.push((spec.protocol, *lo, *hi)),
            PortRef::Named(name) => {
                let before = list.len();
                list.extend(
                    own_ports
                        .iter()
                        .filter(|(n, protocol, _)| n == name && *protocol == spec.protocol)
                        .map(|(_, protocol, port)| (*protocol, *port, *port)),
                );
                if list.len() == before {
                    warnings.push(format!(
                        "{}: named port {name:?} is not a port of this pod: it admits nothing",
                        policy.key()
                    ));
                }
            }
        }
    }
    (!list.is_empty()).then_some(Ports::List(list))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::policy::{ClusterPod, evaluate, lookup, lpm_entries, parse_policies};

    fn runner() -> PodIdentity {
        PodIdentity {
            namespace: "ci".into(),
            name: "runner".into(),
            labels: [("app".to_string(), "runner".to_string())].into(),
        }
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: ci}\nspec:\n  podSelector: {matchLabels: {app: runner}}\n";

    fn compile(
        spec: &str,
        own_ports: &[(String, u8, u16)],
        cluster: Option<&Cluster>,
    ) -> (Vec<AllowRule>, Vec<String>) {
        let set = parse_policies("p.yaml", &format!("{HEAD}{spec}"));
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        match ingress_for(&set, &runner(), own_ports, cluster) {
            Ingress::Isolated {
                rules,
                policies,
                warnings,
            } => {
                assert_eq!(policies, ["ci/in"]);
                (rules, warnings)
            }
            Ingress::Unrestricted => panic!("the policy selects the runner"),
        }
    }

    /// The kernel's answer for one source, from the compiled trie entries.
    fn admits(rules: &[AllowRule], source: &str, protocol: u8, port: u16) -> bool {
        let ip: IpAddr = source.parse().unwrap();
        let entries = lpm_entries(rules).expect("compiles");
        let by_trie = lookup(&entries, ip).is_some_and(|p| p.allows(protocol, port));
        assert_eq!(
            by_trie,
            evaluate(rules, ip, protocol, port),
            "trie and reference agree on {source}"
        );
        by_trie
    }

    #[test]
    fn egress_only_policies_leave_ingress_unrestricted() {
        let set = parse_policies(
            "p.yaml",
            &format!("{HEAD}  policyTypes: [Egress]\n  egress: []\n"),
        );
        assert_eq!(ingress_for(&set, &runner(), &[], None), Ingress::Unrestricted);
        let other = PodIdentity {
            labels: Default::default(),
            ..runner()
        };
        let set = parse_policies("p.yaml", &format!("{HEAD}  policyTypes: [Ingress]\n"));
        assert_eq!(
            ingress_for(&set, &other, &[], None),
            Ingress::Unrestricted,
            "not selected"
        );
    }

    #[test]
    fn an_ingress_policy_without_rules_denies_every_source() {
        let (rules, _) = compile("  policyTypes: [Ingress]\n", &[], None);
        assert!(rules.is_empty());
        assert!(!admits(&rules, "10.0.0.1", 6, 80));
    }

    #[test]
    fn ip_blocks_with_except_and_port_ranges() {
        let (rules, _) = compile(
            "  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]\n    ports: [{port: 8000, endPort: 8010}, {protocol: UDP, port: 53}]\n",
            &[],
            None,
        );
        assert!(admits(&rules, "10.2.3.4", 6, 8005));
        assert!(!admits(&rules, "10.2.3.4", 6, 8011), "past endPort");
        assert!(!admits(&rules, "10.1.2.3", 6, 8005), "in the except");
        assert!(admits(&rules, "10.2.3.4", 17, 53));
        assert!(!admits(&rules, "10.2.3.4", 6, 53), "53 is UDP only");
        assert!(!admits(&rules, "192.168.0.1", 6, 8005), "outside the block");
        assert!(admits(&rules, "::ffff:10.2.3.4", 6, 8005), "v4-mapped is IPv4");
    }

    #[test]
    fn named_ports_are_the_pods_own() {
        let spec = "  policyTypes: [Ingress]\n  ingress:\n  - ports: [{port: http}]\n";
        let own = [("http".to_string(), 6, 8080), ("metrics".to_string(), 6, 9090)];
        let (rules, warnings) = compile(spec, &own, None);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(
            admits(&rules, "192.0.2.1", 6, 8080),
            "from anywhere, on its http port"
        );
        assert!(!admits(&rules, "192.0.2.1", 6, 9090));
        // A pod without that port: the rule admits nothing, and says so.
        let (rules, warnings) = compile(spec, &[], None);
        assert!(rules.is_empty());
        assert!(warnings[0].contains("\"http\""), "{warnings:?}");
    }

    #[test]
    fn selector_peers_resolve_to_pod_ips() {
        let mut cluster = Cluster::default();
        cluster.add_namespace("ci", Default::default());
        cluster.add_namespace("tools", [("team".to_string(), "infra".to_string())].into());
        let pod = |ns: &str, app: &str, ip: &str| ClusterPod {
            namespace: ns.into(),
            name: app.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: vec![ip.parse().unwrap()],
            named_ports: Vec::new(),
        };
        cluster.pods = vec![
            pod("ci", "cache", "10.0.0.5"),
            pod("ci", "web", "10.0.0.6"),
            pod("tools", "cache", "10.0.1.5"),
            pod("tools", "web", "fd00::6"),
        ];
        let (rules, _) = compile(
            "  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: cache}}\n    - namespaceSelector: {matchLabels: {team: infra}}\n      podSelector: {matchLabels: {app: web}}\n",
            &[],
            Some(&cluster),
        );
        assert!(admits(&rules, "10.0.0.5", 6, 1), "same namespace, matching pod");
        assert!(!admits(&rules, "10.0.0.6", 6, 1), "same namespace, other pod");
        assert!(
            !admits(&rules, "10.0.1.5", 6, 1),
            "podSelector alone is the policy's namespace"
        );
        assert!(admits(&rules, "fd00::6", 6, 1), "namespace and pod both match");
        // Without a snapshot, selector peers admit nothing (and say so).
        let (rules, warnings) = compile(
            "  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {}}]\n",
            &[],
            None,
        );
        assert!(rules.is_empty());
        assert!(warnings[0].contains("--cluster"), "{warnings:?}");
    }

    #[test]
    fn the_union_of_every_selecting_policy() {
        let text = format!(
            "{HEAD}  policyTypes: [Ingress]\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.0.0.0/24}}}}]\n---\n{}  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{{ipBlock: {{cidr: 192.0.2.0/24}}}}]\n    ports: [{{port: 22}}]\n",
            HEAD.replace("name: in,", "name: ssh,")
        );
        let set = parse_policies("p.yaml", &text);
        let Ingress::Isolated { rules, policies, .. } = ingress_for(&set, &runner(), &[], None) else {
            panic!("isolated");
        };
        assert_eq!(policies, ["ci/in", "ci/ssh"]);
        assert!(admits(&rules, "10.0.0.9", 6, 443));
        assert!(admits(&rules, "192.0.2.9", 6, 22));
        assert!(!admits(&rules, "192.0.2.9", 6, 443));
    }
}
