//! Domain policy objects from the caches → the policy set, through the same strict parser
//! as files. Parsed results are reused while an object's resourceVersion is unchanged (every
//! pod event triggers a sync).

#![expect(
    clippy::result_large_err,
    reason = "DomainFailure carries the error and the taint; kept once per object version"
)]

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject};

use crate::policy::{DomainFailure, DomainPolicy, PolicyError, PolicySet, domain_policy_from_value};

type Parsed = Result<DomainPolicy, DomainFailure>;

#[derive(Default)]
pub struct DomainObjectCache {
    /// (kind, namespace, name) → (resourceVersion, result).
    by_object: HashMap<(String, String, String), (String, Parsed)>,
}

impl DomainObjectCache {
    /// Adds every object of both kinds to `set`: valid ones to `domains`, invalid ones to
    /// `errors` and `domain_taints`. Returns the invalid objects, to report on them.
    pub fn add_to(
        &mut self,
        set: &mut PolicySet,
        kinds: &[(&ApiResource, Vec<Arc<DynamicObject>>)],
    ) -> Vec<(ObjectReference, PolicyError)> {
        let mut seen = HashMap::new();
        let mut invalid = Vec::new();
        for (resource, objects) in kinds {
            for obj in objects {
                let key = (
                    resource.kind.clone(),
                    obj.metadata.namespace.clone().unwrap_or_default(),
                    obj.metadata.name.clone().unwrap_or_default(),
                );
                let version = obj.metadata.resource_version.clone();
                let result = match (self.by_object.remove(&key), &version) {
                    (Some((cached, result)), Some(v)) if &cached == v => result,
                    _ => {
                        let result = parse(resource, obj);
                        log_warnings(resource, obj, &result);
                        result
                    }
                };
                if let Err(failure) = &result {
                    invalid.push((reference(resource, obj), failure.error.clone()));
                }
                set.add_domain(clone_parsed(&result));
                if let Some(v) = version {
                    seen.insert(key, (v, result));
                }
            }
        }
        self.by_object = seen;
        invalid
    }
}

/// Once per object version, as `exec` and `check` print them when they load a file: a
/// rule that allows a public DNS-over-HTTPS resolver, or a whole top-level domain.
fn log_warnings(resource: &ApiResource, obj: &DynamicObject, result: &Parsed) {
    let Ok(policy) = result else { return };
    for warning in &policy.warnings {
        tracing::warn!(
            kind = %resource.kind,
            namespace = obj.metadata.namespace.as_deref().unwrap_or_default(),
            name = obj.metadata.name.as_deref().unwrap_or_default(),
            %warning,
            "domain policy accepted with a warning"
        );
    }
}

