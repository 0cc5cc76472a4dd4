//! The `WorkloadBaseline` object (pipeguard.dev/v1alpha1): the runs of one workload on one
//! node, written only by that node's agent, so no two writers ever race on an object. Its
//! size is bounded by [`MAX_RUNS`] × [`MAX_DESTINATIONS`] (well under etcd's 1.5 MiB).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::learn::{Observed, Run};

/// Runs kept per workload and node, and per workload when the nodes' objects are merged:
/// the newest ones (by `finished`).
pub const MAX_RUNS: usize = 20;
/// Destinations kept per run: the ones with the most bytes; the rest are counted in
/// `omitted`. 20 runs × 256 destinations × ~200 bytes of JSON ≈ 1 MiB at most.
pub const MAX_DESTINATIONS: usize = 256;

pub const GROUP: &str = "pipeguard.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "WorkloadBaseline";
pub const PLURAL: &str = "workloadbaselines";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineSpec {
    pub workload: String,
    pub node: String,
    #[serde(default)]
    pub runs: Vec<AgentRun>,
}

/// One run: one job pod, as the agent saw its traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRun {
    pub pod: String,
    pub uid: String,
    /// Destinations left out by the [`MAX_DESTINATIONS`] cap.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
    #[serde(flatten)]
    pub run: Run,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A destination as runs are compared on it.
pub type DestKey = (IpAddr, u16, String);

fn key(o: &Observed) -> DestKey {
    (crate::policy::canonical(o.ip), o.port, o.protocol.clone())
}

impl BaselineSpec {
    /// Records what `run` saw so far. The same pod's earlier record is merged in, not
    /// replaced: a restarted agent with fresh counters never makes a run forget a
    /// destination (counts take the larger of the two). Returns whether anything changed
    /// besides the time.
    pub fn record(&mut self, mut run: AgentRun) -> bool {
        let old = self.runs.iter().position(|r| r.uid == run.uid);
        if let Some(i) = old {
            let before = self.runs.remove(i);
            merge_into(&mut run, &before);
            cap(&mut run);
            let changed = run.run.destinations != before.run.destinations || run.omitted != before.omitted;
            if !changed {
                self.runs.insert(i, before);
                return false;
            }
        } else {
            cap(&mut run);
        }
        self.runs.push(run);
        keep_newest(&mut self.runs);
        true
    }
}

fn merge_into(run: &mut AgentRun, before: &AgentRun) {
    let mut by_key: HashMap<(DestKey, String), usize> = run
        .run
        .destinations
        .iter()
        .enumerate()
        .map(|(i, o)| ((key(o), o.verdict.clone()), i))
        .collect();
    for o in &before.run.destinations {
        match by_key.get(&(key(o), o.verdict.clone())) {
            Some(&i) => {
                let d = &mut run.run.destinations[i];
                d.packets = d.packets.max(o.packets);
                d.bytes = d.bytes.max(o.bytes);
                if d.name.is_none() {
                    d.name = o.name.clone();
                }
            }
            None => {
                by_key.insert((key(o), o.verdict.clone()), run.run.destinations.len());
                run.run.destinations.push(o.clone());
            }
        }
    }
}

/// At most [`MAX_DESTINATIONS`], the largest by bytes, in a stable order; `omitted` counts
/// what this cap left out.
fn cap(run: &mut AgentRun) {
    let d = &mut run.run.destinations;
    d.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then_with(|| key(a).cmp(&key(b)))
            .then_with(|| a.verdict.cmp(&b.verdict))
    });
    run.omitted = d.len().saturating_sub(MAX_DESTINATIONS) as u64;
    if d.len() > MAX_DESTINATIONS {
        d.truncate(MAX_DESTINATIONS);
    }
}

/// Newest [`MAX_RUNS`] runs, oldest first.
fn keep_newest(runs: &mut Vec<AgentRun>) {
    runs.sort_by(|a, b| a.run.finished.cmp(&b.run.finished));
    if runs.len() > MAX_RUNS {
        runs.drain(..runs.len() - MAX_RUNS);
    }
}

