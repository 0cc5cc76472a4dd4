//! A snapshot of the cluster (Namespaces and Pods) so selector peers resolve to pod IPs
//! and named ports to numbers. Read from YAML for `exec --cluster` and `check`.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::Deserialize;

use super::error::PolicyError;

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

/// Kubernetes protocol names (TCP, UDP, SCTP; case-sensitive, as the API is).
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(pipeguard_common::PROTO_TCP),
        "UDP" => Some(pipeguard_common::PROTO_UDP),
        "SCTP" => Some(pipeguard_common::PROTO_SCTP),
        _ => None,
    }
}

pub fn load_cluster(path: &Path) -> Result<Cluster, PolicyError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::file(&source, e.to_string()))?;
    let mut cluster = Cluster::default();
    for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let at = |message: String| PolicyError {
            document: Some(i + 1),
            ..PolicyError::file(&source, message)
        };
        let value = serde_yaml::Value::deserialize(document).map_err(|e| at(format!("YAML: {e}")))?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "" if value.is_null() => {}
            "Namespace" => {
                let ns: Namespace = serde_path_to_error::deserialize(value).map_err(|e| at(e.to_string()))?;
                let name = ns
                    .metadata
                    .name
                    .ok_or_else(|| at("namespace without metadata.name".into()))?;
                cluster.add_namespace(&name, ns.metadata.labels.unwrap_or_default());
            }
            "Pod" => {
                let pod: Pod = serde_path_to_error::deserialize(value).map_err(|e| at(e.to_string()))?;
                cluster.pods.push(pod_of(pod).map_err(at)?);
            }
            other => {
                return Err(at(format!(
                    "unsupported kind {other:?} in a cluster snapshot (Namespace, Pod)"
                )));
            }
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

fn pod_of(pod: Pod) -> Result<ClusterPod, String> {
    let name = pod.metadata.name.ok_or("pod without metadata.name")?;
    let namespace = pod.metadata.namespace.unwrap_or_else(|| "default".into());
    let status = pod.status.unwrap_or_default();
    let mut ips: Vec<IpAddr> = Vec::new();
    for text in status
        .pod_ips
        .into_iter()
        .flatten()
        .map(|p| p.ip)
        .chain(status.pod_ip)
    {
        let ip = text
            .parse()
            .map_err(|e| format!("pod {namespace}/{name}: status.podIPs: {text:?}: {e}"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut named_ports = Vec::new();
    for container in pod.spec.map(|s| s.containers).unwrap_or_default() {
        for port in container.ports.unwrap_or_default() {
            let Some(port_name) = port.name else { continue };
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => pipeguard_common::PROTO_TCP,
                "UDP" => pipeguard_common::PROTO_UDP,
                "SCTP" => pipeguard_common::PROTO_SCTP,
                other => {
                    return Err(format!(
                        "pod {namespace}/{name}: unknown container port protocol {other:?}"
                    ));
                }
            };
            let number = u16::try_from(port.container_port).map_err(|_| {
                format!(
                    "pod {namespace}/{name}: containerPort {} out of range",
                    port.container_port
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