fn reference(resource: &ApiResource, obj: &DynamicObject) -> ObjectReference {
    ObjectReference {
        api_version: Some(resource.api_version.clone()),
        kind: Some(resource.kind.clone()),
        name: obj.metadata.name.clone(),
        namespace: obj.metadata.namespace.clone(),
        uid: obj.metadata.uid.clone(),
        resource_version: obj.metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

fn clone_parsed(result: &Parsed) -> Parsed {
    match result {
        Ok(policy) => Ok(policy.clone()),
        Err(failure) => Err(DomainFailure {
            error: failure.error.clone(),
            taint: failure.taint.clone(),
        }),
    }
}

/// The object as the parser reads a file: apiVersion and kind from the resource (list
/// items may come without them), metadata and every other field as served.
fn parse(resource: &ApiResource, obj: &DynamicObject) -> Parsed {
    let value = serde_json::to_value(obj).and_then(|mut json| {
        if let Some(map) = json.as_object_mut() {
            map.insert("apiVersion".into(), resource.api_version.clone().into());
            map.insert("kind".into(), resource.kind.clone().into());
        }
        serde_json::from_value::<serde_yaml::Value>(json)
    });
    match value {
        Ok(value) => domain_policy_from_value("kube", value),
        // Not reachable for a served object; if it ever is, the object still taints.
        Err(e) => {
            let mut metadata = serde_yaml::Mapping::new();
            for (key, value) in [
                ("name", &obj.metadata.name),
                ("namespace", &obj.metadata.namespace),
            ] {
                if let Some(value) = value {
                    metadata.insert(key.into(), value.clone().into());
                }
            }
            let mut fallback = serde_yaml::Mapping::new();
            fallback.insert("kind".into(), resource.kind.clone().into());
            fallback.insert("metadata".into(), serde_yaml::Value::Mapping(metadata));
            let mut failure = domain_policy_from_value("kube", serde_yaml::Value::Mapping(fallback))
                .expect_err("an object without a spec never validates");
            failure.error = PolicyError {
                message: e.to_string(),
                field: None,
                ..failure.error
            };
            Err(failure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CLUSTER_DOMAIN_POLICY, DOMAIN_POLICY};

    /// As a list item arrives: no apiVersion or kind of its own.
    fn object(ns: Option<&str>, name: &str, version: &str, domains: &[&str]) -> Arc<DynamicObject> {
        let mut obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "resourceVersion": version, "uid": "u-1"},
            "spec": {"podSelector": {}, "namespaceSelector": ns.is_none().then(|| serde_json::json!({})),
                     "egress": [{"domains": domains}]}
        }))
        .unwrap();
        if ns.is_some() {
            obj.data["spec"]
                .as_object_mut()
                .unwrap()
                .remove("namespaceSelector");
        }
        Arc::new(obj)
    }

    #[test]
    fn list_items_parse_with_the_resource_kind_and_invalid_ones_are_returned() {
        let (namespaced, cluster) = (
            super::super::kube_domains::resource(DOMAIN_POLICY),
            super::super::kube_domains::resource(CLUSTER_DOMAIN_POLICY),
        );
        let mut cache = DomainObjectCache::default();
        let mut set = PolicySet::default();
        let invalid = cache.add_to(
            &mut set,
            &[
                (
                    &namespaced,
                    vec![
                        object(Some("ci"), "good", "1", &["github.com"]),
                        object(Some("ci"), "bad", "2", &["a..b"]),
                    ],
                ),
                (&cluster, vec![object(None, "platform", "3", &["ghcr.io"])]),
            ],
        );
        let keys: Vec<String> = set.domains.iter().map(|d| d.key()).collect();
        assert_eq!(keys, ["DomainPolicy ci/good", "ClusterDomainPolicy platform"]);
        assert_eq!(invalid.len(), 1);
        let (reference, error) = &invalid[0];
        assert_eq!(reference.kind.as_deref(), Some("DomainPolicy"));
        assert_eq!(reference.api_version.as_deref(), Some("pipeguard.dev/v1alpha1"));
        assert_eq!(
            (reference.namespace.as_deref(), reference.name.as_deref()),
            (Some("ci"), Some("bad"))
        );
        assert_eq!(
            error.to_string(),
            "kube: domainpolicy ci/bad: spec.egress[0].domains[0]: \"a..b\" has an empty label"
        );
        assert_eq!(set.domain_taints.len(), 1);

        // Same resourceVersion: the cached result; a new one is parsed again.
        let mut again = PolicySet::default();
        cache.add_to(
            &mut again,
            &[(
                &namespaced,
                vec![object(Some("ci"), "bad", "2", &["fixed.example"])],
            )],
        );
        assert_eq!(again.errors.len(), 1, "version 2 is cached as invalid");
        let mut fixed = PolicySet::default();
        cache.add_to(
            &mut fixed,
            &[(
                &namespaced,
                vec![object(Some("ci"), "bad", "4", &["fixed.example"])],
            )],
        );
        assert!(fixed.errors.is_empty() && fixed.domains.len() == 1);
    }
}
