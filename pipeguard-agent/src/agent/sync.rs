//! Applies the desired state to the kernel maps incrementally, in an order that never
//! opens a hole. Identical allowlists share an id. When every pod using an allowlist moves
//! to the same new one, the id is changed in place, key by key in the hole-free order of
//! `Engine::replace_policy`: a one-CIDR edit of a 100k-entry policy costs one map write.
//! Otherwise the new allowlist is written under a fresh id, the pod entries are switched to
//! it, and the old id is deleted once unused.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use pipeguard_common::PodEntry;

use super::desired::DesiredPod;
use crate::engine::{Engine, EngineError, PolicyEntries};

/// What the maps hold, as far as this agent wrote them. An allowlist is kept once, shared
/// by reference with the pods that use it (at 100k CIDRs one copy is 14 MB).
#[derive(Default)]
pub struct Applied {
    /// Allowlist (by content) → its policy id.
    policies: HashMap<Arc<PolicyEntries>, u32>,
    pods: HashMap<u64, (Arc<PolicyEntries>, PodEntry)>,
    /// Policy ids are never reused while the agent runs; 0 is never used.
    next_id: u32,
    /// Adopted duplicates, deleted after the first sync.
    orphans: Vec<(u32, PolicyEntries)>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub policies_written: usize,
    /// Allowlists changed in place (their pods kept the id).
    pub policies_updated: usize,
    pub policies_deleted: usize,
    pub pods_written: usize,
    pub pods_deleted: usize,
}

impl std::ops::AddAssign for SyncStats {
    fn add_assign(&mut self, other: Self) {
        self.policies_written += other.policies_written;
        self.policies_updated += other.policies_updated;
        self.policies_deleted += other.policies_deleted;
        self.pods_written += other.pods_written;
        self.pods_deleted += other.pods_deleted;
    }
}

impl Applied {
    /// Takes over what a previous agent left in pinned maps, so the first sync changes them
    /// in the hole-free order instead of overwriting ids pods still point at.
    pub fn adopt(engine: &Engine) -> Result<Self, EngineError> {
        let mut applied = Self::default();
        let mut by_id = HashMap::new();
        for (id, entries) in engine.policies()? {
            applied.next_id = applied.next_id.max(id);
            let entries = Arc::new(entries);
            // Two ids with one allowlist: keep one; the other goes once no pod uses it.
            match applied.policies.get_key_value(&*entries) {
                Some((kept, _)) => {
                    by_id.insert(id, kept.clone());
                    applied.orphans.push((id, (*entries).clone()));
                }
                None => {
                    by_id.insert(id, entries.clone());
                    applied.policies.insert(entries, id);
                }
            }
        }
        for (cgroup_id, entry) in engine.pods()? {
            // A pod pointing at an id with no entries (deny-all) has the empty allowlist.
            let key = by_id.get(&entry.policy_id).cloned().unwrap_or_default();
            applied.pods.insert(cgroup_id, (key, entry));
        }
        Ok(applied)
    }

