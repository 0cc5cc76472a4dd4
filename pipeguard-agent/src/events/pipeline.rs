//! Kernel ring buffer → aggregation → enrichment → hub and sinks. Runs as one task; the
//! hub and the sinks never block it (subscribers are dropped, Kubernetes Events are queued,
//! stdout and the file are written by their own threads behind bounded queues).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::{
    aggregate::{Aggregator, Emit},
    anomaly::{Anomaly, Detectors, Signal},
    hub::Hub,
    kube_events::KubeEvents,
    record::{CiContext, Kind, PodRef, Record},
    sink_queue::SinkQueue,
};
use crate::engine::events::{self as decode, Clock};

/// What enrichment knows about a pod, keyed by its pod-level cgroup id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Its controlling owner, `Kind/name` (`baseline::workload::owner_of`): the workload of
    /// a pod without CI labels.
    pub owner: Option<String>,
    /// The CI job, from the labels and annotations (an ARC workflow pod's from its runner
    /// pod's too).
    pub ci: Option<CiContext>,
    /// Egress policies selecting the pod ("ns/name").
    pub policies: Vec<String>,
    /// Why its egress is restricted, when it is not by those policies' rules.
    pub restriction: Option<String>,
    /// Container cgroup id → container name (or id).
    pub containers: HashMap<u64, String>,
}

#[derive(Clone, Default)]
pub struct PodIndex(Arc<RwLock<HashMap<u64, Arc<PodInfo>>>>);

impl PodIndex {
    pub fn replace(&self, map: HashMap<u64, Arc<PodInfo>>) {
        *self.0.write().expect("pod index lock") = map;
    }

    /// Every pod: (pod cgroup id, info).
    pub fn snapshot(&self) -> Vec<(u64, Arc<PodInfo>)> {
        self.0
            .read()
            .expect("pod index lock")
            .iter()
            .map(|(id, info)| (*id, info.clone()))
            .collect()
    }

    fn get(&self, cgroup_id: u64) -> Option<Arc<PodInfo>> {
        self.0.read().expect("pod index lock").get(&cgroup_id).cloned()
    }
}

/// Counters the pipeline keeps; the agent exports them as metrics.
#[derive(Default)]
pub struct Stats {
    pub attempts: std::sync::atomic::AtomicU64,
    pub records: std::sync::atomic::AtomicU64,
    pub kernel_drops: std::sync::atomic::AtomicU64,
    pub sink_errors: std::sync::atomic::AtomicU64,
    /// Records a sink's queue had no room for, per sink (`SinkKind::index`).
    pub sink_dropped: [std::sync::atomic::AtomicU64; 2],
    /// Anomaly records raised, per signal (`Signal::index`).
    pub anomalies: [std::sync::atomic::AtomicU64; 4],
}

pub struct Pipeline {
    pub node: String,
    pub index: PodIndex,
    pub hub: Arc<Hub>,
    /// Stdout and the events file, each behind its own queue.
    pub sinks: Vec<SinkQueue>,
    pub kube: Option<KubeEvents>,
    pub drops: Option<PerCpuArray<MapData, u64>>,
    /// The kernel's name table, for `dst_name` (`None`: events carry no name).
    pub names: Option<crate::engine::dns::NameTexts>,
    pub stats: Arc<Stats>,
    /// Opt-in per-destination counter (see --metrics-per-destination).
    pub per_destination: Option<
        prometheus_client::metrics::family::Family<
            DestinationLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    >,
    pub aggregator: Aggregator,
    /// The anomaly stage (None: every signal off). Fed each attempt before aggregation.
    pub anomalies: Option<Detectors>,
    /// Anomalies raised elsewhere (the agent's baseline recorder), published like ours.
    pub raised: Option<tokio::sync::mpsc::Receiver<Anomaly>>,
}

/// Labels of the opt-in per-destination denial counter (`--metrics-per-destination`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DestinationLabels {
    pub namespace: crate::escape::LabelValue,
    pub pod: crate::escape::LabelValue,
    pub destination: crate::escape::LabelValue,
}

/// How long identical attempts are folded into one record.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Open aggregation windows kept at most (memory bound under floods).
pub const MAX_KEYS: usize = 16_384;

