//! The agent's side: every `interval`, the kernel's per-destination flow statistics of each
//! local pod become that pod's run in its workload's object for this node, and each run is
//! compared with its workload's stable baseline (`new_destination`, `upload_volume`).
//!
//! The source is the flow table (`CONFIG_FLOW_STATS`): one per-CPU LRU update per packet,
//! on the fast path too, which keeps working. Allowed-attempt events
//! (`CONFIG_REPORT_ALLOWED`) would name the processes, but they switch the per-socket fast
//! path off, so the agent's runs carry no processes. They carry names: the kernel learns
//! them from every guarded pod's answers while the baseline records (`learn_names`), and
//! each pod's are kept here across rounds.
//!
//! Objects are read lazily: the first time a workload has a pod on this node, the agent
//! lists that namespace's objects (this node's to continue writing, every node's for the
//! baseline) and lists them again every [`RELIST`] while the workload has pods here. Memory
//! is bounded by the workloads running on this node, each by the caps of `object`. Until
//! its objects were read, a workload's runs are not written (a write would drop what an
//! earlier agent recorded).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    AgentRun, BaselineSpec, Workload,
    kube_store::Store,
    object::{DestKey, Stable, merge},
};
use crate::{
    engine::{dns::PodNames, stats::FlowReader},
    events::{
        anomaly::{Anomaly, AnomalyConfig, Baseline, NewDestination, Signal},
        pipeline::PodIndex,
    },
    job::Summary,
    learn::{ProcessLog, RUN_FORMAT, Run},
};

/// Other nodes' runs are read again this often while the workload has pods here.
pub const RELIST: Duration = Duration::from_secs(60);
/// `upload_volume` also raises past this many times the most bytes any baseline run sent to
/// the destination ...
pub const FAR_ABOVE: u64 = 10;
/// ... when that is more than this (small transfers vary a lot and matter little).
pub const FAR_ABOVE_FLOOR: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct RecorderConfig {
    pub node: String,
    /// `enforce` or `audit`, written into each run.
    pub mode: String,
    pub interval: Duration,
    /// Runs a destination must appear in to be in the stable baseline; a workload with
    /// fewer earlier runs has no baseline yet and raises no new_destination.
    pub stable_runs: usize,
    pub anomalies: AnomalyConfig,
}

type Key = (String, String); // namespace, workload

/// One workload with pods on this node.
struct Known {
    /// This node's object.
    own: BaselineSpec,
    /// Every node's runs, as last listed, with this node's records.
    all: Vec<AgentRun>,
    listed: Instant,
    dirty: bool,
}

/// One local pod being compared with its workload's baseline (as it was when the pod
/// was first seen).
struct Watched {
    uid: String,
    new_destination: Option<NewDestination>,
    /// Destination → the most bytes a baseline run sent there.
    baseline_bytes: HashMap<DestKey, u64>,
    uploads_raised: HashSet<DestKey>,
}

pub struct Recorder {
    pub config: RecorderConfig,
    pub store: Store,
    pub flows: FlowReader,
    /// Names of the destinations pods resolved (None: runs carry addresses only).
    pub names: Option<PodNames>,
    pub index: PodIndex,
    /// Into the event pipeline: sinks, stream and metrics.
    pub raise: mpsc::Sender<Anomaly>,
    known: HashMap<Key, Known>,
    watched: HashMap<u64, Watched>,
    /// Pod cgroup id → the names its destinations were resolved from, kept across rounds:
    /// the kernel forgets an entry once its TTL ran out, the pod's flows stay.
    seen_names: HashMap<u64, HashMap<IpAddr, String>>,
}

/// Names kept per pod at most.
const MAX_NAMES_PER_POD: usize = 4_096;

impl Recorder {
    pub fn new(
        config: RecorderConfig,
        store: Store,
        flows: FlowReader,
        names: Option<PodNames>,
        index: PodIndex,
        raise: mpsc::Sender<Anomaly>,
    ) -> Self {
        Self {
            config,
            store,
            flows,
            names,
            index,
            raise,
            known: HashMap::new(),
            watched: HashMap::new(),
            seen_names: HashMap::new(),
        }
    }

