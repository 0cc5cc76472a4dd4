//! A CI workload: what stays the same across the runs of one job, read from the labels and
//! annotations its runner system puts on the pod, else from the pod's controlling owner.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// The job's identity, e.g. `github:org/app/ci.yml/build`, `gitlab:group/app/test`,
/// `tekton:release/build`, `app:web`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload(pub String);

/// (system, keys joined with `/`). The first system whose first key the pod has wins.
const SYSTEMS: [(&str, &[&str]); 3] = [
    (
        "github",
        &[
            "actions.github.com/repository",
            "actions.github.com/workflow",
            "actions.github.com/job",
        ],
    ),
    (
        "gitlab",
        &["project.runner.gitlab.com/name", "job.runner.gitlab.com/name"],
    ),
    ("tekton", &["tekton.dev/pipeline", "tekton.dev/pipelineTask"]),
];

/// Without the job's labels, the runner's: ahead of the owner, which is a per-run object
/// for these systems (an EphemeralRunner, a TaskRun).
const RUNNER_LABELS: [&str; 2] = ["actions.github.com/scale-set-name", "tekton.dev/task"];

/// A pod without a controlling owner (a bare pod): its application labels.
const APP_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];

/// Longest owner kind and name kept (an API kind is a short identifier, a name a DNS
/// subdomain); anything longer is not an owner worth a workload and is dropped.
const MAX_KIND: usize = 63;
const MAX_NAME: usize = 253;

/// How long after its scheduled minute a CronJob's Job may still start a pod (retries,
/// a late controller) for the name's suffix to count as that minute.
const CRONJOB_LATE: i64 = 7 * 24 * 3600;
/// Clock skew allowed between the CronJob controller and the API server.
const CRONJOB_EARLY: i64 = 300;

impl Workload {
    /// The workload of a pod; `owner` is its controlling owner as [`owner_of`] names it,
    /// `name` the pod's name, the last resort (without the suffix its controller generated).
    pub fn of(
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
        owner: Option<&str>,
        name: &str,
    ) -> Self {
        let get = |key: &str| labels.get(key).or_else(|| annotations.get(key));
        for (system, keys) in SYSTEMS {
            if get(keys[0]).is_none() {
                continue;
            }
            let parts: Vec<&str> = keys.iter().filter_map(|k| get(k)).map(String::as_str).collect();
            return Self(format!("{system}:{}", parts.join("/")));
        }
        for key in RUNNER_LABELS {
            if let Some(value) = get(key) {
                return Self(format!("{key}={value}"));
            }
        }
        if let Some(owner) = owner {
            return Self(owner.to_string());
        }
        for key in APP_LABELS {
            if let Some(value) = get(key) {
                return Self(format!("{key}={value}"));
            }
        }
        if let Some(job) = labels.get("job-name") {
            // A CronJob's Job is `<cronjob>-<schedule time>`: the CronJob is the workload.
            return Self(format!(
                "job:{}",
                strip_suffix(job, |s| s.chars().all(|c| c.is_ascii_digit()))
            ));
        }
        Self(format!("pod:{}", strip_suffix(name, |s| s.len() == 5)))
    }

    /// The object name for this workload on `node`: readable, unique by a hash of both, and
    /// a valid DNS subdomain (at most 253 characters).
    pub fn object_name(&self, node: &str) -> String {
        let hash = fnv1a(format!("{}\0{node}", self.0).as_bytes());
        format!("{}-{}-{hash:016x}", slug(&self.0, 80), slug(node, 80))
    }

    /// The suggested policy's name (a valid DNS label, at most 63 characters).
    pub fn policy_name(&self) -> String {
        let hash = fnv1a(self.0.as_bytes()) as u32;
        format!("pipeguard-{}-{hash:08x}", slug(&self.0, 34))
    }
}

/// The pod's controlling owner as a workload, `Kind/name`, from the one owner reference the
/// agent keeps (`agent::kube` drops the others). A Deployment's ReplicaSet and a CronJob's
/// Job are per-rollout and per-run objects: their owner is the workload.
pub fn owner_of(pod: &Pod) -> Option<String> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))?;
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second());
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    owner_identity(&owner.kind, &owner.name, &labels, created)
}

