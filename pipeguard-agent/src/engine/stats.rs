//! Reading the per-CPU counters back, summed over CPUs.

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use pipeguard_common::{Counter, CounterKey, FlowKey, map_names};

use super::{Engine, EngineError};

fn sum(values: &aya::maps::PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
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
