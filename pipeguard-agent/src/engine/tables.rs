//! Writing allowlists and pod entries into the kernel maps.
//!
//! Changing an allowlist in place is hole-free when the writes go longest prefix first and
//! the deletes shortest prefix first: at every step, the longest present prefix matching an
//! address is either its longest match in the new allowlist or its longest match in the old
//! one (with that allowlist's value), so each address gets the old or the new verdict and
//! never a broad entry without the narrower exception that came with it.

use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use ipnet::{Ipv4Net, Ipv6Net};
use pipeguard_common::{AllowKeyV4, AllowKeyV6, POLICY_ID_BITS, PodEntry, PortSet, map_names};

use super::{Engine, EngineError};
use crate::policy::{DomainPattern, DomainRule, Ports};

/// The trie contents of one allowlist, as the policy compiler produces them, and the
/// domain rules of a DNS-filtered pod (written to the name map under the same id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntries {
    pub v4: Vec<(Ipv4Net, PortSet)>,
    pub v6: Vec<(Ipv6Net, PortSet)>,
    pub names: Vec<DomainRule>,
    /// Who may connect to the pod, for pods isolated for ingress (keyed by source, ports
    /// are the pod's own); written under [`ingress_id`] of the same id. `None`: not isolated.
    pub ingress: Option<IngressEntries>,
}

/// The trie contents of an ingress allowlist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressEntries {
    pub v4: Vec<(Ipv4Net, PortSet)>,
    pub v6: Vec<(Ipv6Net, PortSet)>,
}

/// Ingress allowlists share the tries with egress ones, under the egress id with this bit:
/// one id names both halves of a pod's allowlist, so sharing, in-place changes and adopting
/// pinned state treat them as one.
pub const INGRESS_ID_BIT: u32 = 1 << 31;

/// The id the ingress half of allowlist `policy_id` is written under (`PodEntry::ingress_policy_id`).
pub fn ingress_id(policy_id: u32) -> u32 {
    policy_id | INGRESS_ID_BIT
}

/// Equal allowlists hash equally, which is all a map needs: equality is checked in full on
/// a hash match. Hashing every entry of a 100k-entry allowlist (field by field) would cost
/// more than the sync it serves, so lengths and a fixed sample of entries are hashed.
impl std::hash::Hash for PolicyEntries {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        const SAMPLES: usize = 16;
        fn sample<N: std::hash::Hash, H: std::hash::Hasher>(entries: &[(N, PortSet)], state: &mut H) {
            entries.len().hash(state);
            let step = entries.len().div_ceil(SAMPLES).max(1);
            for (net, ports) in entries.iter().step_by(step) {
                net.hash(state);
                bytemuck::bytes_of(ports).hash(state);
            }
        }
        sample(&self.v4, state);
        sample(&self.v6, state);
        self.names.len().hash(state);
        for rule in self.names.iter().take(SAMPLES) {
            rule.pattern.hash(state);
        }
        if let Some(ingress) = &self.ingress {
            sample(&ingress.v4, state);
            sample(&ingress.v6, state);
        }
    }
}

fn key_v4(policy_id: u32, net: &Ipv4Net) -> Key<AllowKeyV4> {
    Key::new(
        POLICY_ID_BITS + u32::from(net.prefix_len()),
        AllowKeyV4 {
            policy_id: policy_id.to_be_bytes(),
            addr: net.network().octets(),
        },
    )
}

fn key_v6(policy_id: u32, net: &Ipv6Net) -> Key<AllowKeyV6> {
    Key::new(
        POLICY_ID_BITS + u32::from(net.prefix_len()),
        AllowKeyV6 {
            policy_id: policy_id.to_be_bytes(),
            addr: net.network().octets(),
        },
    )
}

pub(super) fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> EngineError {
    move |source| EngineError::Map { map, source }
}

impl Engine {
    /// Writes (or overwrites) every entry of `entries` under `policy_id`.
    pub fn put_policy(&mut self, policy_id: u32, entries: &PolicyEntries) -> Result<(), EngineError> {
        let written = self
            .put_names(policy_id, &entries.names)
            .and_then(|()| match &entries.ingress {
                Some(ingress) => self.put_addresses(ingress_id(policy_id), &ingress.v4, &ingress.v6),
                None => Ok(()),
            })
            .and_then(|()| self.put_addresses(policy_id, &entries.v4, &entries.v6));
        self.after_write(written)
    }

