//! Domain rules → the kernel's name map (`PG_DNS_NAMES_V1`), per allowlist.
//!
//! The kernel decides by the most specific matching pattern (the exact name, else the
//! longest wildcard suffix), so each entry carries the union of the ports of every pattern
//! that matches the names it matches: `*.com` on 80 and `github.com` on 443 give
//! `github.com` both. Names under the cluster domain may always be queried; their entry has
//! no ports, so their answers teach nothing (cluster addresses are NetworkPolicy's).

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData};
use pipeguard_common::{
    MAX_NAME_BYTES, MAX_PORT_RANGES, NAME_EXACT, NAME_WILDCARD, NameKey, NameRule, PORTS_ALL, PortRange,
    PortSet, map_names, name_hash,
};

use super::{Engine, EngineError, tables::ignore_missing};
use crate::policy::{DomainPattern, DomainRule, Ports};

/// One entry of the name map, before the policy id is added: (kind, name) → ports.
pub type NameEntries = BTreeMap<(u32, String), PortSet>;

#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("domain name {name:?} is not a valid DNS name (at most {MAX_NAME_BYTES} bytes)")]
    TooLong { name: String },
    #[error(
        "domain name {name:?} needs {needed} port ranges; one entry holds at most {MAX_PORT_RANGES} (merge or widen the ranges)"
    )]
    TooManyPortRanges { name: String, needed: usize },
}

/// The name map entries of one allowlist. `cluster_domain` is always allowed (empty: none).
pub fn compile(rules: &[DomainRule], cluster_domain: &str) -> Result<NameEntries, NamesError> {
    let patterns: Vec<(u32, &str, &Ports)> = rules
        .iter()
        .map(|r| match &r.pattern {
            DomainPattern::Exact(n) => (NAME_EXACT, n.as_str(), &r.ports),
            DomainPattern::Wildcard(n) => (NAME_WILDCARD, n.as_str(), &r.ports),
        })
        .collect();
    let mut out = NameEntries::new();
    for &(kind, name, _) in &patterns {
        if out.contains_key(&(kind, name.to_string())) {
            continue;
        }
        let mut all = false;
        let mut ranges = Vec::new();
        for &(other_kind, other, ports) in &patterns {
            if covers(other_kind, other, kind, name) {
                match ports {
                    Ports::All => all = true,
                    Ports::List(list) => ranges.extend_from_slice(list),
                }
            }
        }
        out.insert((kind, name.to_string()), pack(name, all, ranges)?);
    }
    let cluster = cluster_domain.trim_end_matches('.').to_ascii_lowercase();
    if !cluster.is_empty() {
        for kind in [NAME_EXACT, NAME_WILDCARD] {
            // A rule that names the cluster domain keeps its ports.
            out.entry((kind, cluster.clone())).or_default();
        }
    }
    for (_, name) in out.keys() {
        if name.len() >= MAX_NAME_BYTES - 1 {
            return Err(NamesError::TooLong { name: name.clone() });
        }
    }
    Ok(out)
}

/// Does pattern (a_kind, a) match every name pattern (b_kind, b) matches?
fn covers(a_kind: u32, a: &str, b_kind: u32, b: &str) -> bool {
    let strictly_under = |name: &str, suffix: &str| {
        name.len() > suffix.len() + 1
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
    };
    match (a_kind, b_kind) {
        (NAME_EXACT, NAME_EXACT) => a == b,
        (NAME_EXACT, _) => false,
        // *.a covers b (exact) when b is under a; covers *.b when b is a or under a.
        (_, NAME_EXACT) => strictly_under(b, a),
        _ => a == b || strictly_under(b, a),
    }
}

fn pack(name: &str, all: bool, mut ranges: Vec<(u8, u16, u16)>) -> Result<PortSet, NamesError> {
    if all {
        return Ok(PortSet {
            flags: PORTS_ALL,
            ..PortSet::default()
        });
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u8, u16, u16)> = Vec::new();
    for (proto, lo, hi) in ranges {
        match merged.last_mut() {
            Some((p, _, last_hi)) if *p == proto && u32::from(lo) <= u32::from(*last_hi) + 1 => {
                *last_hi = (*last_hi).max(hi);
            }
            _ => merged.push((proto, lo, hi)),
        }
    }
    if merged.len() > MAX_PORT_RANGES {
        return Err(NamesError::TooManyPortRanges {
            name: name.to_string(),
            needed: merged.len(),
        });
    }
    let mut set = PortSet {
        count: merged.len() as u32,
        ..PortSet::default()
    };
    for (slot, (protocol, start, end)) in set.ranges.iter_mut().zip(merged) {
        *slot = PortRange {
            start,
            end,
            protocol,
            _pad: [0; 3],
        };
    }
    Ok(set)
}

fn key(policy_id: u32, kind: u32, name: &str) -> NameKey {
    NameKey {
        policy_id,
        kind,
        hash: name_hash(name.as_bytes()),
    }
}

fn value(name: &str, ports: PortSet) -> NameRule {
    let mut rule = NameRule {
        ports,
        len: name.len() as u32,
        ..NameRule::default()
    };
    rule.name[..name.len()].copy_from_slice(name.as_bytes());
    rule
}

fn map_error(source: aya::maps::MapError) -> EngineError {
    EngineError::Map {
        map: map_names::DNS_NAMES,
        source,
    }
}

