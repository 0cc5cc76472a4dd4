//! Which violation (or anomaly) records become Kubernetes Events, and when: aggregated per
//! pod and destination, rate-limited per pod and per node, in a bounded table. Each record
//! costs O(1) (one hash lookup); the timer does at most a bounded number of queue pops per
//! tick.
//! A job that scans 20,000 ports fills the table once and then only bumps counts.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::record::{Kind, Record};
use crate::escape::printable;

/// One Event per pod and destination per this long, at most.
pub const INTERVAL: Duration = Duration::from_secs(30);
/// Events per pod per `POD_WINDOW`, at most.
pub const PER_POD: u32 = 10;
pub const POD_WINDOW: Duration = Duration::from_secs(60);
/// Events per second from this node, on average, and the burst allowed above it.
pub const NODE_RATE: f64 = 5.0;
pub const NODE_BURST: f64 = 20.0;
/// Pod and destination pairs tracked at most; attempts beyond are counted as dropped.
pub const MAX_KEYS: usize = 4096;
/// Distinct destinations per pod tracked apart; the rest share one "other" entry.
pub const MAX_KEYS_PER_POD: usize = 64;
/// Queue entries looked at per tick, at most (bounds the work of one tick).
const MAX_POPS: usize = 1024;

/// The destination of the entry that collects a pod's destinations past `MAX_KEYS_PER_POD`.
pub const OTHER: &str = "other destinations";

type Key = (String, String); // pod uid, destination

struct Entry {
    /// The latest record, for the Event's text.
    record: Record,
    /// Attempts since the last Event.
    count: u64,
}

struct PodBudget {
    keys: usize,
    window_start: Instant,
    sent: u32,
}

/// What to post: the latest record, its destination text, and the attempts it stands for.
pub struct Due {
    pub record: Record,
    pub destination: String,
    pub count: u64,
}

pub struct Limiter {
    entries: HashMap<Key, Entry>,
    /// Keys never sent yet, oldest first.
    fresh: VecDeque<Key>,
    /// Keys sent (or held back) at some time, with the time they may go again; in order.
    waiting: VecDeque<(Instant, Key)>,
    pods: HashMap<String, PodBudget>,
    /// Pods with no key left, forgotten once their window is over.
    idle_pods: VecDeque<(Instant, String)>,
    tokens: f64,
    last_refill: Instant,
    /// Attempts not tracked because the table was full.
    pub dropped: u64,
}

/// The destination text of a record (escaped): address, port, protocol and learned name,
/// the DNS question, or the hook; for an anomaly, its signal first (`deny_burst`,
/// `new_destination: 127.0.0.1:443/tcp`, `dns_tunnel: exfil.test`), so each signal (and
/// each tunnel's domain) is aggregated apart.
pub fn destination(record: &Record) -> String {
    if record.kind == Kind::Anomaly {
        let signal = printable(record.signal.as_deref().unwrap_or_default()).into_owned();
        let target = record
            .destination_text()
            .or_else(|| record.domain.as_deref().map(|d| printable(d).into_owned()));
        return match target {
            Some(target) => format!("{signal}: {target}"),
            None => signal,
        };
    }
    record
        .target_text()
        .unwrap_or_else(|| record.hook.clone().unwrap_or_default())
}

/// What one record adds to its Event's count: the attempts it stands for, or one raised
/// anomaly (whose own count is what the signal counted, e.g. bytes).
fn occurrences(record: &Record) -> u64 {
    match record.kind {
        Kind::Anomaly => 1,
        _ => record.count,
    }
}

impl Limiter {
    pub fn new(now: Instant) -> Self {
        Self {
            entries: HashMap::new(),
            fresh: VecDeque::new(),
            waiting: VecDeque::new(),
            pods: HashMap::new(),
            idle_pods: VecDeque::new(),
            tokens: NODE_BURST,
            last_refill: now,
            dropped: 0,
        }
    }