    fn put_addresses<'e>(
        &mut self,
        policy_id: u32,
        entries_v4: impl IntoIterator<Item = &'e (Ipv4Net, PortSet)>,
        entries_v6: impl IntoIterator<Item = &'e (Ipv6Net, PortSet)>,
    ) -> Result<(), EngineError> {
        let mut v4: LpmTrie<&mut MapData, AllowKeyV4, PortSet> = self.map_mut(map_names::ALLOW_V4)?;
        for (net, ports) in entries_v4 {
            v4.insert(&key_v4(policy_id, net), *ports, 0)
                .map_err(map_error(map_names::ALLOW_V4))?;
        }
        let mut v6: LpmTrie<&mut MapData, AllowKeyV6, PortSet> = self.map_mut(map_names::ALLOW_V6)?;
        for (net, ports) in entries_v6 {
            v6.insert(&key_v6(policy_id, net), *ports, 0)
                .map_err(map_error(map_names::ALLOW_V6))?;
        }
        Ok(())
    }

    /// Changes `policy_id` from `old` to `new` in place, touching only the keys that
    /// differ, in an order where every address is answered by the old or the new allowlist
    /// at each step, never by a mix (see the module comment). Returns (written, deleted).
    pub fn replace_policy(
        &mut self,
        policy_id: u32,
        old: &PolicyEntries,
        new: &PolicyEntries,
    ) -> Result<(usize, usize), EngineError> {
        let diff = PolicyDiff::between(old, new);
        let none = IngressEntries::default();
        let (old_in, new_in) = (
            old.ingress.as_ref().unwrap_or(&none),
            new.ingress.as_ref().unwrap_or(&none),
        );
        let ingress = PolicyDiff::between_tries(&old_in.v4, &old_in.v6, &new_in.v4, &new_in.v6);
        let written = self
            .put_addresses(
                policy_id,
                diff.put.v4.iter().copied(),
                diff.put.v6.iter().copied(),
            )
            .and_then(|()| {
                self.delete_addresses(
                    policy_id,
                    diff.delete.v4.iter().copied(),
                    diff.delete.v6.iter().copied(),
                )
            })
            .and_then(|()| self.replace_names(policy_id, &old.names, &new.names))
            .and_then(|()| {
                self.put_addresses(
                    ingress_id(policy_id),
                    ingress.put.v4.iter().copied(),
                    ingress.put.v6.iter().copied(),
                )
            })
            .and_then(|()| {
                self.delete_addresses(
                    ingress_id(policy_id),
                    ingress.delete.v4.iter().copied(),
                    ingress.delete.v6.iter().copied(),
                )
            });
        self.after_write(written)?;
        Ok((
            diff.put.len() + ingress.put.len(),
            diff.delete.len() + ingress.delete.len(),
        ))
    }

    /// Deletes the keys of `entries` under `policy_id`, and every name entry of
    /// `policy_id`; keys already gone are fine.
    pub fn delete_policy(&mut self, policy_id: u32, entries: &PolicyEntries) -> Result<(), EngineError> {
        let written = self
            .delete_addresses(policy_id, &entries.v4, &entries.v6)
            .and_then(|()| match &entries.ingress {
                Some(ingress) => self.delete_addresses(ingress_id(policy_id), &ingress.v4, &ingress.v6),
                None => Ok(()),
            })
            .and_then(|()| self.delete_names(policy_id));
        self.after_write(written)
    }

    fn delete_addresses<'e>(
        &mut self,
        policy_id: u32,
        entries_v4: impl IntoIterator<Item = &'e (Ipv4Net, PortSet)>,
        entries_v6: impl IntoIterator<Item = &'e (Ipv6Net, PortSet)>,
    ) -> Result<(), EngineError> {
        let mut v4: LpmTrie<&mut MapData, AllowKeyV4, PortSet> = self.map_mut(map_names::ALLOW_V4)?;
        for (net, _) in entries_v4 {
            ignore_missing(v4.remove(&key_v4(policy_id, net))).map_err(map_error(map_names::ALLOW_V4))?;
        }
        let mut v6: LpmTrie<&mut MapData, AllowKeyV6, PortSet> = self.map_mut(map_names::ALLOW_V6)?;
        for (net, _) in entries_v6 {
            ignore_missing(v6.remove(&key_v6(policy_id, net))).map_err(map_error(map_names::ALLOW_V6))?;
        }
        Ok(())
    }

    /// Points a pod-level cgroup at an allowlist. `entry.counter_slot` is the engine's to
    /// choose: whatever the caller put there is replaced.
    pub fn put_pod(&mut self, cgroup_id: u64, mut entry: PodEntry) -> Result<(), EngineError> {
        if entry.flags & pipeguard_common::POD_DNS_FILTERED != 0 {
            self.ensure_dns()?;
        }
        let assigned = self.slots.assign(cgroup_id);
        if assigned.fresh {
            // Before the entry: the kernel counts into the row as soon as it reads it.
            if let Err(error) = self.zero_counters(assigned.slot) {
                self.slots.release(cgroup_id);
                return Err(error);
            }
        }
        entry.counter_slot = assigned.slot;
        let written =
            self.map_mut(map_names::PODS)
                .and_then(|mut pods: HashMap<&mut MapData, u64, PodEntry>| {
                    pods.insert(cgroup_id, entry, 0)
                        .map_err(map_error(map_names::PODS))
                });
        self.after_write(written)
    }

    /// The pod's entry, then its counter slot: a pod without an entry is no longer
    /// counted, and its slot is zeroed before another pod gets it.
    pub fn delete_pod(&mut self, cgroup_id: u64) -> Result<(), EngineError> {
        let written =
            self.map_mut(map_names::PODS)
                .and_then(|mut pods: HashMap<&mut MapData, u64, PodEntry>| {
                    ignore_missing(pods.remove(&cgroup_id)).map_err(map_error(map_names::PODS))
                });
        self.after_write(written)?;
        self.slots.release(cgroup_id);
        Ok(())
    }
}

