//! Actions Runner Controller's container mode `kubernetes`: the job's containers run in a
//! separate "workflow" pod labelled `runner-pod=<runner pod name>`. pipeguard guards it as
//! its runner pod: policies, the guard selector and CI context see the workflow pod as if
//! it also carried its runner pod's labels (its own win where both set a key), and its
//! events carry the runner's CI context. The runner pod must be on the same node (ARC's
//! hook pins the workflow pod there unless the kube scheduler is asked to place it); a
//! workflow pod whose runner is elsewhere is guarded by its own labels only.

use std::{borrow::Cow, collections::BTreeMap};

/// The label ARC sets on a workflow pod: the name of its runner pod (same namespace).
pub const RUNNER_POD_LABEL: &str = "runner-pod";

/// The runner pod a workflow pod names, if it is one.
pub fn runner_of(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels.get(RUNNER_POD_LABEL).map(String::as_str)
}

/// `own` with the runner's entries it lacks.
pub fn with_runner(
    own: &BTreeMap<String, String>,
    runner: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = runner.clone();
    out.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// The pod as policies select it: a workflow pod with its local runner pod's labels added.
pub fn as_selected<'a>(
    pod: &'a crate::pod::LocalPod,
    local: &[crate::pod::LocalPod],
) -> Cow<'a, crate::pod::LocalPod> {
    let Some(runner) = runner_of(&pod.labels).and_then(|name| {
        local
            .iter()
            .find(|p| p.namespace == pod.namespace && p.name == name && p.uid != pod.uid)
    }) else {
        return Cow::Borrowed(pod);
    };
    let mut selected = pod.clone();
    selected.labels = with_runner(&pod.labels, &runner.labels);
    Cow::Owned(selected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::LocalPod;

    fn pod(name: &str, labels: &[(&str, &str)]) -> LocalPod {
        LocalPod {
            uid: format!("uid-{name}"),
            namespace: "ci".into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cgroup_id: 1,
            escape: None,
        }
    }

    #[test]
    fn a_workflow_pod_is_selected_with_its_runner_pods_labels() {
        let runner = pod("runner-x", &[("app", "runner"), ("team", "build")]);
        let workflow = pod(
            "runner-x-workflow",
            &[("runner-pod", "runner-x"), ("team", "own")],
        );
        let orphan = pod("w2", &[("runner-pod", "gone")]);
        let local = [runner.clone(), workflow.clone(), orphan.clone()];
        let selected = as_selected(&workflow, &local);
        assert_eq!(selected.labels["app"], "runner");
        assert_eq!(selected.labels["team"], "own", "its own labels win");
        assert_eq!(selected.labels["runner-pod"], "runner-x");
        assert_eq!(as_selected(&orphan, &local).labels, orphan.labels);
        assert_eq!(as_selected(&runner, &local).labels, runner.labels);
        let elsewhere = LocalPod {
            namespace: "other".into(),
            ..workflow.clone()
        };
        assert_eq!(
            as_selected(&elsewhere, &local).labels,
            workflow.labels,
            "the runner is looked up in the workflow pod's namespace only"
        );
    }
}
