//! The job's allowlist from its policies: what `pipeguard exec` writes to the kernel for the
//! job, a pod with `identity` and the named container ports `own_ports`. A library function
//! so that tests load exactly what exec loads.

use crate::{
    engine::{IngressEntries, PolicyEntries},
    policy::{self, Cluster, Egress, Ingress, PodIdentity, PolicySet, PortRef},
};

/// The compiled allowlist and whether the job's DNS is filtered (a domain policy selects
/// it). Egress is unrestricted (allow-all, still counted) when no egress or domain policy
/// selects the job; a policy with Ingress in its policyTypes that selects the job gives the
/// allowlist its ingress half. Errors name the policy and field.
pub fn compile(
    set: &PolicySet,
    identity: &PodIdentity,
    own_ports: &[(String, u8, u16)],
    cluster: Option<&Cluster>,
) -> Result<(PolicyEntries, bool), String> {
    for warning in set.domains.iter().flat_map(|d| &d.warnings) {
        tracing::warn!("{warning}");
    }
    // A domain policy isolates the job like an egress NetworkPolicy, allows its names, and
    // makes the job DNS-filtered.
    let domains = policy::domains_for(set, identity, cluster);
    if let Some(domains) = &domains {
        tracing::info!(policies = %domains.policies.join(", "), "names allowed and DNS filtered by");
    }
    let ingress = compile_ingress(set, identity, own_ports, cluster)?;
    let rules = match policy::egress_for(set, identity, cluster) {
        Egress::Unrestricted if domains.is_some() => Vec::new(),
        Egress::Unrestricted => {
            tracing::warn!(
                namespace = %identity.namespace,
                "no NetworkPolicy with Egress in its policyTypes selects this job: egress is unrestricted"
            );
            return Ok((
                PolicyEntries {
                    ingress,
                    ..allow_all()
                },
                false,
            ));
        }
        Egress::Isolated {
            rules,
            policies,
            warnings,
        } => {
            tracing::info!(policies = %policies.join(", "), "egress restricted by");
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            rules
        }
    };
    let entries = policy::lpm_entries(&rules).map_err(|e| e.to_string())?;
    let dns_filtered = domains.is_some();
    Ok((
        PolicyEntries {
            v4: entries.v4,
            v6: entries.v6,
            names: domains.map(|d| d.names).unwrap_or_default(),
            ingress,
        },
        dns_filtered,
    ))
}

/// `exec` has no pod spec: the job's container ports are what `--port` declares. A name in
/// an ingress rule of a policy that selects the job must be one of them; otherwise the
/// command does not run (fail closed, where a pod would quietly admit nothing on it). The
/// error names each policy and field.
pub fn check_own_ports(
    set: &PolicySet,
    identity: &PodIdentity,
    own_ports: &[(String, u8, u16)],
) -> Result<(), String> {
    let mut errors = Vec::new();
    let selecting = set.policies.iter().filter(|p| {
        p.namespace == identity.namespace && p.ingress.is_some() && p.pod_selector.matches(&identity.labels)
    });
    for policy in selecting {
        for (i, rule) in policy.ingress.iter().flatten().enumerate() {
            for (j, spec) in rule.ports.iter().flatten().enumerate() {
                let PortRef::Named(name) = &spec.port else {
                    continue;
                };
                if !own_ports.iter().any(|(n, p, _)| n == name && *p == spec.protocol) {
                    let protocol = protocol_name(spec.protocol);
                    errors.push(format!(
                        "policy {}: spec.ingress[{i}].ports[{j}].port: named port {name:?} ({protocol}) is not a port of the job: declare it with --port {name}=PORT/{protocol}",
                        policy.key()
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        pipeguard_common::PROTO_UDP => "UDP",
        pipeguard_common::PROTO_SCTP => "SCTP",
        _ => "TCP",
    }
}

/// The job's listeners are judged when a policy with Ingress in its policyTypes selects it;
/// named ports in its rules are the job's `own_ports`.
fn compile_ingress(
    set: &PolicySet,
    identity: &PodIdentity,
    own_ports: &[(String, u8, u16)],
    cluster: Option<&Cluster>,
) -> Result<Option<IngressEntries>, String> {
    match policy::ingress_for(set, identity, own_ports, cluster) {
        Ingress::Unrestricted => Ok(None),
        Ingress::Isolated {
            rules,
            policies,
            warnings,
        } => {
            tracing::info!(policies = %policies.join(", "), "ingress restricted by");
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            let entries = policy::lpm_entries(&rules).map_err(|e| e.to_string())?;
            Ok(Some(IngressEntries {
                v4: entries.v4,
                v6: entries.v6,
            }))
        }
    }
}

/// Unrestricted egress is still an allowlist, so the job's traffic is counted the same way.
fn allow_all() -> PolicyEntries {
    let all = pipeguard_common::PortSet {
        flags: pipeguard_common::PORTS_ALL,
        ..Default::default()
    };
    PolicyEntries {
        v4: vec![("0.0.0.0/0".parse().expect("valid"), all)],
        v6: vec![("::/0".parse().expect("valid"), all)],
        names: Vec::new(),
        ingress: None,
    }
}
