//! `pipeguard suggest --from RUN.json...`: several runs of one job → one policy. A
//! destination reached in fewer than `min_runs` runs is left out and listed as unstable.

use std::collections::BTreeMap;

use super::{
    POLICY_NAME,
    observe::{Observed, Run},
    render,
};

/// A destination as runs are merged on it: the name when the job resolved one (addresses
/// behind a name change between runs), else the address; then port and protocol.
type Key = (String, u16, String);

fn key(o: &Observed) -> Key {
    let peer = o.name.clone().unwrap_or_else(|| o.ip.to_string());
    (peer, o.port, o.protocol.clone())
}

#[derive(Debug, PartialEq, Eq)]
pub struct Suggestion {
    /// The policy YAML (NetworkPolicy, and DomainPolicy for names).
    pub policy: String,
    /// Left out: `peer:port/protocol`, seen in this many runs.
    pub unstable: Vec<(String, usize)>,
    pub runs: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuggestError {
    #[error("no runs to merge")]
    NoRuns,
    #[error("--min-runs {min_runs} is more than the {runs} runs given")]
    TooFewRuns { min_runs: usize, runs: usize },
    #[error(
        "run {index} is another job: namespace {namespace:?} and labels {labels:?}, the first run has {first_namespace:?} and {first_labels:?}"
    )]
    OtherJob {
        index: usize,
        namespace: String,
        labels: BTreeMap<String, String>,
        first_namespace: String,
        first_labels: BTreeMap<String, String>,
    },
}

pub fn suggest(runs: &[Run], min_runs: usize) -> Result<Suggestion, SuggestError> {
    suggest_named(runs, min_runs, POLICY_NAME)
}

/// As [`suggest`], for policies named `name`.
pub fn suggest_named(runs: &[Run], min_runs: usize, name: &str) -> Result<Suggestion, SuggestError> {
    let first = runs.first().ok_or(SuggestError::NoRuns)?;
    if min_runs > runs.len() {
        return Err(SuggestError::TooFewRuns {
            min_runs,
            runs: runs.len(),
        });
    }
    let mut merged: BTreeMap<Key, (usize, Observed)> = BTreeMap::new();
    for (index, run) in runs.iter().enumerate() {
        if run.namespace != first.namespace || run.labels != first.labels {
            return Err(SuggestError::OtherJob {
                index: index + 1,
                namespace: run.namespace.clone(),
                labels: run.labels.clone(),
                first_namespace: first.namespace.clone(),
                first_labels: first.labels.clone(),
            });
        }
        let mut in_this_run = std::collections::BTreeSet::new();
        for o in run.destinations.iter().filter(|o| o.reached()) {
            let k = key(o);
            let fresh = in_this_run.insert(k.clone());
            match merged.get_mut(&k) {
                Some((seen_in, total)) => {
                    *seen_in += usize::from(fresh);
                    total.packets += o.packets;
                    total.bytes += o.bytes;
                    for p in &o.processes {
                        if !total.processes.contains(p) {
                            total.processes.push(p.clone());
                        }
                    }
                }
                None => {
                    merged.insert(k, (1, o.clone()));
                }
            }
        }
    }
    let mut entries = Vec::new();
    let mut unstable = Vec::new();
    for ((peer, port, protocol), (seen_in, observed)) in merged {
        if seen_in >= min_runs {
            entries.push(render::Entry {
                observed,
                runs: Some((seen_in, runs.len())),
            });
        } else {
            unstable.push((format!("{peer}:{port}/{protocol}"), seen_in));
        }
    }
    let mut header = vec![format!(
        "Suggested by pipeguard suggest from {} runs: destinations reached in at least {min_runs} of them.",
        runs.len()
    )];
    for (dest, seen_in) in &unstable {
        header.push(format!(
            "unstable, left out: {dest} (seen in {seen_in} of {} runs)",
            runs.len()
        ));
    }
    let target = render::Target {
        name,
        namespace: &first.namespace,
        labels: &first.labels,
    };
    Ok(Suggestion {
        policy: render::policies(&target, &header, &entries),
        unstable,
        runs: runs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dests: &[(&str, u16, &str)]) -> Run {
        Run {
            format: 1,
            namespace: "ci".into(),
            destinations: dests
                .iter()
                .map(|(ip, port, verdict)| Observed {
                    name: None,
                    ip: ip.parse().unwrap(),
                    port: *port,
                    protocol: "tcp".into(),
                    verdict: verdict.to_string(),
                    packets: 1,
                    bytes: 10,
                    processes: vec!["curl".into()],
                })
                .collect(),
            ..Run::default()
        }
    }

    #[test]
    fn a_destination_below_min_runs_is_unstable_and_left_out() {
        let runs = [
            run(&[("10.0.0.1", 443, "audit"), ("10.0.0.2", 443, "audit")]),
            run(&[("10.0.0.1", 443, "allow"), ("10.0.0.3", 80, "deny")]),
            run(&[("10.0.0.1", 443, "allow"), ("10.0.0.2", 443, "allow")]),
        ];
        let s = suggest(&runs, 3).unwrap();
        assert_eq!(s.unstable, vec![("10.0.0.2:443/tcp".to_string(), 2)]);
        assert!(s.policy.contains("10.0.0.1/32"), "{}", s.policy);
        assert!(
            s.policy
                .contains("3 packets, 30 B, first process curl, seen in 3 of 3 runs"),
            "{}",
            s.policy
        );
        assert!(!s.policy.contains("10.0.0.2/32"), "{}", s.policy);
        assert!(
            !s.policy.contains("10.0.0.3/32"),
            "refused destinations are never suggested"
        );
        let s = suggest(&runs, 2).unwrap();
        assert!(
            s.unstable.is_empty() && s.policy.contains("10.0.0.2/32"),
            "{}",
            s.policy
        );
        assert!(
            crate::policy::parse_policies("s.yaml", &s.policy)
                .errors
                .is_empty()
        );
    }

    #[test]
    fn refuses_nonsense() {
        assert_eq!(suggest(&[], 1), Err(SuggestError::NoRuns));
        assert!(matches!(
            suggest(&[run(&[])], 2),
            Err(SuggestError::TooFewRuns { .. })
        ));
        let mut other = run(&[]);
        other.namespace = "prod".into();
        assert!(matches!(
            suggest(&[run(&[]), other], 1),
            Err(SuggestError::OtherJob { index: 2, .. })
        ));
    }
}