impl Engine {
    fn compile_names(&self, rules: &[DomainRule]) -> Result<NameEntries, EngineError> {
        compile(rules, &self.cluster_domain).map_err(EngineError::Names)
    }

    /// Writes the name entries of an allowlist; entries already there are overwritten.
    pub(super) fn put_names(&mut self, policy_id: u32, rules: &[DomainRule]) -> Result<(), EngineError> {
        if !rules.is_empty() {
            self.ensure_dns()?;
        }
        let entries = self.compile_names(rules)?;
        let mut map: HashMap<&mut MapData, NameKey, NameRule> = self.map_mut(map_names::DNS_NAMES)?;
        for ((kind, name), ports) in &entries {
            map.insert(key(policy_id, *kind, name), value(name, *ports), 0)
                .map_err(map_error)?;
        }
        Ok(())
    }

    /// Writes `new`'s entries, then deletes those of `old` that `new` has not: a name
    /// allowed by both stays allowed throughout.
    pub(super) fn replace_names(
        &mut self,
        policy_id: u32,
        old: &[DomainRule],
        new: &[DomainRule],
    ) -> Result<(), EngineError> {
        if old == new {
            return Ok(());
        }
        if !new.is_empty() {
            self.ensure_dns()?;
        }
        let (old, new) = (self.compile_names(old)?, self.compile_names(new)?);
        let mut map: HashMap<&mut MapData, NameKey, NameRule> = self.map_mut(map_names::DNS_NAMES)?;
        for ((kind, name), ports) in &new {
            if old.get(&(*kind, name.clone())) != Some(ports) {
                map.insert(key(policy_id, *kind, name), value(name, *ports), 0)
                    .map_err(map_error)?;
            }
        }
        for (kind, name) in old.keys().filter(|k| !new.contains_key(k)) {
            ignore_missing(map.remove(&key(policy_id, *kind, name))).map_err(map_error)?;
        }
        Ok(())
    }

    /// Deletes every name entry of `policy_id` (found by scanning the map, so entries left
    /// by an earlier agent with other rules go too).
    pub(super) fn delete_names(&mut self, policy_id: u32) -> Result<(), EngineError> {
        let mut map: HashMap<&mut MapData, NameKey, NameRule> = self.map_mut(map_names::DNS_NAMES)?;
        let keys: Vec<NameKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.policy_id == policy_id)
            .collect();
        for k in keys {
            ignore_missing(map.remove(&k)).map_err(map_error)?;
        }
        Ok(())
    }

    /// The name entries in the map, per policy id: (kind, name) → ports.
    pub fn name_entries(&self) -> Result<std::collections::HashMap<u32, NameEntries>, EngineError> {
        let map: HashMap<&MapData, NameKey, NameRule> = self.map(map_names::DNS_NAMES)?;
        let mut out: std::collections::HashMap<u32, NameEntries> = std::collections::HashMap::new();
        for item in map.iter() {
            let (k, rule) = item.map_err(map_error)?;
            let len = (rule.len as usize).min(MAX_NAME_BYTES);
            let name = String::from_utf8_lossy(&rule.name[..len]).into_owned();
            out.entry(k.policy_id)
                .or_default()
                .insert((k.kind, name), rule.ports);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, ports: Ports) -> DomainRule {
        DomainRule {
            pattern: match pattern.strip_prefix("*.") {
                Some(suffix) => DomainPattern::Wildcard(suffix.into()),
                None => DomainPattern::Exact(pattern.into()),
            },
            ports,
        }
    }

    fn tcp(port: u16) -> Ports {
        Ports::List(vec![(6, port, port)])
    }

    #[test]
    fn the_most_specific_entry_carries_every_matching_rules_ports() {
        let entries = compile(
            &[
                rule("*.com", tcp(80)),
                rule("github.com", tcp(443)),
                rule("*.github.com", tcp(22)),
                rule("gitlab.com", Ports::All),
            ],
            "cluster.local",
        )
        .unwrap();
        let ports = |kind, name: &str| entries[&(kind, name.to_string())];
        let github = ports(NAME_EXACT, "github.com");
        assert!(github.allows(6, 443) && github.allows(6, 80) && !github.allows(6, 22));
        let sub = ports(NAME_WILDCARD, "github.com");
        assert!(sub.allows(6, 22) && sub.allows(6, 80) && !sub.allows(6, 443));
        let com = ports(NAME_WILDCARD, "com");
        assert!(com.allows(6, 80) && !com.allows(6, 443));
        assert_eq!(ports(NAME_EXACT, "gitlab.com").flags, PORTS_ALL);
        let cluster = ports(NAME_WILDCARD, "cluster.local");
        assert!(
            !cluster.allows(6, 443),
            "the cluster domain may be queried, teaches nothing"
        );
        assert_eq!(entries.len(), 6);
    }

    #[test]
    fn a_wildcard_never_covers_its_own_suffix_or_a_lookalike() {
        assert!(!covers(NAME_WILDCARD, "npmjs.org", NAME_EXACT, "npmjs.org"));
        assert!(!covers(NAME_WILDCARD, "npmjs.org", NAME_EXACT, "evilnpmjs.org"));
        assert!(covers(
            NAME_WILDCARD,
            "npmjs.org",
            NAME_EXACT,
            "registry.npmjs.org"
        ));
        assert!(covers(NAME_WILDCARD, "org", NAME_WILDCARD, "npmjs.org"));
        assert!(!covers(NAME_EXACT, "npmjs.org", NAME_WILDCARD, "npmjs.org"));
    }
}
