//! The desired kernel state for this node's pods: a pure function of the policies, the
//! cluster snapshot and the pod cgroups found, so it is tested without a kernel.
//!
//! Fail closed: a guarded pod whose namespace has a policy that does not parse or validate
//! (NetworkPolicy or DomainPolicy), that an invalid ClusterDomainPolicy could select, or
//! whose allowlist does not compile, keeps its last good allowlist, or gets deny-all if it
//! never had one. It never falls back to unrestricted egress.
//!
//! Ingress: the allowlist's ingress half (`ingress_desired`) is computed beside the egress
//! one and fails closed the same way; a pod with an ingress half is `POD_INGRESS_ISOLATED`.
//!
//! Domain policies: a guarded pod selected by one is egress-isolated and DNS-filtered; its
//! allowlist is its NetworkPolicy egress rules (if any select it) plus the union of its
//! domain rules. Its resolver must be allowed by a NetworkPolicy, as any destination is.

use std::collections::{BTreeMap, HashMap};

use pipeguard_common::{
    MODE_AUDIT, MODE_ENFORCE, POD_DENY_RAW_SOCKETS, POD_DNS_FILTERED, POD_INGRESS_ISOLATED, PORTS_ALL,
    PortSet,
};

use super::{guard::GuardConfig, ingress_desired::ingress_half};
pub use crate::pod::LocalPod;
use crate::{
    engine::PolicyEntries,
    job::Mode,
    policy::{self, Cluster, Egress, PodIdentity, PolicySet},
};