impl Engine {
    /// Every pod entry in the map (for adopting pinned state), as callers wrote them: the
    /// counter slot is the engine's own business and reads as 0.
    pub fn pods(&self) -> Result<Vec<(u64, PodEntry)>, EngineError> {
        let mut pods = self.pod_entries()?;
        for (_, entry) in &mut pods {
            entry.counter_slot = 0;
        }
        Ok(pods)
    }

    /// Every pod entry in the map as the kernel reads it.
    pub(super) fn pod_entries(&self) -> Result<Vec<(u64, PodEntry)>, EngineError> {
        let pods: HashMap<&MapData, u64, PodEntry> = self.map(map_names::PODS)?;
        pods.iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(map_names::PODS))
    }

    /// Every allowlist in the tries, by policy id (for adopting pinned state); ingress
    /// halves (ids with `INGRESS_ID_BIT`) are folded into their allowlist.
    pub fn policies(&self) -> Result<std::collections::HashMap<u32, PolicyEntries>, EngineError> {
        let mut out: std::collections::HashMap<u32, IngressEntries> = std::collections::HashMap::new();
        let v4: LpmTrie<&MapData, AllowKeyV4, PortSet> = self.map(map_names::ALLOW_V4)?;
        for item in v4.iter() {
            let (key, ports) = item.map_err(map_error(map_names::ALLOW_V4))?;
            let data = key.data();
            let len = (key.prefix_len() - POLICY_ID_BITS) as u8;
            let net = Ipv4Net::new(data.addr.into(), len).map_err(|e| EngineError::Corrupt(e.to_string()))?;
            out.entry(u32::from_be_bytes(data.policy_id))
                .or_default()
                .v4
                .push((net, ports));
        }
        let v6: LpmTrie<&MapData, AllowKeyV6, PortSet> = self.map(map_names::ALLOW_V6)?;
        for item in v6.iter() {
            let (key, ports) = item.map_err(map_error(map_names::ALLOW_V6))?;
            let data = key.data();
            let len = (key.prefix_len() - POLICY_ID_BITS) as u8;
            let net = Ipv6Net::new(data.addr.into(), len).map_err(|e| EngineError::Corrupt(e.to_string()))?;
            out.entry(u32::from_be_bytes(data.policy_id))
                .or_default()
                .v6
                .push((net, ports));
        }
        let mut out = fold_ingress(out);
        for (id, names) in self.name_entries()? {
            out.entry(id).or_default().names = names
                .into_iter()
                .filter(|((_, name), ports)| *name != self.cluster_domain || *ports != PortSet::default())
                .map(|((kind, name), ports)| rule_of(kind, name, &ports))
                .collect();
        }
        for entries in out.values_mut() {
            entries.v4.sort_by_key(|(n, _)| (*n, n.prefix_len()));
            entries.v6.sort_by_key(|(n, _)| (*n, n.prefix_len()));
            if let Some(ingress) = &mut entries.ingress {
                ingress.v4.sort_by_key(|(n, _)| (*n, n.prefix_len()));
                ingress.v6.sort_by_key(|(n, _)| (*n, n.prefix_len()));
            }
        }
        Ok(out)
    }
}

