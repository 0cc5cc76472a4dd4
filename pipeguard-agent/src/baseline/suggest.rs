//! The suggested policies of a namespace's workloads from their merged runs: the same
//! merge as `suggest --from` (`learn::suggest`), one policy per workload.

use std::collections::BTreeMap;

use super::{AgentRun, Workload};
use crate::learn::{Run, suggest::suggest_named};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadSuggestError {
    #[error("no runs recorded for workload {0:?} in this namespace")]
    UnknownWorkload(String),
    #[error("no runs recorded in this namespace")]
    Empty,
}

/// `---`-separated policies, each preceded by `# workload: W`. `min_runs` defaults to all
/// runs of each workload; a workload with fewer runs than `min_runs` gets a comment saying
/// so instead of a policy.
pub fn render(
    merged: &BTreeMap<String, Vec<AgentRun>>,
    workload: Option<&str>,
    min_runs: Option<usize>,
) -> Result<String, WorkloadSuggestError> {
    let chosen: Vec<(&String, &Vec<AgentRun>)> = match workload {
        Some(w) => vec![
            merged
                .get_key_value(w)
                .ok_or_else(|| WorkloadSuggestError::UnknownWorkload(w.to_string()))?,
        ],
        None => merged.iter().collect(),
    };
    if chosen.is_empty() {
        return Err(WorkloadSuggestError::Empty);
    }
    let mut docs = Vec::new();
    for (name, runs) in chosen {
        let runs: Vec<Run> = runs.iter().map(|r| r.run.clone()).collect();
        let min = min_runs.unwrap_or(runs.len());
        let policy_name = Workload(name.clone()).policy_name();
        let text = match suggest_named(&runs, min, &policy_name) {
            Ok(s) => s.policy,
            Err(e) => format!("# no policy: {e}\n"),
        };
        docs.push(format!("# workload: {name} ({} runs)\n{text}", runs.len()));
    }
    Ok(docs.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::object::{BaselineSpec, merge, tests::run};

    #[test]
    fn runs_of_two_nodes_make_one_policy_per_workload() {
        let node = |n: &str, runs| BaselineSpec {
            workload: "gitlab:app/test".into(),
            node: n.into(),
            runs,
        };
        let merged = merge(&[
            node(
                "a",
                vec![run("p1", "t1", &[("10.0.0.1", 443, 10), ("10.0.0.2", 80, 1)])],
            ),
            node("b", vec![run("p2", "t2", &[("10.0.0.1", 443, 20)])]),
        ]);
        let text = render(&merged, Some("gitlab:app/test"), None).unwrap();
        assert!(
            text.starts_with("# workload: gitlab:app/test (2 runs)\n"),
            "{text}"
        );
        assert!(
            text.contains("10.0.0.1/32") && text.contains("seen in 2 of 2 runs"),
            "{text}"
        );
        assert!(
            text.contains("unstable, left out: 10.0.0.2:80/tcp (seen in 1 of 2 runs)"),
            "{text}"
        );
        assert!(text.contains("name: \"pipeguard-gitlab-app-test-"), "{text}");
        assert!(
            text.contains("matchLabels") && text.contains("\"app\": \"runner\"") && !text.contains("\"run\""),
            "{text}"
        );
        let policies = crate::policy::parse_policies("s.yaml", &text);
        assert!(policies.errors.is_empty(), "{:?}", policies.errors);
        let loose = render(&merged, None, Some(1)).unwrap();
        assert!(loose.contains("10.0.0.2/32"), "{loose}");
        assert!(
            render(&merged, None, Some(3))
                .unwrap()
                .contains("# no policy: --min-runs 3")
        );
        assert_eq!(
            render(&merged, Some("tekton:x/y"), None),
            Err(WorkloadSuggestError::UnknownWorkload("tekton:x/y".into()))
        );
        assert_eq!(
            render(&BTreeMap::new(), None, None),
            Err(WorkloadSuggestError::Empty)
        );
    }
}
