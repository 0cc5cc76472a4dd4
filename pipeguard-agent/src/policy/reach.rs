//! Can this source reach that destination? The offline answer `pipeguard check` gives:
//! the source's egress verdict, the destination's ingress verdict, and the policies that
//! decided, by the same semantics the kernel allowlists are compiled from.

use std::net::IpAddr;

use super::{
    cluster::{Cluster, ClusterPod},
    domain_select::selecting_domain,
    egress::{PodIdentity, policy_egress_rules, selecting_egress},
    eval::evaluate,
    ingress::{Source, policy_admits, selecting_ingress},
    load::PolicySet,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination<'a> {
    Pod(&'a ClusterPod),
    /// An address outside the cluster snapshot: no ingress side.
    Ip(IpAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortQuery {
    Number(u16),
    /// A container port name, resolved on the destination pod.
    Name(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Allow,
    Deny,
    NotApplicable,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::NotApplicable => "n/a",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    pub egress: Side,
    pub ingress: Side,
    pub allowed: bool,
    /// The policies that decided: those that allowed, or on a deny, those that isolate.
    pub policies: Vec<String>,
    pub reason: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReachError {
    #[error("pod {0} has no IP address in the cluster snapshot")]
    NoIp(String),
    #[error("destination has no container port named {name:?} for {protocol}")]
    UnknownPortName { name: String, protocol: &'static str },
    #[error("a port name needs a pod destination, not an IP")]
    NamedPortToIp,
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        pipeguard_common::PROTO_UDP => "UDP",
        pipeguard_common::PROTO_SCTP => "SCTP",
        _ => "TCP",
    }
}

/// The address of `pod` to use toward `family` (IPv4 preferred when free to choose).
fn address(pod: &ClusterPod, family: Option<bool>) -> Result<IpAddr, ReachError> {
    let want_v4 = family.unwrap_or(true);
    pod.ips
        .iter()
        .find(|ip| ip.is_ipv4() == want_v4)
        .or(pod.ips.first())
        .copied()
        .ok_or_else(|| ReachError::NoIp(format!("{}/{}", pod.namespace, pod.name)))
}

pub fn reach(
    set: &PolicySet,
    cluster: &Cluster,
    from: &ClusterPod,
    to: &Destination<'_>,
    port: &PortQuery,
    protocol: u8,
) -> Result<Reach, ReachError> {
    let (dst_ip, dst_pod) = match to {
        Destination::Pod(p) => (address(p, None)?, Some(*p)),
        Destination::Ip(ip) => (*ip, None),
    };
    let port = match (port, dst_pod) {
        (PortQuery::Number(n), _) => *n,
        (PortQuery::Name(_), None) => return Err(ReachError::NamedPortToIp),
        (PortQuery::Name(name), Some(pod)) => pod
            .named_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == protocol)
            .map(|(_, _, number)| *number)
            .ok_or_else(|| ReachError::UnknownPortName {
                name: name.clone(),
                protocol: protocol_name(protocol),
            })?,
    };
    let src_ip = address(from, Some(dst_ip.is_ipv4()))?;
    let what = format!("{}/{}", port, protocol_name(protocol));

    // Egress of the source.
    let identity = PodIdentity {
        namespace: from.namespace.clone(),
        name: from.name.clone(),
        labels: from.labels.clone(),
    };
    let isolating = selecting_egress(set, &identity);
    // A domain policy isolates egress too; its rules allow names, never a pod or an IP.
    let domains: Vec<String> = selecting_domain(set, &identity, Some(cluster))
        .iter()
        .map(|d| d.key())
        .collect();
    let allowing: Vec<String> = isolating
        .iter()
        .filter(|p| {
            evaluate(
                &policy_egress_rules(p, Some(cluster), &mut Vec::new()),
                dst_ip,
                protocol,
                port,
            )
        })
        .map(|p| p.key())
        .collect();
    let egress = if (isolating.is_empty() && domains.is_empty()) || !allowing.is_empty() {
        Side::Allow
    } else {
        Side::Deny
    };

    // Ingress of the destination, when it is a pod.
    let (ingress, ingress_isolating, ingress_allowing) = match dst_pod {
        None => (Side::NotApplicable, Vec::new(), Vec::new()),
        Some(dst) => {
            let isolating = selecting_ingress(set, dst);
            let source = Source {
                ip: src_ip,
                pod: Some(from),
            };
            let allowing: Vec<String> = isolating
                .iter()
                .filter(|p| policy_admits(p, cluster, &source, dst, protocol, port))
                .map(|p| p.key())
                .collect();
            let side = if isolating.is_empty() || !allowing.is_empty() {
                Side::Allow
            } else {
                Side::Deny
            };
            (
                side,
                isolating.iter().map(|p| p.key()).collect::<Vec<_>>(),
                allowing,
            )
        }
    };

    let allowed = egress == Side::Allow && ingress != Side::Deny;
    let mut policies = Vec::new();
    let mut reasons = Vec::new();
    if egress == Side::Deny {
        policies.extend(isolating.iter().map(|p| p.key()));
        policies.extend(domains.iter().cloned());
        reasons.push(format!(
            "egress of {}/{} is isolated and no rule allows {dst_ip} on {what}",
            from.namespace, from.name
        ));
    }
    if ingress == Side::Deny {
        policies.extend(ingress_isolating.iter().cloned());
        let dst = dst_pod.expect("ingress is judged only for pods");
        reasons.push(format!(
            "ingress of {}/{} is isolated and no rule admits {src_ip} on {what}",
            dst.namespace, dst.name
        ));
    }
    if allowed {
        policies.extend(allowing);
        policies.extend(ingress_allowing);
        reasons.push(
            match (
                isolating.is_empty() && domains.is_empty(),
                ingress_isolating.is_empty(),
            ) {
                (true, true) => "no policy isolates either side".to_string(),
                _ => format!("allowed on {what}"),
            },
        );
    }
    policies.sort();
    policies.dedup();
    Ok(Reach {
        egress,
        ingress,
        allowed,
        policies,
        reason: reasons.join("; "),
        port,
    })
}
