//! The ingress half of a guarded pod's desired allowlist: pure, like `desired`.
//!
//! Fail closed: when the pod's namespace has a policy that does not parse or validate, or
//! its ingress rules do not compile, the pod keeps its last good ingress allowlist, or gets
//! one that admits only the node if it never had one. It never falls back to open ingress.
//!
//! The node: like Cilium and Calico by default, traffic from the node a pod runs on (the
//! kubelet's probes) is always admitted: `Settings::ingress_from_node` lists the node's own
//! addresses, added to every ingress allowlist on every port.

use ipnet::IpNet;

use super::desired::{LocalPod, Settings};
use crate::{
    engine::{IngressEntries, PolicyEntries},
    policy::{self, AllowRule, Cluster, Ingress, PodIdentity, PolicySet, Ports},
};

/// What the pod's ingress allowlist is, and the reason it failed closed, if it did.
pub struct IngressHalf {
    pub entries: Option<IngressEntries>,
    pub failed: Option<String>,
}

/// `tainted`: the first invalid object of the pod's namespace, if any; `last_good`: what was
/// last applied to the pod.
pub fn ingress_half(
    settings: &Settings,
    policies: &PolicySet,
    cluster: &Cluster,
    pod: &LocalPod,
    tainted: Option<&str>,
    last_good: Option<&PolicyEntries>,
) -> IngressHalf {
    let fail_closed = |reason: String| IngressHalf {
        entries: Some(
            last_good
                .and_then(|e| e.ingress.clone())
                .unwrap_or_else(|| node_only(&settings.ingress_from_node)),
        ),
        failed: Some(reason),
    };
    if let Some(object) = tainted {
        return fail_closed(format!("{object} in namespace {} is invalid", pod.namespace));
    }
    let identity = PodIdentity {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        labels: pod.labels.clone(),
    };
    let own_ports = cluster
        .pods
        .iter()
        .find(|p| p.namespace == pod.namespace && p.name == pod.name)
        .map(|p| p.named_ports.as_slice())
        .unwrap_or_default();
    let mut rules = match policy::ingress_for(policies, &identity, own_ports, Some(cluster)) {
        Ingress::Unrestricted if settings.default_deny_ingress => Vec::new(),
        Ingress::Unrestricted => {
            return IngressHalf {
                entries: None,
                failed: None,
            };
        }
        Ingress::Isolated { rules, .. } => rules,
    };
    rules.extend(node_rules(&settings.ingress_from_node));
    match policy::lpm_entries(&rules) {
        Ok(e) => IngressHalf {
            entries: Some(IngressEntries { v4: e.v4, v6: e.v6 }),
            failed: None,
        },
        Err(error) => fail_closed(format!("ingress: {error}")),
    }
}

fn node_rules(node: &[IpNet]) -> impl Iterator<Item = AllowRule> + '_ {
    node.iter().map(|net| AllowRule {
        cidr: *net,
        except: Vec::new(),
        ports: Ports::All,
    })
}

