//! Prometheus metrics, one registry, `pipeguard_` prefix. Label cardinality stays bounded:
//! per pod and per policy, never per destination.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::escape::LabelValue;
pub use crate::events::pipeline::DestinationLabels;

/// One series per anomaly signal (four, fixed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    pub signal: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub namespace: LabelValue,
    pub name: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub namespace: LabelValue,
    pub pod: LabelValue,
    pub verdict: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: LabelValue,
}

/// What woke the sync loop: a watched kind, `pod_cgroup_created`, `cgroups_changed`,
/// `resync` or `recheck` (bounded: a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// How a sync ran: `full`, `new_pods` (only new pod cgroups' entries), `removed_pods`
/// (only removed pod cgroups' entries), `unchanged` (the periodic resync found nothing
/// moved and stopped after the scan), or `scan_failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: LabelValue,
}

/// The `map` label of the learned-address map in `map_entries`, `map_capacity`, `dns_swept`.
pub const DNS_LEARNED_MAP: &str = "dns_learned";
/// The `map` label of the socket table (records of guarded pods' live sockets, the
/// connections they accepted included).
pub const SOCKETS_MAP: &str = "sockets";
/// The `map` label of the outstanding-query map in `dns_swept`.
pub const DNS_QUERIES_MAP: &str = "dns_queries";

pub struct Metrics {
    pub registry: Registry,
    pub ready: Gauge,
    /// 1 compiled, 0 failed, per NetworkPolicy.
    pub policy_compiled: Family<PolicyLabels, Gauge>,
    /// Count of NetworkPolicies by state (compiled, failed).
    pub policies: Family<StateLabels, Gauge>,
    /// DomainPolicies and ClusterDomainPolicies by state (compiled, failed).
    pub domain_policies: Family<StateLabels, Gauge>,
    /// 1 while a domain policy CRD is not installed (its kind is read as empty).
    pub domain_crd_missing: Family<KindLabels, Gauge>,
    /// Local pods by status (enforced, unrestricted, default_deny, failed_closed, not_guarded).
    pub pods: Family<StateLabels, Gauge>,
    pub allow_entries: Gauge,
    pub allowlists: Gauge,
    pub unmatched_pod_cgroups: Gauge,
    pub sync_seconds: Histogram,
    pub sync_errors: Counter,
    /// Wake-ups of the sync loop per source.
    pub sync_triggers: Family<SourceLabels, Counter>,
    /// Syncs per path (full, new_pods, removed_pods, unchanged).
    pub syncs: Family<PathLabels, Counter>,
    pub packets: Family<TrafficLabels, Counter>,
    /// Denied (or audited) attempts the event pipeline received.
    pub event_attempts: Counter,
    /// Records delivered (each may stand for many attempts).
    pub event_records: Counter,
    /// Events the kernel could not queue (ring buffer full); reported, never silent.
    pub event_ring_drops: Counter,
    pub event_sink_errors: Counter,
    /// Records a sink (stdout, file) lost because it fell behind; the stream did not wait.
    pub event_sink_dropped: Family<SinkLabels, Counter>,
    pub event_subscribers: Gauge,
    pub event_subscribers_dropped: Counter,
    /// Anomaly records raised, per signal.
    pub anomalies: Family<SignalLabels, Counter>,
    /// Denied attempts per destination: only with --metrics-per-destination (unbounded labels).
    pub denied_destinations: Family<DestinationLabels, Counter>,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    pub bytes: Family<TrafficLabels, Counter>,
    /// DNS queries of DNS-filtered pods, per pod and verdict (allow, deny, audit, error).
    pub dns_queries: Family<TrafficLabels, Counter>,
    /// New inbound connections and datagrams judged by ingress rules, per pod and verdict.
    pub ingress: Family<TrafficLabels, Counter>,
    /// Expired learned addresses and unanswered queries the periodic sweep deleted.
    pub dns_swept: Family<MapLabels, Counter>,
    /// Open HTTP connections.
    pub http_connections: Gauge,
    /// HTTP connections closed at once because a connection cap was reached.
    pub http_refused: Counter,
    /// HTTP connections closed by the head deadline or the idle timeout.
    pub http_timed_out: Counter,
    /// Last absolute kernel counter values, to turn them into counter increments.
    last_traffic: Mutex<HashMap<(TrafficLabels, bool), u64>>,
    /// Last absolute kernel DNS query counts, likewise.
    last_dns: Mutex<HashMap<TrafficLabels, u64>>,
    last_ingress: Mutex<HashMap<TrafficLabels, u64>>,
    /// What [`Metrics::refresh`] reads at scrape time.
    live: Mutex<Live>,
}

