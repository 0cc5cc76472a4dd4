//! `DomainPolicy` and `ClusterDomainPolicy` (pipeguard.dev/v1alpha1): the wire format,
//! strictly (an unknown field is an error), and its validation into typed policies.
//!
//! Semantics, like an egress NetworkPolicy whose peers are names: a domain policy that
//! selects a pod isolates its egress and makes it DNS-filtered; its rules only allow, in a
//! union with the pod's NetworkPolicy egress rules.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    DomainPattern, DomainRule, Ports,
    domain::doh_resolvers_allowed,
    model::{LabelSelector, ObjectMeta, PortDoc},
    selector::Selector,
    validate::{PortRef, port},
};

pub const DOMAIN_API_VERSION: &str = "pipeguard.dev/v1alpha1";
pub const DOMAIN_POLICY: &str = "DomainPolicy";
pub const CLUSTER_DOMAIN_POLICY: &str = "ClusterDomainPolicy";

/// Whom a domain policy can select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainScope {
    /// A `DomainPolicy`: pods of its own namespace.
    Namespace(String),
    /// A `ClusterDomainPolicy`: pods of the namespaces its `namespaceSelector` matches.
    Cluster { namespaces: Selector },
}

/// A valid domain policy of either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainPolicy {
    pub scope: DomainScope,
    pub name: String,
    pub pod_selector: Selector,
    pub egress: Vec<DomainEgress>,
    /// Accepted input the user should know about (a public DoH resolver allowed, ...).
    pub warnings: Vec<String>,
}

/// One `spec.egress[]` rule: these names, on these ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainEgress {
    pub domains: Vec<DomainPattern>,
    pub ports: Ports,
}

impl DomainPolicy {
    /// How the policy is named in statuses, events and `check` answers.
    pub fn key(&self) -> String {
        match &self.scope {
            DomainScope::Namespace(ns) => format!("{DOMAIN_POLICY} {ns}/{}", self.name),
            DomainScope::Cluster { .. } => format!("{CLUSTER_DOMAIN_POLICY} {}", self.name),
        }
    }

    /// Whether the policy selects a pod of `namespace` with `labels`; `namespace_labels`
    /// are its namespace's labels (read only for cluster-scoped policies).
    pub fn selects(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        namespace_labels: impl FnOnce() -> BTreeMap<String, String>,
    ) -> bool {
        let in_scope = match &self.scope {
            DomainScope::Namespace(ns) => ns == namespace,
            DomainScope::Cluster { namespaces } => namespaces.matches(&namespace_labels()),
        };
        in_scope && self.pod_selector.matches(labels)
    }

    /// Every (name, ports) the policy allows.
    pub fn rules(&self) -> impl Iterator<Item = DomainRule> + '_ {
        self.egress.iter().flat_map(|rule| {
            rule.domains.iter().map(|pattern| DomainRule {
                pattern: pattern.clone(),
                ports: rule.ports.clone(),
            })
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[expect(
    dead_code,
    reason = "kind and metadata are checked on the raw document, before this parse"
)]
pub(super) struct DomainPolicyDoc {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: DomainSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DomainSpec {
    /// Only in a ClusterDomainPolicy; read here so a misplaced one gets a clear error.
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: LabelSelector,
    #[serde(default)]
    pub egress: Vec<DomainEgressDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DomainEgressDoc {
    pub domains: Vec<String>,
    pub ports: Option<Vec<PortDoc>>,
}

type FieldError = (String, String);

pub(super) fn validate_domain(
    doc: DomainPolicyDoc,
    cluster_scoped: bool,
    namespace: String,
    name: String,
) -> Result<DomainPolicy, FieldError> {
    if doc.api_version != DOMAIN_API_VERSION {
        return Err((
            "apiVersion".into(),
            format!("expected {DOMAIN_API_VERSION}, got {:?}", doc.api_version),
        ));
    }
    let spec = doc.spec;
    let scope = match (cluster_scoped, &spec.namespace_selector) {
        (false, None) => DomainScope::Namespace(namespace),
        (false, Some(_)) => {
            return Err((
                "spec.namespaceSelector".into(),
                "a DomainPolicy selects pods of its own namespace; select namespaces with a ClusterDomainPolicy".into(),
            ));
        }
        (true, None) => {
            return Err((
                "spec.namespaceSelector".into(),
                "missing (a ClusterDomainPolicy needs one; {} selects every namespace)".into(),
            ));
        }
        (true, Some(selector)) => DomainScope::Cluster {
            namespaces: Selector::parse(selector)
                .map_err(|(f, m)| (format!("spec.namespaceSelector.{f}"), m))?,
        },
    };
    let pod_selector =
        Selector::parse(&spec.pod_selector).map_err(|(f, m)| (format!("spec.podSelector.{f}"), m))?;
    let mut warnings = Vec::new();
    let mut egress = Vec::new();
    for (i, rule) in spec.egress.iter().enumerate() {
        egress.push(egress_rule(&format!("spec.egress[{i}]"), rule, &mut warnings)?);
    }
    Ok(DomainPolicy {
        scope,
        name,
        pod_selector,
        egress,
        warnings,
    })
}

fn egress_rule(
    at: &str,
    rule: &DomainEgressDoc,
    warnings: &mut Vec<String>,
) -> Result<DomainEgress, FieldError> {
    if rule.domains.is_empty() {
        return Err((
            format!("{at}.domains"),
            "empty: a rule needs at least one name".into(),
        ));
    }
    let mut domains = Vec::new();
    for (j, text) in rule.domains.iter().enumerate() {
        let field = format!("{at}.domains[{j}]");
        let pattern = DomainPattern::parse(text).map_err(|message| (field.clone(), message))?;
        for resolver in doh_resolvers_allowed(&pattern) {
            warnings.push(format!(
                "{field}: {pattern} allows the public DNS-over-HTTPS resolver {resolver}, through which a job can resolve any name past the DNS filter"
            ));
        }
        if let DomainPattern::Wildcard(suffix) = &pattern
            && !suffix.contains('.')
        {
            warnings.push(format!(
                "{field}: {pattern} allows every name under the top-level domain {suffix}"
            ));
        }
        if !domains.contains(&pattern) {
            domains.push(pattern);
        }
    }
    let ports = match rule.ports.as_deref() {
        // Like NetworkPolicy: no ports (or an empty list) means every port.
        None | Some([]) => Ports::All,
        Some(list) => {
            let mut out = Vec::new();
            for (j, doc) in list.iter().enumerate() {
                let field = format!("{at}.ports[{j}]");
                let spec = port(&field, doc)?;
                match spec.port {
                    PortRef::Any => out.push((spec.protocol, 0, u16::MAX)),
                    PortRef::Range(lo, hi) => out.push((spec.protocol, lo, hi)),
                    PortRef::Named(name) => {
                        return Err((
                            format!("{field}.port"),
                            format!(
                                "named port {name:?}: the destination of a domain rule is not a pod, so it has no port names; use a number"
                            ),
                        ));
                    }
                }
            }
            Ports::List(out)
        }
    };
    Ok(DomainEgress { domains, ports })
}
