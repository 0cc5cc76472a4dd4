//! A pod on this node as the agent knows it: identity, labels and its cgroup. Below both
//! the agent (which finds pods) and the event pipeline (which reports on them).

use std::collections::BTreeMap;

/// A pod scheduled on this node whose cgroup was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub cgroup_id: u64,
    /// Why the pod can step around a node-level guard (privileged, CAP_NET_ADMIN/SYS_ADMIN/
    /// BPF added, hostPID), if it can.
    pub escape: Option<String>,
}