/// The sources of the counters that change between syncs: the kernel's per-pod counters
/// and the event pipeline's. Read at every scrape, so /metrics is current.
pub struct LiveSources {
    pub counters: Option<crate::engine::stats::CounterReader>,
    /// Counts the learned-address map's entries.
    pub learned: Option<crate::engine::dns::LearnedReader>,
    /// Counts the socket table's records.
    pub sockets: Option<crate::engine::stats::SocketsReader>,
    pub events: Arc<crate::events::pipeline::Stats>,
    pub hub: Arc<crate::events::hub::Hub>,
}

#[derive(Default)]
struct Live {
    sources: Option<LiveSources>,
    /// This node's pods as of the last sync: pod cgroup id → (namespace, name).
    pods: HashMap<u64, (String, String)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pipeguard");
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("build_info", "pipeguard version", build_info);
        let m = Self {
            ready: Gauge::default(),
            policy_compiled: Family::default(),
            policies: Family::default(),
            pods: Family::default(),
            domain_policies: Family::default(),
            domain_crd_missing: Family::default(),
            allow_entries: Gauge::default(),
            allowlists: Gauge::default(),
            unmatched_pod_cgroups: Gauge::default(),
            sync_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
            sync_errors: Counter::default(),
            sync_triggers: Family::default(),
            syncs: Family::default(),
            packets: Family::default(),
            bytes: Family::default(),
            dns_queries: Family::default(),
            ingress: Family::default(),
            dns_swept: Family::default(),
            event_attempts: Counter::default(),
            event_records: Counter::default(),
            event_ring_drops: Counter::default(),
            event_sink_errors: Counter::default(),
            event_sink_dropped: Family::default(),
            event_subscribers: Gauge::default(),
            event_subscribers_dropped: Counter::default(),
            anomalies: Family::default(),
            denied_destinations: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            http_connections: Gauge::default(),
            http_refused: Counter::default(),
            http_timed_out: Counter::default(),
            last_traffic: Mutex::default(),
            last_dns: Mutex::default(),
            last_ingress: Mutex::default(),
            live: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ready",
            "1 when synced and the programs are attached",
            m.ready.clone(),
        );
        registry.register(
            "policy_compiled",
            "1 if the NetworkPolicy compiled, 0 if it was rejected",
            m.policy_compiled.clone(),
        );
        registry.register("policies", "NetworkPolicies by state", m.policies.clone());
        registry.register(
            "domain_policies",
            "DomainPolicies and ClusterDomainPolicies by state",
            m.domain_policies.clone(),
        );
        registry.register(
            "domain_crd_missing",
            "1 while the CRD of a domain policy kind is not installed (read as no objects)",
            m.domain_crd_missing.clone(),
        );
        registry.register("pods", "Pods on this node by enforcement status", m.pods.clone());
        registry.register(
            "unmatched_pod_cgroups",
            "Pod cgroups that match no pod scheduled on this node yet",
            m.unmatched_pod_cgroups.clone(),
        );
        registry.register(
            "allow_entries",
            "Entries in the allow tries",
            m.allow_entries.clone(),
        );
        registry.register(
            "allowlists",
            "Distinct allowlists (policy ids) in the maps",
            m.allowlists.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time to compute and apply one sync",
            m.sync_seconds.clone(),
        );
        registry.register(
            "sync_errors",
            "Syncs that failed to write the maps",
            m.sync_errors.clone(),
        );
        registry.register(
            "sync_triggers",
            "Wake-ups of the sync loop per source (a watched kind, pod_cgroup_created, cgroups_changed, resync, recheck)",
            m.sync_triggers.clone(),
        );
        registry.register(
            "syncs",
            "Syncs per path: full, new_pods (only new pod cgroups), removed_pods (only removed pod cgroups), unchanged (periodic resync, nothing moved), scan_failed",
            m.syncs.clone(),
        );
        registry.register(
            "packets",
            "Packets and refused attempts per pod and verdict",
            m.packets.clone(),
        );
        registry.register("bytes", "Bytes per pod and verdict", m.bytes.clone());
        registry.register(
            "dns_queries",
            "DNS queries of DNS-filtered pods per pod and verdict (allow, deny, audit, error)",
            m.dns_queries.clone(),
        );
        registry.register(
            "ingress",
            "New inbound connections and datagrams to ingress-isolated pods, per pod and verdict (allow, deny, audit, error)",
            m.ingress.clone(),
        );
        registry.register(
            "dns_swept",
            "Expired entries the periodic DNS sweep deleted, per map (dns_learned, dns_queries)",
            m.dns_swept.clone(),
        );
        registry.register(
            "event_attempts",
            "Denied or audited attempts seen by the event pipeline",
            m.event_attempts.clone(),
        );
        registry.register(
            "anomalies",
            "Anomaly records raised, per signal (deny_burst, upload_volume, new_destination, dns_tunnel)",
            m.anomalies.clone(),
        );
        registry.register(
            "event_records",
            "Violation records delivered (after aggregation)",
            m.event_records.clone(),
        );
        registry.register(
            "event_ring_drops",
            "Kernel events lost to a full ring buffer",
            m.event_ring_drops.clone(),
        );
        registry.register(
            "event_sink_errors",
            "Records a sink failed to deliver",
            m.event_sink_errors.clone(),
        );
        registry.register(
            "event_sink_dropped",
            "Records a sink (stdout, file) lost because it fell behind; the stream did not wait for it",
            m.event_sink_dropped.clone(),
        );
        registry.register(
            "event_subscribers",
            "Connected /v1/events subscribers",
            m.event_subscribers.clone(),
        );
        registry.register(
            "event_subscribers_dropped",
            "Subscribers dropped for falling behind",
            m.event_subscribers_dropped.clone(),
        );
        registry.register(
            "map_entries",
            "Entries pipeguard keeps in each kernel map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity of each kernel map",
            m.map_capacity.clone(),
        );
        registry.register(
            "http_connections",
            "Open connections to the HTTP listener",
            m.http_connections.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections closed at once because a connection cap was reached",
            m.http_refused.clone(),
        );
        registry.register(
            "http_connections_timed_out",
            "HTTP connections closed by the request head deadline or the idle timeout",
            m.http_timed_out.clone(),
        );
        for (map, capacity) in [
            ("pods", pipeguard_common::MAX_PODS),
            ("allow_v4", pipeguard_common::MAX_ALLOW_ENTRIES),
            ("allow_v6", pipeguard_common::MAX_ALLOW_ENTRIES),
            ("counters", pipeguard_common::MAX_COUNTER_SLOTS),
            ("flows", pipeguard_common::MAX_FLOWS),
            (DNS_LEARNED_MAP, pipeguard_common::MAX_LEARNED),
            (SOCKETS_MAP, pipeguard_common::MAX_SOCKETS),
        ] {
            m.map_capacity
                .get_or_create(&MapLabels { map: map.into() })
                .set(i64::from(capacity));
        }
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Records absolute kernel counter values as counter increments.
    pub fn observe_traffic(&self, labels: TrafficLabels, packets: u64, bytes: u64) {
        let mut last = self.last_traffic.lock().expect("metrics lock");
        for (is_bytes, value, family) in [(false, packets, &self.packets), (true, bytes, &self.bytes)] {
            let prev = last.insert((labels.clone(), is_bytes), value).unwrap_or(0);
            // A recreated map restarts at zero; count from there.
            family
                .get_or_create(&labels)
                .inc_by(value.checked_sub(prev).unwrap_or(value));
        }
    }