    /// Pod and destination pairs tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Counts a record: O(1).
    pub fn observe(&mut self, record: &Record, now: Instant) {
        let Some(pod) = &record.pod else { return };
        let n = occurrences(record);
        let mut key = (pod.uid.clone(), destination(record));
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.count += n;
            entry.record = record.clone();
            return;
        }
        let keys = self.pods.get(&pod.uid).map_or(0, |b| b.keys);
        if keys >= MAX_KEYS_PER_POD {
            key.1 = OTHER.to_string();
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.count += n;
                entry.record = record.clone();
                return;
            }
        }
        if self.entries.len() >= MAX_KEYS {
            self.dropped += n;
            return;
        }
        let budget = self.pods.entry(pod.uid.clone()).or_insert(PodBudget {
            keys: 0,
            window_start: now,
            sent: 0,
        });
        budget.keys += 1;
        self.entries.insert(
            key.clone(),
            Entry {
                record: record.clone(),
                count: n,
            },
        );
        self.fresh.push_back(key);
    }

    /// What may be posted now, within the node's and the pods' budgets.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
        self.tokens = (self.tokens + elapsed * NODE_RATE).min(NODE_BURST);
        self.last_refill = now;
        let mut out = Vec::new();
        let mut pops = 0;
        // New pairs first: the first Event about a destination is the one people need.
        while pops < MAX_POPS && self.tokens >= 1.0 {
            let Some(key) = self.fresh.pop_front() else { break };
            pops += 1;
            self.send_or_hold(key, now, &mut out);
        }
        while pops < MAX_POPS {
            match self.waiting.front() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            let Some((_, key)) = self.waiting.pop_front() else {
                break;
            };
            pops += 1;
            let count = self.entries.get(&key).map_or(0, |e| e.count);
            if count == 0 {
                self.forget(&key, now);
                continue;
            }
            if self.tokens < 1.0 {
                // Out of node budget: try again at the front next tick.
                self.waiting.push_front((now, key));
                break;
            }
            self.send_or_hold(key, now, &mut out);
        }
        while let Some((at, _)) = self.idle_pods.front() {
            if *at > now {
                break;
            }
            let Some((_, uid)) = self.idle_pods.pop_front() else {
                break;
            };
            if self.pods.get(&uid).is_some_and(|b| b.keys == 0) {
                self.pods.remove(&uid);
            }
        }
        out
    }

    fn send_or_hold(&mut self, key: Key, now: Instant, out: &mut Vec<Due>) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let budget = self.pods.get_mut(&key.0).expect("every key has a pod budget");
        if now.saturating_duration_since(budget.window_start) >= POD_WINDOW {
            budget.window_start = now;
            budget.sent = 0;
        }
        if budget.sent < PER_POD {
            budget.sent += 1;
            self.tokens -= 1.0;
            out.push(Due {
                record: entry.record.clone(),
                destination: key.1.clone(),
                count: std::mem::take(&mut entry.count),
            });
        }
        // Sent or held back: either way the pair may go again after the interval, with
        // whatever it has counted by then.
        self.waiting.push_back((now + INTERVAL, key));
    }

    fn forget(&mut self, key: &Key, now: Instant) {
        self.entries.remove(key);
        if let Some(budget) = self.pods.get_mut(&key.0) {
            budget.keys -= 1;
            if budget.keys == 0 {
                self.idle_pods
                    .push_back((budget.window_start.max(now) + POD_WINDOW, key.0.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::record::PodRef;

    fn record(uid: &str, port: u16) -> Record {
        Record {
            kind: Kind::Violation,
            signal: None,
            domain: None,
            time: "t".into(),
            first_seen: "t".into(),
            last_seen: "t".into(),
            count: 1,
            verdict: Some("deny".into()),
            hook: Some("connect4".into()),
            protocol: Some("tcp".into()),
            dst_ip: Some("127.0.0.1".parse().unwrap()),
            dst_port: Some(port),
            dst_name: None,
            query: None,
            qtype: None,
            malformed: false,
            pid: Some(1),
            comm: Some("curl".into()),
            exe: None,
            node: "n".into(),
            pod: Some(PodRef {
                namespace: "ci".into(),
                name: "runner".into(),
                uid: uid.into(),
                container: None,
            }),
            policies: vec![],
            reason: None,
            ci: None,
            cgroup_id: 1,
        }
    }

    #[test]
    fn each_tunnels_domain_is_an_event_of_its_own() {
        let tunnel = |domain: &str| Record {
            kind: Kind::Anomaly,
            signal: Some("dns_tunnel".into()),
            domain: Some(domain.into()),
            dst_ip: None,
            dst_port: None,
            ..record("a", 1)
        };
        assert_eq!(destination(&tunnel("exfil.test")), "dns_tunnel: exfil.test");
        assert_ne!(
            destination(&tunnel("exfil.test")),
            destination(&tunnel("other.test"))
        );
    }

    #[test]
    fn a_port_scan_is_bounded_per_pod_and_per_node_and_nothing_is_lost_silently() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        for port in 0..20_000u16 {
            l.observe(&record("a", port), t0);
        }
        assert_eq!(l.len(), MAX_KEYS_PER_POD + 1, "the rest share one entry");
        let first = l.due(t0);
        assert_eq!(first.len(), PER_POD as usize, "per-pod budget");
        assert!(first.iter().all(|d| d.count == 1));
        // Over a long run the pod gets PER_POD Events per window, and every attempt is
        // counted in some Event or still pending.
        let mut posted: u64 = first.iter().map(|d| d.count).sum();
        let mut events = first.len();
        let mut now = t0;
        for _ in 0..(10 * 60 * 4) {
            now += Duration::from_millis(250);
            let due = l.due(now);
            events += due.len();
            posted += due.iter().map(|d| d.count).sum::<u64>();
        }
        let pending: u64 = l.entries.values().map(|e| e.count).sum();
        assert_eq!(posted + pending + l.dropped, 20_000);
        assert!(events <= (PER_POD as usize) * 11, "{events} Events in 10 minutes");
        assert!(l.is_empty(), "quiet pairs are forgotten: {}", l.len());
        assert!(l.pods.is_empty(), "and so is the pod");
    }

    #[test]
    fn the_table_is_bounded_and_the_node_budget_holds_across_pods() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        for pod in 0..200 {
            for port in 0..100u16 {
                l.observe(&record(&format!("pod-{pod}"), port), t0);
            }
        }
        assert_eq!(l.len(), MAX_KEYS);
        assert!(l.dropped > 0);
        let burst = l.due(t0);
        assert_eq!(burst.len(), NODE_BURST as usize);
        let next = l.due(t0 + Duration::from_secs(1));
        assert_eq!(next.len(), NODE_RATE as usize);
    }
}