/// Admits the node and nothing else.
fn node_only(node: &[IpNet]) -> IngressEntries {
    let rules: Vec<AllowRule> = node_rules(node).collect();
    // Whole prefixes on every port: nothing here can need more port ranges than an entry holds.
    let e = policy::lpm_entries(&rules).unwrap_or_default();
    IngressEntries { v4: e.v4, v6: e.v6 }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use pipeguard_common::POD_INGRESS_ISOLATED;

    use super::*;
    use crate::{
        agent::{
            default_settings,
            desired::{Status, compute},
            guard::GuardConfig,
        },
        policy::{LpmEntries, lookup, parse_policies},
    };

    fn settings(default_deny_ingress: bool) -> Settings {
        Settings {
            guard: GuardConfig {
                namespaces: vec!["ci".into()],
                ..GuardConfig::default()
            },
            default_deny_ingress,
            ingress_from_node: vec!["192.168.1.10/32".parse().unwrap()],
            ..default_settings()
        }
    }

    fn runner() -> LocalPod {
        LocalPod {
            uid: "uid-runner".into(),
            namespace: "ci".into(),
            name: "runner".into(),
            labels: [("app".to_string(), "runner".to_string())].into(),
            cgroup_id: 7,
            escape: None,
        }
    }

    fn desired(
        settings: &Settings,
        set: &PolicySet,
        cluster: &Cluster,
        last: &HashMap<String, std::sync::Arc<PolicyEntries>>,
    ) -> crate::agent::desired::DesiredPod {
        compute(settings, set, cluster, &[runner()], last).remove(0)
    }

    fn admits(entries: &IngressEntries, source: &str, port: u16) -> bool {
        let tries = LpmEntries {
            v4: entries.v4.clone(),
            v6: entries.v6.clone(),
        };
        lookup(&tries, source.parse().unwrap()).is_some_and(|p| p.allows(6, port))
    }

    const CACHE_ONLY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: ci}\nspec:\n  podSelector: {matchLabels: {app: runner}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/24}}]\n    ports: [{port: 8080}]\n";

    #[test]
    fn a_selected_pod_admits_its_rules_and_the_node() {
        let set = parse_policies("p.yaml", CACHE_ONLY);
        let out = desired(&settings(false), &set, &Cluster::default(), &HashMap::new());
        assert_ne!(out.flags & POD_INGRESS_ISOLATED, 0);
        let ingress = out.entries.ingress.as_ref().expect("an ingress half");
        assert!(admits(ingress, "10.0.0.9", 8080));
        assert!(!admits(ingress, "10.0.0.9", 22), "not its port");
        assert!(!admits(ingress, "10.0.1.9", 8080), "not its source");
        assert!(admits(ingress, "192.168.1.10", 22), "the node, on every port");
        // Egress is untouched: no egress policy selects the pod.
        assert_eq!(out.status, Status::Unrestricted);
    }

    #[test]
    fn unselected_pods_are_open_unless_default_deny_ingress() {
        let set = PolicySet::default();
        let open = desired(&settings(false), &set, &Cluster::default(), &HashMap::new());
        assert_eq!(open.flags & POD_INGRESS_ISOLATED, 0);
        assert_eq!(open.entries.ingress, None);
        let closed = desired(&settings(true), &set, &Cluster::default(), &HashMap::new());
        assert_ne!(closed.flags & POD_INGRESS_ISOLATED, 0);
        let ingress = closed.entries.ingress.as_ref().unwrap();
        assert!(!admits(ingress, "10.0.0.9", 8080));
        assert!(admits(ingress, "192.168.1.10", 8080), "only the node");
        // Pods the agent does not guard are never isolated.
        let web = LocalPod {
            namespace: "web".into(),
            ..runner()
        };
        let out = compute(
            &settings(true),
            &set,
            &Cluster::default(),
            &[web],
            &HashMap::new(),
        );
        assert_eq!(out[0].entries.ingress, None);
    }

    #[test]
    fn a_malformed_ingress_rule_fails_closed_and_names_object_and_field() {
        let set = parse_policies("p.yaml", &CACHE_ONLY.replace("10.0.0.0/24", "10.0.0.0/33"));
        assert_eq!(set.errors.len(), 1);
        let error = set.errors[0].to_string();
        assert!(
            error.contains("ci/in") && error.contains("spec.ingress[0].from[0].ipBlock.cidr"),
            "{error}"
        );
        // Never had an allowlist: only the node may connect.
        let out = desired(&settings(false), &set, &Cluster::default(), &HashMap::new());
        assert!(
            matches!(out.status, Status::FailedClosed { .. }),
            "{:?}",
            out.status
        );
        assert_ne!(out.flags & POD_INGRESS_ISOLATED, 0);
        let ingress = out.entries.ingress.as_ref().unwrap();
        assert!(!admits(ingress, "10.0.0.9", 8080));
        assert!(admits(ingress, "192.168.1.10", 8080));
        // Had one: keeps it.
        let good = desired(
            &settings(false),
            &parse_policies("p.yaml", CACHE_ONLY),
            &Cluster::default(),
            &HashMap::new(),
        );
        let last = HashMap::from([(
            "uid-runner".to_string(),
            std::sync::Arc::new(good.entries.clone()),
        )]);
        let out = desired(&settings(false), &set, &Cluster::default(), &last);
        assert_eq!(out.entries.ingress, good.entries.ingress);
    }

    #[test]
    fn named_ports_resolve_to_the_pods_own_from_the_snapshot() {
        let set = parse_policies("p.yaml", &CACHE_ONLY.replace("port: 8080", "port: http"));
        let mut cluster = Cluster::default();
        cluster.pods.push(crate::policy::ClusterPod {
            namespace: "ci".into(),
            name: "runner".into(),
            labels: runner().labels,
            ips: vec!["10.0.9.1".parse().unwrap()],
            named_ports: vec![("http".into(), 6, 8081)],
        });
        let out = desired(&settings(false), &set, &cluster, &HashMap::new());
        let ingress = out.entries.ingress.as_ref().unwrap();
        assert!(admits(ingress, "10.0.0.9", 8081));
        assert!(!admits(ingress, "10.0.0.9", 8080));
    }
}
