//! Aggregation: the first attempt of a kind goes out at once; identical ones inside the
//! window are counted and go out as one record when it closes. A flood becomes a bounded
//! stream, and the counts still add up to every attempt.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::engine::events::Violation;

/// Identical attempts: same pod, destination, hook, verdict and process, and for DNS the
/// same question (each refused name is worth its own record).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    pod_cgroup_id: u64,
    dst_ip: Option<IpAddr>,
    dst_port: Option<u16>,
    protocol: String,
    hook: &'static str,
    verdict: &'static str,
    pid: u32,
    query: Option<String>,
    qtype: Option<String>,
}

impl From<&Violation> for Key {
    fn from(v: &Violation) -> Self {
        Self {
            pod_cgroup_id: v.pod_cgroup_id,
            dst_ip: v.dst_ip,
            dst_port: v.dst_port,
            protocol: v.protocol.clone(),
            hook: v.hook,
            verdict: v.verdict,
            pid: v.pid,
            query: v.query.clone(),
            qtype: v.qtype.clone(),
        }
    }
}

struct Open {
    opened: Instant,
    /// Attempts after the first, not yet reported.
    suppressed: u64,
    first_suppressed: Option<String>,
    last: Violation,
}

/// One record to emit: `sample` stands for `count` attempts seen from `first_seen` to the
/// sample's own time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emit {
    pub sample: Violation,
    pub count: u64,
    pub first_seen: String,
}

pub struct Aggregator {
    window: Duration,
    max_keys: usize,
    open: HashMap<Key, Open>,
}

impl Aggregator {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys,
            open: HashMap::new(),
        }
    }

    /// Returns the record to emit now, if this attempt opens a window.
    pub fn add(&mut self, v: Violation, now: Instant) -> Vec<Emit> {
        let key = Key::from(&v);
        if let Some(open) = self.open.get_mut(&key) {
            open.suppressed += 1;
            open.first_suppressed.get_or_insert_with(|| v.time.clone());
            open.last = v;
            return Vec::new();
        }
        // Memory stays bounded: with too many open windows, close them all early.
        let mut out = if self.open.len() >= self.max_keys {
            self.flush_all()
        } else {
            Vec::new()
        };
        out.push(Emit {
            first_seen: v.time.clone(),
            sample: v.clone(),
            count: 1,
        });
        self.open.insert(
            key,
            Open {
                opened: now,
                suppressed: 0,
                first_suppressed: None,
                last: v,
            },
        );
        out
    }

    /// Closes the windows older than the window length.
    pub fn flush(&mut self, now: Instant) -> Vec<Emit> {
        let window = self.window;
        let expired: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, o)| now.duration_since(o.opened) >= window)
            .map(|(k, _)| k.clone())
            .collect();
        expired.into_iter().filter_map(|k| self.close(&k)).collect()
    }

    pub fn flush_all(&mut self) -> Vec<Emit> {
        let keys: Vec<Key> = self.open.keys().cloned().collect();
        keys.into_iter().filter_map(|k| self.close(&k)).collect()
    }

    fn close(&mut self, key: &Key) -> Option<Emit> {
        let open = self.open.remove(key)?;
        (open.suppressed > 0).then(|| Emit {
            first_seen: open.first_suppressed.unwrap_or_else(|| open.last.time.clone()),
            sample: open.last,
            count: open.suppressed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violation(port: u16, time: &str) -> Violation {
        Violation {
            time: time.into(),
            verdict: "deny",
            hook: "connect4",
            direction: "egress",
            protocol: "tcp".into(),
            dst_ip: Some("10.0.0.1".parse().unwrap()),
            dst_port: Some(port),
            src_ip: None,
            src_port: None,
            pid: 7,
            comm: "curl".into(),
            cgroup_id: 1,
            pod_cgroup_id: 1,
            policy_id: 1,
            socket: None,
            dst_name: None,
            query: None,
            qtype: None,
            malformed: false,
            name_hash: 0,
        }
    }

    #[test]
    fn a_flood_becomes_two_records_whose_counts_add_up() {
        let mut agg = Aggregator::new(Duration::from_secs(1), 100);
        let t0 = Instant::now();
        let mut emitted = Vec::new();
        for i in 0..10_000 {
            emitted.extend(agg.add(violation(443, &format!("t{i}")), t0));
        }
        assert_eq!(emitted.len(), 1, "the first goes out at once");
        emitted.extend(agg.flush(t0 + Duration::from_millis(500)));
        assert_eq!(emitted.len(), 1, "the window is still open");
        emitted.extend(agg.flush(t0 + Duration::from_secs(1)));
        assert_eq!(emitted.len(), 2);
        assert_eq!(emitted.iter().map(|e| e.count).sum::<u64>(), 10_000);
        assert_eq!(
            (emitted[1].first_seen.as_str(), emitted[1].sample.time.as_str()),
            ("t1", "t9999")
        );
    }

    #[test]
    fn different_destinations_are_different_records_and_keys_stay_bounded() {
        let mut agg = Aggregator::new(Duration::from_secs(1), 3);
        let t0 = Instant::now();
        let mut emitted = Vec::new();
        for port in 0..10 {
            for _ in 0..2 {
                emitted.extend(agg.add(violation(port, "t"), t0));
            }
        }
        emitted.extend(agg.flush_all());
        assert_eq!(emitted.iter().map(|e| e.count).sum::<u64>(), 20);
        assert!(agg.open.is_empty());
        assert!(emitted.len() <= 20);
    }
}
