//! NetworkPolicy (networking.k8s.io/v1) parsing, validation and compilation to the kernel's
//! allowlist. Pure: no kernel, no network, so most tests run here.
//!
//! Pipeline: `load` (files → raw objects, strict serde with field paths) → `validate`
//! (typed policies, every spec rule checked) → `egress` (which policies select a pod, the
//! union of their rules as [`AllowRule`]s) → `lpm` (trie entries whose longest-prefix answer
//! equals [`evaluate`], the straightforward reference). Ingress takes the same road:
//! `ingress_rules` (the policies that isolate a pod for ingress, their rules as source
//! ranges on the pod's own ports) → `lpm`; `ingress` is `pipeguard check`'s evaluation.
//!
//! Domain policies (`DomainPolicy`, `ClusterDomainPolicy`) ride along: `load` dispatches
//! them by kind to `domain_load` → `domain_policy` (wire format, validation) → `domain`
//! (name syntax); `domain_select` picks a pod's rules; `reach_name` answers `check --to-name`.
//!
//! Imports run one way, never in a loop: `cluster` (snapshots) → `load` (files and
//! objects) → `validate` → `model` (the wire format) and `selector`; the `domain_*`
//! modules sit beside `validate` and under `load`.

#![expect(
    clippy::result_large_err,
    reason = "PolicyError carries file, object and field names; errors are the cold path"
)]

mod cluster;
mod domain;
mod domain_load;
mod domain_policy;
mod domain_select;
mod egress;
mod error;
mod eval;
mod ingress;
mod ingress_rules;
mod load;
mod lpm;
mod model;
mod punycode;
mod reach;
mod reach_name;
mod selector;
mod validate;
mod yaml_stream;

pub use self::{
    cluster::{Cluster, ClusterPod, MAX_CLUSTER_BYTES, NAMESPACE_NAME_LABEL, cluster_from_str, load_cluster},
    domain::{DOH_RESOLVERS, DomainPattern, DomainRule, doh_resolvers_allowed},
    domain_load::{DomainFailure, DomainTaint, TaintScope, domain_policy_from_value, is_domain_kind},
    domain_policy::{
        CLUSTER_DOMAIN_POLICY, DOMAIN_API_VERSION, DOMAIN_POLICY, DomainEgress, DomainPolicy, DomainScope,
    },
    domain_select::{Domains, domain_taint_for, domains_for, merge_rules, selecting_domain},
    egress::{Egress, PodIdentity, egress_for, policy_egress_rules, selecting_egress},
    error::PolicyError,
    eval::evaluate,
    ingress::{Source, policy_admits, selecting_ingress},
    ingress_rules::{Ingress, ingress_for},
    load::{MAX_FILE_BYTES, PolicySet, load_policies, parse_policies, policy_from_json, policy_from_value},
    lpm::{CompileError, LpmEntries, lookup, lpm_entries},
    model::protocol_number,
    reach::{Destination, PortQuery, Reach, ReachError, Side, reach},
    reach_name::{NameReach, reach_name},
    selector::Selector,
    validate::{Peer, Policy, PortRef, PortSpec, Rule, is_port_name},
};

/// One allowed destination range: `cidr` minus `except`, on `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pub cidr: ipnet::IpNet,
    pub except: Vec<ipnet::IpNet>,
    pub ports: Ports,
}

/// What a rule allows on the destinations it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// A rule without ports: every protocol (ICMP included) and port.
    All,
    /// (protocol number, first port, last port), inclusive. Empty allows nothing.
    List(Vec<(u8, u16, u16)>),
}

impl Ports {
    pub fn allows(&self, protocol: u8, port: u16) -> bool {
        match self {
            Self::All => true,
            Self::List(list) => list
                .iter()
                .any(|&(p, lo, hi)| p == protocol && lo <= port && port <= hi),
        }
    }
}

/// ::ffff:a.b.c.d destinations are IPv4 on the wire; the kernel looks them up as IPv4, so
/// the compiler and the reference evaluator do the same.
pub fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
