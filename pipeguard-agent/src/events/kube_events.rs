//! Kubernetes Events on the pod, so `kubectl describe pod` shows blocked attempts and
//! anomalies. Aggregated and rate-limited by [`Limiter`] (per pod and destination, per pod,
//! per node, in a bounded table, O(1) per record); anomalies have a limiter of their own,
//! so a flood of denials (a deny_burst) cannot hold back the Event that names it. Posting
//! happens off the event path, and a slow API server costs Events, never the violation
//! stream. Job-controlled text (the process name, names in an anomaly's detail) is escaped
//! before it reaches a message.

use std::time::Instant;

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::mpsc;

pub use super::kube_limit::INTERVAL;
use super::{
    kube_limit::{Due, Limiter},
    record::{Kind, Record},
};
use crate::escape::printable;

/// Events waiting for the API server at most; past it they are counted and dropped.
const POST_QUEUE: usize = 256;

pub struct KubeEvents {
    limiter: Limiter,
    /// Anomaly records, apart from the violations.
    anomalies: Limiter,
    tx: mpsc::Sender<Event>,
    /// Bumped for every Event refused by the API or dropped (queue full, table full).
    errors: prometheus_client::metrics::counter::Counter,
    reported_dropped: u64,
}

impl KubeEvents {
    /// Starts the poster; `errors` is bumped for every Event the API refused.
    pub fn start(client: Client, node: String, errors: prometheus_client::metrics::counter::Counter) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(POST_QUEUE);
        let poster_errors = errors.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let ns = event.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Event> = Api::namespaced(client.clone(), &ns);
                if let Err(error) = api.create(&PostParams::default(), &event).await {
                    poster_errors.inc();
                    tracing::warn!(%error, node = %node, "posting a Kubernetes Event failed");
                }
            }
        });
        Self {
            limiter: Limiter::new(Instant::now()),
            anomalies: Limiter::new(Instant::now()),
            tx,
            errors,
            reported_dropped: 0,
        }
    }

    /// Counts the record: O(1), nothing is sent from here.
    pub fn observe(&mut self, record: &Record, now: Instant) {
        match record.kind {
            Kind::Anomaly => self.anomalies.observe(record, now),
            _ => self.limiter.observe(record, now),
        }
    }

    /// Sends what the limits allow now (called from the pipeline's timer).
    pub fn flush_due(&mut self, now: Instant) {
        let due = self.anomalies.due(now).into_iter().chain(self.limiter.due(now));
        for due in due {
            // try_send: a full queue means the API is slow; the Event is counted as lost.
            if self.tx.try_send(to_event(&due)).is_err() {
                self.errors.inc();
            }
        }
        let dropped = self.limiter.dropped + self.anomalies.dropped;
        if dropped > self.reported_dropped {
            tracing::warn!(
                attempts = dropped - self.reported_dropped,
                "Kubernetes Events table full: attempts not counted in Events (the stream has them)"
            );
            self.errors.inc();
            self.reported_dropped = dropped;
        }
    }
}

fn to_event(due: &Due) -> Event {
    let r = &due.record;
    let pod = r.pod.clone().expect("only pod records are kept");
    if r.kind == Kind::Anomaly {
        return pod_event(
            PodEvent {
                namespace: &pod.namespace,
                name: &pod.name,
                uid: &pod.uid,
            },
            "PipeguardAnomaly",
            "Detect",
            format!(
                "pipeguard raised {} {} time(s): {}",
                printable(r.signal.as_deref().unwrap_or_default()),
                due.count,
                printable(r.reason.as_deref().unwrap_or_default())
            ),
            due.count,
            &r.node,
        );
    }
    let audit = r.verdict.as_deref() == Some("audit");
    let who = r
        .comm
        .as_deref()
        .map(|c| format!(" by {}", printable(c)))
        .unwrap_or_default();
    let count = due.count;
    pod_event(
        PodEvent {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &pod.uid,
        },
        if audit { "EgressAudit" } else { "EgressDenied" },
        "Connect",
        match r.question_text() {
            Some(question) => format!(
                "pipeguard {} {count} DNS query(ies) for {question} to {}{who}: {}",
                if audit { "would refuse" } else { "refused" },
                r.dst_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                printable(r.reason.as_deref().unwrap_or_default())
            ),
            // Already escaped.
            None => format!(
                "pipeguard {} {count} egress attempt(s) to {}{who}: {}",
                if audit { "would block" } else { "blocked" },
                due.destination,
                printable(r.reason.as_deref().unwrap_or_default())
            ),
        },
        count,
        &r.node,
    )
}

/// The object an Event is about.
pub struct PodEvent<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// A Warning Event on a pod, reported by pipeguard from `node`.
fn pod_event(
    pod: PodEvent<'_>,
    reason: &str,
    action: &str,
    message: String,
    count: u64,
    node: &str,
) -> Event {
    object_event(("Pod", "v1"), pod, reason, action, message, count, node)
}

/// A Warning Event on any namespaced object, (kind, apiVersion).
fn object_event(
    (kind, api_version): (&str, &str),
    pod: PodEvent<'_>,
    reason: &str,
    action: &str,
    message: String,
    count: u64,
    node: &str,
) -> Event {
    let now = Timestamp::now();
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.pipeguard.", pod.name)),
            namespace: Some(pod.namespace.to_string()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            kind: Some(kind.into()),
            api_version: Some(api_version.into()),
            name: Some(pod.name.to_string()),
            namespace: Some(pod.namespace.to_string()),
            uid: Some(pod.uid.to_string()),
            ..ObjectReference::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some("Warning".into()),
        count: Some(count.min(i32::MAX as u64) as i32),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        reporting_component: Some("pipeguard".into()),
        reporting_instance: Some(node.to_string()),
        action: Some(action.into()),
        source: Some(EventSource {
            component: Some("pipeguard".into()),
            host: Some(node.to_string()),
        }),
        ..Event::default()
    }
}

