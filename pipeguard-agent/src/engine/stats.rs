//! Reading the per-CPU counters back, summed over CPUs.

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use pipeguard_common::{
    COUNTER_SLOT_NONE, COUNTER_SLOT_OVERFLOW, Counter, CounterKey, FlowKey, HOOK_COUNT, Hook, PodCounters,
    PodEntry, REMEMBERED_REPLY, SocketRecord, SocketState, VERDICT_ALLOW, VERDICT_COUNT, map_names,
};

use super::{Engine, EngineError, socket_records::SocketRecords};

fn plus(a: Counter, b: Counter) -> Counter {
    Counter {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

fn sum(values: &aya::maps::PerCpuValues<Counter>) -> Counter {
    values.iter().copied().fold(Counter::default(), plus)
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

/// What the fast path of each socket counted for its remembered destination and has not
/// added to the flow table yet (see `SocketState::flow_pending`).
fn pending_flows(sockets: &SocketRecords<SocketState>) -> Vec<(FlowKey, Counter)> {
    sockets
        .records()
        .into_iter()
        .filter(|state| state.flow_pending.packets != 0)
        .map(|state| {
            (
                FlowKey {
                    cgroup_id: state.pod_cgroup_id,
                    addr: state.addr,
                    port: state.port,
                    protocol: state.protocol,
                    verdict: VERDICT_ALLOW,
                    _pad: [0; 4],
                },
                state.flow_pending,
            )
        })
        .collect()
}

/// One total per flow key.
fn merge(flows: impl Iterator<Item = (FlowKey, Counter)>) -> Vec<(FlowKey, Counter)> {
    let mut merged: HashMap<FlowKey, Counter> = HashMap::new();
    for (key, c) in flows {
        let total = merged.entry(key).or_default();
        *total = plus(*total, c);
    }
    merged.into_iter().collect()
}

/// A pod's counter row as (key, totals over CPUs), the counters it has used only.
fn row_counters(pod_cgroup_id: u64, values: &PerCpuValues<PodCounters>) -> Vec<(CounterKey, Counter)> {
    let mut out = Vec::new();
    for hook in 0..HOOK_COUNT {
        for verdict in 0..VERDICT_COUNT {
            let c = values.iter().fold(Counter::default(), |acc, row| {
                plus(acc, row.by_hook[hook][verdict])
            });
            if c != Counter::default() {
                out.push((
                    CounterKey {
                        cgroup_id: pod_cgroup_id,
                        verdict: verdict as u8,
                        hook: hook as u8,
                        _pad: [0; 6],
                    },
                    c,
                ));
            }
        }
    }
    out
}

fn read_row<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, PodCounters>,
    slot: u32,
) -> Result<PerCpuValues<PodCounters>, EngineError> {
    map.get(&slot, 0).map_err(|source| EngineError::Map {
        map: map_names::COUNTERS,
        source,
    })
}

impl Engine {
    /// Every counter of one pod cgroup (0: attempts judged for no pod): (key, totals over
    /// all CPUs). Empty for a pod the engine has no counter slot for.
    pub fn counters(&self, pod_cgroup_id: u64) -> Result<Vec<(CounterKey, Counter)>, EngineError> {
        let Some(slot) = self.slots.of(pod_cgroup_id) else {
            return Ok(Vec::new());
        };
        let map: PerCpuArray<&MapData, PodCounters> = self.map(map_names::COUNTERS)?;
        Ok(row_counters(pod_cgroup_id, &read_row(&map, slot)?))
    }

    /// Every counter of every pod this engine counts, and of no pod.
    pub fn all_counters(&self) -> Result<Vec<(CounterKey, Counter)>, EngineError> {
        let map: PerCpuArray<&MapData, PodCounters> = self.map(map_names::COUNTERS)?;
        let mut out = row_counters(0, &read_row(&map, COUNTER_SLOT_NONE)?);
        for (pod, slot) in self.slots.iter() {
            out.extend(row_counters(pod, &read_row(&map, slot)?));
        }
        Ok(out)
    }

    /// Per-destination statistics of one pod cgroup (only kept with `flow_stats`): the flow
    /// table, plus what open sockets' fast paths counted and have not moved there yet.
    pub fn flows(&self, pod_cgroup_id: u64) -> Result<Vec<(FlowKey, Counter)>, EngineError> {
        let map: PerCpuHashMap<&MapData, FlowKey, Counter> = self.map(map_names::FLOWS)?;
        let sockets = self.socket_records(map_names::SOCKETS)?;
        let mut flows = every_entry(&map, map_names::FLOWS)?;
        flows.extend(pending_flows(&sockets));
        Ok(merge(
            flows
                .into_iter()
                .filter(|(key, _)| key.cgroup_id == pod_cgroup_id),
        ))
    }

    /// Zeroes a counter slot's row on every CPU (before a pod gets it).
    pub(super) fn zero_counters(&mut self, slot: u32) -> Result<(), EngineError> {
        let err = |source| EngineError::Map {
            map: map_names::COUNTERS,
            source,
        };
        let io_err = |source| err(aya::maps::MapError::IoError(source));
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| io_err(source))?;
        let zeros = PerCpuValues::try_from(vec![PodCounters::default(); cpus]).map_err(io_err)?;
        let mut map: PerCpuArray<&mut MapData, PodCounters> = self.map_mut(map_names::COUNTERS)?;
        map.set(slot, zeros, 0).map_err(err)
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

/// A second handle on the socket table.
pub struct SocketsReader {
    states: SocketRecords<SocketState>,
}

impl SocketsReader {
    /// Sockets with a record (their pod, their remembered verdict), accepted connections
    /// included: one scan of the table.
    pub fn count(&self) -> usize {
        self.states.count()
    }

    /// Accepted connections with a record (`REMEMBERED_REPLY`); bounded the same way.
    pub fn accepted(&self) -> usize {
        self.accepted_records().count()
    }

    /// The pods of accepted connections, where their record knows it (handed over at the
    /// handshake, or found by their first reply); bounded the same way.
    pub fn accepted_pods(&self) -> Vec<u64> {
        self.accepted_records()
            .filter(|s| s.pod_cgroup_id != 0)
            .map(|s| s.pod_cgroup_id)
            .collect()
    }

    fn accepted_records(&self) -> impl Iterator<Item = SocketState> {
        self.states
            .records()
            .into_iter()
            .filter(|s| s.remembered & REMEMBERED_REPLY != 0)
    }
}

/// Second handles on the counter array and the pod table, so /metrics can read the
/// counters at scrape time while the sync loop owns the engine.
pub struct CounterReader {
    map: PerCpuArray<MapData, PodCounters>,
    pods: BpfHashMap<MapData, u64, PodEntry>,
}

impl CounterReader {
    /// Totals per (pod cgroup, verdict), summed over hooks and CPUs, and the DNS queries
    /// and inbound attempts per (pod cgroup, verdict), for every pod in the pod table and
    /// for no pod (cgroup 0): one walk of the pod table and one read per pod.
    pub fn totals(&self) -> Result<Totals, EngineError> {
        let mut out = Totals::default();
        let mut rows = vec![(0, COUNTER_SLOT_NONE)];
        for item in self.pods.iter() {
            let (pod, entry) = item.map_err(|source| EngineError::Map {
                map: map_names::PODS,
                source,
            })?;
            out.entries += 1;
            if entry.counter_slot != COUNTER_SLOT_NONE && entry.counter_slot != COUNTER_SLOT_OVERFLOW {
                rows.push((pod, entry.counter_slot));
            }
        }
        for (pod, slot) in rows {
            for (key, c) in row_counters(pod, &read_row(&self.map, slot)?) {
                let t = out.traffic.entry((key.cgroup_id, key.verdict)).or_default();
                *t = plus(*t, c);
                if key.hook == Hook::Dns as u8 {
                    *out.dns_queries.entry((key.cgroup_id, key.verdict)).or_default() += c.packets;
                }
                if key.hook == Hook::Ingress as u8 {
                    *out.ingress.entry((key.cgroup_id, key.verdict)).or_default() += c.packets;
                }
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
    /// Pods counted (each holds a counter slot; past `MAX_COUNTER_SLOTS` they share one).
    pub entries: usize,
}

/// A second handle on the per-destination flow statistics, for the agent's baseline
/// recorder (the sync loop owns the engine).
pub struct FlowReader {
    map: PerCpuHashMap<MapData, FlowKey, Counter>,
    sockets: SocketRecords<SocketState>,
}

impl FlowReader {
    /// Every flow of every pod, summed over CPUs, with what open sockets have not moved
    /// into the table yet: one walk of each map, bounded by their capacities.
    pub fn all(&self) -> Result<Vec<(FlowKey, Counter)>, EngineError> {
        let mut flows = every_entry(&self.map, map_names::FLOWS)?;
        flows.extend(pending_flows(&self.sockets));
        Ok(merge(flows.into_iter()))
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
        Ok(FlowReader {
            map,
            sockets: self.socket_records(map_names::SOCKETS)?,
        })
    }

    /// Counts the socket tables' records (sockets of guarded pods the kernel remembers).
    pub fn sockets_reader(&self) -> Result<SocketsReader, EngineError> {
        Ok(SocketsReader {
            states: self.socket_records(map_names::SOCKETS)?,
        })
    }

    pub fn counter_reader(&self) -> Result<CounterReader, EngineError> {
        let err = |source| EngineError::Map {
            map: map_names::COUNTERS,
            source,
        };
        let map =
            PerCpuArray::try_from(Map::PerCpuArray(self.second_handle(map_names::COUNTERS)?)).map_err(err)?;
        let pods =
            BpfHashMap::try_from(Map::HashMap(self.second_handle(map_names::PODS)?)).map_err(|source| {
                EngineError::Map {
                    map: map_names::PODS,
                    source,
                }
            })?;
        Ok(CounterReader { map, pods })
    }

    /// A second handle on a per-socket table, read in place.
    fn socket_records<T: SocketRecord>(&self, name: &'static str) -> Result<SocketRecords<T>, EngineError> {
        Ok(SocketRecords::new(self.second_handle(name)?, name))
    }

    /// A new fd for the same map (by id), owned by the caller.
    pub(super) fn second_handle(&self, name: &'static str) -> Result<MapData, EngineError> {
        let err = |source| EngineError::Map { map: name, source };
        let data = match self.ebpf.map(name) {
            Some(
                Map::PerCpuHashMap(data)
                | Map::LruHashMap(data)
                | Map::HashMap(data)
                | Map::PerCpuLruHashMap(data)
                | Map::PerCpuArray(data)
                | Map::Array(data),
            ) => data,
            _ => return Err(EngineError::MissingMap { map: name }),
        };
        let id = data.info().map_err(err)?.id();
        MapData::from_id(id).map_err(err)
    }
}
