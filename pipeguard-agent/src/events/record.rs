//! The violation record users see: the kernel event, aggregated and enriched with the pod,
//! the CI job, the process and the policy. Field names are a stable interface.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::escape::printable;

/// What the stream carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Denied (or audited) attempts: `count` identical ones between first and last seen.
    Violation,
    /// Kernel events lost because the ring buffer was full: `count` of them.
    Drops,
    /// Something unusual (`signal`, explained in `reason`; see `events::anomaly`).
    Anomaly,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub kind: Kind,
    /// For anomalies: deny_burst, upload_volume, new_destination or dns_tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// For dns_tunnel anomalies: the base domain the queries went under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// RFC 3339, the last attempt this record stands for.
    pub time: String,
    pub first_seen: String,
    pub last_seen: String,
    /// How many attempts this record stands for.
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    /// The DNS name the destination was learned from (see `Violation::dst_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
    /// For hook `dns`: the question name; the resolver is the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// For hook `dns`: the question type (`A`, `AAAA`, `TXT`, ... or its number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    /// For hook `dns`: the query could not be parsed and was refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub malformed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// The executable, when the process was still there to ask.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The egress policies that select the pod ("ns/name").
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub policies: Vec<String>,
    /// Why nothing allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci: Option<CiContext>,
    pub cgroup_id: u64,
}

impl Record {
    /// `count` events the kernel could not deliver, as one record.
    pub fn drops(time: String, count: u64, node: String, reason: Option<String>) -> Self {
        Self {
            kind: Kind::Drops,
            signal: None,
            domain: None,
            time: time.clone(),
            first_seen: time.clone(),
            last_seen: time,
            count,
            verdict: None,
            hook: None,
            protocol: None,
            dst_ip: None,
            dst_port: None,
            dst_name: None,
            query: None,
            qtype: None,
            malformed: false,
            pid: None,
            comm: None,
            exe: None,
            node,
            pod: None,
            policies: Vec::new(),
            reason,
            ci: None,
            cgroup_id: 0,
        }
    }

    pub fn is_dns_query(&self) -> bool {
        self.hook.as_deref() == Some("dns")
    }

    /// `203.0.113.7:443/tcp (exfil.example.net)`: the address, and the name it was learned
    /// from when there is one. Escaped for people.
    pub fn destination_text(&self) -> Option<String> {
        let (ip, port) = (self.dst_ip?, self.dst_port?);
        let protocol = printable(self.protocol.as_deref().unwrap_or_default()).into_owned();
        Some(match &self.dst_name {
            Some(name) => format!("{ip}:{port}/{protocol} ({})", printable(name)),
            None => format!("{ip}:{port}/{protocol}"),
        })
    }

    /// For a DNS query event: `secret.exfil.test (A)`, or why there is no name. Escaped.
    pub fn question_text(&self) -> Option<String> {
        if !self.is_dns_query() {
            return None;
        }
        let name = self.query.as_deref().map(printable);
        let qtype = printable(self.qtype.as_deref().unwrap_or("?")).into_owned();
        Some(match (name, self.malformed) {
            (Some(name), false) => format!("{name} ({qtype})"),
            (Some(name), true) => format!("{name} (malformed)"),
            (None, _) => "(malformed query)".to_string(),
        })
    }

