//! Which local pods' allowlists a cluster change can alter, so a pod or namespace event
//! elsewhere recomputes only those (a full recompute at 50,000 cluster pods is what made
//! every event cost seconds). Conservative by construction: a pod is left alone only when
//! none of the policies its allowlist is compiled from can read the changed object.
//!
//! A local pod's allowlist reads remote objects only through the rules of the policies that
//! select it (its dependencies): selector peers (the peer pods' IPs, labels and namespace
//! labels) and named ports (any pod's ports, for rules with a named port and an ipBlock or
//! no peer). Everything else it reads (its own labels, its namespace's policies, domain
//! policies through its namespace's labels, its own named ports) the caller covers by
//! recomputing the pods of the changed namespace or the changed pod itself.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::policy::{Cluster, ClusterPod, Peer, Policy, PolicySet, PortRef, Rule};

use super::{
    desired::{self, DesiredPod, LocalPod, Settings},
    world::PodDelta,
};
use crate::engine::PolicyEntries;

/// A namespace whose labels changed: (name, labels before, labels after).
pub type NamespaceDelta = (String, BTreeMap<String, String>, BTreeMap<String, String>);

/// What one wake-up of the loop changed.
pub struct Changes<'a> {
    pub pods: &'a [PodDelta],
    pub namespaces: &'a [NamespaceDelta],
    /// Namespaces where a NetworkPolicy changed.
    pub policy_namespaces: &'a BTreeSet<String>,
}

/// UIDs of the `local` pods whose allowlists `changes` can alter. `deps`: each pod's
/// [`dependencies`] in `policies` (the set before a policy change; a pod without them is
/// affected). `cluster`: after the changes.
pub fn affected<'a>(
    changes: &Changes<'_>,
    policies: &PolicySet,
    cluster: &Cluster,
    local: impl IntoIterator<Item = &'a LocalPod>,
    deps: &HashMap<String, Vec<usize>>,
) -> HashSet<String> {
    let mut affected = HashSet::new();
    for pod in local {
        let Some(deps) = deps.get(&pod.uid) else {
            affected.insert(pod.uid.clone());
            continue;
        };
        let deps = || deps.iter().filter_map(|i| policies.policies.get(*i));
        // An ARC workflow pod is selected with its runner pod's labels: any local pod of its
        // namespace that changed may be (or have been) its runner.
        let workflow = super::workflow_pod::runner_of(&pod.labels).is_some();
        let hit = changes.policy_namespaces.contains(&pod.namespace)
            || (workflow
                && changes
                    .pods
                    .iter()
                    .any(|d| !d.local.is_empty() && d.key.0 == pod.namespace))
            || changes.namespaces.iter().any(|(name, old, new)| {
                // Its namespace's labels select domain policies too.
                *name == pod.namespace || deps().any(|p| namespace_touches(p, old, new))
            })
            || changes.pods.iter().any(|delta| {
                delta.local.contains(&pod.uid)
                    // Its own named ports (ingress).
                    || (delta.key.0 == pod.namespace && delta.key.1 == pod.name)
                    || delta
                        .old
                        .iter()
                        .chain(&delta.new)
                        .any(|peer| deps().any(|p| pod_touches(p, cluster, peer)))
            });
        if hit {
            affected.insert(pod.uid.clone());
        }
    }
    affected
}

/// Indices into `set.policies` of the policies that select `pod` for egress or ingress
/// (an ARC workflow pod with its runner pod's labels, `local` being every local pod).
pub fn dependencies(set: &PolicySet, pod: &LocalPod, local: &[LocalPod]) -> Vec<usize> {
    let pod = super::workflow_pod::as_selected(pod, local);
    set.policies
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.namespace == pod.namespace
                && (p.egress.is_some() || p.ingress.is_some())
                && p.pod_selector.matches(&pod.labels)
        })
        .map(|(i, _)| i)
        .collect()
}

/// [`dependencies`] of each local pod, by UID.
pub fn all_dependencies(set: &PolicySet, local: &[LocalPod]) -> HashMap<String, Vec<usize>> {
    local
        .iter()
        .map(|pod| (pod.uid.clone(), dependencies(set, pod, local)))
        .collect()
}