    /// Where [`Metrics::refresh`] reads from, once the engine and the pipeline run.
    pub fn set_live_sources(&self, sources: LiveSources) {
        self.live.lock().expect("metrics lock").sources = Some(sources);
    }

    /// The pods whose kernel counters are reported, replaced by every sync. The series of
    /// pods no longer here go with them: a node that runs a job a minute would otherwise
    /// keep every job's series for as long as the agent runs.
    pub fn set_pods(&self, pods: HashMap<u64, (String, String)>) {
        // `live` first, as in `refresh`, which takes the `last_*` locks under it.
        let mut live = self.live.lock().expect("metrics lock");
        let here: HashSet<(&str, &str)> = pods
            .values()
            .map(|(namespace, name)| (namespace.as_str(), name.as_str()))
            .collect();
        let gone =
            |labels: &TrafficLabels| !here.contains(&(labels.namespace.0.as_str(), labels.pod.0.as_str()));
        self.last_traffic
            .lock()
            .expect("metrics lock")
            .retain(|(labels, is_bytes), _| {
                let family = if *is_bytes { &self.bytes } else { &self.packets };
                keep_series(family, labels, gone(labels))
            });
        for (family, last) in [
            (&self.dns_queries, &self.last_dns),
            (&self.ingress, &self.last_ingress),
        ] {
            last.lock()
                .expect("metrics lock")
                .retain(|labels, _| keep_series(family, labels, gone(labels)));
        }
        live.pods = pods;
    }

