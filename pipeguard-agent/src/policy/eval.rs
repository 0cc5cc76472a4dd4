//! The reference evaluator: the plain reading of an allowlist, against which the trie
//! compilation is tested.

use std::net::IpAddr;

use super::{AllowRule, canonical};

/// True when some rule covers `ip` (not in one of its excepts) on `protocol`/`port`.
pub fn evaluate(rules: &[AllowRule], ip: IpAddr, protocol: u8, port: u16) -> bool {
    let ip = canonical(ip);
    rules.iter().any(|r| {
        r.cidr.contains(&ip) && !r.except.iter().any(|e| e.contains(&ip)) && r.ports.allows(protocol, port)
    })
}
