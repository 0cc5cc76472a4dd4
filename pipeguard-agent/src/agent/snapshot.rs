//! Kubernetes objects from the caches → the policy layer's inputs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::raw_policy::RawPolicy;
use crate::policy::{Cluster, ClusterPod, Policy, PolicyError, PolicySet, policy_from_json};

/// Every NetworkPolicy through the same strict parser as files, so one error type and one
/// set of rules covers both; objects that fail are reported, never skipped silently. Parsed
/// policies are reused while an object's resourceVersion is unchanged: every pod or
/// namespace event triggers a sync, and must not re-parse a 100k-CIDR policy.
#[derive(Default)]
pub struct PolicyCache {
    /// (namespace, name) → (resourceVersion, what it parsed to).
    by_object: HashMap<(String, String), (String, Parsed)>,
}

type Parsed = Result<Arc<Policy>, PolicyError>;

impl PolicyCache {
    pub fn policies(&mut self, objects: &[Arc<RawPolicy>]) -> PolicySet {
        let mut seen = HashMap::with_capacity(objects.len());
        let mut set = PolicySet::default();
        for obj in objects {
            let key = (
                obj.metadata.namespace.clone().unwrap_or_default(),
                obj.metadata.name.clone().unwrap_or_default(),
            );
            let version = obj.metadata.resource_version.clone();
            let result = match (self.by_object.remove(&key), &version) {
                (Some((cached, result)), Some(v)) if &cached == v => result,
                _ => parse(obj).map(Arc::new),
            };
            match &result {
                Ok(p) => set.policies.push(p.clone()),
                Err(e) => set.errors.push(e.clone()),
            }
            if let Some(v) = version {
                seen.insert(key, (v, result));
            }
        }
        // Objects that are gone are forgotten.
        self.by_object = seen;
        set
    }
}

#[expect(
    clippy::result_large_err,
    reason = "kept as is in the cache, once per object version"
)]
fn parse(obj: &RawPolicy) -> Result<Policy, PolicyError> {
    // JSON bytes, not a value tree (see `policy_from_json`).
    match obj.to_json() {
        Ok(json) => policy_from_json("kube", &json),
        Err(e) => Err(PolicyError {
            namespace: obj.metadata.namespace.clone(),
            ..PolicyError::file("kube", e.to_string())
        }),
    }
}

pub fn cluster(namespaces: &[std::sync::Arc<Namespace>], pods: &[std::sync::Arc<Pod>]) -> Cluster {
    let mut cluster = Cluster::default();
    for ns in namespaces {
        if let Some(name) = &ns.metadata.name {
            cluster.add_namespace(name, ns.metadata.labels.clone().unwrap_or_default());
        }
    }
    for pod in pods {
        if let Some(p) = cluster_pod(pod) {
            cluster.pods.push(p);
        }
    }
    cluster
}

/// A pod without a name or IP cannot be a peer yet; it is left out until it has them.
pub(super) fn cluster_pod(pod: &Pod) -> Option<ClusterPod> {
    let status = pod.status.as_ref()?;
    let mut ips = Vec::new();
    for text in status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| &p.ip)
        .chain(status.pod_ip.as_ref())
    {
        if let Ok(ip) = text.parse()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return None;
    }
    let mut named_ports = Vec::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        for port in c.ports.iter().flatten() {
            let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) else {
                continue;
            };
            // A port with a protocol we do not know is no named port of ours.
            let Some(protocol) = crate::policy::protocol_number(port.protocol.as_deref().unwrap_or("TCP"))
            else {
                continue;
            };
            named_ports.push((name.clone(), protocol, number));
        }
    }
    Some(ClusterPod {
        namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone()?,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        named_ports,
    })
}

/// What the agent keeps of a pod scheduled on its node.
pub struct ScheduledPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// See `agent::bypass`.
    pub escape: Option<String>,
}