/// Every node's objects of one namespace → the runs of each workload: one per pod (the
/// newest record of it), the newest [`MAX_RUNS`], with the labels every run shares (what a
/// policy can select the workload's pods by).
pub fn merge(objects: &[BaselineSpec]) -> BTreeMap<String, Vec<AgentRun>> {
    let mut by_workload: BTreeMap<String, HashMap<String, AgentRun>> = BTreeMap::new();
    for spec in objects {
        let runs = by_workload.entry(spec.workload.clone()).or_default();
        for r in &spec.runs {
            match runs.get(&r.uid) {
                Some(kept) if kept.run.finished >= r.run.finished => {}
                _ => {
                    runs.insert(r.uid.clone(), r.clone());
                }
            }
        }
    }
    by_workload
        .into_iter()
        .map(|(workload, runs)| {
            let mut runs: Vec<AgentRun> = runs.into_values().collect();
            keep_newest(&mut runs);
            let shared = shared_labels(&runs);
            for r in &mut runs {
                r.run.labels = shared.clone();
            }
            (workload, runs)
        })
        .collect()
}

fn shared_labels(runs: &[AgentRun]) -> BTreeMap<String, String> {
    let Some(first) = runs.first() else {
        return BTreeMap::new();
    };
    first
        .run
        .labels
        .iter()
        .filter(|(k, v)| runs.iter().all(|r| r.run.labels.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What a new run is compared with: the destinations reached in at least `min_runs` of the
/// other runs (never the run itself), with the most bytes any of them sent there.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stable {
    pub destinations: HashMap<DestKey, u64>,
    /// Runs it was built from.
    pub runs: usize,
}

impl Stable {
    pub fn of(runs: &[AgentRun], except_uid: &str, min_runs: usize) -> Self {
        let mut seen: HashMap<DestKey, (usize, u64)> = HashMap::new();
        let mut count = 0;
        for r in runs.iter().filter(|r| r.uid != except_uid) {
            count += 1;
            let mut in_run = HashSet::new();
            for o in r.run.destinations.iter().filter(|o| o.reached()) {
                let k = key(o);
                let e = seen.entry(k.clone()).or_default();
                if in_run.insert(k) {
                    e.0 += 1;
                }
                e.1 = e.1.max(o.bytes);
            }
        }
        Self {
            destinations: seen
                .into_iter()
                .filter(|(_, (n, _))| *n >= min_runs.max(1))
                .map(|(k, (_, bytes))| (k, bytes))
                .collect(),
            runs: count,
        }
    }

    pub fn set(&self) -> HashSet<DestKey> {
        self.destinations.keys().cloned().collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn run(uid: &str, finished: &str, dests: &[(&str, u16, u64)]) -> AgentRun {
        AgentRun {
            pod: format!("pod-{uid}"),
            uid: uid.into(),
            omitted: 0,
            run: Run {
                format: crate::learn::RUN_FORMAT,
                mode: "enforce".into(),
                namespace: "ci".into(),
                labels: BTreeMap::from([("app".into(), "runner".into()), ("run".into(), uid.into())]),
                finished: finished.into(),
                destinations: dests
                    .iter()
                    .map(|(ip, port, bytes)| Observed {
                        name: None,
                        ip: ip.parse().unwrap(),
                        port: *port,
                        protocol: "tcp".into(),
                        verdict: "allow".into(),
                        packets: 1,
                        bytes: *bytes,
                        processes: Vec::new(),
                    })
                    .collect(),
                ..Run::default()
            },
        }
    }

    fn spec(node: &str, runs: Vec<AgentRun>) -> BaselineSpec {
        BaselineSpec {
            workload: "gitlab:app/test".into(),
            node: node.into(),
            runs,
        }
    }

    #[test]
    fn a_pod_recorded_again_is_merged_and_unchanged_records_say_so() {
        let mut s = spec("a", Vec::new());
        assert!(s.record(run("p1", "t1", &[("10.0.0.1", 443, 100)])));
        assert!(
            !s.record(run("p1", "t2", &[("10.0.0.1", 443, 100)])),
            "only the time moved"
        );
        // A restarted agent with fresh counters: smaller counts, one new destination.
        assert!(s.record(run("p1", "t3", &[("10.0.0.1", 443, 5), ("10.0.0.2", 80, 7)])));
        assert_eq!(s.runs.len(), 1);
        let d = &s.runs[0].run.destinations;
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].port, d[0].bytes), (443, 100), "the larger count is kept");
    }

    #[test]
    fn runs_and_destinations_are_capped() {
        let mut s = spec("a", Vec::new());
        for i in 0..MAX_RUNS + 5 {
            s.record(run(
                &format!("p{i:02}"),
                &format!("t{i:02}"),
                &[("10.0.0.1", 443, 1)],
            ));
        }
        assert_eq!(s.runs.len(), MAX_RUNS);
        assert_eq!(s.runs[0].uid, "p05", "the oldest runs go first");
        let many: Vec<(String, u16, u64)> = (0..MAX_DESTINATIONS as u16 + 10)
            .map(|p| ("10.0.0.9".to_string(), p + 1, u64::from(p)))
            .collect();
        let many: Vec<(&str, u16, u64)> = many.iter().map(|(ip, p, b)| (ip.as_str(), *p, *b)).collect();
        let mut s = spec("a", Vec::new());
        s.record(run("big", "t", &many));
        let r = &s.runs[0];
        assert_eq!((r.run.destinations.len(), r.omitted), (MAX_DESTINATIONS, 10));
        assert!(
            r.run.destinations.iter().all(|d| d.bytes >= 10),
            "the largest are kept"
        );
    }

    #[test]
    fn nodes_are_merged_per_pod_and_the_newest_runs_kept() {
        let a = spec(
            "a",
            vec![run("p1", "t1", &[("10.0.0.1", 443, 1)]), run("p2", "t2", &[])],
        );
        // The same pod seen by another node (it cannot be, but a stale object may say so):
        // the newer record wins.
        let b = spec(
            "b",
            vec![run("p2", "t3", &[("10.0.0.2", 443, 1)]), run("p3", "t4", &[])],
        );
        let mut other = spec("a", vec![run("q1", "t1", &[])]);
        other.workload = "tekton:release/build".into();
        let merged = merge(&[a, b, other]);
        assert_eq!(merged.len(), 2);
        let runs = &merged["gitlab:app/test"];
        let uids: Vec<&str> = runs.iter().map(|r| r.uid.as_str()).collect();
        assert_eq!(uids, ["p1", "p2", "p3"]);
        assert_eq!(runs[1].run.destinations[0].ip.to_string(), "10.0.0.2");
        assert_eq!(
            runs[0].run.labels,
            BTreeMap::from([("app".to_string(), "runner".to_string())]),
            "only the labels every run has"
        );
        let many: Vec<BaselineSpec> = (0..3)
            .map(|n| {
                spec(
                    &format!("n{n}"),
                    (0..MAX_RUNS)
                        .map(|i| run(&format!("n{n}-{i:02}"), &format!("t{i:02}-{n}"), &[]))
                        .collect(),
                )
            })
            .collect();
        let runs = &merge(&many)["gitlab:app/test"];
        assert_eq!(runs.len(), MAX_RUNS, "capped across nodes too");
        assert!(
            runs.iter().all(|r| r.run.finished.as_str() >= "t13"),
            "the newest"
        );
    }

    #[test]
    fn the_stable_baseline_leaves_out_the_run_itself_and_rare_destinations() {
        let runs = [
            run("p1", "t1", &[("10.0.0.1", 443, 100), ("10.0.0.2", 443, 1)]),
            run("p2", "t2", &[("10.0.0.1", 443, 300)]),
            run("p3", "t3", &[("10.0.0.3", 443, 1)]),
        ];
        let s = Stable::of(&runs, "p3", 2);
        assert_eq!(s.runs, 2);
        let k: DestKey = ("10.0.0.1".parse().unwrap(), 443, "tcp".into());
        assert_eq!(s.destinations, HashMap::from([(k, 300)]));
        assert!(Stable::of(&runs, "p3", 1).destinations.len() == 2);
    }
}
