//! Domain allow rules (`DomainPolicy`, `ClusterDomainPolicy`), compiled: the contract
//! between the policy layer (which parses and selects them) and the engine (which turns
//! them into the kernel's name map).

use super::Ports;

/// A name a rule allows, normalized: lowercase ASCII (IDN names in punycode), no trailing
/// dot, every label 1..=63 bytes, at most 253 bytes in all.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainPattern {
    /// `github.com`: that name only.
    Exact(String),
    /// `*.npmjs.org`, stored as `npmjs.org`: one or more labels before the suffix, never
    /// the suffix itself.
    Wildcard(String),
}

/// One domain rule of one policy: the names it allows, and on which ports the addresses
/// they resolve to may be reached (`Ports::All` when the rule names no ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRule {
    pub pattern: DomainPattern,
    pub ports: Ports,
}
