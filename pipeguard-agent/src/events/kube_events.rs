//! Kubernetes Events on the pod, so `kubectl describe pod` shows blocked attempts.
//! Aggregated and rate-limited: at most one Event per pod and destination per interval,
//! carrying the count since the last one; posting happens off the event path.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::mpsc;

use super::record::Record;

/// One Kubernetes Event per pod and destination per this long, at most.
pub const INTERVAL: Duration = Duration::from_secs(30);

type Key = (String, String); // pod uid, destination

struct Pending {
    record: Record,
    count: u64,
    last_sent: Option<Instant>,
}

pub struct KubeEvents {
    pending: HashMap<Key, Pending>,
    tx: mpsc::Sender<Event>,
}

impl KubeEvents {
    /// Starts the poster; `errors` is bumped for every Event the API refused.
    pub fn start(client: Client, node: String, errors: prometheus_client::metrics::counter::Counter) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(256);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let ns = event.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Event> = Api::namespaced(client.clone(), &ns);
                if let Err(error) = api.create(&PostParams::default(), &event).await {
                    errors.inc();
                    tracing::warn!(%error, node = %node, "posting a Kubernetes Event failed");
                }
            }
        });
        Self {
            pending: HashMap::new(),
            tx,
        }
    }

    /// Counts the record; sends an Event when its key's interval has passed.
    pub fn observe(&mut self, record: &Record, now: Instant) {
        let Some(pod) = &record.pod else { return };
        let dest = match (record.dst_ip, record.dst_port) {
            (Some(ip), Some(port)) => format!("{ip}:{port}/{}", record.protocol.clone().unwrap_or_default()),
            _ => record.hook.clone().unwrap_or_default(),
        };
        let entry = self.pending.entry((pod.uid.clone(), dest)).or_insert(Pending {
            record: record.clone(),
            count: 0,
            last_sent: None,
        });
        entry.count += record.count;
        entry.record = record.clone();
        self.flush_due(now);
    }

    pub fn flush_due(&mut self, now: Instant) {
        for ((_, dest), p) in self.pending.iter_mut() {
            let due = p.last_sent.is_none_or(|t| now.duration_since(t) >= INTERVAL);
            if p.count == 0 || !due {
                continue;
            }
            // try_send: a full queue means the API is slow; the count carries over.
            if self.tx.try_send(to_event(&p.record, dest, p.count)).is_ok() {
                p.count = 0;
                p.last_sent = Some(now);
            }
        }
    }
}

fn to_event(r: &Record, dest: &str, count: u64) -> Event {
    let pod = r.pod.clone().expect("only pod records are kept");
    let audit = r.verdict.as_deref() == Some("audit");
    let who = r.comm.clone().map(|c| format!(" by {c}")).unwrap_or_default();
    pod_event(
        PodEvent {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &pod.uid,
        },
        if audit { "EgressAudit" } else { "EgressDenied" },
        "Connect",
        format!(
            "pipeguard {} {count} egress attempt(s) to {dest}{who}: {}",
            if audit { "would block" } else { "blocked" },
            r.reason.clone().unwrap_or_default()
        ),
        count,
        &r.node,
    )
}

/// The pod an Event is about.
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
    let now = Timestamp::now();
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.pipeguard.", pod.name)),
            namespace: Some(pod.namespace.to_string()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            kind: Some("Pod".into()),
            api_version: Some("v1".into()),
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
    tokio::spawn(async move {
        let api: Api<Event> = Api::namespaced(client, &event.metadata.namespace.clone().unwrap_or_default());
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(%error, "posting a Kubernetes Event failed");
        }
    });
}