/// Whether an allowlist compiled from `policy` can read `pod` (as it was or as it is now).
/// `cluster` gives the namespaces' labels (a namespace change is checked on its own).
pub fn pod_touches(policy: &Policy, cluster: &Cluster, pod: &ClusterPod) -> bool {
    let selected = |pods: &Option<crate::policy::Selector>, namespaces: &Option<crate::policy::Selector>| {
        let ns_ok = match namespaces {
            Some(sel) => sel.matches(&cluster.namespace_labels(&pod.namespace)),
            None => pod.namespace == policy.namespace,
        };
        ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&pod.labels))
    };
    let egress = policy.egress.iter().flatten().any(|rule| {
        let named = has_named_port(rule);
        match &rule.peers {
            // Named ports resolve on every pod.
            None => named,
            Some(peers) => peers.iter().any(|peer| match peer {
                Peer::IpBlock { cidr, .. } => named && pod.ips.iter().any(|ip| cidr.contains(ip)),
                Peer::Pods { pods, namespaces } => selected(pods, namespaces),
            }),
        }
    });
    let ingress = policy.ingress.iter().flatten().any(|rule| {
        rule.peers.iter().flatten().any(|peer| match peer {
            Peer::IpBlock { .. } => false,
            Peer::Pods { pods, namespaces } => selected(pods, namespaces),
        })
    });
    egress || ingress
}

/// Whether an allowlist compiled from `policy` can read the labels of namespace `name`,
/// which changed from `old` to `new`: a namespace selector that matches either.
pub fn namespace_touches(
    policy: &Policy,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> bool {
    let rules = policy
        .egress
        .iter()
        .flatten()
        .chain(policy.ingress.iter().flatten());
    rules
        .flat_map(|rule| rule.peers.iter().flatten())
        .any(|peer| match peer {
            Peer::Pods {
                namespaces: Some(sel),
                ..
            } => sel.matches(old) || sel.matches(new),
            _ => false,
        })
}

fn has_named_port(rule: &Rule) -> bool {
    rule.ports
        .iter()
        .flatten()
        .any(|p| matches!(p.port, PortRef::Named(_)))
}

/// The desired state of `local`: the pods `recompute` names (and any pod without a previous
/// result for the same `LocalPod` or without dependencies, and ARC workflow pods of a
/// namespace whose local pods changed) computed afresh, the others' `previous` results
/// kept. `deps` is updated to match. Returns it and how many were computed.
#[expect(clippy::too_many_arguments, reason = "the compiler's inputs, each one")]
pub fn merge(
    settings: &Settings,
    policies: &PolicySet,
    cluster: &Cluster,
    local: &[LocalPod],
    recompute: impl Fn(&LocalPod) -> bool,
    previous: Vec<DesiredPod>,
    last_good: &HashMap<String, std::sync::Arc<PolicyEntries>>,
    deps: &mut HashMap<String, Vec<usize>>,
) -> (Vec<DesiredPod>, usize) {
    let mut previous: HashMap<String, DesiredPod> =
        previous.into_iter().map(|d| (d.pod.uid.clone(), d)).collect();
    let mut moved: HashSet<String> = local
        .iter()
        .filter(|pod| previous.get(&pod.uid).is_none_or(|d| d.pod != **pod))
        .map(|pod| pod.namespace.clone())
        .collect();
    let present: HashSet<&str> = local.iter().map(|p| p.uid.as_str()).collect();
    moved.extend(
        previous
            .values()
            .filter(|d| !present.contains(d.pod.uid.as_str()))
            .map(|d| d.pod.namespace.clone()),
    );
    let todo = |pod: &LocalPod| {
        recompute(pod)
            || previous.get(&pod.uid).is_none_or(|d| d.pod != *pod)
            || !deps.contains_key(&pod.uid)
            || (super::workflow_pod::runner_of(&pod.labels).is_some() && moved.contains(&pod.namespace))
    };
    let todo: HashSet<String> = local.iter().filter(|p| todo(p)).map(|p| p.uid.clone()).collect();
    let fresh = desired::compute_some(
        settings,
        policies,
        cluster,
        local,
        |pod| todo.contains(&pod.uid),
        last_good,
    );
    let mut fresh: HashMap<String, DesiredPod> = fresh.into_iter().map(|d| (d.pod.uid.clone(), d)).collect();
    for pod in local.iter().filter(|p| todo.contains(&p.uid)) {
        deps.insert(pod.uid.clone(), dependencies(policies, pod, local));
    }
    let desired: Vec<DesiredPod> = local
        .iter()
        .filter_map(|pod| fresh.remove(&pod.uid).or_else(|| previous.remove(&pod.uid)))
        .collect();
    deps.retain(|uid, _| present.contains(uid.as_str()));
    (desired, todo.len())
}

#[cfg(test)]
#[path = "affected_tests.rs"]
mod tests;