/// `Kind/name` of a controlling owner; `created` is the pod's creation time (Unix seconds).
pub fn owner_identity(
    kind: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    created: Option<i64>,
) -> Option<String> {
    if kind.is_empty() || name.is_empty() || kind.len() > MAX_KIND || name.len() > MAX_NAME {
        return None;
    }
    match kind {
        // A static pod's mirror: the node is no workload.
        "Node" => None,
        // The Deployment controller names its ReplicaSets `<deployment>-<pod-template-hash>`
        // and labels their pods with the hash: each rollout is a new ReplicaSet.
        "ReplicaSet" => Some(
            match labels
                .get("pod-template-hash")
                .and_then(|hash| name.strip_suffix(hash.as_str())?.strip_suffix('-'))
                .filter(|d| !d.is_empty())
            {
                Some(deployment) => format!("Deployment/{deployment}"),
                None => format!("ReplicaSet/{name}"),
            },
        ),
        "Job" => Some(match cronjob_of(name, created) {
            Some(cronjob) => format!("CronJob/{cronjob}"),
            None => format!("Job/{name}"),
        }),
        _ => Some(format!("{kind}/{name}")),
    }
}

/// The CronJob that created the Job `name`, when the name says so. The CronJob controller
/// names a Job `<cronjob>-<scheduled time in minutes since the epoch>`; any Job may end in
/// digits (`migrate-2`), so the suffix counts only when it is the minute the pod could
/// have been scheduled in: at most `CRONJOB_LATE` before the pod was created. Without a
/// creation time nothing is stripped (`Job/<name>`, one workload per run, rather than two
/// unrelated Jobs merged into one baseline).
fn cronjob_of(name: &str, created: Option<i64>) -> Option<&str> {
    let (cronjob, suffix) = name.rsplit_once('-')?;
    if cronjob.is_empty() || suffix.is_empty() || !suffix.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let scheduled = suffix.parse::<i64>().ok()?.checked_mul(60)?;
    let late = created?.checked_sub(scheduled)?;
    (-CRONJOB_EARLY..=CRONJOB_LATE).contains(&late).then_some(cronjob)
}

/// `name` without its last `-part` when `generated(part)`.
fn strip_suffix(name: &str, generated: impl Fn(&str) -> bool) -> &str {
    match name.rsplit_once('-') {
        Some((head, tail)) if !head.is_empty() && !tail.is_empty() && generated(tail) => head,
        _ => name,
    }
}

/// Lowercase alphanumerics and dashes, at most `max` characters, never starting or ending
/// with a dash.
fn slug(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
        if out.len() >= max {
            break;
        }
    }
    let trimmed = out.trim_matches('-');
    if trimmed.is_empty() {
        "x".into()
    } else {
        trimmed.into()
    }
}

