//! Which pods the agent guards: pods on this node in the guarded namespaces, matching the
//! guard selector, or recognized as CI runner pods by their labels.

use std::collections::BTreeMap;

use crate::policy::Selector;

/// Label keys that mark CI runner pods, with the system that sets them.
pub const RUNNER_LABELS: [(&str, &str); 6] = [
    (
        "actions.github.com/scale-set-name",
        "Actions Runner Controller (runner scale sets)",
    ),
    (
        "runner-deployment-name",
        "Actions Runner Controller (legacy RunnerDeployment)",
    ),
    // Container mode `kubernetes`: the job's containers run in a separate workflow pod
    // that names its runner pod in this label. (GitLab service containers and Tekton
    // sidecars are containers of the guarded pod itself: its cgroup covers them.)
    (
        "runner-pod",
        "Actions Runner Controller (container mode kubernetes workflow pods)",
    ),
    // The job id is an annotation; the project id is a label on every job pod.
    (
        "project.runner.gitlab.com/id",
        "GitLab Runner (Kubernetes executor job pods)",
    ),
    ("tekton.dev/taskRun", "Tekton (TaskRun pods)"),
    ("tekton.dev/pipelineRun", "Tekton (PipelineRun pods)"),
];

#[derive(Clone, Debug, Default)]
pub struct GuardConfig {
    pub namespaces: Vec<String>,
    /// `key=value` and `key` terms, all of which must hold.
    pub selector: Option<Selector>,
    /// Recognize runner pods by `RUNNER_LABELS`.
    pub runner_labels: bool,
}

impl GuardConfig {
    pub fn is_guarded(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespaces.iter().any(|n| n == namespace)
            || self.selector.as_ref().is_some_and(|s| s.matches(labels))
            || (self.runner_labels && RUNNER_LABELS.iter().any(|(k, _)| labels.contains_key(*k)))
    }
}

/// Parses `a=b,c` (equality and existence terms; `!=` and set operators are refused rather
/// than misread).
/// Parses `a=b,c` (equality and existence terms; `!=` and set operators are refused
/// rather than misread, and so is a key given twice).
pub fn parse_selector(text: &str) -> Result<Selector, String> {
    let mut terms: Vec<(String, Option<String>)> = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if term.contains("!=") || term.contains(" in ") || term.contains(" notin ") || term.starts_with('!') {
            return Err(format!(
                "unsupported selector term {term:?}: use key=value or key"
            ));
        }
        let (key, value) = match term.split_once('=') {
            Some((k, v)) => (
                k.trim().to_string(),
                Some(v.trim_start_matches('=').trim().to_string()),
            ),
            None => (term.to_string(), None),
        };
        if terms.iter().any(|(k, _)| *k == key) {
            return Err(format!("selector key {key:?} is given twice"));
        }
        terms.push((key, value));
    }
    Ok(Selector::from_terms(&terms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespaces_selector_and_runner_labels() {
        let g = GuardConfig {
            namespaces: vec!["ci".into()],
            selector: Some(parse_selector("team=build,guarded").unwrap()),
            runner_labels: true,
        };
        assert!(g.is_guarded("ci", &labels(&[])));
        assert!(g.is_guarded("x", &labels(&[("team", "build"), ("guarded", "")])));
        assert!(
            !g.is_guarded("x", &labels(&[("team", "build")])),
            "every term must hold"
        );
        assert!(g.is_guarded("x", &labels(&[("tekton.dev/taskRun", "build-1")])));
        assert!(g.is_guarded("x", &labels(&[("actions.github.com/scale-set-name", "linux")])));
        assert!(
            g.is_guarded("x", &labels(&[("runner-pod", "linux-abc-runner-xyz")])),
            "an ARC workflow pod is a runner too"
        );
        assert!(!g.is_guarded("x", &labels(&[("app", "web")])));
        let off = GuardConfig {
            runner_labels: false,
            ..GuardConfig::default()
        };
        assert!(!off.is_guarded("x", &labels(&[("tekton.dev/taskRun", "b")])));
    }

    #[test]
    fn selector_parsing_refuses_what_it_cannot_honour() {
        let s = parse_selector("a=b, c").unwrap();
        assert!(s.matches(&labels(&[("a", "b"), ("c", "")])));
        assert!(!s.matches(&labels(&[("a", "b")])), "c must exist");
        assert!(!s.matches(&labels(&[("a", "x"), ("c", "")])));
        assert!(parse_selector("a==b").unwrap().matches(&labels(&[("a", "b")])));
        assert!(parse_selector("a!=b").is_err());
        assert!(parse_selector("env in (a,b)").is_err());
        assert!(parse_selector("!a").is_err());
        assert!(parse_selector("a=b,a=c").is_err(), "a key given twice");
    }
}