/// Pods scheduled on `node`, by uid.
pub fn local_pods(pods: &[std::sync::Arc<Pod>], node: &str) -> BTreeMap<String, ScheduledPod> {
    pods.iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|p| {
            Some((
                p.metadata.uid.clone()?,
                ScheduledPod {
                    namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    name: p.metadata.name.clone()?,
                    labels: p.metadata.labels.clone().unwrap_or_default(),
                    escape: super::bypass::marked(p),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        // From text, as the API sends it (a raw spec only deserializes from text).
        Arc::new(serde_json::from_str(&v.to_string()).unwrap())
    }

    fn netpol(rv: &str, cidr: &str) -> Arc<RawPolicy> {
        from(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ci", "resourceVersion": rv},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": cidr}}]}]}
        }))
    }

    fn first_cidr(set: &PolicySet) -> Option<String> {
        let egress = set.policies.first()?.egress.as_ref()?;
        match egress[0].peers.as_ref()?.first()? {
            crate::policy::Peer::IpBlock { cidr, .. } => Some(cidr.to_string()),
            _ => None,
        }
    }

    #[test]
    fn the_policy_cache_reparses_exactly_when_the_resource_version_changes() {
        let mut cache = PolicyCache::default();
        let set = cache.policies(&[netpol("1", "10.0.0.0/8")]);
        assert_eq!(first_cidr(&set).as_deref(), Some("10.0.0.0/8"));
        // Same resourceVersion: the cached parse is used (the API server never changes an
        // object without a new version, so a different body here proves the reuse).
        let set = cache.policies(&[netpol("1", "11.0.0.0/8")]);
        assert_eq!(first_cidr(&set).as_deref(), Some("10.0.0.0/8"));
        let set = cache.policies(&[netpol("2", "11.0.0.0/8")]);
        assert_eq!(first_cidr(&set).as_deref(), Some("11.0.0.0/8"));
        // A broken object is reported from the cache as well, with its field.
        let set = cache.policies(&[netpol("3", "11.0.0.0/33")]);
        let set_again = cache.policies(&[netpol("3", "11.0.0.0/33")]);
        assert_eq!(set.errors.len(), 1);
        assert_eq!(set.errors, set_again.errors);
        assert!(
            set.errors[0].to_string().contains("ipBlock.cidr"),
            "{}",
            set.errors[0]
        );
        // Gone from the cluster, gone from the cache.
        assert!(cache.policies(&[]).policies.is_empty());
        assert!(cache.by_object.is_empty());
    }

    #[test]
    fn objects_with_missing_fields_are_skipped_or_reported_never_a_panic() {
        let pods = vec![
            from::<Pod>(serde_json::json!({"metadata": {"name": "bare"}})),
            from::<Pod>(
                serde_json::json!({"metadata": {"name": "no-ip", "namespace": "ci"}, "spec": {"containers": []}}),
            ),
            from::<Pod>(
                serde_json::json!({"metadata": {"namespace": "ci"}, "status": {"podIP": "10.0.0.1"}}),
            ),
            from::<Pod>(
                serde_json::json!({"metadata": {"name": "bad-ip", "namespace": "ci"}, "status": {"podIP": "not-an-ip"}}),
            ),
            from::<Pod>(
                serde_json::json!({"metadata": {"name": "ok", "namespace": "ci", "uid": "u1"},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": 70000, "name": "big"}]}]},
                "status": {"podIP": "10.0.0.2"}}),
            ),
        ];
        let namespaces = vec![from::<Namespace>(serde_json::json!({"metadata": {}}))];
        let cluster = cluster(&namespaces, &pods);
        assert_eq!(
            cluster.pods.len(),
            1,
            "only the pod with a name and an IP is a peer"
        );
        assert!(
            cluster.pods[0].named_ports.is_empty(),
            "an out-of-range port is not a named port"
        );
        let local = local_pods(&pods, "n1");
        assert_eq!(local.len(), 1);
        // A NetworkPolicy without a spec cannot be compiled: it is an error for its namespace.
        let set = PolicyCache::default().policies(&[from::<RawPolicy>(
            serde_json::json!({"metadata": {"name": "x", "namespace": "ci"}}),
        )]);
        assert_eq!(set.policies.len(), 0);
        assert_eq!(set.errors.len(), 1);
        assert_eq!(set.errors[0].namespace.as_deref(), Some("ci"));
    }
}
