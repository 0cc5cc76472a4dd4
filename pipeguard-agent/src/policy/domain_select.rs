//! Which domain policies select a pod, and the union of their rules in one canonical
//! form (so identical allowlists, names included, compare equal and share one id).

use std::collections::BTreeMap;

use super::{
    Cluster, DomainPattern, DomainRule, Ports, cluster::NAMESPACE_NAME_LABEL, domain_load::DomainTaint,
    domain_policy::DomainPolicy, egress::PodIdentity, load::PolicySet,
};

/// The domain side of one pod's egress, when at least one domain policy selects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domains {
    /// Keys of the selecting policies (`DomainPolicy ns/name`, `ClusterDomainPolicy name`).
    pub policies: Vec<String>,
    /// One rule per name, sorted: the union of every selecting policy's rules.
    pub names: Vec<DomainRule>,
}

/// Labels of the pod's namespace: from the snapshot, or just its name label without one.
fn namespace_labels(cluster: Option<&Cluster>, namespace: &str) -> BTreeMap<String, String> {
    match cluster {
        Some(c) => c.namespace_labels(namespace),
        None => BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())]),
    }
}

/// The domain policies that select `pod`.
pub fn selecting_domain<'a>(
    set: &'a PolicySet,
    pod: &PodIdentity,
    cluster: Option<&Cluster>,
) -> Vec<&'a DomainPolicy> {
    set.domains
        .iter()
        .filter(|d| {
            d.selects(&pod.namespace, &pod.labels, || {
                namespace_labels(cluster, &pod.namespace)
            })
        })
        .collect()
}

/// `None` when no domain policy selects the pod (it is not DNS-filtered).
pub fn domains_for(set: &PolicySet, pod: &PodIdentity, cluster: Option<&Cluster>) -> Option<Domains> {
    let selecting = selecting_domain(set, pod, cluster);
    if selecting.is_empty() {
        return None;
    }
    Some(Domains {
        policies: selecting.iter().map(|d| d.key()).collect(),
        names: merge_rules(selecting.iter().flat_map(|d| d.rules())),
    })
}

/// The first invalid domain policy that makes `pod` fail closed, if any.
pub fn domain_taint_for<'a>(
    set: &'a PolicySet,
    pod: &PodIdentity,
    cluster: Option<&Cluster>,
) -> Option<&'a DomainTaint> {
    set.domain_taints.iter().find(|t| {
        t.covers(&pod.namespace, &pod.labels, || {
            namespace_labels(cluster, &pod.namespace)
        })
    })
}

/// One rule per pattern, sorted by pattern; the ports of a pattern named by several rules
/// are their union (`All` if any rule has no ports), sorted and deduplicated.
pub fn merge_rules(rules: impl IntoIterator<Item = DomainRule>) -> Vec<DomainRule> {
    let mut by_pattern: BTreeMap<DomainPattern, Ports> = BTreeMap::new();
    for rule in rules {
        let merged = match (by_pattern.remove(&rule.pattern), rule.ports) {
            (None, ports) => ports,
            (Some(Ports::All), _) | (_, Ports::All) => Ports::All,
            (Some(Ports::List(mut a)), Ports::List(b)) => {
                a.extend(b);
                Ports::List(a)
            }
        };
        by_pattern.insert(rule.pattern, merged);
    }
    by_pattern
        .into_iter()
        .map(|(pattern, ports)| DomainRule {
            pattern,
            ports: match ports {
                Ports::All => Ports::All,
                Ports::List(mut list) => {
                    list.sort_unstable();
                    list.dedup();
                    Ports::List(list)
                }
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policies;

    fn pod(ns: &str, labels: &[(&str, &str)]) -> PodIdentity {
        PodIdentity {
            namespace: ns.into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const POLICIES: &str = "
apiVersion: pipeguard.dev/v1alpha1
kind: DomainPolicy
metadata: {name: build, namespace: ci}
spec:
  podSelector: {matchLabels: {app: runner}}
  egress:
  - domains: [github.com, '*.githubusercontent.com']
    ports: [{port: 443}]
  - domains: [GitHub.com.]
    ports: [{port: 80}]
---
apiVersion: pipeguard.dev/v1alpha1
kind: ClusterDomainPolicy
metadata: {name: platform}
spec:
  namespaceSelector: {matchLabels: {team: ci}}
  podSelector: {}
  egress:
  - domains: [ghcr.io, github.com]
";

    #[test]
    fn selection_follows_namespace_and_labels() {
        let set = parse_policies("d.yaml", POLICIES);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        let runner = pod("ci", &[("app", "runner")]);
        let d = domains_for(&set, &runner, None).unwrap();
        assert_eq!(d.policies, vec!["DomainPolicy ci/build"]);
        // The same name in two rules: one rule, ports merged and sorted.
        assert_eq!(
            d.names,
            vec![
                DomainRule {
                    pattern: DomainPattern::Exact("github.com".into()),
                    ports: Ports::List(vec![(6, 80, 80), (6, 443, 443)]),
                },
                DomainRule {
                    pattern: DomainPattern::Wildcard("githubusercontent.com".into()),
                    ports: Ports::List(vec![(6, 443, 443)]),
                },
            ]
        );
        assert_eq!(domains_for(&set, &pod("ci", &[("app", "web")]), None), None);
        assert_eq!(domains_for(&set, &pod("web", &[("app", "runner")]), None), None);

        // The cluster-scoped one needs the namespace's labels.
        let mut cluster = Cluster::default();
        cluster.add_namespace("ci", BTreeMap::from([("team".to_string(), "ci".to_string())]));
        let d = domains_for(&set, &runner, Some(&cluster)).unwrap();
        assert_eq!(
            d.policies,
            vec!["DomainPolicy ci/build", "ClusterDomainPolicy platform"]
        );
        let github = d
            .names
            .iter()
            .find(|r| r.pattern.to_string() == "github.com")
            .unwrap();
        assert_eq!(github.ports, Ports::All, "a rule without ports allows every port");
        assert!(d.names.iter().any(|r| r.pattern.to_string() == "ghcr.io"));
        let other = domains_for(&set, &pod("ci", &[]), Some(&cluster)).unwrap();
        assert_eq!(other.policies, vec!["ClusterDomainPolicy platform"]);
    }

    #[test]
    fn a_namespace_selector_on_the_name_label_works_without_a_snapshot() {
        let text = POLICIES.replace(
            "{matchLabels: {team: ci}}",
            "{matchLabels: {kubernetes.io/metadata.name: ci}}",
        );
        let set = parse_policies("d.yaml", &text);
        let d = domains_for(&set, &pod("ci", &[]), None).unwrap();
        assert_eq!(d.policies, vec!["ClusterDomainPolicy platform"]);
    }

    #[test]
    fn merged_rules_are_canonical() {
        let rule = |p: &str, ports: Ports| DomainRule {
            pattern: DomainPattern::parse(p).unwrap(),
            ports,
        };
        let a = merge_rules([
            rule("b.com", Ports::List(vec![(6, 443, 443)])),
            rule("a.com", Ports::List(vec![(6, 80, 80)])),
            rule("b.com", Ports::List(vec![(6, 443, 443)])),
        ]);
        let b = merge_rules([
            rule("a.com", Ports::List(vec![(6, 80, 80)])),
            rule("b.com", Ports::List(vec![(6, 443, 443)])),
        ]);
        assert_eq!(a, b);
        let all = merge_rules([
            rule("a.com", Ports::List(vec![(6, 80, 80)])),
            rule("a.com", Ports::All),
        ]);
        assert_eq!(all, vec![rule("a.com", Ports::All)]);
    }
}
