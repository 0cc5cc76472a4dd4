//! The DNS state the kernel keeps, seen from user space: learned addresses (read for
//! summaries and metrics, swept when expired) and the name table (hash → name) that puts a
//! name on events. The kernel enforces from these maps alone; user space only tidies.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use pipeguard_common::{LearnedAddr, LearnedKey, MAX_LEARNED, MAX_NAME_BYTES, NameText, PodEntry, map_names};

use super::{Engine, EngineError, tables::ignore_missing};

/// How often the agent and exec sweep expired DNS entries (the TTL floor's default: an
/// entry outlives its expiry by at most this long).
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// bpf_ktime_get_ns: CLOCK_MONOTONIC.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An address learned from an answer under one rule, as the kernel holds it (an address
/// several rules taught is one of these per rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    pub policy_id: u32,
    pub addr: IpAddr,
    /// Time left; zero once expired (connections opened before still work).
    pub remaining: std::time::Duration,
    pub name_hash: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsSweep {
    pub learned_removed: usize,
    pub learned_remaining: usize,
    /// Always 0: expired query slots are reused by the kernel, not deleted (kept for the
    /// `dns_queries` series of `pipeguard_dns_swept_total`).
    pub queries_removed: usize,
    /// Capacity of the learned-address map (LRU beyond it).
    pub learned_capacity: u32,
}

