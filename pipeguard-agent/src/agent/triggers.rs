//! What wakes the sync loop, and for what. A cache change needs a full sync (one pod or
//! policy can change every pod's allowlist); a new pod cgroup needs only that pod's entry,
//! computed from the inputs of the last full sync. Each wake-up is counted per source in
//! `pipeguard_sync_triggers_total`, so a source that wakes the loop for nothing shows.

use std::sync::Mutex;

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::Notify;

use super::{metrics::SourceLabels, pod_cgroups::PodCgroup};

/// New pod cgroups kept for the incremental path; beyond this a burst takes the full sync.
const MAX_CREATED: usize = 256;

pub struct Triggers {
    notify: Notify,
    pending: Mutex<Pending>,
    counts: Family<SourceLabels, Counter>,
}

#[derive(Default)]
struct Pending {
    full: bool,
    created: Vec<PodCgroup>,
}

/// What the loop has to do after a wake-up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Recompute every pod (a cache changed, a pod cgroup went, or too many came at once).
    pub full: bool,
    /// Pod cgroups created since the last wake-up (ignored when `full`).
    pub created: Vec<PodCgroup>,
}

impl Work {
    pub fn is_empty(&self) -> bool {
        !self.full && self.created.is_empty()
    }
}

impl Triggers {
    pub fn new(counts: Family<SourceLabels, Counter>) -> Self {
        Self {
            notify: Notify::new(),
            pending: Mutex::default(),
            counts,
        }
    }

    /// A cache (or the cgroup tree in a way the incremental path does not cover) changed.
    pub fn full(&self, source: &str) {
        self.pending.lock().expect("triggers lock").full = true;
        self.wake(source);
    }

    /// A pod cgroup appeared.
    pub fn created(&self, cgroup: PodCgroup) {
        {
            let mut pending = self.pending.lock().expect("triggers lock");
            if pending.created.len() < MAX_CREATED {
                pending.created.push(cgroup);
            } else {
                pending.full = true;
            }
        }
        self.wake("pod_cgroup_created");
    }

    /// Counts a wake-up of the loop by its own timer.
    pub fn count(&self, source: &str) {
        self.counts
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    fn wake(&self, source: &str) {
        self.count(source);
        self.notify.notify_one();
    }

    /// Resolves when something was triggered since the last [`Triggers::take`] (or spuriously;
    /// `take` then returns no work).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    pub fn take(&self) -> Work {
        let mut pending = self.pending.lock().expect("triggers lock");
        let Pending { full, created } = std::mem::take(&mut *pending);
        Work {
            full,
            created: if full { Vec::new() } else { created },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cg(n: u8) -> PodCgroup {
        PodCgroup {
            uid: format!("{n}"),
            path: format!("/x/pod{n}").into(),
        }
    }

    #[test]
    fn new_cgroups_alone_stay_incremental_and_anything_else_makes_it_full() {
        let t = Triggers::new(Family::default());
        assert!(t.take().is_empty());
        t.created(cg(1));
        t.created(cg(2));
        assert_eq!(
            t.take(),
            Work {
                full: false,
                created: vec![cg(1), cg(2)]
            }
        );
        assert!(t.take().is_empty(), "taken once");
        t.created(cg(3));
        t.full("Pod");
        assert_eq!(
            t.take(),
            Work {
                full: true,
                created: Vec::new()
            }
        );
        for i in 0..=MAX_CREATED {
            t.created(cg(i as u8));
        }
        assert!(t.take().full, "a burst beyond the bound takes the full sync");
        let counted = |source: &str| {
            t.counts
                .get_or_create(&SourceLabels {
                    source: source.into(),
                })
                .get()
        };
        assert_eq!(counted("pod_cgroup_created"), 3 + MAX_CREATED as u64 + 1);
        assert_eq!(counted("Pod"), 1);
    }
}
