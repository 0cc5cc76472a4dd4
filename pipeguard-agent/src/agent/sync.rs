//! Applies the desired state to the kernel maps incrementally, in an order that never
//! opens a hole. Identical allowlists share an id. When every pod using an allowlist moves
//! to the same new one, the id is changed in place, key by key in the hole-free order of
//! `Engine::replace_policy`: a one-CIDR edit of a 100k-entry policy costs one map write.
//! Otherwise the new allowlist is written under a fresh id, the pod entries are switched to
//! it, and the old id is deleted once unused.

use std::collections::HashMap;

use pipeguard_common::PodEntry;

use super::desired::DesiredPod;
use crate::engine::{Engine, EngineError, PolicyEntries};

/// Byte identity of an allowlist, for sharing ids between identical allowlists.
fn fingerprint(entries: &PolicyEntries) -> Vec<u8> {
    let mut out = Vec::new();
    for (net, ports) in &entries.v4 {
        out.extend_from_slice(&net.network().octets());
        out.push(net.prefix_len());
        out.extend_from_slice(bytemuck::bytes_of(ports));
    }
    out.push(0xff);
    for (net, ports) in &entries.v6 {
        out.extend_from_slice(&net.network().octets());
        out.push(net.prefix_len());
        out.extend_from_slice(bytemuck::bytes_of(ports));
    }
    out
}

struct AppliedPolicy {
    id: u32,
    entries: PolicyEntries,
}

