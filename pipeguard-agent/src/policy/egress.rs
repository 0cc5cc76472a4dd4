//! NetworkPolicy egress semantics for one pod: which policies select it, and the union of
//! what their rules allow, as address ranges with ports.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{
    AllowRule, Ports,
    cluster::{Cluster, ClusterPod},
    load::PolicySet,
    validate::{Peer, Policy, PortRef, PortSpec, Rule},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Egress {
    /// No policy with Egress in its policyTypes selects the pod.
    Unrestricted,
    /// Egress only where some rule allows it. `policies`: "ns/name" of the selecting
    /// policies; `warnings`: what the user should know (unresolvable selector peers, ...).
    Isolated {
        rules: Vec<AllowRule>,
        policies: Vec<String>,
        warnings: Vec<String>,
    },
}

pub fn egress_for(set: &PolicySet, pod: &PodIdentity, cluster: Option<&Cluster>) -> Egress {
    let selecting = selecting_egress(set, pod);
    if selecting.is_empty() {
        return Egress::Unrestricted;
    }
    let mut rules = Vec::new();
    let mut warnings = Vec::new();
    for policy in &selecting {
        warnings.extend(policy.warnings.iter().cloned());
        rules.extend(policy_egress_rules(policy, cluster, &mut warnings));
    }
    Egress::Isolated {
        rules,
        policies: selecting.iter().map(|p| p.key()).collect(),
        warnings,
    }
}

/// The policies that isolate `pod` for egress.
pub fn selecting_egress<'a>(set: &'a PolicySet, pod: &PodIdentity) -> Vec<&'a Policy> {
    set.policies
        .iter()
        .map(|p| &**p)
        .filter(|p| p.namespace == pod.namespace && p.egress.is_some() && p.pod_selector.matches(&pod.labels))
        .collect()
}

/// What one policy's egress rules allow, resolved against the cluster snapshot.
pub fn policy_egress_rules(
    policy: &Policy,
    cluster: Option<&Cluster>,
    warnings: &mut Vec<String>,
) -> Vec<AllowRule> {
    let mut rules = Vec::new();
    for rule in policy.egress.iter().flatten() {
        compile_rule(
            &policy.namespace,
            rule,
            cluster,
            &mut rules,
            warnings,
            &policy.key(),
        );
    }
    rules
}

fn everywhere() -> [IpNet; 2] {
    [
        "0.0.0.0/0".parse().expect("valid"),
        "::/0".parse().expect("valid"),
    ]
}

fn compile_rule(
    namespace: &str,
    rule: &Rule,
    cluster: Option<&Cluster>,
    out: &mut Vec<AllowRule>,
    warnings: &mut Vec<String>,
    policy: &str,
) {
    let numeric = numeric_ports(rule.ports.as_deref());
    let named: Vec<&PortSpec> = rule
        .ports
        .iter()
        .flatten()
        .filter(|p| matches!(p.port, PortRef::Named(_)))
        .collect();
    // Pods only matter here through named ports: without any, no pod is looked at (a scan
    // of 50,000 cluster pods per rule otherwise).
    let pods = match cluster {
        Some(c) if !named.is_empty() => c.pods.as_slice(),
        _ => &[],
    };
    if cluster.is_none()
        && let Some(PortRef::Named(name)) = named.first().map(|p| &p.port)
    {
        warnings.push(format!(
            "{policy}: named port {name:?} matches nothing without a cluster snapshot (--cluster)"
        ));
    }
    let push_numeric = |cidr: IpNet, except: Vec<IpNet>, out: &mut Vec<AllowRule>| {
        if numeric != Ports::List(Vec::new()) {
            out.push(AllowRule {
                cidr,
                except,
                ports: numeric.clone(),
            });
        }
    };
    match &rule.peers {
        None => {
            for net in everywhere() {
                push_numeric(net, Vec::new(), out);
            }
            // Named ports only mean something on pods: resolve them on every pod.
            for pod in pods {
                push_pod(pod, &named, Ports::List(Vec::new()), out);
            }
        }
        Some(peers) => {
            for peer in peers {
                match peer {
                    Peer::IpBlock { cidr, except } => {
                        push_numeric(*cidr, except.clone(), out);
                        for pod in pods
                            .iter()
                            .filter(|p| p.ips.iter().any(|ip| in_block(*ip, cidr, except)))
                        {
                            push_pod(pod, &named, Ports::List(Vec::new()), out);
                        }
                    }
                    Peer::Pods {
                        pods: pod_sel,
                        namespaces,
                    } => {
                        let Some(cluster) = cluster else {
                            warnings.push(format!(
                                "{policy}: a podSelector/namespaceSelector peer matches nothing without a cluster snapshot (--cluster)"
                            ));
                            continue;
                        };
                        for pod in &cluster.pods {
                            let ns_ok = match namespaces {
                                Some(sel) => sel.matches(&cluster.namespace_labels(&pod.namespace)),
                                None => pod.namespace == namespace,
                            };
                            let pod_ok = pod_sel.as_ref().is_none_or(|sel| sel.matches(&pod.labels));
                            if ns_ok && pod_ok {
                                push_pod(pod, &named, numeric.clone(), out);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn in_block(ip: std::net::IpAddr, cidr: &IpNet, except: &[IpNet]) -> bool {
    cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
}

/// The numeric part of a rule's ports; `All` when the rule has no ports.
fn numeric_ports(ports: Option<&[PortSpec]>) -> Ports {
    let Some(ports) = ports else { return Ports::All };
    Ports::List(
        ports
            .iter()
            .filter_map(|p| match p.port {
                PortRef::Any => Some((p.protocol, 0, u16::MAX)),
                PortRef::Range(lo, hi) => Some((p.protocol, lo, hi)),
                PortRef::Named(_) => None,
            })
            .collect(),
    )
}

/// One rule per pod IP: `base` plus the pod's own numbers for the named ports.
fn push_pod(pod: &ClusterPod, named: &[&PortSpec], base: Ports, out: &mut Vec<AllowRule>) {
    let ports = match base {
        Ports::All => Ports::All,
        Ports::List(mut list) => {
            for spec in named {
                if let PortRef::Named(name) = &spec.port {
                    list.extend(
                        pod.named_ports
                            .iter()
                            .filter(|(n, proto, _)| n == name && *proto == spec.protocol)
                            .map(|(_, proto, port)| (*proto, *port, *port)),
                    );
                }
            }
            if list.is_empty() {
                return;
            }
            Ports::List(list)
        }
    };
    for ip in &pod.ips {
        out.push(AllowRule {
            cidr: IpNet::from(super::canonical(*ip)),
            except: Vec::new(),
            ports: ports.clone(),
        });
    }
}