    /// `DNS query refused: secret.exfil.test (A) → 10.96.0.10:53`, or the destination
    /// (`destination_text`) for any other attempt.
    pub fn target_text(&self) -> Option<String> {
        let Some(question) = self.question_text() else {
            return self.destination_text();
        };
        let refused = if self.verdict.as_deref() == Some("audit") {
            "would be refused"
        } else {
            "refused"
        };
        let resolver = match (self.dst_ip, self.dst_port) {
            (Some(ip), Some(port)) => format!(" → {ip}:{port}"),
            _ => String::new(),
        };
        Some(format!("DNS query {refused}: {question}{resolver}"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// The CI job behind a runner pod, from the labels and annotations its system sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiContext {
    /// actions-runner-controller, gitlab-runner or tekton.
    pub system: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub fields: BTreeMap<String, String>,
}

/// (system, output field, label or annotation key). Keys absent from a pod are skipped.
const CI_KEYS: [(&str, &str, &str); 13] = [
    (
        "actions-runner-controller",
        "scale_set",
        "actions.github.com/scale-set-name",
    ),
    (
        "actions-runner-controller",
        "repository",
        "actions.github.com/repository",
    ),
    (
        "actions-runner-controller",
        "organization",
        "actions.github.com/organization",
    ),
    (
        "actions-runner-controller",
        "workflow",
        "actions.github.com/workflow",
    ),
    ("actions-runner-controller", "job", "actions.github.com/job"),
    // An ARC workflow pod (container mode kubernetes) names the runner pod it runs for.
    ("actions-runner-controller", "runner_pod", "runner-pod"),
    ("gitlab-runner", "project", "project.runner.gitlab.com/name"),
    ("gitlab-runner", "project_id", "project.runner.gitlab.com/id"),
    ("gitlab-runner", "job_id", "job.runner.gitlab.com/id"),
    ("gitlab-runner", "pipeline_id", "pipeline.runner.gitlab.com/id"),
    ("tekton", "pipeline_run", "tekton.dev/pipelineRun"),
    ("tekton", "task_run", "tekton.dev/taskRun"),
    ("tekton", "pipeline", "tekton.dev/pipeline"),
];

/// Whether a label or annotation key is one `CiContext` reads (the pod cache keeps only
/// these annotations).
pub fn is_ci_key(key: &str) -> bool {
    CI_KEYS.iter().any(|(_, _, k)| *k == key)
}

impl CiContext {
    pub fn of(labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>) -> Option<Self> {
        let mut ctx: Option<Self> = None;
        for (system, field, key) in CI_KEYS {
            let Some(value) = labels.get(key).or_else(|| annotations.get(key)) else {
                continue;
            };
            let ctx = ctx.get_or_insert_with(|| Self {
                system: system.into(),
                fields: BTreeMap::new(),
            });
            if ctx.system == system {
                ctx.fields.insert(field.into(), value.clone());
            }
        }
        ctx
    }
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
    fn ci_context_for_each_runner_system() {
        let arc = CiContext::of(
            &map(&[("actions.github.com/scale-set-name", "linux")]),
            &map(&[
                ("actions.github.com/repository", "org/app"),
                ("actions.github.com/workflow", "ci.yml"),
            ]),
        )
        .unwrap();
        assert_eq!(arc.system, "actions-runner-controller");
        assert_eq!(arc.fields["repository"], "org/app");
        assert_eq!(arc.fields["workflow"], "ci.yml");
        let gitlab = CiContext::of(
            &map(&[
                ("job.runner.gitlab.com/id", "42"),
                ("project.runner.gitlab.com/id", "7"),
            ]),
            &map(&[]),
        )
        .unwrap();
        assert_eq!(
            (gitlab.system.as_str(), gitlab.fields["job_id"].as_str()),
            ("gitlab-runner", "42")
        );
        let tekton = CiContext::of(
            &map(&[
                ("tekton.dev/taskRun", "build-x"),
                ("tekton.dev/pipelineRun", "run-1"),
            ]),
            &map(&[]),
        )
        .unwrap();
        assert_eq!(tekton.fields["task_run"], "build-x");
        assert_eq!(tekton.fields["pipeline_run"], "run-1");
        assert_eq!(CiContext::of(&map(&[("app", "web")]), &map(&[])), None);
        let workflow = CiContext::of(&map(&[("runner-pod", "linux-x7k2p-runner-9qz")]), &map(&[])).unwrap();
        assert_eq!(
            (workflow.system.as_str(), workflow.fields["runner_pod"].as_str()),
            ("actions-runner-controller", "linux-x7k2p-runner-9qz")
        );
    }
}
