//! One `DomainPolicy` or `ClusterDomainPolicy` object (from a file or the API server) →
//! a validated policy, or an error naming the object and field plus the pods that must
//! fail closed because of it.
//!
//! Whom an invalid object taints: a `DomainPolicy`, every guarded pod of its namespace (as
//! an invalid NetworkPolicy does). A `ClusterDomainPolicy`, the pods its selectors would
//! select when both selectors are readable, else every guarded pod: ignoring it instead
//! would leave pods it was meant to DNS-filter sending any query.

use std::collections::BTreeMap;

use super::{
    domain_policy::{CLUSTER_DOMAIN_POLICY, DOMAIN_POLICY, DomainPolicy, validate_domain},
    error::PolicyError,
    model::LabelSelector,
    selector::Selector,
};

/// Who fails closed because of one invalid domain policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainTaint {
    /// `domainpolicy NS/NAME` or `clusterdomainpolicy NAME`, as in the error.
    pub object: String,
    pub scope: TaintScope,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaintScope {
    Namespace(String),
    Selected { namespaces: Selector, pods: Selector },
    AllGuarded,
}

impl DomainTaint {
    pub fn covers(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        namespace_labels: impl FnOnce() -> BTreeMap<String, String>,
    ) -> bool {
        match &self.scope {
            TaintScope::Namespace(ns) => ns == namespace,
            TaintScope::Selected { namespaces, pods } => {
                pods.matches(labels) && namespaces.matches(&namespace_labels())
            }
            TaintScope::AllGuarded => true,
        }
    }
}

#[derive(Debug)]
pub struct DomainFailure {
    pub error: PolicyError,
    pub taint: DomainTaint,
}

pub fn is_domain_kind(kind: &str) -> bool {
    kind == DOMAIN_POLICY || kind == CLUSTER_DOMAIN_POLICY
}

/// One object, strictly parsed and validated. `value` must have a domain kind.
pub fn domain_policy_from_value(
    source: &str,
    value: serde_yaml::Value,
) -> Result<DomainPolicy, DomainFailure> {
    let text = |v: Option<&serde_yaml::Value>| v.and_then(|s| s.as_str()).map(str::to_string);
    let kind = text(value.get("kind")).unwrap_or_default();
    let cluster_scoped = kind == CLUSTER_DOMAIN_POLICY;
    let metadata = value.get("metadata");
    let name = text(metadata.and_then(|m| m.get("name"))).filter(|n| !n.is_empty());
    let given_namespace = text(metadata.and_then(|m| m.get("namespace")));
    let namespace = given_namespace.clone().unwrap_or_else(|| "default".into());
    let shown = name.as_deref().unwrap_or("<no name>");
    let object = if cluster_scoped {
        format!("{} {shown}", kind.to_lowercase())
    } else {
        format!("{} {namespace}/{shown}", kind.to_lowercase())
    };
    let taint = DomainTaint {
        object: object.clone(),
        scope: if cluster_scoped {
            readable_selectors(&value)
        } else {
            TaintScope::Namespace(namespace.clone())
        },
    };
    let fail = |field: Option<String>, message: String| DomainFailure {
        error: PolicyError {
            source: source.into(),
            document: None,
            object: Some(object.clone()),
            namespace: (!cluster_scoped).then(|| namespace.clone()),
            field,
            message,
        },
        taint: taint.clone(),
    };
    let Some(name) = name else {
        return Err(fail(Some("metadata.name".into()), "missing name".into()));
    };
    if cluster_scoped && given_namespace.is_some() {
        return Err(fail(
            Some("metadata.namespace".into()),
            "a ClusterDomainPolicy is cluster-scoped: remove the namespace".into(),
        ));
    }
    let doc = serde_path_to_error::deserialize(value).map_err(|e: serde_path_to_error::Error<_>| {
        let path = e.path().to_string();
        fail((path != ".").then_some(path), e.into_inner().to_string())
    })?;
    let mut policy = validate_domain(doc, cluster_scoped, namespace.clone(), name)
        .map_err(|(field, message)| fail(Some(field), message))?;
    for warning in &mut policy.warnings {
        *warning = format!("{source}: {object}: {warning}");
    }
    Ok(policy)
}

/// The selectors of a broken ClusterDomainPolicy, when both still parse and validate.
fn readable_selectors(value: &serde_yaml::Value) -> TaintScope {
    let selector = |field: &str| {
        let raw = value.get("spec")?.get(field)?.clone();
        let doc: LabelSelector = serde_yaml::from_value(raw).ok()?;
        Selector::parse(&doc).ok()
    };
    match (selector("namespaceSelector"), selector("podSelector")) {
        (Some(namespaces), Some(pods)) => TaintScope::Selected { namespaces, pods },
        _ => TaintScope::AllGuarded,
    }
}