/// FNV-1a: stable across builds and Rust versions (the std hasher is not), so every agent
/// names an object the same way.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_runner_system_names_its_job() {
        let none = BTreeMap::new();
        let arc = Workload::of(
            &map(&[("actions.github.com/scale-set-name", "linux")]),
            &map(&[
                ("actions.github.com/repository", "org/app"),
                ("actions.github.com/workflow", "ci.yml"),
                ("actions.github.com/job", "build"),
            ]),
            None,
            "linux-x7k2p-runner-9qz4m",
        );
        assert_eq!(arc.0, "github:org/app/ci.yml/build");
        let gitlab = Workload::of(
            &map(&[
                ("project.runner.gitlab.com/name", "app"),
                ("job.runner.gitlab.com/name", "test"),
                ("job.runner.gitlab.com/id", "42"),
            ]),
            &none,
            None,
            "runner-abc-project-7-concurrent-0",
        );
        assert_eq!(gitlab.0, "gitlab:app/test", "the job id differs per run");
        let tekton = Workload::of(
            &map(&[
                ("tekton.dev/pipeline", "release"),
                ("tekton.dev/pipelineTask", "build"),
                ("tekton.dev/taskRun", "release-run-1-build"),
            ]),
            &none,
            None,
            "release-run-1-build-pod",
        );
        assert_eq!(tekton.0, "tekton:release/build");
        assert_eq!(
            Workload::of(&map(&[("app", "web")]), &none, None, "web-1").0,
            "app=web"
        );
        assert_eq!(
            Workload::of(
                &map(&[("job-name", "nightly-28391234")]),
                &none,
                None,
                "nightly-28391234-x9k2m"
            )
            .0,
            "job:nightly"
        );
        assert_eq!(Workload::of(&none, &none, None, "build-x9k2m").0, "pod:build");
    }

    #[test]
    fn without_ci_labels_the_controlling_owner_is_the_workload() {
        let none = BTreeMap::new();
        let web = map(&[("app", "web"), ("pod-template-hash", "5d8f7c6b9")]);
        assert_eq!(
            Workload::of(&web, &none, Some("Deployment/web"), "web-5d8f7c6b9-x9k2m").0,
            "Deployment/web",
            "the owner ahead of the app label"
        );
        // The job's and the runner's labels stay ahead of the owner (a per-run object).
        let arc = map(&[("actions.github.com/scale-set-name", "linux")]);
        assert_eq!(
            Workload::of(&arc, &none, Some("EphemeralRunner/linux-x7k2p-runner-9qz4m"), "p").0,
            "actions.github.com/scale-set-name=linux"
        );
        let tekton = map(&[
            ("tekton.dev/pipeline", "release"),
            ("tekton.dev/pipelineTask", "build"),
        ]);
        assert_eq!(
            Workload::of(&tekton, &none, Some("TaskRun/release-run-1-build"), "p").0,
            "tekton:release/build"
        );
    }

    #[test]
    fn per_rollout_and_per_run_owners_name_their_owner() {
        let hash = map(&[("pod-template-hash", "5d8f7c6b9")]);
        let none = BTreeMap::new();
        let id = owner_identity;
        let long_kind = "K".repeat(64);
        type Labels = BTreeMap<String, String>;
        // (kind, name, pod labels, workload)
        let cases: [(&str, &str, &Labels, Option<&str>); 8] = [
            ("ReplicaSet", "web-5d8f7c6b9", &hash, Some("Deployment/web")),
            // Not the Deployment controller's naming: the ReplicaSet itself.
            ("ReplicaSet", "web", &none, Some("ReplicaSet/web")),
            ("ReplicaSet", "web-1234", &hash, Some("ReplicaSet/web-1234")),
            ("ReplicaSet", "5d8f7c6b9", &hash, Some("ReplicaSet/5d8f7c6b9")),
            ("StatefulSet", "db", &none, Some("StatefulSet/db")),
            // A static pod's mirror.
            ("Node", "node-a", &none, None),
            ("Job", "", &none, None),
            (&long_kind, "x", &none, None),
        ];
        for (kind, name, labels, want) in cases {
            assert_eq!(id(kind, name, labels, None).as_deref(), want, "{kind}/{name}");
        }

        // 2025-12-04T12:00:00Z is minute 29_414_160 of the epoch.
        let scheduled: i64 = 29_414_160 * 60;
        let nightly = "nightly-29414160";
        assert_eq!(
            id("Job", nightly, &none, Some(scheduled + 5)).as_deref(),
            Some("CronJob/nightly"),
            "a pod created just after its Job's scheduled minute"
        );
        assert_eq!(
            id("Job", nightly, &none, Some(scheduled + 3 * 24 * 3600)).as_deref(),
            Some("CronJob/nightly"),
            "a retry days later"
        );
        for created in [None, Some(scheduled - 3600), Some(scheduled + 30 * 24 * 3600)] {
            assert_eq!(
                id("Job", nightly, &none, created).as_deref(),
                Some("Job/nightly-29414160"),
                "{created:?}: not its scheduled minute"
            );
        }
        assert_eq!(
            id("Job", "migrate-2", &none, Some(scheduled)).as_deref(),
            Some("Job/migrate-2"),
            "a hand-made Job ending in digits is no CronJob's"
        );
        assert_eq!(
            id("Job", "-29414160", &none, Some(scheduled)).as_deref(),
            Some("Job/-29414160")
        );
    }

    #[test]
    fn only_the_controlling_owner_counts() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-5d8f7c6b9-x9k2m",
                "labels": {"pod-template-hash": "5d8f7c6b9"},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "u1"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f7c6b9",
                     "uid": "u2", "controller": true}
                ]
            }
        }))
        .unwrap();
        assert_eq!(owner_of(&pod).as_deref(), Some("Deployment/web"));
        let bare: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "b", "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "u1"}
            ]}
        }))
        .unwrap();
        assert_eq!(owner_of(&bare), None, "no controller: a bare pod");
    }

    #[test]
    fn names_are_valid_and_differ_per_node() {
        let w = Workload("github:Org/App/ci.yml/build".into());
        let a = w.object_name("node-a");
        assert_ne!(a, w.object_name("node-b"));
        assert!(
            a.len() <= 253 && a.starts_with("github-org-app-ci-yml-build-node-a-"),
            "{a}"
        );
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        let long = Workload("x".repeat(1000));
        assert!(long.object_name(&"n".repeat(300)).len() <= 253);
        let p = long.policy_name();
        assert!(p.len() <= 63 && !p.ends_with('-'), "{p}");
    }
}
