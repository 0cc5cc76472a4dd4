//! A NetworkPolicy as the API server sends it, its spec kept as raw JSON. The typed
//! k8s-openapi struct would make one object that does not deserialize fail the whole list
//! and watch, freezing the cache while the agent looked healthy; with the spec raw, every
//! object reaches the policy layer's strict parser, which rejects a bad one with its field
//! and fails closed for its namespace only. Raw JSON is also the compact form to keep: a
//! 100k-CIDR policy is its bytes, not a tree of values.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RawPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "spec_text"
    )]
    pub spec: Option<Box<RawValue>>,
}

/// Any JSON value, kept as its compact text, written while it is read (`json_text`): not
/// `RawValue` directly, since serde buffers an object whose keys come in an unexpected
/// order (a watch event with "object" before "type") and a buffered value cannot become
/// a `RawValue`; and not through a `serde_json::Value`, whose tree is 30 times the text.
fn spec_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    let text = super::json_text::read(d)?;
    if text == "null" {
        return Ok(None);
    }
    RawValue::from_string(text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl RawPolicy {
    /// The object as JSON bytes with its apiVersion and kind, for `policy_from_json`.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.spec.as_ref().map_or(0, |s| s.get().len()) + 512);
        out.extend_from_slice(br#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":"#);
        serde_json::to_writer(&mut out, &self.metadata)?;
        if let Some(spec) = &self.spec {
            out.extend_from_slice(br#","spec":"#);
            out.extend_from_slice(spec.get().as_bytes());
        }
        out.push(b'}');
        Ok(out)
    }
}

impl kube::Resource for RawPolicy {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "NetworkPolicy".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "networking.k8s.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "networkpolicies".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_spec_deserializes_and_round_trips_to_the_parser() {
        let broken: RawPolicy = serde_json::from_str(
            r#"{"metadata": {"name": "b", "namespace": "ci"}, "spec": {"podSelector": "x", "egress": 7}}"#,
        )
        .unwrap();
        let set = crate::policy::policy_from_json("kube", &broken.to_json().unwrap());
        let error = set.expect_err("a spec of the wrong shape is rejected");
        assert_eq!(error.namespace.as_deref(), Some("ci"));
        let good: RawPolicy = serde_json::from_str(
            r#"{"metadata": {"name": "g", "namespace": "ci"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}}"#,
        )
        .unwrap();
        let policy = crate::policy::policy_from_json("kube", &good.to_json().unwrap()).unwrap();
        assert_eq!((policy.namespace.as_str(), policy.name.as_str()), ("ci", "g"));
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    #[test]
    fn deserializes_inside_watch_events_and_lists() {
        let reordered = r#"{"object":{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"b","namespace":"ci"},"spec":{"egress":7}},"type":"MODIFIED"}"#;
        let event: kube::core::WatchEvent<RawPolicy> = serde_json::from_str(reordered).unwrap();
        assert!(matches!(event, kube::core::WatchEvent::Modified(_)));
        let line = r#"{"type":"ADDED","object":{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"b","namespace":"ci","resourceVersion":"3"},"spec":{"podSelector":"x"}}}"#;
        let event: kube::core::WatchEvent<RawPolicy> = serde_json::from_str(line).unwrap();
        assert!(matches!(event, kube::core::WatchEvent::Added(_)));
        let list = r#"{"kind":"NetworkPolicyList","apiVersion":"networking.k8s.io/v1","metadata":{"resourceVersion":"3"},"items":[{"metadata":{"name":"b","namespace":"ci"},"spec":{"podSelector":"x"}}]}"#;
        let list: kube::core::ObjectList<RawPolicy> = serde_json::from_str(list).unwrap();
        assert_eq!(list.items.len(), 1);
    }
}
