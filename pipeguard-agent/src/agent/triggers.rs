//! What wakes the sync loop, and for what. A pod or namespace event carries what changed
//! (the loop keeps its own copy of the cluster, `world`) and a policy event its namespace,
//! so the loop recomputes only the pods they can affect (`affected`); a relist or a domain
//! object needs a full sync; a new pod cgroup needs only that pod's entry, and one that went
//! only the removal of its entry. Each wake-up is counted per source in
//! `pipeguard_sync_triggers_total`, so a source that wakes the loop for nothing shows.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::Notify;

use super::{
    metrics::SourceLabels,
    pod_cgroups::PodCgroup,
    world::{PodKey, PodRecord},
};

/// New (or removed) pod cgroups kept for the incremental path; beyond this a burst takes
/// the full sync.
const MAX_CREATED: usize = 256;

pub struct Triggers {
    notify: Notify,
    pending: Mutex<Pending>,
    counts: Family<SourceLabels, Counter>,
}

/// What the loop has to do after a wake-up.
#[derive(Debug, Default)]
pub struct Work {
    /// Recompute every pod (a relist, a domain object, or too many pod cgroups came or
    /// went at once).
    pub full: bool,
    /// Pod cgroups created since the last wake-up (ignored when `full`).
    pub created: Vec<PodCgroup>,
    /// Pod cgroups removed since the last wake-up (ignored when `full`).
    pub removed: Vec<PodCgroup>,
    /// Every pod, from a relist of the pod watch (the changes in `pods` came after it).
    pub relisted: Option<Vec<(PodKey, PodRecord)>>,
    /// The latest state of each pod that changed (`None`: deleted).
    pub pods: HashMap<PodKey, Option<PodRecord>>,
    /// Namespaces whose object changed.
    pub namespaces: BTreeSet<String>,
    /// Namespaces where a NetworkPolicy changed.
    pub policy_namespaces: BTreeSet<String>,
}

impl Work {
    pub fn is_empty(&self) -> bool {
        !self.full
            && self.created.is_empty()
            && self.removed.is_empty()
            && self.relisted.is_none()
            && self.pods.is_empty()
            && self.namespaces.is_empty()
            && self.policy_namespaces.is_empty()
    }
}

type Pending = Work;

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

    /// A pod changed (`None`: deleted); a later change of the same pod replaces it.
    pub fn pod(&self, key: PodKey, record: Option<PodRecord>) {
        self.pending
            .lock()
            .expect("triggers lock")
            .pods
            .insert(key, record);
        self.wake("Pod");
    }

    /// The pod watch listed every pod: what it had pending is superseded.
    pub fn relisted_pods(&self, records: Vec<(PodKey, PodRecord)>) {
        {
            let mut pending = self.pending.lock().expect("triggers lock");
            pending.pods.clear();
            pending.relisted = Some(records);
        }
        self.wake("Pod");
    }

    pub fn namespace(&self, name: String) {
        self.pending
            .lock()
            .expect("triggers lock")
            .namespaces
            .insert(name);
        self.wake("Namespace");
    }

    /// A NetworkPolicy in `namespace` changed.
    pub fn policy(&self, namespace: String) {
        self.pending
            .lock()
            .expect("triggers lock")
            .policy_namespaces
            .insert(namespace);
        self.wake("NetworkPolicy");
    }

    /// A pod cgroup appeared.
    pub fn created(&self, cgroup: PodCgroup) {
        self.keep(cgroup, |work| &mut work.created);
        self.wake("pod_cgroup_created");
    }

    /// A pod cgroup was removed (its pod finished).
    pub fn removed(&self, cgroup: PodCgroup) {
        self.keep(cgroup, |work| &mut work.removed);
        self.wake("pod_cgroup_removed");
    }

    /// Into `list` of the pending work, or a full sync once it holds `MAX_CREATED`.
    fn keep(&self, cgroup: PodCgroup, list: impl FnOnce(&mut Work) -> &mut Vec<PodCgroup>) {
        let mut pending = self.pending.lock().expect("triggers lock");
        let list = list(&mut pending);
        if list.len() < MAX_CREATED {
            list.push(cgroup);
        } else {
            pending.full = true;
        }
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
        let mut work = std::mem::take(&mut *self.pending.lock().expect("triggers lock"));
        if work.full {
            // The full sync scans the cgroups.
            work.created.clear();
            work.removed.clear();
        }
        work
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
        let work = t.take();
        assert!(!work.full);
        assert_eq!(work.created, vec![cg(1), cg(2)]);
        assert!(t.take().is_empty(), "taken once");
        t.created(cg(3));
        t.full("Pod");
        let work = t.take();
        assert!(work.full);
        assert!(work.created.is_empty());
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

    #[test]
    fn removed_cgroups_stay_incremental_up_to_the_bound() {
        let t = Triggers::new(Family::default());
        t.removed(cg(1));
        t.created(cg(2));
        let work = t.take();
        assert!(!work.full && !work.is_empty());
        assert_eq!((work.removed, work.created), (vec![cg(1)], vec![cg(2)]));
        t.removed(cg(3));
        t.full("Namespace");
        assert!(t.take().removed.is_empty(), "the full sync scans instead");
        for i in 0..=MAX_CREATED {
            t.removed(cg(i as u8));
        }
        assert!(t.take().full, "a burst beyond the bound takes the full sync");
    }
}