#[derive(Clone, Debug)]
pub struct Settings {
    pub guard: GuardConfig,
    /// Isolate guarded pods that no egress policy selects.
    pub default_deny_egress: bool,
    /// Isolate guarded pods that no ingress policy selects (`--default-deny-ingress`).
    pub default_deny_ingress: bool,
    /// The node's own addresses: always admitted by ingress allowlists (kubelet probes).
    pub ingress_from_node: Vec<ipnet::IpNet>,
    pub mode: Mode,
    /// Deny all egress of guarded pods that can step around the guard (fail closed)
    /// instead of only reporting them.
    pub refuse_privileged: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not guarded: allow-all, counted.
    NotGuarded,
    /// Guarded, but no egress policy selects it (and no default deny).
    Unrestricted,
    /// Egress restricted by these policies ("ns/name").
    Enforced(Vec<String>),
    /// Guarded, restricted by `--default-deny-egress` alone.
    DefaultDeny,
    /// Its policies could not be compiled; `kept_last_good` says what it got instead.
    FailedClosed { reason: String, kept_last_good: bool },
    /// It can step around the guard (`LocalPod::escape`) and `--refuse-privileged` is set:
    /// all egress denied.
    RefusedPrivileged { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPod {
    pub pod: LocalPod,
    pub entries: PolicyEntries,
    pub mode: u32,
    pub flags: u32,
    pub status: Status,
}

pub fn allow_all() -> PolicyEntries {
    let all = PortSet {
        flags: PORTS_ALL,
        ..PortSet::default()
    };
    PolicyEntries {
        v4: vec![("0.0.0.0/0".parse().expect("valid"), all)],
        v6: vec![("::/0".parse().expect("valid"), all)],
        names: Vec::new(),
        ingress: None,
    }
}

/// `last_good`: the allowlists last applied per pod UID (for fail-closed).
pub fn compute(
    settings: &Settings,
    policies: &PolicySet,
    cluster: &Cluster,
    local: &[LocalPod],
    last_good: &HashMap<String, std::sync::Arc<PolicyEntries>>,
) -> Vec<DesiredPod> {
    compute_some(settings, policies, cluster, local, |_| true, last_good)
}

/// [`compute`] for the pods of `local` that `which` names; `local` is every local pod (an
/// ARC workflow pod is selected with its runner pod's labels).
pub fn compute_some(
    settings: &Settings,
    policies: &PolicySet,
    cluster: &Cluster,
    local: &[LocalPod],
    which: impl Fn(&LocalPod) -> bool,
    last_good: &HashMap<String, std::sync::Arc<PolicyEntries>>,
) -> Vec<DesiredPod> {
    // Namespace → the first invalid object there.
    let mut tainted: BTreeMap<&str, &str> = BTreeMap::new();
    for error in &policies.errors {
        if let Some(ns) = error.namespace.as_deref() {
            tainted
                .entry(ns)
                .or_insert(error.object.as_deref().unwrap_or("a policy"));
        }
    }
    // Domain policies say nothing about ingress: only other invalid objects taint it.
    let mut ingress_tainted: BTreeMap<&str, &str> = BTreeMap::new();
    for error in &policies.errors {
        let object = error.object.as_deref().unwrap_or("a policy");
        if let Some(ns) = error.namespace.as_deref()
            && !object.starts_with("domainpolicy ")
        {
            ingress_tainted.entry(ns).or_insert(object);
        }
    }
    let mode = match settings.mode {
        Mode::Enforce => MODE_ENFORCE,
        Mode::Audit => MODE_AUDIT,
    };
    local
        .iter()
        .filter(|own| which(own))
        .map(|own| {
            // An ARC workflow pod is guarded and selected as its runner pod is.
            let selected = super::workflow_pod::as_selected(own, local);
            let pod = &*selected;
            if !settings.guard.is_guarded(&pod.namespace, &pod.labels) {
                return DesiredPod {
                    pod: own.clone(),
                    entries: allow_all(),
                    mode: MODE_ENFORCE,
                    flags: 0,
                    status: Status::NotGuarded,
                };
            }
            let (mut entries, mut status, dns_filtered) = match &pod.escape {
                Some(reason) if settings.refuse_privileged => (
                    PolicyEntries::default(),
                    Status::RefusedPrivileged {
                        reason: reason.clone(),
                    },
                    false,
                ),
                _ => guarded(settings, policies, cluster, pod, &tainted, last_good),
            };
            let ingress = ingress_half(
                settings,
                policies,
                cluster,
                pod,
                ingress_tainted.get(pod.namespace.as_str()).copied(),
                last_good.get(&pod.uid).map(|e| &**e),
            );
            entries.ingress = ingress.entries;
            if let (Some(reason), false) = (ingress.failed, matches!(status, Status::FailedClosed { .. })) {
                status = Status::FailedClosed {
                    reason,
                    kept_last_good: last_good.contains_key(&pod.uid),
                };
            }
            let isolated = if entries.ingress.is_some() {
                POD_INGRESS_ISOLATED
            } else {
                0
            };
            DesiredPod {
                pod: own.clone(),
                entries,
                mode,
                flags: POD_DENY_RAW_SOCKETS | isolated | if dns_filtered { POD_DNS_FILTERED } else { 0 },
                status,
            }
        })
        .collect()
}

/// The pod's allowlist, its status, and whether it is DNS-filtered.
fn guarded(
    settings: &Settings,
    policies: &PolicySet,
    cluster: &Cluster,
    pod: &LocalPod,
    tainted: &BTreeMap<&str, &str>,
    last_good: &HashMap<String, std::sync::Arc<PolicyEntries>>,
) -> (PolicyEntries, Status, bool) {
    let identity = PodIdentity {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        labels: pod.labels.clone(),
    };
    let domain_taint = policy::domain_taint_for(policies, &identity, Some(cluster));
    let domains = policy::domains_for(policies, &identity, Some(cluster));
    // Failing closed keeps DNS filtered whenever a domain policy (valid or not) may select
    // the pod or the kept allowlist has names: a broken policy never unfilters DNS.
    let filtered_anyway = domain_taint.is_some() || domains.is_some();
    let fail_closed = |reason: String| {
        let kept = last_good.get(&pod.uid).map(|e| PolicyEntries::clone(e));
        let kept_last_good = kept.is_some();
        let entries = kept.unwrap_or_default();
        let dns_filtered = filtered_anyway || !entries.names.is_empty();
        (
            entries,
            Status::FailedClosed {
                reason,
                kept_last_good,
            },
            dns_filtered,
        )
    };
    if let Some(object) = tainted.get(pod.namespace.as_str()) {
        return fail_closed(format!("{object} in namespace {} is invalid", pod.namespace));
    }
    if let Some(taint) = domain_taint {
        return fail_closed(format!("{} is invalid and could select this pod", taint.object));
    }
    let (rules, mut deciding) = match (policy::egress_for(policies, &identity, Some(cluster)), &domains) {
        (Egress::Unrestricted, None) if settings.default_deny_egress => {
            return (PolicyEntries::default(), Status::DefaultDeny, false);
        }
        (Egress::Unrestricted, None) => return (allow_all(), Status::Unrestricted, false),
        // Selected by a domain policy alone: isolated to its names.
        (Egress::Unrestricted, Some(_)) => (Vec::new(), Vec::new()),
        (Egress::Isolated { rules, policies, .. }, _) => (rules, policies),
    };
    let names = match domains {
        Some(domains) => {
            deciding.extend(domains.policies);
            domains.names
        }
        None => Vec::new(),
    };
    let dns_filtered = filtered_anyway;
    match policy::lpm_entries(&rules) {
        Ok(e) => (
            PolicyEntries {
                v4: e.v4,
                v6: e.v6,
                names,
                ingress: None,
            },
            Status::Enforced(deciding),
            dns_filtered,
        ),
        Err(error) => fail_closed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policies;

    fn pod(ns: &str, labels: &[(&str, &str)]) -> LocalPod {
        LocalPod {
            uid: format!("uid-{ns}"),
            namespace: ns.into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cgroup_id: 42,
            escape: None,
        }
    }

    fn settings(default_deny: bool) -> Settings {
        Settings {
            guard: GuardConfig {
                namespaces: vec!["ci".into()],
                selector: None,
                runner_labels: true,
            },
            default_deny_egress: default_deny,
            default_deny_ingress: false,
            ingress_from_node: Vec::new(),
            mode: Mode::Enforce,
            refuse_privileged: false,
        }
    }

    const REGISTRY_ONLY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: reg, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.1/32}}]\n";