    pub async fn run(mut self) {
        tracing::info!(interval = ?self.config.interval, stable_runs = self.config.stable_runs, "recording workload baselines");
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.step().await;
        }
    }

    /// Adds what the kernel learned for the `live` pods to `seen_names`; forgets the rest.
    fn keep_names(&mut self, live: &HashSet<u64>) {
        self.seen_names.retain(|id, _| live.contains(id));
        let Some(names) = &mut self.names else { return };
        let ids: Vec<u64> = live.iter().copied().collect();
        for (pod, learned) in names.of(&ids) {
            let kept = self.seen_names.entry(pod).or_default();
            for (ip, name) in learned {
                if kept.len() < MAX_NAMES_PER_POD || kept.contains_key(&ip) {
                    kept.insert(ip, name);
                }
            }
        }
    }

    /// One round: read the flows, record and compare each pod's run, write what changed.
    pub async fn step(&mut self) {
        let flows = match self.flows.all() {
            Ok(f) => f,
            Err(error) => {
                tracing::warn!(%error, "baseline: cannot read the flow statistics");
                return;
            }
        };
        let mut by_pod: HashMap<u64, Vec<_>> = HashMap::new();
        for (key, counter) in flows {
            by_pod.entry(key.cgroup_id).or_default().push((key, counter));
        }
        let pods = self.index.snapshot();
        tracing::debug!(pods = pods.len(), flows_of = by_pod.len(), "baseline round");
        let live: HashSet<u64> = pods.iter().map(|(id, _)| *id).collect();
        self.watched.retain(|id, _| live.contains(id));
        self.keep_names(&live);
        let mut active: HashSet<Key> = HashSet::new();
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        for (cgroup_id, pod) in pods {
            let Some(flows) = by_pod.remove(&cgroup_id) else {
                continue;
            };
            let workload = Workload::of(&pod.labels, &pod.annotations, pod.owner.as_deref(), &pod.name);
            let key = (pod.namespace.clone(), workload.0.clone());
            active.insert(key.clone());
            if !self.load(&key).await {
                continue;
            }
            let mut summary = Summary::new(flows, &[], 0, 0);
            summary.names = self.seen_names.get(&cgroup_id).cloned().unwrap_or_default();
            let destinations = Run::observe(&summary, &ProcessLog::default());
            let run = AgentRun {
                pod: pod.name.clone(),
                uid: pod.uid.clone(),
                omitted: 0,
                run: Run {
                    format: RUN_FORMAT,
                    command: Vec::new(),
                    mode: self.config.mode.clone(),
                    namespace: pod.namespace.clone(),
                    labels: pod.labels.clone(),
                    finished: now.clone(),
                    destinations,
                    anomalies: Vec::new(),
                },
            };
            self.compare(cgroup_id, &key, &run).await;
            let known = self.known.get_mut(&key).expect("loaded");
            if known.own.record(run.clone()) {
                known.dirty = true;
            }
            known.all.retain(|r| r.uid != run.uid);
            known.all.push(run);
        }
        self.write().await;
        // Workloads with no pod here any more are forgotten once written.
        self.known.retain(|k, v| active.contains(k) || v.dirty);
    }

    /// Reads the workload's objects when first seen and every `RELIST`; false while that
    /// has never succeeded.
    async fn load(&mut self, key: &Key) -> bool {
        if self.known.get(key).is_some_and(|k| k.listed.elapsed() < RELIST) {
            return true;
        }
        let stored = match self.store.list(Some(&key.0)).await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(namespace = %key.0, %error, "baseline: cannot read the workload baselines");
                return self.known.contains_key(key);
            }
        };
        let mut specs = Vec::new();
        let mut own = None;
        for s in stored {
            match s.spec {
                Ok(spec) if spec.workload == key.1 => {
                    if spec.node == self.config.node {
                        own = Some(spec.clone());
                    }
                    specs.push(spec);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(namespace = %s.namespace, name = %s.name, %error, "baseline: skipping a malformed WorkloadBaseline")
                }
            }
        }
        let own = match self.known.remove(key) {
            // What this agent recorded is newer than what it wrote.
            Some(k) => {
                Known {
                    listed: Instant::now(),
                    ..k
                }
                .own
            }
            None => own.unwrap_or_else(|| BaselineSpec {
                workload: key.1.clone(),
                node: self.config.node.clone(),
                runs: Vec::new(),
            }),
        };
        specs.retain(|s| s.node != self.config.node);
        specs.push(own.clone());
        let all = merge(&specs).remove(&key.1).unwrap_or_default();
        self.known.insert(
            key.clone(),
            Known {
                own,
                all,
                listed: Instant::now(),
                dirty: false,
            },
        );
        true
    }

    /// Raises `new_destination` and `upload_volume` for what `run` reached.
    async fn compare(&mut self, cgroup_id: u64, key: &Key, run: &AgentRun) {
        let anomalies = &self.config.anomalies;
        let watched = self.watched.entry(cgroup_id).or_insert_with(|| {
            let stable = Stable::of(&self.known[key].all, &run.uid, self.config.stable_runs);
            let has_baseline = stable.runs >= self.config.stable_runs.max(1);
            Watched {
                uid: run.uid.clone(),
                new_destination: (anomalies.new_destination && has_baseline)
                    .then(|| NewDestination::new(Baseline::Seen(stable.set()))),
                baseline_bytes: stable.destinations,
                uploads_raised: HashSet::new(),
            }
        });
        if watched.uid != run.uid {
            // A cgroup id reused by another pod: start over next round.
            self.watched.remove(&cgroup_id);
            return;
        }
        let mut raised = Vec::new();
        for o in run.run.destinations.iter().filter(|o| o.reached()) {
            let dest: DestKey = (crate::policy::canonical(o.ip), o.port, o.protocol.clone());
            if let Some(nd) = &mut watched.new_destination
                && nd.observe(&dest)
            {
                raised.push(
                    Anomaly::new(
                        Signal::NewDestination,
                        format!(
                            "{}:{}/{} is not in the stable baseline of workload {}",
                            dest.0, dest.1, dest.2, key.1
                        ),
                        o.packets,
                        cgroup_id,
                    )
                    .to(&dest),
                );
            }
            if let Some(threshold) = anomalies.upload_volume
                && let Some(detail) =
                    upload_above(threshold, watched.baseline_bytes.get(&dest).copied(), o.bytes)
                && watched.uploads_raised.insert(dest.clone())
            {
                raised.push(
                    Anomaly::new(
                        Signal::UploadVolume,
                        format!(
                            "{} bytes sent to {}:{}/{}, {detail}",
                            o.bytes, dest.0, dest.1, dest.2
                        ),
                        o.bytes,
                        cgroup_id,
                    )
                    .to(&dest),
                );
            }
        }
        for a in raised {
            // The pipeline is gone only when the agent stops.
            let _ = self.raise.send(a).await;
        }
    }

    async fn write(&mut self) {
        for ((namespace, workload), known) in self.known.iter_mut().filter(|(_, k)| k.dirty) {
            let name = Workload(workload.clone()).object_name(&self.config.node);
            match self.store.write(namespace, &name, &known.own).await {
                Ok(()) => known.dirty = false,
                Err(error) => tracing::warn!(%error, "baseline: not written, retrying next round"),
            }
        }
    }
}

/// Why `bytes` to one destination is unusual: above `threshold`, or far above the most a
/// baseline run sent there (`baseline`).
pub fn upload_above(threshold: u64, baseline: Option<u64>, bytes: u64) -> Option<String> {
    if bytes > threshold {
        return Some(format!(
            "above the {} threshold",
            crate::learn::render::human_bytes(threshold)
        ));
    }
    let most = baseline?;
    let far = most.saturating_mul(FAR_ABOVE).max(FAR_ABOVE_FLOOR);
    (bytes > far)
        .then(|| format!("more than {FAR_ABOVE} times the most a baseline run sent there ({most} bytes)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_judged_by_the_threshold_and_by_the_baseline() {
        assert!(upload_above(100 << 20, None, 50 << 20).is_none());
        assert!(
            upload_above(100 << 20, None, 101 << 20)
                .unwrap()
                .contains("threshold")
        );
        assert!(
            upload_above(100 << 20, Some(1000), 900 << 10).is_none(),
            "below the floor"
        );
        assert!(upload_above(100 << 20, Some(1 << 20), 9 << 20).is_none());
        assert!(
            upload_above(100 << 20, Some(1 << 20), 11 << 20)
                .unwrap()
                .contains("10 times")
        );
    }
}
