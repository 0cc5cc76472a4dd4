//! Kubernetes objects from the caches → the policy layer's inputs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::policy::{Cluster, ClusterPod, PolicyError, PolicySet, policy_from_value};

/// Every NetworkPolicy through the same strict parser as files, so one error type and one
/// set of rules covers both. Objects that fail are reported, never skipped silently.
pub fn policies(objects: &[std::sync::Arc<NetworkPolicy>]) -> PolicySet {
    let mut set = PolicySet::default();
    for obj in objects {
        let mut obj = (**obj).clone();
        obj.metadata.managed_fields = None;
        let value = serde_json::to_value(&obj)
            .map_err(|e| e.to_string())
            .and_then(|mut v| {
                // The typed object omits kind/apiVersion; the parser checks them.
                v["apiVersion"] = "networking.k8s.io/v1".into();
                v["kind"] = "NetworkPolicy".into();
                serde_yaml::to_value(v).map_err(|e| e.to_string())
            });
        let result = match value {
            Ok(value) => policy_from_value("kube", value),
            Err(message) => Err(PolicyError {
                namespace: obj.metadata.namespace.clone(),
                ..PolicyError::file("kube", message)
            }),
        };
        match result {
            Ok(p) => set.policies.push(p),
            Err(e) => set.errors.push(e),
        }
    }
    set
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
fn cluster_pod(pod: &Pod) -> Option<ClusterPod> {
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

/// Pods scheduled on `node`: uid → (namespace, name, labels).
pub fn local_pods(
    pods: &[std::sync::Arc<Pod>],
    node: &str,
) -> BTreeMap<String, (String, String, BTreeMap<String, String>)> {
    pods.iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|p| {
            Some((
                p.metadata.uid.clone()?,
                (
                    p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    p.metadata.name.clone()?,
                    p.metadata.labels.clone().unwrap_or_default(),
                ),
            ))
        })
        .collect()
}

/// Container cgroup id → container name, from the pod cgroup's children (named after the
/// container id by every runtime) and the pod's container statuses.
pub fn container_cgroups(
    pod: &Pod,
    uid: &str,
    root: &std::path::Path,
) -> std::collections::HashMap<u64, String> {
    let names: Vec<(String, String)> = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter_map(|c| {
            let id = c.container_id.as_deref()?.split("://").nth(1)?.to_string();
            Some((id, c.name.clone()))
        })
        .collect();
    let mut out = std::collections::HashMap::new();
    let Some(dir) = super::pod_cgroups::scan(root)
        .ok()
        .and_then(|all| all.into_iter().find(|p| p.uid == uid))
    else {
        return out;
    };
    for entry in std::fs::read_dir(&dir.path).into_iter().flatten().flatten() {
        let dirname = entry.file_name().to_string_lossy().into_owned();
        let Ok(id) = crate::cgroup::cgroup_id(&entry.path()) else {
            continue;
        };
        if !entry.path().is_dir() {
            continue;
        }
        let name = names
            .iter()
            .find(|(cid, _)| dirname.contains(cid.as_str()))
            .map(|(_, n)| n.clone())
            .unwrap_or(dirname);
        out.insert(id, name);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
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
        let set = policies(&[from::<NetworkPolicy>(
            serde_json::json!({"metadata": {"name": "x", "namespace": "ci"}}),
        )]);
        assert_eq!(set.policies.len(), 0);
        assert_eq!(set.errors.len(), 1);
        assert_eq!(set.errors[0].namespace.as_deref(), Some("ci"));
    }
}
