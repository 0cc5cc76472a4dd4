//! A CI workload: what stays the same across the runs of one job, read from the labels and
//! annotations its runner system puts on the pod.

use std::collections::BTreeMap;

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

/// Without CI labels: the owner as its labels name it. The agent's pod cache drops owner
/// references (memory at 50,000 pods), so these labels stand in for them.
const OWNER_LABELS: [&str; 4] = [
    "actions.github.com/scale-set-name",
    "tekton.dev/task",
    "app.kubernetes.io/name",
    "app",
];

impl Workload {
    /// The workload of a pod; `name` is the pod's name, the last resort (without the suffix
    /// its controller generated).
    pub fn of(labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>, name: &str) -> Self {
        let get = |key: &str| labels.get(key).or_else(|| annotations.get(key));
        for (system, keys) in SYSTEMS {
            if get(keys[0]).is_none() {
                continue;
            }
            let parts: Vec<&str> = keys.iter().filter_map(|k| get(k)).map(String::as_str).collect();
            return Self(format!("{system}:{}", parts.join("/")));
        }
        for key in OWNER_LABELS {
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
            "release-run-1-build-pod",
        );
        assert_eq!(tekton.0, "tekton:release/build");
        assert_eq!(Workload::of(&map(&[("app", "web")]), &none, "web-1").0, "app=web");
        assert_eq!(
            Workload::of(
                &map(&[("job-name", "nightly-28391234")]),
                &none,
                "nightly-28391234-x9k2m"
            )
            .0,
            "job:nightly"
        );
        assert_eq!(Workload::of(&none, &none, "build-x9k2m").0, "pod:build");
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
