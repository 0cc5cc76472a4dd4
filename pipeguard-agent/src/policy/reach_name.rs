//! May this pod reach that name? `pipeguard check --to-name`: the domain rules that allow
//! it, or why nothing does, by the semantics the kernel enforces: a pod selected by a
//! domain policy is DNS-filtered (a query for a name no rule names never leaves), and its
//! egress is the union of its NetworkPolicy rules and its domain rules.

use super::{
    DomainPattern, Reach, Side,
    cluster::{Cluster, ClusterPod},
    domain_select::selecting_domain,
    egress::{PodIdentity, policy_egress_rules, selecting_egress},
    load::PolicySet,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameReach {
    pub reach: Reach,
    /// The rule that allows it: `DomainPolicy ci/build spec.egress[0].domains[1] (*.npmjs.org)`.
    pub rule: Option<String>,
    /// The pod's DNS queries are checked against its domain rules.
    pub dns_filtered: bool,
}

/// Whether some isolating NetworkPolicy lets the pod send DNS (port 53, UDP or TCP)
/// anywhere: the domain rules need a resolver, and only NetworkPolicies allow one.
fn dns_allowed(isolating: &[&super::Policy], cluster: &Cluster) -> bool {
    isolating.iter().any(|policy| {
        policy_egress_rules(policy, Some(cluster), &mut Vec::new())
            .iter()
            .any(|r| {
                r.ports.allows(pipeguard_common::PROTO_UDP, 53)
                    || r.ports.allows(pipeguard_common::PROTO_TCP, 53)
            })
    })
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        pipeguard_common::PROTO_UDP => "UDP",
        pipeguard_common::PROTO_SCTP => "SCTP",
        _ => "TCP",
    }
}

/// `name` is a plain name (no wildcard); `cluster_domain` names are always resolvable.
pub fn reach_name(
    set: &PolicySet,
    cluster: &Cluster,
    from: &ClusterPod,
    name: &str,
    port: u16,
    protocol: u8,
    cluster_domain: &str,
) -> Result<NameReach, String> {
    let name = match DomainPattern::parse(name)? {
        DomainPattern::Exact(name) => name,
        DomainPattern::Wildcard(_) => return Err("--to-name takes a name, not a *. pattern".into()),
    };
    let what = format!("{port}/{}", protocol_name(protocol));
    let pod = format!("{}/{}", from.namespace, from.name);
    let identity = PodIdentity {
        namespace: from.namespace.clone(),
        name: from.name.clone(),
        labels: from.labels.clone(),
    };
    let isolating = selecting_egress(set, &identity);
    let domains = selecting_domain(set, &identity, Some(cluster));
    let answer = |allowed: bool, policies: Vec<String>, rule: Option<String>, reason: String| NameReach {
        reach: Reach {
            egress: if allowed { Side::Allow } else { Side::Deny },
            ingress: Side::NotApplicable,
            allowed,
            policies,
            reason,
            port,
        },
        rule,
        dns_filtered: !domains.is_empty(),
    };
    if isolating.is_empty() && domains.is_empty() {
        return Ok(answer(
            true,
            Vec::new(),
            None,
            format!("no policy isolates egress of {pod}"),
        ));
    }

    // A domain rule naming it on this port.
    let mut named_elsewhere = false;
    for policy in &domains {
        for (i, rule) in policy.egress.iter().enumerate() {
            for (j, pattern) in rule.domains.iter().enumerate() {
                if !pattern.matches(&name) {
                    continue;
                }
                if rule.ports.allows(protocol, port) {
                    let rule = format!("{} spec.egress[{i}].domains[{j}] ({pattern})", policy.key());
                    if !dns_allowed(&isolating, cluster) {
                        return Ok(answer(
                            false,
                            vec![policy.key()],
                            Some(rule),
                            format!(
                                "{name} is allowed on {what}, but no NetworkPolicy allows {pod} DNS (port 53), so it cannot resolve it"
                            ),
                        ));
                    }
                    return Ok(answer(
                        true,
                        vec![policy.key()],
                        Some(rule),
                        format!("{name} is allowed on {what}"),
                    ));
                }
                named_elsewhere = true;
            }
        }
    }
    let in_cluster = name == cluster_domain || name.ends_with(&format!(".{cluster_domain}"));
    if !domains.is_empty() && !named_elsewhere && !in_cluster {
        return Ok(answer(
            false,
            domains.iter().map(|d| d.key()).collect(),
            None,
            format!("{pod} is DNS-filtered and no domain rule names {name}: its DNS query is refused"),
        ));
    }

    // An IP rule that allows every address of a family on this port allows the name too.
    for policy in &isolating {
        let rules = policy_egress_rules(policy, Some(cluster), &mut Vec::new());
        if let Some(everything) = rules
            .iter()
            .find(|r| r.cidr.prefix_len() == 0 && r.except.is_empty() && r.ports.allows(protocol, port))
        {
            return Ok(answer(
                true,
                vec![policy.key()],
                None,
                format!(
                    "{name} resolves, and {} allows every address in {} on {what}",
                    policy.key(),
                    everything.cidr
                ),
            ));
        }
    }
    let mut policies: Vec<String> = isolating.iter().map(|p| p.key()).collect();
    policies.extend(domains.iter().map(|d| d.key()));
    let mut reason = if named_elsewhere {
        format!("domain rules name {name}, but not on {what}")
    } else {
        format!("no domain rule names {name}")
    };
    if !isolating.is_empty() {
        reason.push_str(
            "; only an ipBlock covering the addresses it resolves to could allow it (not known offline)",
        );
    }
    Ok(answer(false, policies, None, reason))
}
