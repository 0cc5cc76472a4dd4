//! Promises the agent checks about itself each sync, each turning it not ready (with the
//! reason on /readyz, a log line and `pipeguard_ready 0`) when it cannot keep it.
//!
//! A new pod cgroup under kubepods is registered within one sync of its appearing (the
//! inotify watch wakes the loop). Until then it has what `--unknown-pods` gives unknown
//! cgroups. A pod cgroup that holds processes and matches no pod scheduled on this node for
//! longer than [`WINDOW`] (its pod object has not arrived: the API is slow or unreachable)
//! breaks that promise.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use super::pod_cgroups::PodCgroup;

/// How long a populated pod cgroup may stay unmatched before the agent says so.
pub const WINDOW: Duration = Duration::from_secs(5);
/// How often the loop looks again while some pod cgroup is unmatched.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Pod cgroups without a pod, by UID, with when they were first seen so.
#[derive(Default)]
pub struct Unmatched {
    since: HashMap<String, Instant>,
}

impl Unmatched {
    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }

    pub fn len(&self) -> usize {
        self.since.len()
    }

    /// A pod cgroup that went before it was matched (its pod object was deleted first).
    pub fn forget(&mut self, uid: &str) {
        self.since.remove(uid);
    }

    /// Records this scan's unmatched cgroups; the problem, if one with processes has waited
    /// longer than [`WINDOW`].
    pub fn check(&mut self, unmatched: &[PodCgroup], now: Instant) -> Option<String> {
        let mut since = HashMap::with_capacity(unmatched.len());
        let mut late = Vec::new();
        for cg in unmatched {
            let first = self.since.get(&cg.uid).copied().unwrap_or(now);
            since.insert(cg.uid.clone(), first);
            if now.duration_since(first) > WINDOW && populated(&cg.path) {
                late.push(cg.uid.as_str());
            }
        }
        self.since = since;
        if late.is_empty() {
            return None;
        }
        late.sort_unstable();
        Some(format!(
            "{} pod cgroup(s) with processes match no pod on this node after {}s (first: pod{}); the API watch may be behind; they get what --unknown-pods gives",
            late.len(),
            WINDOW.as_secs(),
            late[0]
        ))
    }
}

/// Whether the cgroup or its descendants hold processes (`populated 1` in cgroup.events).
fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}