/// Trie contents by id → allowlists, each id with `INGRESS_ID_BIT` as the ingress half of
/// the id without it.
fn fold_ingress(
    by_id: std::collections::HashMap<u32, IngressEntries>,
) -> std::collections::HashMap<u32, PolicyEntries> {
    let mut out: std::collections::HashMap<u32, PolicyEntries> = std::collections::HashMap::new();
    for (id, tries) in by_id {
        let entries = out.entry(id & !INGRESS_ID_BIT).or_default();
        if id & INGRESS_ID_BIT != 0 {
            entries.ingress = Some(tries);
        } else {
            entries.v4 = tries.v4;
            entries.v6 = tries.v6;
        }
    }
    out
}

/// A name entry read back as a rule (its ports are the merged ones, so an adopted allowlist
/// with names is rewritten under a fresh id on the first sync, in the hole-free order).
fn rule_of(kind: u32, name: String, ports: &PortSet) -> DomainRule {
    DomainRule {
        pattern: if kind == pipeguard_common::NAME_EXACT {
            DomainPattern::Exact(name)
        } else {
            DomainPattern::Wildcard(name)
        },
        ports: if ports.flags & pipeguard_common::PORTS_ALL != 0 {
            Ports::All
        } else {
            Ports::List(
                ports.ranges[..(ports.count as usize).min(ports.ranges.len())]
                    .iter()
                    .map(|r| (r.protocol, r.start, r.end))
                    .collect(),
            )
        },
    }
}

pub(super) fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// The keys an in-place change writes and deletes, each in its safe order. It borrows the
/// entries of the two allowlists: at 100k entries a copy of one side is 14 MB, and a full
/// rebuild would hold four of them at once.
struct PolicyDiff<'a> {
    put: Keys<'a>,
    delete: Keys<'a>,
}

struct Keys<'a> {
    v4: Vec<&'a (Ipv4Net, PortSet)>,
    v6: Vec<&'a (Ipv6Net, PortSet)>,
}

impl Keys<'_> {
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

impl<'a> PolicyDiff<'a> {
    /// The egress halves of two allowlists.
    fn between(old: &'a PolicyEntries, new: &'a PolicyEntries) -> Self {
        Self::between_tries(&old.v4, &old.v6, &new.v4, &new.v6)
    }

    fn between_tries(
        old4: &'a [(Ipv4Net, PortSet)],
        old6: &'a [(Ipv6Net, PortSet)],
        new4: &'a [(Ipv4Net, PortSet)],
        new6: &'a [(Ipv6Net, PortSet)],
    ) -> Self {
        let (put4, delete4) = diff_family(old4, new4, |n| n.prefix_len());
        let (put6, delete6) = diff_family(old6, new6, |n| n.prefix_len());
        Self {
            put: Keys { v4: put4, v6: put6 },
            delete: Keys {
                v4: delete4,
                v6: delete6,
            },
        }
    }
}

type EntryRefs<'a, N> = Vec<&'a (N, PortSet)>;