    /// Brings the traffic and event counters up to the kernel's and the pipeline's values.
    /// Called on every scrape (only: it walks the pod and socket tables, whose cost is
    /// their capacity, and reads one counter row per pod), one refresh at a time.
    pub fn refresh(&self) {
        let live = self.live.lock().expect("metrics lock");
        let Some(sources) = &live.sources else {
            return;
        };
        self.observe_events(&sources.events, &sources.hub);
        if let Some(learned) = &sources.learned {
            self.map_entries
                .get_or_create(&MapLabels {
                    map: DNS_LEARNED_MAP.into(),
                })
                .set(learned.count() as i64);
        }
        if let Some(sockets) = &sources.sockets {
            self.map_entries
                .get_or_create(&MapLabels {
                    map: SOCKETS_MAP.into(),
                })
                .set(sockets.count() as i64);
        }
        let Some(reader) = &sources.counters else {
            return;
        };
        let totals = match reader.totals() {
            Ok(totals) => totals,
            Err(error) => {
                tracing::warn!(%error, "reading the kernel counters for /metrics");
                return;
            }
        };
        self.map_entries
            .get_or_create(&MapLabels {
                map: "counters".into(),
            })
            .set(totals.entries as i64);
        let labels = |cgroup_id: u64, verdict: u8| {
            live.pods.get(&cgroup_id).map(|(namespace, pod)| TrafficLabels {
                namespace: namespace.clone().into(),
                pod: pod.clone().into(),
                verdict: verdict_name(verdict).into(),
            })
        };
        for ((cgroup_id, verdict), counter) in totals.traffic {
            if let Some(labels) = labels(cgroup_id, verdict) {
                self.observe_traffic(labels, counter.packets, counter.bytes);
            }
        }
        for ((cgroup_id, verdict), queries) in totals.dns_queries {
            if let Some(labels) = labels(cgroup_id, verdict) {
                observe_count(&self.dns_queries, &self.last_dns, labels, queries);
            }
        }
        for ((cgroup_id, verdict), attempts) in totals.ingress {
            if let Some(labels) = labels(cgroup_id, verdict) {
                observe_count(&self.ingress, &self.last_ingress, labels, attempts);
            }
        }
    }

    /// What one periodic DNS sweep did.
    pub fn observe_dns_sweep(&self, sweep: &crate::engine::dns::DnsSweep) {
        for (map, removed) in [
            (DNS_LEARNED_MAP, sweep.learned_removed),
            (DNS_QUERIES_MAP, sweep.queries_removed),
        ] {
            self.dns_swept
                .get_or_create(&MapLabels { map: map.into() })
                .inc_by(removed as u64);
        }
    }

    /// Opt-in: registered only with --metrics-per-destination.
    pub fn enable_per_destination(&mut self) {
        self.registry.register(
            "denied_destinations",
            "Denied attempts per pod and destination (opt-in: one series per destination)",
            self.denied_destinations.clone(),
        );
    }