/// One Event on a guarded pod that starts failing closed (its policies do not compile), so
/// `kubectl describe pod` says why its egress is restricted.
pub fn post_failed_closed(
    client: Client,
    pod: &crate::pod::LocalPod,
    reason: &str,
    kept_last_good: bool,
    node: &str,
) {
    let event = pod_event(
        PodEvent {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &pod.uid,
        },
        "EgressPolicyFailedClosed",
        "Compile",
        format!(
            "pipeguard is failing closed: {reason}; {}",
            if kept_last_good {
                "the last good allowlist stays in force"
            } else {
                "all egress is denied"
            }
        ),
        1,
        node,
    );
    post(client, event);
}

/// One Event on a guarded pod that can step around a node-level guard (privileged,
/// CAP_NET_ADMIN/SYS_ADMIN/BPF added, hostPID): reported, or all its egress denied with
/// `--refuse-privileged`.
pub fn post_escape_capable(
    client: Client,
    pod: &crate::pod::LocalPod,
    reason: &str,
    refused: bool,
    node: &str,
) {
    let reason = printable(reason);
    let message = if refused {
        format!(
            "pipeguard denies all egress of this pod (--refuse-privileged): it can step around the guard ({reason})"
        )
    } else {
        format!(
            "this pod can step around pipeguard's egress guard ({reason}); its egress is enforced only as long as it does not"
        )
    };
    let event = pod_event(
        PodEvent {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &pod.uid,
        },
        "EgressGuardBypassable",
        "Inspect",
        message,
        1,
        node,
    );
    post(client, event);
}

/// One Event on a NetworkPolicy the agent rejected (it does not deserialize or validate),
/// so its author sees why with `kubectl describe networkpolicy`.
pub fn post_policy_rejected(client: Client, policy: PodEvent<'_>, error: &str, node: &str) {
    let event = object_event(
        ("NetworkPolicy", "networking.k8s.io/v1"),
        policy,
        "PolicyRejected",
        "Compile",
        format!(
            "pipeguard rejected this NetworkPolicy; guarded pods in its namespace fail closed: {}",
            printable(error)
        ),
        1,
        node,
    );
    post(client, event);
}

fn post(client: Client, event: Event) {
    tokio::spawn(async move {
        let api: Api<Event> = Api::namespaced(client, &event.metadata.namespace.clone().unwrap_or_default());
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(%error, "posting a Kubernetes Event failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(extra: serde_json::Value) -> Due {
        let mut json = serde_json::json!({
            "kind": "violation", "time": "t", "first_seen": "t", "last_seen": "t", "count": 2,
            "verdict": "deny", "protocol": "udp", "comm": "curl", "node": "n", "cgroup_id": 1,
            "pod": {"namespace": "ci", "name": "runner", "uid": "u"},
            "reason": "no domain rule for this pod allows the name"
        });
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let record: Record = serde_json::from_value(json).unwrap();
        Due {
            destination: super::super::kube_limit::destination(&record),
            record,
            count: 2,
        }
    }

    #[test]
    fn an_anomaly_names_its_signal_and_detail_escaped() {
        let mut record = due(serde_json::json!({})).record;
        record.kind = Kind::Anomaly;
        record.signal = Some("dns_tunnel".into());
        record.verdict = None;
        record.reason = Some("a 56-character label under t.evil\u{1b}[2J.example".into());
        let mut limiter = Limiter::new(Instant::now());
        let now = Instant::now();
        limiter.observe(&record, now);
        limiter.observe(&record, now);
        let due = limiter.due(now);
        assert_eq!(due.len(), 1, "one signal of one pod: one Event");
        assert_eq!(
            due[0].count, 2,
            "counted per raise, not by what the signal counted"
        );
        let event = to_event(&due[0]);
        assert_eq!(event.reason.as_deref(), Some("PipeguardAnomaly"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.involved_object.uid.as_deref(), Some("u"));
        let message = event.message.unwrap();
        assert_eq!(
            message,
            "pipeguard raised dns_tunnel 2 time(s): a 56-character label under t.evil\\u{1b}[2J.example"
        );
    }

    #[test]
    fn messages_name_the_query_or_the_learned_name_escaped() {
        let query = to_event(&due(serde_json::json!({
            "hook": "dns", "dst_ip": "10.96.0.10", "dst_port": 53,
            "query": "secret\\x0a.exfil.test\u{1b}[2J", "qtype": "TXT"
        })));
        let message = query.message.unwrap();
        assert!(
            message.starts_with(
                "pipeguard refused 2 DNS query(ies) for secret\\\\x0a.exfil.test\\u{1b}[2J (TXT) to 10.96.0.10 by curl"
            ),
            "{message}"
        );
        let named = to_event(&due(serde_json::json!({
            "hook": "connect4", "protocol": "tcp", "dst_ip": "203.0.113.7", "dst_port": 443,
            "dst_name": "exfil.example.net"
        })));
        let message = named.message.unwrap();
        assert!(
            message.contains("egress attempt(s) to 203.0.113.7:443/tcp (exfil.example.net) by curl"),
            "{message}"
        );
    }
}