/// IPv4 addresses are stored IPv4-mapped.
pub fn ip_of(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> EngineError {
    move |source| EngineError::Map { map, source }
}

impl Engine {
    /// Every learned address (the allowlists' entries).
    pub fn learned(&self) -> Result<Vec<Learned>, EngineError> {
        self.entries_of(map_names::DNS_LEARNED)
    }

    /// Every address named for learning (`learn_names`); they allow nothing.
    pub fn seen(&self) -> Result<Vec<Learned>, EngineError> {
        self.entries_of(map_names::DNS_SEEN)
    }

    fn entries_of(&self, name: &'static str) -> Result<Vec<Learned>, EngineError> {
        let now = monotonic_ns();
        let map: BpfHashMap<&MapData, LearnedKey, LearnedAddr> = self.map(name)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, value) = item.map_err(map_error(name))?;
            for held in value.rules.iter().filter(|r| r.expires_ns != 0) {
                out.push(Learned {
                    policy_id: key.policy_id,
                    addr: ip_of(key.addr),
                    remaining: std::time::Duration::from_nanos(held.expires_ns.saturating_sub(now)),
                    name_hash: held.name_hash,
                });
            }
        }
        Ok(out)
    }

    /// The name a hash stands for, if the kernel recorded it (bounded, LRU).
    pub fn name_text(&self, hash: u64) -> Option<String> {
        let map: BpfHashMap<&MapData, u64, NameText> = self.map(map_names::DNS_NAME_TEXT).ok()?;
        let text = map.get(&hash, 0).ok()?;
        Some(name_from_bytes(&text.name, text.len as usize))
    }

    /// A second handle on the name table, for the event readers (which run while the agent's
    /// sync loop owns the engine).
    pub fn name_texts(&self) -> Result<NameTexts, EngineError> {
        let map = BpfHashMap::try_from(Map::LruHashMap(self.second_handle(map_names::DNS_NAME_TEXT)?))
            .map_err(map_error(map_names::DNS_NAME_TEXT))?;
        Ok(NameTexts {
            map,
            cache: HashMap::new(),
        })
    }

    /// Second handles on the pod table, the learned addresses and the name table: what the
    /// baseline recorder names its runs' destinations with.
    pub fn pod_names(&self) -> Result<PodNames, EngineError> {
        let pods = BpfHashMap::try_from(Map::HashMap(self.second_handle(map_names::PODS)?))
            .map_err(map_error(map_names::PODS))?;
        let table =
            |name| BpfHashMap::try_from(Map::LruHashMap(self.second_handle(name)?)).map_err(map_error(name));
        Ok(PodNames {
            pods,
            tables: [table(map_names::DNS_LEARNED)?, table(map_names::DNS_SEEN)?],
            texts: self.name_texts()?,
        })
    }

    /// A second handle on the learned-address map, for /metrics at scrape time.
    pub fn learned_reader(&self) -> Result<LearnedReader, EngineError> {
        let map = BpfHashMap::try_from(Map::LruHashMap(self.second_handle(map_names::DNS_LEARNED)?))
            .map_err(map_error(map_names::DNS_LEARNED))?;
        Ok(LearnedReader { map })
    }

    /// Learned (and seen) addresses of one allowlist with their names (for `exec`'s summary
    /// and learned policy).
    pub fn learned_names(&self, policy_id: u32) -> Result<HashMap<IpAddr, String>, EngineError> {
        let mut out = HashMap::new();
        let entries = self.seen()?.into_iter().chain(self.learned()?);
        for l in entries.filter(|l| l.policy_id == policy_id) {
            if let Some(name) = self.name_text(l.name_hash) {
                out.insert(l.addr, name);
            }
        }
        Ok(out)
    }

    /// [`Engine::sweep_dns`], logged; `None` (after a warning) when it failed. A failed
    /// sweep changes nothing about enforcement: the LRU maps still bound the state.
    pub fn sweep_dns_logged(&mut self) -> Option<DnsSweep> {
        match self.sweep_dns() {
            Ok(sweep) => {
                if sweep.learned_removed + sweep.queries_removed > 0 {
                    tracing::debug!(
                        learned_removed = sweep.learned_removed,
                        queries_removed = sweep.queries_removed,
                        learned_remaining = sweep.learned_remaining,
                        "swept expired DNS entries"
                    );
                }
                Some(sweep)
            }
            Err(error) => {
                tracing::warn!(%error, "sweeping expired DNS entries");
                None
            }
        }
    }

    /// Deletes expired learned (and seen) addresses, so the LRU maps only evict under real
    /// pressure. (Unanswered queries need no sweep: the kernel reuses their slots once they
    /// expire. Connections opened while an entry lived hold their own pass in the socket's
    /// storage, so they need no entry kept for them.)
    pub fn sweep_dns(&mut self) -> Result<DnsSweep, EngineError> {
        let (learned_removed, learned_remaining) = self.sweep_expired(map_names::DNS_LEARNED)?;
        self.sweep_expired(map_names::DNS_SEEN)?;
        Ok(DnsSweep {
            learned_removed,
            learned_remaining,
            learned_capacity: MAX_LEARNED,
            ..DnsSweep::default()
        })
    }

    /// (removed, remaining) of one table shaped like the learned one.
    fn sweep_expired(&mut self, name: &'static str) -> Result<(usize, usize), EngineError> {
        let now = monotonic_ns();
        let (mut removed, mut remaining) = (0, 0);
        let mut table: BpfHashMap<&mut MapData, LearnedKey, LearnedAddr> = self.map_mut(name)?;
        let mut expired = Vec::new();
        for item in table.iter() {
            let (key, value) = item.map_err(map_error(name))?;
            if value.expires_ns() > now {
                remaining += 1;
            } else {
                expired.push(key);
            }
        }
        for key in &expired {
            // Read again right before the delete: an answer may have taught the address
            // again since the walk (the window left is the two syscalls in between).
            if table.get(key, 0).is_ok_and(|v| v.expires_ns() > monotonic_ns()) {
                remaining += 1;
                continue;
            }
            ignore_missing(table.remove(key)).map_err(map_error(name))?;
            removed += 1;
        }
        Ok((removed, remaining))
    }
}

/// Names resolved before, kept at most (cleared when full: names repeat within a burst).
const NAME_CACHE_ENTRIES: usize = 4_096;

