//! What the event pipeline knows about each local pod (names, CI labels, policies, its
//! containers), rebuilt only for pods whose object, status or cgroup changed since the last
//! sync: a sync after one pod event costs one pod's work here, not every pod's.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;

use super::{
    Status,
    desired::DesiredPod,
    workflow_pod::{runner_of, with_runner},
};
use crate::events::{
    pipeline::PodInfo,
    record::{CiContext, is_ci_key},
};

/// When a pod's info was built: rebuilt when any of these differ.
#[derive(PartialEq)]
struct Stamp {
    resource_version: Option<String>,
    status: Status,
    cgroup_id: u64,
    /// An ARC workflow pod's runner pod, whose CI context it carries.
    runner_version: Option<String>,
}

#[derive(Default)]
pub(super) struct InfoCache {
    by_uid: HashMap<String, (Stamp, Arc<PodInfo>)>,
}

impl InfoCache {
    /// The index for the pipeline: pod cgroup id → info. `pods`: this node's pod objects
    /// by UID; `paths`: pod cgroup id → its directory.
    pub(super) fn refresh(
        &mut self,
        desired: &[DesiredPod],
        pods: &HashMap<String, Arc<Pod>>,
        paths: &HashMap<u64, PathBuf>,
    ) -> HashMap<u64, Arc<PodInfo>> {
        let mut index = HashMap::with_capacity(desired.len());
        let mut kept = HashMap::with_capacity(desired.len());
        // Pods by (namespace, name), for ARC workflow pods' runners: only when one is here.
        let by_name: HashMap<(&str, &str), &Arc<Pod>> = if desired
            .iter()
            .any(|d| runner_of(&d.pod.labels).is_some())
        {
            pods.values()
                .filter_map(|p| Some(((p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?), p)))
                .collect()
        } else {
            HashMap::new()
        };
        for d in desired {
            let pod = pods.get(&d.pod.uid);
            let runner = runner_of(&d.pod.labels)
                .and_then(|name| by_name.get(&(d.pod.namespace.as_str(), name)).copied())
                .filter(|r| r.metadata.uid.as_deref() != Some(d.pod.uid.as_str()));
            let stamp = Stamp {
                resource_version: pod.and_then(|p| p.metadata.resource_version.clone()),
                status: d.status.clone(),
                cgroup_id: d.pod.cgroup_id,
                runner_version: runner.and_then(|r| r.metadata.resource_version.clone()),
            };
            let info = match self.by_uid.remove(&d.pod.uid) {
                Some((old, info)) if old == stamp => info,
                _ => Arc::new(build(d, pod, runner, paths.get(&d.pod.cgroup_id))),
            };
            index.insert(d.pod.cgroup_id, info.clone());
            kept.insert(d.pod.uid.clone(), (stamp, info));
        }
        // Pods that are gone are forgotten.
        self.by_uid = kept;
        index
    }
}

fn build(
    d: &DesiredPod,
    pod: Option<&Arc<Pod>>,
    runner: Option<&Arc<Pod>>,
    path: Option<&PathBuf>,
) -> PodInfo {
    let (policies, restriction) = match &d.status {
        Status::Enforced(policies) => (policies.clone(), None),
        Status::DefaultDeny => (
            Vec::new(),
            Some("no egress policy selects the pod and --default-deny-egress is set".into()),
        ),
        Status::FailedClosed {
            reason,
            kept_last_good,
        } => (
            Vec::new(),
            Some(format!(
                "failing closed ({reason}); {}",
                if *kept_last_good {
                    "the last good allowlist applies"
                } else {
                    "all egress is denied"
                }
            )),
        ),
        Status::RefusedPrivileged { reason } => (
            Vec::new(),
            Some(format!(
                "all egress is denied: the pod can step around the guard ({reason}) and --refuse-privileged is set"
            )),
        ),
        Status::Unrestricted | Status::NotGuarded => (Vec::new(), None),
    };
    let annotations = pod.map(|p| ci_annotations(p)).unwrap_or_default();
    let ci = match runner {
        // The runner's job, plus the workflow pod's own `runner_pod`.
        Some(runner) => CiContext::of(
            &with_runner(
                &d.pod.labels,
                runner.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            ),
            &with_runner(&annotations, &ci_annotations(runner)),
        ),
        None => CiContext::of(&d.pod.labels, &annotations),
    };
    PodInfo {
        namespace: d.pod.namespace.clone(),
        name: d.pod.name.clone(),
        uid: d.pod.uid.clone(),
        labels: d.pod.labels.clone(),
        annotations,
        owner: pod.and_then(|p| crate::baseline::workload::owner_of(p)),
        ci,
        policies,
        restriction,
        containers: match (pod, path) {
            (Some(pod), Some(path)) => container_cgroups(pod, path),
            _ => HashMap::new(),
        },
    }
}

/// Only the annotations enrichment reads (the cache keeps no others anyway).
fn ci_annotations(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| is_ci_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Container cgroup id → container name, from the pod cgroup's children (named after the
/// container id by every runtime) and the pod's container statuses.
fn container_cgroups(pod: &Pod, dir: &Path) -> HashMap<u64, String> {
    let names: Vec<(String, String)> = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter_map(|c| {
            let id = c.container_id.as_deref()?.split("://").nth(1)?.to_string();
            Some((id, c.name.clone()))
        })
        .collect();
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(id) = crate::cgroup::cgroup_id(&entry.path()) else {
            continue;
        };
        let dirname = entry.file_name().to_string_lossy().into_owned();
        let name = names
            .iter()
            .find(|(cid, _)| dirname.contains(cid.as_str()))
            .map(|(_, n)| n.clone())
            .unwrap_or(dirname);
        out.insert(id, name);
    }
    out
}