/// (new or changed entries, longest prefix first; vanished entries, shortest first).
/// A merge of the two sides sorted by prefix: at 100k entries, hash maps of both sides
/// cost several times more than the one key that usually changes.
fn diff_family<'a, N: Copy + Ord>(
    old: &'a [(N, PortSet)],
    new: &'a [(N, PortSet)],
    prefix_len: impl Fn(&N) -> u8,
) -> (EntryRefs<'a, N>, EntryRefs<'a, N>) {
    let sorted = |entries: &'a [(N, PortSet)]| {
        let mut v: EntryRefs<'a, N> = entries.iter().collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    };
    let (old, new) = (sorted(old), sorted(new));
    let (mut put, mut delete) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.0 == n.0 => {
                if o.1 != n.1 {
                    put.push(*n);
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.0 < n.0 => {
                delete.push(*o);
                i += 1;
            }
            (Some(o), None) => {
                delete.push(*o);
                i += 1;
            }
            (_, Some(n)) => {
                put.push(*n);
                j += 1;
            }
            (None, None) => unreachable!("the loop condition"),
        }
    }
    put.sort_by_key(|(net, _)| std::cmp::Reverse(prefix_len(net)));
    delete.sort_by_key(|(net, _)| prefix_len(net));
    (put, delete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(n: u16) -> PortSet {
        let mut p = PortSet {
            count: 1,
            ..PortSet::default()
        };
        p.ranges[0].start = n;
        p.ranges[0].end = n;
        p
    }

    fn v4(entries: &[(&str, u16)]) -> PolicyEntries {
        PolicyEntries {
            v4: entries
                .iter()
                .map(|(n, p)| (n.parse().unwrap(), ports(*p)))
                .collect(),
            v6: vec![],
            names: vec![],
            ingress: None,
        }
    }

    #[test]
    fn the_diff_writes_only_changes_longest_first_and_deletes_shortest_first() {
        let old = v4(&[
            ("10.0.0.0/8", 1),
            ("10.1.0.0/16", 2),
            ("10.1.2.0/24", 3),
            ("10.9.9.9/32", 4),
        ]);
        let new = v4(&[
            ("10.0.0.0/8", 1),
            ("10.1.0.0/16", 5),
            ("11.0.0.0/8", 6),
            ("11.1.1.1/32", 7),
        ]);
        let diff = PolicyDiff::between(&old, &new);
        let put: Vec<String> = diff.put.v4.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(put, ["11.1.1.1/32", "10.1.0.0/16", "11.0.0.0/8"]);
        let delete: Vec<String> = diff.delete.v4.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(delete, ["10.1.2.0/24", "10.9.9.9/32"]);
    }

    #[test]
    fn allowlists_differing_outside_the_hash_sample_are_still_different_keys() {
        use std::collections::HashMap;
        let many: Vec<(String, u16)> = (0..100).map(|i| (format!("10.0.{i}.0/24"), 1)).collect();
        let refs: Vec<(&str, u16)> = many.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        let a = v4(&refs);
        let mut b = a.clone();
        b.v4[1].1 = ports(2); // index 1 is not sampled (every 7th of 100 is)
        let mut map = HashMap::new();
        map.insert(a.clone(), 1);
        map.insert(b.clone(), 2);
        assert_eq!((map.len(), map[&a], map[&b]), (2, 1, 2));
    }

    /// Longest-prefix match over a set of entries, as the kernel trie answers.
    fn verdict(entries: &std::collections::HashMap<Ipv4Net, PortSet>, addr: u32) -> Option<PortSet> {
        entries
            .iter()
            .filter(|(net, _)| net.contains(&std::net::Ipv4Addr::from(addr)))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, p)| *p)
    }

    #[test]
    fn every_step_of_an_in_place_change_answers_old_or_new_for_every_address() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let base = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0));
        for _ in 0..300 {
            let mut random_allowlist = || {
                let mut v4 = Vec::new();
                for _ in 0..next(12) {
                    let len = 24 + next(9) as u8;
                    let net = Ipv4Net::new((base + next(256) as u32).into(), len)
                        .unwrap()
                        .trunc();
                    if !v4.iter().any(|(n, _)| *n == net) {
                        v4.push((net, ports(next(3) as u16)));
                    }
                }
                PolicyEntries {
                    v4,
                    ..PolicyEntries::default()
                }
            };
            let (old, new) = (random_allowlist(), random_allowlist());
            let diff = PolicyDiff::between(&old, &new);
            let mut trie: std::collections::HashMap<_, _> = old.v4.iter().copied().collect();
            let target: std::collections::HashMap<_, _> = new.v4.iter().copied().collect();
            let start = trie.clone();
            let steps = diff
                .put
                .v4
                .iter()
                .map(|&&(n, p)| (n, Some(p)))
                .chain(diff.delete.v4.iter().map(|&&(n, _)| (n, None)));
            for (net, ports) in steps {
                match ports {
                    Some(p) => trie.insert(net, p),
                    None => trie.remove(&net),
                };
                for addr in base..base + 256 {
                    let now = verdict(&trie, addr);
                    assert!(
                        now == verdict(&start, addr) || now == verdict(&target, addr),
                        "{}: neither old nor new after writing {net}\nold {old:?}\nnew {new:?}",
                        std::net::Ipv4Addr::from(addr)
                    );
                }
            }
            assert_eq!(trie, target, "the steps end at the new allowlist");
        }
    }

    #[test]
    fn an_unchanged_allowlist_has_an_empty_diff() {
        let same = v4(&[("10.0.0.0/8", 1), ("10.1.0.0/16", 2)]);
        let diff = PolicyDiff::between(&same, &same);
        assert!(diff.put.v4.is_empty() && diff.delete.v4.is_empty());
    }
}