/// The kernel's name table seen from an event reader, with a cache in front: a burst of
/// events about one address costs one map lookup.
pub struct NameTexts {
    map: BpfHashMap<MapData, u64, NameText>,
    cache: HashMap<u64, String>,
}

impl super::events::NameTable for NameTexts {
    fn name(&mut self, hash: u64) -> Option<String> {
        if let Some(name) = self.cache.get(&hash) {
            return Some(name.clone());
        }
        // A miss (evicted from the kernel's LRU table) is not cached: the next answer for
        // the name writes it again.
        let text = self.map.get(&hash, 0).ok()?;
        let name = name_from_bytes(&text.name, text.len as usize);
        if self.cache.len() >= NAME_CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(hash, name.clone());
        Some(name)
    }
}

/// Counts learned entries without the engine (scrape time).
pub struct LearnedReader {
    map: BpfHashMap<MapData, LearnedKey, LearnedAddr>,
}

impl LearnedReader {
    /// Entries in the map: one walk of its keys, bounded by `MAX_LEARNED`.
    pub fn count(&self) -> usize {
        self.map.keys().filter(Result::is_ok).count()
    }
}

/// A name as the job sent it: bytes, possibly not UTF-8; control characters are escaped by
/// whoever prints it (JSON does).
pub fn name_from_bytes(bytes: &[u8], len: usize) -> String {
    let len = len.min(MAX_NAME_BYTES).min(bytes.len());
    let mut out = String::with_capacity(len);
    for &b in &bytes[..len] {
        // A backslash too, so an escape in the output always stands for a byte.
        if b.is_ascii_graphic() && b != b'\\' {
            out.push(b as char);
        } else {
            // Not printable ASCII: shown as \xNN, so a name can never forge a line or a field.
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The names the kernel learned for pods' destinations, without the engine: learned
/// entries are per allowlist, so a pod's are those of the allowlist it has now.
pub struct PodNames {
    pods: BpfHashMap<MapData, u64, PodEntry>,
    /// The learned and the seen addresses.
    tables: [BpfHashMap<MapData, LearnedKey, LearnedAddr>; 2],
    texts: NameTexts,
}

impl PodNames {
    /// Pod cgroup id → address → name, for the pods among `cgroup_ids` the kernel knows:
    /// one walk of the learned and the seen tables (bounded by their capacities).
    pub fn of(&mut self, cgroup_ids: &[u64]) -> HashMap<u64, HashMap<IpAddr, String>> {
        use super::events::NameTable as _;
        let mut pods_of: HashMap<u32, Vec<u64>> = HashMap::new();
        for id in cgroup_ids {
            if let Ok(entry) = self.pods.get(id, 0) {
                pods_of.entry(entry.policy_id).or_default().push(*id);
            }
        }
        let mut out: HashMap<u64, HashMap<IpAddr, String>> = HashMap::new();
        let entries = self.tables.iter().flat_map(|t| t.iter().filter_map(Result::ok));
        for (key, value) in entries {
            let Some(pods) = pods_of.get(&key.policy_id) else {
                continue;
            };
            let Some(name) = self.texts.name(value.longest().name_hash) else {
                continue;
            };
            for pod in pods {
                out.entry(*pod).or_default().insert(ip_of(key.addr), name.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn names_with_control_characters_and_non_ascii_are_escaped() {
        let raw = b"a\nb\x1b[31m\xffc\\x0a.example";
        assert_eq!(
            name_from_bytes(raw, raw.len()),
            "a\\x0ab\\x1b[31m\\xffc\\x5cx0a.example"
        );
        assert_eq!(
            name_from_bytes(b"github.com", 99),
            "github.com",
            "len past the end is cut"
        );
    }

    #[test]
    fn addresses_round_trip_ipv4_mapped() {
        let v4: IpAddr = Ipv4Addr::new(203, 0, 113, 7).into();
        assert_eq!(ip_of(mapped(v4)), v4);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_of(mapped(v6)), v6);
    }
}