    /// Brings the event counters up to the pipeline's and the hub's absolute values.
    pub fn observe_events(&self, stats: &crate::events::pipeline::Stats, hub: &crate::events::hub::Hub) {
        use std::sync::atomic::Ordering::Relaxed;
        let bump = |c: &Counter, value: u64| c.inc_by(value.saturating_sub(c.get()));
        bump(&self.event_attempts, stats.attempts.load(Relaxed));
        bump(&self.event_records, stats.records.load(Relaxed));
        for signal in crate::events::anomaly::Signal::ALL {
            let counter = self.anomalies.get_or_create(&SignalLabels {
                signal: signal.name(),
            });
            bump(&counter, stats.anomalies[signal.index()].load(Relaxed));
        }
        bump(&self.event_ring_drops, stats.kernel_drops.load(Relaxed));
        bump(
            &self.event_subscribers_dropped,
            hub.dropped_subscribers.load(Relaxed),
        );
        self.event_sink_errors.inc_by(stats.sink_errors.swap(0, Relaxed));
        for sink in crate::events::sink_queue::SinkKind::ALL {
            let counter = self
                .event_sink_dropped
                .get_or_create(&SinkLabels { sink: sink.name() });
            bump(&counter, stats.sink_dropped[sink.index()].load(Relaxed));
        }
        self.event_subscribers.set(hub.subscriber_count() as i64);
    }

    /// Brings the HTTP listener's figures up to date (at scrape time).
    pub fn observe_http(&self, connections: &super::listener::Connections) {
        use std::sync::atomic::Ordering::Relaxed;
        let bump = |c: &Counter, value: u64| c.inc_by(value.saturating_sub(c.get()));
        self.http_connections.set(connections.open() as i64);
        bump(&self.http_refused, connections.refused.load(Relaxed));
        bump(&self.http_timed_out, connections.timed_out.load(Relaxed));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        pipeguard_common::VERDICT_ALLOW => "allow",
        pipeguard_common::VERDICT_DENY => "deny",
        pipeguard_common::VERDICT_AUDIT => "audit",
        _ => "error",
    }
}

/// Whether a pod's series stays; when it goes, it leaves `family` too.
fn keep_series(family: &Family<TrafficLabels, Counter>, labels: &TrafficLabels, gone: bool) -> bool {
    if gone {
        family.remove(labels);
    }
    !gone
}

/// Records an absolute kernel count as a counter increment since the `last` one seen.
fn observe_count(
    family: &Family<TrafficLabels, Counter>,
    last: &Mutex<HashMap<TrafficLabels, u64>>,
    labels: TrafficLabels,
    count: u64,
) {
    let prev = last
        .lock()
        .expect("metrics lock")
        .insert(labels.clone(), count)
        .unwrap_or(0);
    // A recreated map restarts at zero; count from there.
    family
        .get_or_create(&labels)
        .inc_by(count.checked_sub(prev).unwrap_or(count));
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{Metrics, TrafficLabels, observe_count};

    fn labels(pod: &str) -> TrafficLabels {
        TrafficLabels {
            namespace: "ci".into(),
            pod: pod.into(),
            verdict: "deny".into(),
        }
    }

    fn series_of(metrics: &Metrics, pod: &str) -> usize {
        let wanted = format!("pod=\"{pod}\"");
        metrics.encode().lines().filter(|l| l.contains(&wanted)).count()
    }

    #[test]
    fn a_pod_that_left_takes_its_series_with_it() {
        let metrics = Metrics::default();
        let pods = |names: &[&str]| -> HashMap<u64, (String, String)> {
            (0u64..)
                .zip(names)
                .map(|(id, name)| (id, ("ci".to_string(), name.to_string())))
                .collect()
        };
        metrics.set_pods(pods(&["job-1", "job-2"]));
        for pod in ["job-1", "job-2"] {
            metrics.observe_traffic(labels(pod), 3, 300);
            observe_count(&metrics.dns_queries, &metrics.last_dns, labels(pod), 2);
            observe_count(&metrics.ingress, &metrics.last_ingress, labels(pod), 1);
        }
        assert_eq!(series_of(&metrics, "job-1"), 4);

        metrics.set_pods(pods(&["job-2"]));
        assert_eq!(series_of(&metrics, "job-1"), 0, "{}", metrics.encode());
        assert_eq!(series_of(&metrics, "job-2"), 4);
        assert_eq!(metrics.last_traffic.lock().unwrap().len(), 2);
        assert_eq!(metrics.last_dns.lock().unwrap().len(), 1);
        assert_eq!(metrics.last_ingress.lock().unwrap().len(), 1);
    }
}
