//! NetworkPolicy ingress semantics for one destination pod: which policies isolate it, and
//! whether one of their rules admits a given source on a given port.

use std::net::IpAddr;

use super::{
    cluster::{Cluster, ClusterPod},
    load::PolicySet,
    validate::{Peer, Policy, PortRef, PortSpec, Rule},
};

/// The policies that isolate `pod` for ingress.
pub fn selecting_ingress<'a>(set: &'a PolicySet, pod: &ClusterPod) -> Vec<&'a Policy> {
    set.policies
        .iter()
        .map(|p| &**p)
        .filter(|p| {
            p.namespace == pod.namespace && p.ingress.is_some() && p.pod_selector.matches(&pod.labels)
        })
        .collect()
}

/// A connection's source, as ingress rules see it.
pub struct Source<'a> {
    pub ip: IpAddr,
    /// The pod behind `ip`, if it is one.
    pub pod: Option<&'a ClusterPod>,
}

/// True when some ingress rule of `policy` admits `source` to `dest` on `protocol`/`port`.
pub fn policy_admits(
    policy: &Policy,
    cluster: &Cluster,
    source: &Source<'_>,
    dest: &ClusterPod,
    protocol: u8,
    port: u16,
) -> bool {
    policy
        .ingress
        .iter()
        .flatten()
        .any(|rule| rule_admits(policy, rule, cluster, source, dest, protocol, port))
}

fn rule_admits(
    policy: &Policy,
    rule: &Rule,
    cluster: &Cluster,
    source: &Source<'_>,
    dest: &ClusterPod,
    protocol: u8,
    port: u16,
) -> bool {
    let port_ok = match &rule.ports {
        None => true,
        Some(ports) => ports.iter().any(|spec| port_matches(spec, dest, protocol, port)),
    };
    let peer_ok = match &rule.peers {
        None => true,
        Some(peers) => peers.iter().any(|peer| match peer {
            Peer::IpBlock { cidr, except } => {
                let ip = super::canonical(source.ip);
                cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
            }
            Peer::Pods { pods, namespaces } => source.pod.is_some_and(|src| {
                let ns_ok = match namespaces {
                    Some(sel) => sel.matches(&cluster.namespace_labels(&src.namespace)),
                    None => src.namespace == policy.namespace,
                };
                ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&src.labels))
            }),
        }),
    };
    port_ok && peer_ok
}

/// Ingress ports are the destination's own: a named port means that pod's container port.
fn port_matches(spec: &PortSpec, dest: &ClusterPod, protocol: u8, port: u16) -> bool {
    spec.protocol == protocol
        && match &spec.port {
            PortRef::Any => true,
            PortRef::Range(lo, hi) => (*lo..=*hi).contains(&port),
            PortRef::Named(name) => dest
                .named_ports
                .iter()
                .any(|(n, p, number)| n == name && *p == protocol && *number == port),
        }
}
