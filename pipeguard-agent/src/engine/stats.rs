//! Reading the per-CPU counters back, summed over CPUs.

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use pipeguard_common::{
    AcceptedPeer, Counter, CounterKey, FlowKey, HOOK_COUNT, Hook, SocketState, VERDICT_ERROR, map_names,
};

use super::{Engine, EngineError};

fn sum(values: &aya::maps::PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

/// Every entry of a per-CPU counter map, summed over CPUs.
fn every_entry<T: std::borrow::Borrow<MapData>, K: aya::Pod>(
    map: &PerCpuHashMap<T, K, Counter>,
    name: &'static str,
) -> Result<Vec<(K, Counter)>, EngineError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (key, values) = item.map_err(|source| EngineError::Map { map: name, source })?;
        out.push((key, sum(&values)));
    }
    Ok(out)
}

impl Engine {
    /// Every counter of one pod cgroup: (key, totals over all CPUs).
    pub fn counters(&self, pod_cgroup_id: u64) -> Result<Vec<(CounterKey, Counter)>, EngineError> {
        let map: PerCpuHashMap<&MapData, CounterKey, Counter> = self.map(map_names::COUNTERS)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, values) = item.map_err(|source| EngineError::Map {
                map: map_names::COUNTERS,
                source,
            })?;
            if key.cgroup_id == pod_cgroup_id {
                out.push((key, sum(&values)));
            }
        }
        Ok(out)
    }

    /// Every counter of every pod, from one walk of the map (the agent's path: a walk per
    /// pod would make reading them quadratic in pods).
    pub fn all_counters(&self) -> Result<Vec<(CounterKey, Counter)>, EngineError> {
        let map: PerCpuHashMap<&MapData, CounterKey, Counter> = self.map(map_names::COUNTERS)?;
        every_entry(&map, map_names::COUNTERS)
    }

    /// Per-destination statistics of one pod cgroup (only kept with `flow_stats`).
    pub fn flows(&self, pod_cgroup_id: u64) -> Result<Vec<(FlowKey, Counter)>, EngineError> {
        let map: aya::maps::PerCpuHashMap<&MapData, FlowKey, Counter> = self.map(map_names::FLOWS)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, values) = item.map_err(|source| EngineError::Map {
                map: map_names::FLOWS,
                source,
            })?;
            if key.cgroup_id == pod_cgroup_id {
                out.push((key, sum(&values)));
            }
        }
        Ok(out)
    }

    /// Deletes every counter of one pod cgroup, for each hook and verdict it could have. The
    /// map is not LRU (a running pod's counts must never be evicted), so a finished pod's
    /// counters would otherwise stay for good: the map would fill, new pods would go
    /// uncounted, and every walk of it (each /metrics refresh) would cost more.
    pub(super) fn delete_counters(&mut self, pod_cgroup_id: u64) -> Result<(), EngineError> {
        let mut map: PerCpuHashMap<&mut MapData, CounterKey, Counter> = self.map_mut(map_names::COUNTERS)?;
        for hook in 0..HOOK_COUNT as u8 {
            for verdict in 0..=VERDICT_ERROR {
                let key = CounterKey {
                    cgroup_id: pod_cgroup_id,
                    verdict,
                    hook,
                    _pad: [0; 6],
                };
                super::tables::ignore_missing(map.remove(&key))
                    .map_err(super::tables::map_error(map_names::COUNTERS))?;
            }
        }
        Ok(())
    }

    /// Events the kernel could not put into the full ring buffer.
    pub fn event_drops(&self) -> Result<u64, EngineError> {
        let map: PerCpuArray<&MapData, u64> = self.map(map_names::EVENT_DROPS)?;
        let values = map.get(&0, 0).map_err(|source| EngineError::Map {
            map: map_names::EVENT_DROPS,
            source,
        })?;
        Ok(values.iter().sum())
    }
}

/// Second handles on the socket tables.
pub struct SocketsReader {
    states: BpfHashMap<MapData, u64, SocketState>,
    accepted: BpfHashMap<MapData, u64, AcceptedPeer>,
}

impl SocketsReader {
    /// Sockets with a record (their pod, their remembered verdict): one walk of the keys,
    /// bounded by `MAX_SOCKETS`.
    pub fn count(&self) -> usize {
        self.states.keys().filter(Result::is_ok).count()
    }

    /// Accepted connections with their peer's record; bounded the same way.
    pub fn accepted(&self) -> usize {
        self.accepted.keys().filter(Result::is_ok).count()
    }
}

