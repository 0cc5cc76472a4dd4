//! The wire format, strictly: an unknown field is an error, never silently ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyDoc {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: Spec,
}

/// Metadata fields kubectl and the API server write are accepted (exported manifests
/// carry them); pipeguard only reads name, namespace and labels.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[expect(dead_code, reason = "accepted so exported manifests parse; not used")]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub uid: Option<serde_json::Value>,
    pub resource_version: Option<serde_json::Value>,
    pub generation: Option<serde_json::Value>,
    pub creation_timestamp: Option<serde_json::Value>,
    pub deletion_timestamp: Option<serde_json::Value>,
    pub deletion_grace_period_seconds: Option<serde_json::Value>,
    pub generate_name: Option<serde_json::Value>,
    pub managed_fields: Option<serde_json::Value>,
    pub owner_references: Option<serde_json::Value>,
    pub finalizers: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    pub pod_selector: LabelSelector,
    pub policy_types: Option<Vec<String>>,
    pub ingress: Option<Vec<IngressRule>>,
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    pub to: Option<Vec<PeerDoc>>,
    pub ports: Option<Vec<PortDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressRule {
    pub from: Option<Vec<PeerDoc>>,
    pub ports: Option<Vec<PortDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerDoc {
    // Boxed: a policy may list 100k peers, nearly all ipBlocks, and a selector inline is
    // 48 bytes each, read or not.
    pub pod_selector: Option<Box<LabelSelector>>,
    pub namespace_selector: Option<Box<LabelSelector>>,
    pub ip_block: Option<IpBlockDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpBlockDoc {
    pub cidr: String,
    pub except: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortDoc {
    pub protocol: Option<String>,
    pub port: Option<IntOrString>,
    pub end_port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<Requirement>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
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