    /// The allowlist a pod's entry points at, as applied.
    pub fn allowlist_of(&self, cgroup_id: u64) -> Option<Arc<PolicyEntries>> {
        self.pods.get(&cgroup_id).map(|(k, _)| k.clone())
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    pub fn entry_count(&self) -> usize {
        self.policies.keys().map(|p| p.v4.len() + p.v6.len()).sum()
    }

    /// (IPv4 entries, IPv6 entries, pod entries) as written to the maps.
    pub fn map_entries(&self) -> (usize, usize, usize) {
        let v4 = self.policies.keys().map(|p| p.v4.len()).sum();
        let v6 = self.policies.keys().map(|p| p.v6.len()).sum();
        (v4, v6, self.pods.len())
    }

    pub fn apply(&mut self, engine: &mut Engine, desired: &[DesiredPod]) -> Result<SyncStats, EngineError> {
        let mut stats = SyncStats::default();
        // 0. Allowlists whose pods all move to the same new allowlist change in place.
        self.update_in_place(engine, desired, &mut stats)?;
        // 1. New allowlists first, under fresh ids.
        for d in desired {
            self.ensure_policy(engine, &d.entries, &mut stats)?;
        }
        // 2. Point pods at them.
        let mut wanted = HashMap::new();
        for d in desired {
            let (key, entry) = self.point(engine, d, &mut stats)?;
            wanted.insert(d.pod.cgroup_id, (key, entry));
        }
        // 3. Forget pods that are gone.
        for cgroup_id in self.pods.keys().filter(|c| !wanted.contains_key(c)) {
            engine.delete_pod(*cgroup_id)?;
            stats.pods_deleted += 1;
        }
        self.pods = wanted;
        // 4. Only now delete allowlists no pod uses (pods hold the very `Arc`s of step 2).
        let used: HashSet<*const PolicyEntries> = self.pods.values().map(|(k, _)| Arc::as_ptr(k)).collect();
        let unused: Vec<Arc<PolicyEntries>> = self
            .policies
            .keys()
            .filter(|k| !used.contains(&Arc::as_ptr(k)))
            .cloned()
            .collect();
        for key in unused {
            let id = self.policies.remove(&key).expect("listed above");
            engine.delete_policy(id, &key)?;
            stats.policies_deleted += 1;
        }
        for (id, entries) in std::mem::take(&mut self.orphans) {
            engine.delete_policy(id, &entries)?;
            stats.policies_deleted += 1;
        }
        Ok(stats)
    }

    /// One pod more (a new pod cgroup), without the full diff: its allowlist is written under
    /// a fresh id unless some pod has it already, then its entry. Nothing is deleted here; an
    /// allowlist this leaves unused goes at the next full sync.
    pub fn add(&mut self, engine: &mut Engine, d: &DesiredPod) -> Result<SyncStats, EngineError> {
        let mut stats = SyncStats::default();
        self.ensure_policy(engine, &d.entries, &mut stats)?;
        let (key, entry) = self.point(engine, d, &mut stats)?;
        self.pods.insert(d.pod.cgroup_id, (key, entry));
        Ok(stats)
    }

    /// Writes an allowlist under a fresh id unless it has one.
    fn ensure_policy(
        &mut self,
        engine: &mut Engine,
        entries: &PolicyEntries,
        stats: &mut SyncStats,
    ) -> Result<(), EngineError> {
        if !self.policies.contains_key(entries) {
            self.next_id += 1;
            engine.put_policy(self.next_id, entries)?;
            stats.policies_written += 1;
            self.policies.insert(Arc::new(entries.clone()), self.next_id);
        }
        Ok(())
    }

    /// Writes the pod's entry, pointing at its (already written) allowlist, unless the map
    /// holds it already. Returns what the entry now is.
    fn point(
        &self,
        engine: &mut Engine,
        d: &DesiredPod,
        stats: &mut SyncStats,
    ) -> Result<(Arc<PolicyEntries>, PodEntry), EngineError> {
        let (key, id) = self.policies.get_key_value(&d.entries).expect("written first");
        let entry = PodEntry {
            policy_id: *id,
            mode: d.mode,
            flags: d.flags,
            ingress_policy_id: crate::engine::ingress_id(*id),
            ..PodEntry::default()
        };
        let unchanged = self
            .pods
            .get(&d.pod.cgroup_id)
            .is_some_and(|(k, e)| *e == entry && (Arc::ptr_eq(k, key) || k == key));
        if !unchanged {
            engine.put_pod(d.pod.cgroup_id, entry)?;
            stats.pods_written += 1;
        }
        Ok((key.clone(), entry))
    }

    fn update_in_place(
        &mut self,
        engine: &mut Engine,
        desired: &[DesiredPod],
        stats: &mut SyncStats,
    ) -> Result<(), EngineError> {
        let wanted: HashMap<u64, &PolicyEntries> =
            desired.iter().map(|d| (d.pod.cgroup_id, &d.entries)).collect();
        let wanted_set: HashSet<&PolicyEntries> = wanted.values().copied().collect();
        // Old allowlist → the one new allowlist all its remaining pods want (None: several).
        let mut moves: HashMap<*const PolicyEntries, (Arc<PolicyEntries>, Option<&PolicyEntries>)> =
            HashMap::new();
        for (cgroup_id, (old, _)) in &self.pods {
            let Some(new) = wanted.get(cgroup_id).copied() else {
                continue; // a pod that is going away does not hold its allowlist back
            };
            if **old == *new {
                continue;
            }
            moves
                .entry(Arc::as_ptr(old))
                .and_modify(|(_, to)| {
                    if *to != Some(new) {
                        *to = None;
                    }
                })
                .or_insert_with(|| (old.clone(), Some(new)));
        }
        let mut claimed: HashSet<&PolicyEntries> = HashSet::new();
        for (old, new) in moves.into_values() {
            let Some(new) = new else { continue };
            // Still wanted by some pod, or the new allowlist already has an id: no in-place.
            if wanted_set.contains(&*old) || self.policies.contains_key(new) || !claimed.insert(new) {
                continue;
            }
            let Some(id) = self.policies.remove(&old) else {
                continue; // a pod adopted with an id that has no entries (deny-all)
            };
            engine.replace_policy(id, &old, new)?;
            stats.policies_updated += 1;
            let new = Arc::new(new.clone());
            self.policies.insert(new.clone(), id);
            for (key, _) in self.pods.values_mut().filter(|(k, _)| Arc::ptr_eq(k, &old)) {
                *key = new.clone();
            }
        }
        Ok(())
    }
}
