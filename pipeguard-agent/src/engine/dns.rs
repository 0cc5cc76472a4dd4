//! The DNS state the kernel keeps, seen from user space: learned addresses (read for
//! summaries and metrics, swept when expired) and the name table (hash → name) that puts a
//! name on events. The kernel enforces from these maps alone; user space only tidies.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use pipeguard_common::{
    LearnedAddr, LearnedKey, MAX_LEARNED, MAX_NAME_BYTES, NameText, QueryKey, QueryState, map_names,
};

use super::{Engine, EngineError, tables::ignore_missing};

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

/// An address learned from an answer, as the kernel holds it.
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
    /// Every learned address.
    pub fn learned(&self) -> Result<Vec<Learned>, EngineError> {
        let now = monotonic_ns();
        let map: BpfHashMap<&MapData, LearnedKey, LearnedAddr> = self.map(map_names::DNS_LEARNED)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, value) = item.map_err(map_error(map_names::DNS_LEARNED))?;
            out.push(Learned {
                policy_id: key.policy_id,
                addr: ip_of(key.addr),
                remaining: std::time::Duration::from_nanos(value.expires_ns.saturating_sub(now)),
                name_hash: value.name_hash,
            });
        }
        Ok(out)
    }

    /// The name a hash stands for, if the kernel recorded it (bounded, LRU).
    pub fn name_text(&self, hash: u64) -> Option<String> {
        let map: BpfHashMap<&MapData, u64, NameText> = self.map(map_names::DNS_NAME_TEXT).ok()?;
        let text = map.get(&hash, 0).ok()?;
        Some(name_from_bytes(&text.name, text.len as usize))
    }

    /// Learned addresses of one allowlist with their names (for `exec`'s summary).
    pub fn learned_names(&self, policy_id: u32) -> Result<HashMap<IpAddr, String>, EngineError> {
        let mut out = HashMap::new();
        for l in self.learned()?.into_iter().filter(|l| l.policy_id == policy_id) {
            if let Some(name) = self.name_text(l.name_hash) {
                out.insert(l.addr, name);
            }
        }
        Ok(out)
    }

    /// Deletes expired learned addresses and unanswered queries, so the LRU maps only evict
    /// under real pressure. Connections opened while an entry lived keep their own record.
    pub fn sweep_dns(&mut self) -> Result<DnsSweep, EngineError> {
        let now = monotonic_ns();
        let mut sweep = DnsSweep {
            learned_capacity: MAX_LEARNED,
            ..DnsSweep::default()
        };
        let mut learned: BpfHashMap<&mut MapData, LearnedKey, LearnedAddr> =
            self.map_mut(map_names::DNS_LEARNED)?;
        let mut expired = Vec::new();
        for item in learned.iter() {
            let (key, value) = item.map_err(map_error(map_names::DNS_LEARNED))?;
            if value.expires_ns <= now {
                expired.push(key);
            } else {
                sweep.learned_remaining += 1;
            }
        }
        for key in &expired {
            ignore_missing(learned.remove(key)).map_err(map_error(map_names::DNS_LEARNED))?;
        }
        sweep.learned_removed = expired.len();
        let mut queries: BpfHashMap<&mut MapData, QueryKey, QueryState> =
            self.map_mut(map_names::DNS_QUERIES)?;
        let stale: Vec<QueryKey> = queries
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now)
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            ignore_missing(queries.remove(key)).map_err(map_error(map_names::DNS_QUERIES))?;
        }
        sweep.queries_removed = stale.len();
        Ok(sweep)
    }
}

/// A name as the job sent it: bytes, possibly not UTF-8; control characters are escaped by
/// whoever prints it (JSON does).
pub fn name_from_bytes(bytes: &[u8], len: usize) -> String {
    let len = len.min(MAX_NAME_BYTES).min(bytes.len());
    let mut out = String::with_capacity(len);
    for &b in &bytes[..len] {
        if b.is_ascii_graphic() {
            out.push(b as char);
        } else {
            // Not printable ASCII: shown as \xNN, so a name can never forge a line or a field.
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn names_with_control_characters_and_non_ascii_are_escaped() {
        let raw = b"a\nb\x1b[31m\xffc.example";
        assert_eq!(name_from_bytes(raw, raw.len()), "a\\x0ab\\x1b[31m\\xffc.example");
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