/// A second handle on the counters map, so /metrics can read it at scrape time while the
/// sync loop owns the engine.
pub struct CounterReader {
    map: PerCpuHashMap<MapData, CounterKey, Counter>,
}

impl CounterReader {
    /// Totals per (pod cgroup, verdict), summed over hooks and CPUs, and the DNS queries
    /// per (pod cgroup, verdict): one walk of the map, so its cost is bounded by the map's
    /// capacity whatever the number of pods.
    pub fn totals(&self) -> Result<Totals, EngineError> {
        let mut out = Totals::default();
        for item in self.map.iter() {
            let (key, values) = item.map_err(|source| EngineError::Map {
                map: map_names::COUNTERS,
                source,
            })?;
            out.entries += 1;
            let c = sum(&values);
            let t = out.traffic.entry((key.cgroup_id, key.verdict)).or_default();
            t.packets += c.packets;
            t.bytes += c.bytes;
            if key.hook == Hook::Dns as u8 {
                *out.dns_queries.entry((key.cgroup_id, key.verdict)).or_default() += c.packets;
            }
            if key.hook == Hook::Ingress as u8 {
                *out.ingress.entry((key.cgroup_id, key.verdict)).or_default() += c.packets;
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Default)]
pub struct Totals {
    /// (pod cgroup, verdict) → packets and bytes over every hook.
    pub traffic: HashMap<(u64, u8), Counter>,
    /// (pod cgroup, verdict) → DNS queries checked (hook `Dns`).
    pub dns_queries: HashMap<(u64, u8), u64>,
    /// (pod cgroup, verdict) → inbound attempts judged (hook `Ingress`).
    pub ingress: HashMap<(u64, u8), u64>,
    /// Entries in the map (it is not LRU: when full, new pods go uncounted).
    pub entries: usize,
}

/// A second handle on the per-destination flow statistics, for the agent's baseline
/// recorder (the sync loop owns the engine).
pub struct FlowReader {
    map: PerCpuHashMap<MapData, FlowKey, Counter>,
}

impl FlowReader {
    /// Every flow of every pod, summed over CPUs: one walk of the map, bounded by its
    /// capacity (`MAX_FLOWS`).
    pub fn all(&self) -> Result<Vec<(FlowKey, Counter)>, EngineError> {
        every_entry(&self.map, map_names::FLOWS)
    }
}

impl Engine {
    pub fn flow_reader(&self) -> Result<FlowReader, EngineError> {
        let data = self.second_handle(map_names::FLOWS)?;
        let map =
            PerCpuHashMap::try_from(Map::PerCpuLruHashMap(data)).map_err(|source| EngineError::Map {
                map: map_names::FLOWS,
                source,
            })?;
        Ok(FlowReader { map })
    }

    /// Counts the socket tables' records (sockets of guarded pods the kernel remembers).
    pub fn sockets_reader(&self) -> Result<SocketsReader, EngineError> {
        let open = |name| {
            let data = self.second_handle(name)?;
            Ok::<_, EngineError>(Map::LruHashMap(data))
        };
        let err = |map| move |source| EngineError::Map { map, source };
        Ok(SocketsReader {
            states: BpfHashMap::try_from(open(map_names::SOCKETS)?).map_err(err(map_names::SOCKETS))?,
            accepted: BpfHashMap::try_from(open(map_names::ACCEPTED)?).map_err(err(map_names::ACCEPTED))?,
        })
    }

    pub fn counter_reader(&self) -> Result<CounterReader, EngineError> {
        let err = |source| EngineError::Map {
            map: map_names::COUNTERS,
            source,
        };
        let data = self.second_handle(map_names::COUNTERS)?;
        let map = PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(err)?;
        Ok(CounterReader { map })
    }

    /// A new fd for the same map (by id), owned by the caller.
    pub(super) fn second_handle(&self, name: &'static str) -> Result<MapData, EngineError> {
        let err = |source| EngineError::Map { map: name, source };
        let data = match self.ebpf.map(name) {
            Some(
                Map::PerCpuHashMap(data)
                | Map::LruHashMap(data)
                | Map::HashMap(data)
                | Map::PerCpuLruHashMap(data),
            ) => data,
            _ => return Err(EngineError::MissingMap { map: name }),
        };
        let id = data.info().map_err(err)?.id();
        MapData::from_id(id).map_err(err)
    }
}