/// What the maps hold, as far as this agent wrote them.
#[derive(Default)]
pub struct Applied {
    policies: HashMap<Vec<u8>, AppliedPolicy>,
    pods: HashMap<u64, (Vec<u8>, PodEntry)>,
    /// Policy ids are never reused while the agent runs; 0 is never used.
    next_id: u32,
    /// Adopted duplicates, deleted after the first sync.
    orphans: Vec<AppliedPolicy>,
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

impl Applied {
    /// Takes over what a previous agent left in pinned maps, so the first sync changes them
    /// in the hole-free order instead of overwriting ids pods still point at.
    pub fn adopt(engine: &Engine) -> Result<Self, EngineError> {
        let mut applied = Self::default();
        let mut key_of_id = HashMap::new();
        for (id, entries) in engine.policies()? {
            let key = fingerprint(&entries);
            applied.next_id = applied.next_id.max(id);
            key_of_id.insert(id, key.clone());
            // Two ids with one allowlist: keep one; the other goes once no pod uses it.
            if let Some(twin) = applied
                .policies
                .insert(key.clone(), AppliedPolicy { id, entries })
            {
                applied.orphans.push(twin);
            }
        }
        for (cgroup_id, entry) in engine.pods()? {
            // A pod pointing at an id with no entries (deny-all) has the empty fingerprint.
            let key = key_of_id
                .get(&entry.policy_id)
                .cloned()
                .unwrap_or_else(|| fingerprint(&PolicyEntries::default()));
            applied.pods.insert(cgroup_id, (key, entry));
        }
        Ok(applied)
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    pub fn entry_count(&self) -> usize {
        self.policies
            .values()
            .map(|p| p.entries.v4.len() + p.entries.v6.len())
            .sum()
    }

    /// (IPv4 entries, IPv6 entries, pod entries) as written to the maps.
    pub fn map_entries(&self) -> (usize, usize, usize) {
        let v4 = self.policies.values().map(|p| p.entries.v4.len()).sum();
        let v6 = self.policies.values().map(|p| p.entries.v6.len()).sum();
        (v4, v6, self.pods.len())
    }

    pub fn apply(&mut self, engine: &mut Engine, desired: &[DesiredPod]) -> Result<SyncStats, EngineError> {
        let mut stats = SyncStats::default();
        // 0. Allowlists whose pods all move to the same new allowlist change in place.
        self.update_in_place(engine, desired, &mut stats)?;
        // 1. New allowlists first, under fresh ids.
        for d in desired {
            let key = fingerprint(&d.entries);
            if !self.policies.contains_key(&key) {
                self.next_id += 1;
                let id = self.next_id;
                engine.put_policy(id, &d.entries)?;
                stats.policies_written += 1;
                self.policies.insert(
                    key,
                    AppliedPolicy {
                        id,
                        entries: d.entries.clone(),
                    },
                );
            }
        }
        // 2. Point pods at them.
        let mut wanted = HashMap::new();
        for d in desired {
            let key = fingerprint(&d.entries);
            let id = self.policies[&key].id;
            let entry = PodEntry {
                policy_id: id,
                mode: d.mode,
                flags: d.flags,
                _pad: 0,
            };
            if self.pods.get(&d.pod.cgroup_id) != Some(&(key.clone(), entry)) {
                engine.put_pod(d.pod.cgroup_id, entry)?;
                stats.pods_written += 1;
            }
            wanted.insert(d.pod.cgroup_id, (key, entry));
        }
        // 3. Forget pods that are gone.
        for cgroup_id in self.pods.keys().filter(|c| !wanted.contains_key(c)) {
            engine.delete_pod(*cgroup_id)?;
            stats.pods_deleted += 1;
        }
        self.pods = wanted;
        // 4. Only now delete allowlists no pod uses.
        let used: std::collections::HashSet<&Vec<u8>> = self.pods.values().map(|(k, _)| k).collect();
        let unused: Vec<Vec<u8>> = self
            .policies
            .keys()
            .filter(|k| !used.contains(k))
            .cloned()
            .collect();
        for key in unused {
            let policy = self.policies.remove(&key).expect("listed above");
            engine.delete_policy(policy.id, &policy.entries)?;
            stats.policies_deleted += 1;
        }
        for orphan in std::mem::take(&mut self.orphans) {
            engine.delete_policy(orphan.id, &orphan.entries)?;
            stats.policies_deleted += 1;
        }
        Ok(stats)
    }
}

impl Applied {
    fn update_in_place(
        &mut self,
        engine: &mut Engine,
        desired: &[DesiredPod],
        stats: &mut SyncStats,
    ) -> Result<(), EngineError> {
        let wanted: HashMap<u64, Vec<u8>> = desired
            .iter()
            .map(|d| (d.pod.cgroup_id, fingerprint(&d.entries)))
            .collect();
        let wanted_keys: std::collections::HashSet<&Vec<u8>> = wanted.values().collect();
        // Old allowlist → the one new allowlist all its remaining pods want (None: several).
        let mut moves: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        for (cgroup_id, (old_key, _)) in &self.pods {
            let Some(new_key) = wanted.get(cgroup_id) else {
                continue; // a pod that is going away does not hold its allowlist back
            };
            if new_key == old_key {
                continue;
            }
            moves
                .entry(old_key.clone())
                .and_modify(|to| {
                    if to.as_ref() != Some(new_key) {
                        *to = None;
                    }
                })
                .or_insert_with(|| Some(new_key.clone()));
        }
        let mut claimed = std::collections::HashSet::new();
        for (old_key, new_key) in moves {
            let Some(new_key) = new_key else { continue };
            // Still wanted by some pod, or the new allowlist already has an id: no in-place.
            if wanted_keys.contains(&old_key)
                || self.policies.contains_key(&new_key)
                || !claimed.insert(new_key.clone())
            {
                continue;
            }
            let Some(old) = self.policies.remove(&old_key) else {
                continue; // a pod adopted with an id that has no entries (deny-all)
            };
            let new = desired
                .iter()
                .find(|d| wanted[&d.pod.cgroup_id] == new_key)
                .map(|d| d.entries.clone())
                .expect("a pod wants it");
            engine.replace_policy(old.id, &old.entries, &new)?;
            stats.policies_updated += 1;
            self.policies.insert(
                new_key.clone(),
                AppliedPolicy {
                    id: old.id,
                    entries: new,
                },
            );
            for (key, _) in self.pods.values_mut().filter(|(k, _)| k == &old_key) {
                *key = new_key.clone();
            }
        }
        Ok(())
    }
}
