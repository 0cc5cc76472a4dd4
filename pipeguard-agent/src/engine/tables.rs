//! Writing allowlists and pod entries into the kernel maps.
//!
//! Ordering rule for changing an allowlist in place: write every new entry first, then
//! delete the keys the new allowlist no longer has. Every intermediate trie then answers
//! each address with either the old or the new verdict, never with something both deny.
//! The agent goes further and writes a changed allowlist under a fresh policy id, switches
//! the pod entry, then deletes the old id.

use std::collections::HashSet;

use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use ipnet::{Ipv4Net, Ipv6Net};
use pipeguard_common::{AllowKeyV4, AllowKeyV6, POLICY_ID_BITS, PodEntry, PortSet, map_names};

use super::{Engine, EngineError};

/// The trie contents of one allowlist, as the policy compiler produces them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntries {
    pub v4: Vec<(Ipv4Net, PortSet)>,
    pub v6: Vec<(Ipv6Net, PortSet)>,
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

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> EngineError {
    move |source| EngineError::Map { map, source }
}

impl Engine {
    /// Writes (or overwrites) every entry of `entries` under `policy_id`.
    pub fn put_policy(&mut self, policy_id: u32, entries: &PolicyEntries) -> Result<(), EngineError> {
        let mut v4: LpmTrie<&mut MapData, AllowKeyV4, PortSet> = self.map_mut(map_names::ALLOW_V4)?;
        for (net, ports) in &entries.v4 {
            v4.insert(&key_v4(policy_id, net), *ports, 0)
                .map_err(map_error(map_names::ALLOW_V4))?;
        }
        let mut v6: LpmTrie<&mut MapData, AllowKeyV6, PortSet> = self.map_mut(map_names::ALLOW_V6)?;
        for (net, ports) in &entries.v6 {
            v6.insert(&key_v6(policy_id, net), *ports, 0)
                .map_err(map_error(map_names::ALLOW_V6))?;
        }
        Ok(())
    }

    /// Moves `policy_id` from `old` to `new` without a moment that allows more than both
    /// (see the module comment).
    pub fn replace_policy(
        &mut self,
        policy_id: u32,
        old: &PolicyEntries,
        new: &PolicyEntries,
    ) -> Result<(), EngineError> {
        self.put_policy(policy_id, new)?;
        let keep4: HashSet<_> = new.v4.iter().map(|(n, _)| *n).collect();
        let keep6: HashSet<_> = new.v6.iter().map(|(n, _)| *n).collect();
        let stale = PolicyEntries {
            v4: old
                .v4
                .iter()
                .filter(|(n, _)| !keep4.contains(n))
                .copied()
                .collect(),
            v6: old
                .v6
                .iter()
                .filter(|(n, _)| !keep6.contains(n))
                .copied()
                .collect(),
        };
        self.delete_policy(policy_id, &stale)
    }

    /// Deletes the keys of `entries` under `policy_id`; keys already gone are fine.
    pub fn delete_policy(&mut self, policy_id: u32, entries: &PolicyEntries) -> Result<(), EngineError> {
        let mut v4: LpmTrie<&mut MapData, AllowKeyV4, PortSet> = self.map_mut(map_names::ALLOW_V4)?;
        for (net, _) in &entries.v4 {
            ignore_missing(v4.remove(&key_v4(policy_id, net))).map_err(map_error(map_names::ALLOW_V4))?;
        }
        let mut v6: LpmTrie<&mut MapData, AllowKeyV6, PortSet> = self.map_mut(map_names::ALLOW_V6)?;
        for (net, _) in &entries.v6 {
            ignore_missing(v6.remove(&key_v6(policy_id, net))).map_err(map_error(map_names::ALLOW_V6))?;
        }
        Ok(())
    }

    /// Points a pod-level cgroup at an allowlist.
    pub fn put_pod(&mut self, cgroup_id: u64, entry: PodEntry) -> Result<(), EngineError> {
        let mut pods: HashMap<&mut MapData, u64, PodEntry> = self.map_mut(map_names::PODS)?;
        pods.insert(cgroup_id, entry, 0)
            .map_err(map_error(map_names::PODS))
    }

    pub fn delete_pod(&mut self, cgroup_id: u64) -> Result<(), EngineError> {
        let mut pods: HashMap<&mut MapData, u64, PodEntry> = self.map_mut(map_names::PODS)?;
        ignore_missing(pods.remove(&cgroup_id)).map_err(map_error(map_names::PODS))
    }
}

impl Engine {
    /// Every pod entry in the map (for adopting pinned state).
    pub fn pods(&self) -> Result<Vec<(u64, PodEntry)>, EngineError> {
        let pods: HashMap<&MapData, u64, PodEntry> = self.map(map_names::PODS)?;
        pods.iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(map_names::PODS))
    }

    /// Every allowlist in the tries, by policy id (for adopting pinned state).
    pub fn policies(&self) -> Result<std::collections::HashMap<u32, PolicyEntries>, EngineError> {
        let mut out: std::collections::HashMap<u32, PolicyEntries> = std::collections::HashMap::new();
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
        for entries in out.values_mut() {
            entries.v4.sort_by_key(|(n, _)| (*n, n.prefix_len()));
            entries.v6.sort_by_key(|(n, _)| (*n, n.prefix_len()));
        }
        Ok(out)
    }
}

fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}
