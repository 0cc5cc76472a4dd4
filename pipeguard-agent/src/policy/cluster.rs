//! A snapshot of the cluster (Namespaces and Pods) so selector peers resolve to pod IPs
//! and named ports to numbers. Read from YAML for `exec --cluster` and `check`.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::Deserialize;

use super::{error::PolicyError, model::protocol_number};

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Namespace → labels (always including `kubernetes.io/metadata.name`).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<ClusterPod>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// Named container ports: (name, protocol number, port).
    pub named_ports: Vec<(String, u8, u16)>,
}

impl Cluster {
    /// Labels of `namespace`; a namespace the snapshot does not list still has its name label.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self.namespaces.get(namespace).cloned().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), namespace.into());
        labels
    }

    pub fn add_namespace(&mut self, name: &str, mut labels: BTreeMap<String, String>) {
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        self.namespaces.insert(name.into(), labels);
    }
}

/// Snapshots are bigger than policy files (`kubectl get pods -A -o yaml` of a busy cluster),
/// but still bounded: reading one must not exhaust memory.
pub const MAX_CLUSTER_BYTES: u64 = 64 << 20;

/// Reads a multi-document YAML snapshot of v1 Namespaces and v1 Pods. `kind: List` documents
/// (what `kubectl get namespaces,pods -A -o yaml` writes) are read item by item. A namespace
/// the pods use but the snapshot does not list is added with only its name label.
pub fn load_cluster(path: &Path) -> Result<Cluster, PolicyError> {
    let source = path.display().to_string();
    let text =
        super::load::read_limited(path, MAX_CLUSTER_BYTES).map_err(|e| PolicyError::file(&source, e))?;
    cluster_from_str(&source, &text)
}

/// [`load_cluster`] on text already read; `source` names it in errors.
pub fn cluster_from_str(source: &str, text: &str) -> Result<Cluster, PolicyError> {
    let mut cluster = Cluster::default();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| PolicyError {
            document: Some(i + 1),
            ..PolicyError::file(source, format!("YAML: {e}"))
        })?;
        if value.is_null() {
            continue;
        }
        for object in super::load::list_items(value) {
            add_object(&mut cluster, object).map_err(|e| PolicyError {
                document: Some(i + 1),
                source: source.into(),
                ..e
            })?;
        }
    }
    let unlisted: Vec<String> = cluster
        .pods
        .iter()
        .map(|p| p.namespace.clone())
        .filter(|ns| !cluster.namespaces.contains_key(ns))
        .collect();
    for ns in unlisted {
        cluster.add_namespace(&ns, BTreeMap::new());
    }
    Ok(cluster)
}

/// One Namespace or Pod. The error names the object and the field; the caller adds the file.
fn add_object(cluster: &mut Cluster, value: serde_yaml::Value) -> Result<(), PolicyError> {
    let text = |v: Option<&serde_yaml::Value>| v.and_then(|s| s.as_str()).unwrap_or_default().to_string();
    let kind = text(value.get("kind"));
    let metadata = value.get("metadata");
    let name = text(metadata.and_then(|m| m.get("name")));
    let namespace = text(metadata.and_then(|m| m.get("namespace")));
    let shown = if name.is_empty() { "<no name>" } else { &name };
    let object = match kind.as_str() {
        "Namespace" => format!("namespace {shown}"),
        "Pod" if namespace.is_empty() => format!("pod default/{shown}"),
        "Pod" => format!("pod {namespace}/{shown}"),
        _ => format!("object {shown}"),
    };
    let error = |field: Option<String>, message: String| PolicyError {
        object: Some(object.clone()),
        field,
        ..PolicyError::file("", message)
    };
    let strict = |e: serde_path_to_error::Error<serde_yaml::Error>| {
        let path = e.path().to_string();
        error((path != ".").then_some(path), e.into_inner().to_string())
    };
    if name.is_empty() && (kind == "Namespace" || kind == "Pod") {
        return Err(error(Some("metadata.name".into()), "missing name".into()));
    }
    match kind.as_str() {
        "Namespace" => {
            let ns: Namespace = serde_path_to_error::deserialize(value).map_err(strict)?;
            cluster.add_namespace(&name, ns.metadata.labels.unwrap_or_default());
        }
        "Pod" => {
            let pod: Pod = serde_path_to_error::deserialize(value).map_err(strict)?;
            cluster
                .pods
                .push(pod_of(pod).map_err(|(field, message)| error(Some(field), message))?);
        }
        "" => return Err(error(Some("kind".into()), "missing kind (Namespace, Pod)".into())),
        other => {
            return Err(error(
                Some("kind".into()),
                format!("unsupported kind {other:?} in a cluster snapshot (Namespace, Pod)"),
            ));
        }
    }
    Ok(())
}

/// `Err((field, message))`, the field relative to the Pod.
fn pod_of(pod: Pod) -> Result<ClusterPod, (String, String)> {
    let name = pod.metadata.name.unwrap_or_default();
    let namespace = pod.metadata.namespace.unwrap_or_else(|| "default".into());
    let status = pod.status.unwrap_or_default();
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.into_iter().flatten().enumerate();
    let addresses = listed
        .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip))
        .chain(status.pod_ip.map(|ip| ("status.podIP".to_string(), ip)));
    for (field, text) in addresses {
        let ip = text
            .parse()
            .map_err(|e| (field, format!("invalid IP address {text:?}: {e}")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut named_ports = Vec::new();
    let containers = pod.spec.map(|s| s.containers).unwrap_or_default();
    for (c, container) in containers.into_iter().enumerate() {
        for (p, port) in container.ports.unwrap_or_default().into_iter().enumerate() {
            let at = format!("spec.containers[{c}].ports[{p}]");
            let Some(port_name) = port.name else { continue };
            let text = port.protocol.as_deref().unwrap_or("TCP");
            let protocol = protocol_number(text).ok_or_else(|| {
                (
                    format!("{at}.protocol"),
                    format!("unknown protocol {text:?} (TCP, UDP, SCTP)"),
                )
            })?;
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    (
                        format!("{at}.containerPort"),
                        format!("port {} is outside 1-65535", port.container_port),
                    )
                })?;
            named_ports.push((port_name, protocol, number));
        }
    }
    Ok(ClusterPod {
        namespace,
        name,
        labels: pod.metadata.labels.unwrap_or_default(),
        ips,
        named_ports,
    })
}