impl Pipeline {
    pub async fn run(mut self, ring: RingBuf<MapData>) {
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
        let mut ring = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(%error, "cannot poll the event ring buffer");
                return;
            }
        };
        let clock = Clock::now();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut reported_drops = 0u64;
        let mut raised = self.raised.take();
        loop {
            let from_elsewhere = async {
                match &mut raised {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(a) = from_elsewhere => self.raise(a),
                guard = ring.readable_mut() => {
                    let Ok(mut guard) = guard else { return };
                    let now = Instant::now();
                    let mut batch = Vec::new();
                    let mut anomalies = Vec::new();
                    while let Some(item) = guard.get_inner_mut().next() {
                        let Some(v) = decode::decode_named(&item, &clock, &mut self.names) else {
                            continue;
                        };
                        // Allowed: only queries reported for dns_tunnel, never a record.
                        if v.verdict == "allow" {
                            if let Some(detectors) = &mut self.anomalies {
                                anomalies.extend(detectors.on_allowed_query(&v, now));
                            }
                            continue;
                        }
                        self.stats.attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(detectors) = &mut self.anomalies {
                            anomalies.extend(detectors.on_attempt(&v, 1, now));
                        }
                        batch.extend(self.aggregator.add(v, now));
                    }
                    guard.clear_ready();
                    for e in batch {
                        self.emit(e);
                    }
                    for a in anomalies {
                        self.raise(a);
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    for e in self.aggregator.flush(now) {
                        self.emit(e);
                    }
                    reported_drops = self.report_drops(reported_drops);
                    if let Some(kube) = &mut self.kube {
                        kube.flush_due(now);
                    }
                }
            }
        }
    }

    /// Kernel drops become a record and a metric: never lost silently.
    fn report_drops(&mut self, reported: u64) -> u64 {
        let Some(map) = &self.drops else { return reported };
        let Ok(values) = map.get(&0, 0) else {
            return reported;
        };
        let total: u64 = values.iter().sum();
        if total > reported {
            self.stats
                .kernel_drops
                .store(total, std::sync::atomic::Ordering::Relaxed);
            let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
            self.publish(Record::drops(
                now,
                total - reported,
                self.node.clone(),
                Some("the kernel's event ring buffer was full; counters still counted these attempts".into()),
            ));
        }
        total
    }

    fn emit(&mut self, e: Emit) {
        let record = enrich(&e, &self.index, &self.node);
        if let (Some(family), Some(pod), Some(ip), Some(port)) =
            (&self.per_destination, &record.pod, record.dst_ip, record.dst_port)
        {
            let labels = DestinationLabels {
                namespace: pod.namespace.clone().into(),
                pod: pod.name.clone().into(),
                destination: format!("{ip}:{port}/{}", record.protocol.clone().unwrap_or_default()).into(),
            };
            family.get_or_create(&labels).inc_by(record.count);
        }
        if let Some(kube) = &mut self.kube {
            kube.observe(&record, Instant::now());
        }
        self.publish(record);
    }

    fn raise(&mut self, anomaly: Anomaly) {
        if let Some(signal) = Signal::ALL.iter().find(|s| s.name() == anomaly.signal) {
            self.stats.anomalies[signal.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let record = anomaly_record(anomaly, &self.index, &self.node);
        if let Some(kube) = &mut self.kube {
            kube.observe(&record, Instant::now());
        }
        self.publish(record);
    }

    fn publish(&mut self, record: Record) {
        self.stats
            .records
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let record = std::sync::Arc::new(record);
        for sink in &self.sinks {
            sink.send(record.clone());
        }
        self.hub.publish(record);
    }
}

/// An anomaly as a stream record, with the pod and CI job it concerns.
pub fn anomaly_record(a: Anomaly, index: &PodIndex, node: &str) -> Record {
    let pod = index.get(a.pod_cgroup_id);
    Record {
        kind: Kind::Anomaly,
        signal: Some(a.signal),
        domain: a.domain,
        time: a.time.clone(),
        first_seen: a.time.clone(),
        last_seen: a.time,
        count: a.count,
        verdict: None,
        hook: None,
        protocol: a.protocol,
        dst_ip: a.dst_ip,
        dst_port: a.dst_port,
        dst_name: None,
        query: None,
        qtype: None,
        malformed: false,
        pid: None,
        comm: a.comm,
        exe: None,
        node: node.to_string(),
        ci: pod.as_ref().and_then(|p| p.ci.clone()),
        policies: pod.as_ref().map(|p| p.policies.clone()).unwrap_or_default(),
        pod: pod.map(|p| PodRef {
            container: None,
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: p.uid.clone(),
        }),
        reason: Some(a.detail),
        cgroup_id: a.pod_cgroup_id,
    }
}

pub fn enrich(e: &Emit, index: &PodIndex, node: &str) -> Record {
    let v = &e.sample;
    let pod = index.get(v.pod_cgroup_id);
    let dest = match (v.dst_ip, v.dst_port) {
        (Some(ip), Some(port)) => format!("{ip}:{port}/{}", v.protocol),
        _ => String::new(),
    };
    let reason = if v.hook == "sock_create" {
        "raw and packet sockets are refused in guarded pods".to_string()
    } else if v.hook == "dns" {
        if v.malformed {
            "the DNS query could not be parsed (refused: fail closed)".to_string()
        } else {
            match &pod {
                Some(p) if !p.policies.is_empty() => {
                    format!(
                        "no domain rule for this pod allows the name (policies: {})",
                        p.policies.join(", ")
                    )
                }
                _ => "no domain rule for this pod allows the name".to_string(),
            }
        }
    } else if v.pod_cgroup_id == 0 {
        "the cgroup is not matched to a pod yet (--unknown-pods deny)".to_string()
    } else {
        match &pod {
            Some(p) if p.restriction.is_some() => p.restriction.clone().unwrap_or_default(),
            Some(p) if !p.policies.is_empty() => {
                format!("no egress rule of {} allows {dest}", p.policies.join(", "))
            }
            _ => format!("no allowlist entry covers {dest}"),
        }
    };
    Record {
        kind: Kind::Violation,
        signal: None,
        domain: None,
        time: v.time.clone(),
        first_seen: e.first_seen.clone(),
        last_seen: v.time.clone(),
        count: e.count,
        verdict: Some(v.verdict.to_string()),
        hook: Some(v.hook.to_string()),
        protocol: Some(v.protocol.clone()),
        dst_ip: v.dst_ip,
        dst_port: v.dst_port,
        dst_name: v.dst_name.clone(),
        query: v.query.clone(),
        qtype: v.qtype.clone(),
        malformed: v.malformed,
        pid: Some(v.pid),
        comm: Some(v.comm.clone()),
        // Cheap, and only once per record, not per attempt.
        exe: std::fs::read_link(format!("/proc/{}/exe", v.pid))
            .ok()
            .map(|p| p.display().to_string()),
        node: node.to_string(),
        ci: pod.as_ref().and_then(|p| p.ci.clone()),
        policies: pod.as_ref().map(|p| p.policies.clone()).unwrap_or_default(),
        pod: pod.map(|p| PodRef {
            container: p.containers.get(&v.cgroup_id).cloned(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: p.uid.clone(),
        }),
        reason: Some(reason),
        cgroup_id: v.cgroup_id,
    }
}
