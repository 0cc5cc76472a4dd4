//! The cluster as the sync loop knows it, kept up to date event by event: every pod's
//! compiler inputs (labels, IPs, named ports), this node's pod objects, and the namespaces'
//! labels. No other copy of the 50,000 pod objects is kept (the pod watch has no reflector
//! store), and no sync rebuilds it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;

use super::snapshot::ScheduledPod;
use crate::policy::{Cluster, ClusterPod};

/// (namespace, name).
pub type PodKey = (String, String);

/// What the agent keeps of one pod, made by the pod watch (`pod_watch::record`).
#[derive(Clone, Debug)]
pub struct PodRecord {
    pub uid: Option<String>,
    /// `None` until it has an IP (it cannot be a peer before).
    pub peer: Option<ClusterPod>,
    /// The (slimmed) object, for pods scheduled on this node only.
    pub local: Option<Arc<Pod>>,
}

/// One pod's change, as far as other pods' allowlists can see it.
#[derive(Debug, Default)]
pub struct PodDelta {
    pub key: PodKey,
    pub old: Option<ClusterPod>,
    pub new: Option<ClusterPod>,
    /// UIDs of the local pod this key was or is (its own allowlist changes with it).
    pub local: Vec<String>,
}

#[derive(Default)]
pub struct World {
    pub cluster: Cluster,
    /// Key → index in `cluster.pods`.
    index: HashMap<PodKey, usize>,
    /// Pods scheduled on this node, by UID.
    pub scheduled: BTreeMap<String, ScheduledPod>,
    /// Their objects by UID (for enrichment).
    pub objects: HashMap<String, Arc<Pod>>,
    local_uid: HashMap<PodKey, String>,
}

impl World {
    /// A relist: every pod is replaced (namespaces stay).
    pub fn replace_pods(&mut self, records: impl IntoIterator<Item = (PodKey, PodRecord)>) {
        self.cluster.pods.clear();
        self.index.clear();
        self.scheduled.clear();
        self.objects.clear();
        self.local_uid.clear();
        for (key, record) in records {
            self.apply_pod(key, Some(record));
        }
        self.cluster.pods.shrink_to_fit();
    }

    /// Applies one pod's new state (`None`: deleted) and says what changed.
    pub fn apply_pod(&mut self, key: PodKey, record: Option<PodRecord>) -> PodDelta {
        let old = self.remove_peer(&key);
        let mut local = Vec::new();
        if let Some(uid) = self.local_uid.remove(&key) {
            self.scheduled.remove(&uid);
            self.objects.remove(&uid);
            local.push(uid);
        }
        let mut new = None;
        if let Some(record) = record {
            if let (Some(pod), Some(uid)) = (record.local, record.uid) {
                self.scheduled.insert(uid.clone(), scheduled(&key, &pod));
                self.objects.insert(uid.clone(), pod);
                self.local_uid.insert(key.clone(), uid.clone());
                if !local.contains(&uid) {
                    local.push(uid);
                }
            }
            if let Some(peer) = record.peer {
                self.index.insert(key.clone(), self.cluster.pods.len());
                self.cluster.pods.push(peer.clone());
                new = Some(peer);
            }
        }
        PodDelta { key, old, new, local }
    }

    fn remove_peer(&mut self, key: &PodKey) -> Option<ClusterPod> {
        let at = self.index.remove(key)?;
        let removed = self.cluster.pods.swap_remove(at);
        if let Some(moved) = self.cluster.pods.get(at) {
            self.index
                .insert((moved.namespace.clone(), moved.name.clone()), at);
        }
        Some(removed)
    }

    /// A namespace's labels (`None`: deleted); returns its labels before and after as the
    /// compiler sees them (a namespace it does not know still has its name label).
    pub fn set_namespace(
        &mut self,
        name: &str,
        labels: Option<BTreeMap<String, String>>,
    ) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let old = self.cluster.namespace_labels(name);
        match labels {
            Some(labels) => self.cluster.add_namespace(name, labels),
            None => {
                self.cluster.namespaces.remove(name);
            }
        }
        (old, self.cluster.namespace_labels(name))
    }
}

fn scheduled(key: &PodKey, pod: &Pod) -> ScheduledPod {
    ScheduledPod {
        namespace: key.0.clone(),
        name: key.1.clone(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        escape: super::bypass::marked(pod),
    }
}
