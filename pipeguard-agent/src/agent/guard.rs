//! Which pods the agent guards: pods on this node in the guarded namespaces, matching the
//! guard selector, or recognized as CI runner pods by their labels.

use std::collections::BTreeMap;

/// Label keys that mark CI runner pods, with the system that sets them.
pub const RUNNER_LABELS: [(&str, &str); 5] = [
    (
        "actions.github.com/scale-set-name",
        "Actions Runner Controller (runner scale sets)",
    ),
    (
        "runner-deployment-name",
        "Actions Runner Controller (legacy RunnerDeployment)",
    ),
    (
        "job.runner.gitlab.com/id",
        "GitLab Runner (Kubernetes executor job pods)",
    ),
    ("tekton.dev/taskRun", "Tekton (TaskRun pods)"),
    ("tekton.dev/pipelineRun", "Tekton (PipelineRun pods)"),
];

#[derive(Clone, Debug, Default)]
pub struct GuardConfig {
    pub namespaces: Vec<String>,
    /// `key=value` and `key` terms, all of which must hold (a simple equality selector).
    pub selector: Option<Vec<(String, Option<String>)>>,
    /// Recognize runner pods by `RUNNER_LABELS`.
    pub runner_labels: bool,
}

impl GuardConfig {
    pub fn is_guarded(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespaces.iter().any(|n| n == namespace)
            || self.selector.as_ref().is_some_and(|terms| {
                terms.iter().all(|(k, v)| match v {
                    Some(v) => labels.get(k) == Some(v),
                    None => labels.contains_key(k),
                })
            })
            || (self.runner_labels && RUNNER_LABELS.iter().any(|(k, _)| labels.contains_key(*k)))
    }
}

/// Parses `a=b,c` (equality and existence terms; `!=` and set operators are refused rather
/// than misread).
pub fn parse_selector(text: &str) -> Result<Vec<(String, Option<String>)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|term| {
            if term.contains("!=")
                || term.contains(" in ")
                || term.contains(" notin ")
                || term.starts_with('!')
            {
                return Err(format!(
                    "unsupported selector term {term:?}: use key=value or key"
                ));
            }
            Ok(match term.split_once('=') {
                Some((k, v)) => (
                    k.trim_end_matches('=').trim().to_string(),
                    Some(v.trim_start_matches('=').trim().to_string()),
                ),
                None => (term.to_string(), None),
            })
        })
        .collect()
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
        assert!(!g.is_guarded("x", &labels(&[("app", "web")])));
        let off = GuardConfig {
            runner_labels: false,
            ..GuardConfig::default()
        };
        assert!(!off.is_guarded("x", &labels(&[("tekton.dev/taskRun", "b")])));
    }

    #[test]
    fn selector_parsing_refuses_what_it_cannot_honour() {
        assert_eq!(
            parse_selector("a=b, c").unwrap(),
            vec![("a".into(), Some("b".into())), ("c".into(), None)]
        );
        assert_eq!(
            parse_selector("a==b").unwrap(),
            vec![("a".into(), Some("b".into()))]
        );
        assert!(parse_selector("a!=b").is_err());
        assert!(parse_selector("env in (a,b)").is_err());
        assert!(parse_selector("!a").is_err());
    }
}