    #[test]
    fn guarded_pods_get_their_policy_and_others_allow_all() {
        let set = parse_policies("p.yaml", REGISTRY_ONLY);
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &[pod("ci", &[]), pod("web", &[])],
            &HashMap::new(),
        );
        assert_eq!(out[0].status, Status::Enforced(vec!["ci/reg".into()]));
        assert_eq!(out[0].entries.v4.len(), 1);
        assert_eq!(out[0].flags, POD_DENY_RAW_SOCKETS);
        assert_eq!(out[1].status, Status::NotGuarded);
        assert_eq!(out[1].entries, allow_all());
    }

    #[test]
    fn an_arc_workflow_pod_gets_its_runner_pods_policy() {
        let set = parse_policies(
            "p.yaml",
            &REGISTRY_ONLY.replace("podSelector: {}", "podSelector: {matchLabels: {app: runner}}"),
        );
        let runner = LocalPod {
            name: "runner-x".into(),
            uid: "uid-runner".into(),
            ..pod("ci", &[("app", "runner")])
        };
        let workflow = LocalPod {
            name: "runner-x-workflow".into(),
            uid: "uid-workflow".into(),
            ..pod("ci", &[("runner-pod", "runner-x")])
        };
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &[runner, workflow.clone()],
            &HashMap::new(),
        );
        assert_eq!(out[1].status, Status::Enforced(vec!["ci/reg".into()]));
        assert_eq!(out[1].entries, out[0].entries);
        assert_eq!(out[1].pod, workflow, "the pod itself keeps its own labels");
        // Without its runner on the node: its own labels only (no policy selects them).
        let alone = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &[workflow],
            &HashMap::new(),
        );
        assert_eq!(alone[0].status, Status::Unrestricted);
    }

    #[test]
    fn escape_capable_pods_are_denied_only_with_refuse_privileged() {
        let set = parse_policies("p.yaml", REGISTRY_ONLY);
        let privileged = LocalPod {
            escape: Some("container \"dind\" is privileged".into()),
            ..pod("ci", &[])
        };
        let reported = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            std::slice::from_ref(&privileged),
            &HashMap::new(),
        );
        assert_eq!(reported[0].status, Status::Enforced(vec!["ci/reg".into()]));
        let refusing = Settings {
            refuse_privileged: true,
            ..settings(false)
        };
        let refused = compute(
            &refusing,
            &set,
            &Cluster::default(),
            std::slice::from_ref(&privileged),
            &HashMap::new(),
        );
        assert!(matches!(refused[0].status, Status::RefusedPrivileged { .. }));
        assert_eq!(refused[0].entries, PolicyEntries::default(), "deny-all");
        // Pods the agent does not guard are not its to refuse.
        let outside = LocalPod {
            namespace: "web".into(),
            ..privileged
        };
        let out = compute(&refusing, &set, &Cluster::default(), &[outside], &HashMap::new());
        assert_eq!(out[0].status, Status::NotGuarded);
    }

    #[test]
    fn unselected_guarded_pods_follow_default_deny() {
        let set = PolicySet::default();
        let open = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &[pod("ci", &[])],
            &HashMap::new(),
        );
        assert_eq!(open[0].status, Status::Unrestricted);
        let closed = compute(
            &settings(true),
            &set,
            &Cluster::default(),
            &[pod("ci", &[])],
            &HashMap::new(),
        );
        assert_eq!(closed[0].status, Status::DefaultDeny);
        assert!(closed[0].entries.v4.is_empty() && closed[0].entries.v6.is_empty());
    }

    #[test]
    fn an_invalid_policy_fails_closed_never_open() {
        let broken = REGISTRY_ONLY.replace("10.0.0.1/32", "10.0.0.1/33");
        let set = parse_policies("p.yaml", &broken);
        assert_eq!(set.errors.len(), 1);
        // Never had an allowlist: deny-all, although no valid policy selects the pod.
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &[pod("ci", &[])],
            &HashMap::new(),
        );
        assert!(
            matches!(
                out[0].status,
                Status::FailedClosed {
                    kept_last_good: false,
                    ..
                }
            ),
            "{:?}",
            out[0].status
        );
        // Ingress fails closed with it (no node addresses in these settings: nothing).
        let deny_all = PolicyEntries {
            ingress: Some(Default::default()),
            ..PolicyEntries::default()
        };
        assert_eq!(out[0].entries, deny_all);
        // Had one: keeps it.
        let good = compute(
            &settings(false),
            &parse_policies("p.yaml", REGISTRY_ONLY),
            &Cluster::default(),
            &[pod("ci", &[])],
            &HashMap::new(),
        );
        let last = HashMap::from([("uid-ci".to_string(), std::sync::Arc::new(good[0].entries.clone()))]);
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &[pod("ci", &[])],
            &last,
        );
        assert!(matches!(
            out[0].status,
            Status::FailedClosed {
                kept_last_good: true,
                ..
            }
        ));
        // Egress keeps what it had; ingress, never isolated before, admits nothing now.
        let kept = PolicyEntries {
            ingress: Some(Default::default()),
            ..good[0].entries.clone()
        };
        assert_eq!(out[0].entries, kept);
    }

    fn failed_reason(d: &DesiredPod) -> &str {
        match &d.status {
            Status::FailedClosed { reason, .. } => reason,
            other => panic!("expected failing closed, got {other:?}"),
        }
    }

    const DOMAINS: &str = "apiVersion: pipeguard.dev/v1alpha1\nkind: DomainPolicy\nmetadata: {name: names, namespace: ci}\nspec:\n  podSelector: {matchLabels: {app: runner}}\n  egress:\n  - domains: [github.com]\n";

    const CLUSTER_DOMAINS: &str = "apiVersion: pipeguard.dev/v1alpha1\nkind: ClusterDomainPolicy\nmetadata: {name: platform}\nspec:\n  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ci}}\n  podSelector: {matchLabels: {app: runner}}\n  egress:\n  - domains: [ghcr.io]\n";

    #[test]
    fn an_invalid_domain_policy_fails_its_namespace_closed() {
        let text = format!(
            "{REGISTRY_ONLY}---\n{}",
            DOMAINS.replace("github.com", "'bad..name'")
        );
        let set = parse_policies("p.yaml", &text);
        assert_eq!(set.errors.len(), 1);
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            // Even a pod the broken policy does not seem to select: its selector cannot be
            // trusted more than the rest of it.
            &[pod("ci", &[("app", "web")])],
            &HashMap::new(),
        );
        assert_eq!(
            failed_reason(&out[0]),
            "domainpolicy ci/names in namespace ci is invalid"
        );
        assert_eq!(out[0].entries, PolicyEntries::default());
    }

    #[test]
    fn an_invalid_cluster_domain_policy_fails_closed_whom_it_could_select() {
        let broken = CLUSTER_DOMAINS.replace("ghcr.io", "'*'");
        let set = parse_policies("p.yaml", &broken);
        assert_eq!(set.errors.len(), 1);
        let pods = [
            pod("ci", &[("app", "runner")]),
            pod("ci", &[("app", "web")]),
            pod("web", &[("app", "runner")]),
        ];
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &pods,
            &HashMap::new(),
        );
        assert_eq!(
            failed_reason(&out[0]),
            "clusterdomainpolicy platform is invalid and could select this pod"
        );
        assert_eq!(
            out[1].status,
            Status::Unrestricted,
            "not selected by its selectors"
        );
        assert_eq!(out[2].status, Status::NotGuarded);
        // Unreadable selectors: every guarded pod.
        let unreadable = broken.replace(
            "{matchLabels: {app: runner}}",
            "{matchExpressions: [{key: a, operator: Is}]}",
        );
        let set = parse_policies("p.yaml", &unreadable);
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &pods,
            &HashMap::new(),
        );
        assert!(matches!(out[0].status, Status::FailedClosed { .. }));
        assert!(matches!(out[1].status, Status::FailedClosed { .. }));
        assert_eq!(out[2].status, Status::NotGuarded, "only guarded pods");
    }

    #[test]
    fn a_domain_policy_isolates_the_pods_it_selects() {
        for (text, key) in [
            (DOMAINS, "DomainPolicy ci/names"),
            (CLUSTER_DOMAINS, "ClusterDomainPolicy platform"),
        ] {
            let set = parse_policies("p.yaml", text);
            assert!(set.errors.is_empty(), "{:?}", set.errors);
            let out = compute(
                &settings(false),
                &set,
                &Cluster::default(),
                &[pod("ci", &[("app", "runner")]), pod("ci", &[])],
                &HashMap::new(),
            );
            assert_eq!(out[0].status, Status::Enforced(vec![key.into()]), "{text}");
            assert!(out[0].entries.v4.is_empty() && out[0].entries.v6.is_empty());
            assert_eq!(out[0].entries.names.len(), 1, "its names, nothing else");
            assert_eq!(out[0].flags, POD_DENY_RAW_SOCKETS | POD_DNS_FILTERED);
            assert_eq!(out[1].status, Status::Unrestricted);
            assert_eq!(out[1].flags, POD_DENY_RAW_SOCKETS, "not DNS-filtered");
        }
        // With a NetworkPolicy too: its rules, and both policies decide.
        let set = parse_policies("p.yaml", &format!("{REGISTRY_ONLY}---\n{DOMAINS}"));
        let out = compute(
            &settings(false),
            &set,
            &Cluster::default(),
            &[pod("ci", &[("app", "runner")])],
            &HashMap::new(),
        );
        assert_eq!(
            out[0].status,
            Status::Enforced(vec!["ci/reg".into(), "DomainPolicy ci/names".into()])
        );
        assert_eq!(out[0].entries.v4.len(), 1);
        assert_eq!(out[0].entries.names[0].pattern.to_string(), "github.com");
        // Failing closed keeps DNS filtered, even for a pod that never had names.
        let broken = format!(
            "{}---\n{DOMAINS}",
            REGISTRY_ONLY.replace("10.0.0.1/32", "10.0.0.1/33")
        );
        let out = compute(
            &settings(false),
            &parse_policies("p.yaml", &broken),
            &Cluster::default(),
            &[pod("ci", &[("app", "runner")])],
            &HashMap::new(),
        );
        assert!(matches!(out[0].status, Status::FailedClosed { .. }));
        assert_eq!(
            out[0].flags,
            POD_DENY_RAW_SOCKETS | POD_DNS_FILTERED | POD_INGRESS_ISOLATED
        );
    }
}
