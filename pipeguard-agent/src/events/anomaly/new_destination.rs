//! `new_destination`: allowed traffic to a destination the baseline does not have. The
//! baseline is a set of destinations (a learned run) or an allowlist (a policy); each new
//! destination raises once.

use std::{collections::HashSet, net::IpAddr};

use crate::{engine::PolicyEntries, policy::protocol_number};

/// A destination as the baseline knows it.
pub type Dest = (IpAddr, u16, String);

pub enum Baseline {
    /// Destinations a run reached (`exec --learn-json`).
    Seen(HashSet<Dest>),
    /// What a policy allows.
    Allowlist(PolicyEntries),
}

impl Baseline {
    pub fn contains(&self, dest: &Dest) -> bool {
        match self {
            Self::Seen(set) => set.contains(dest),
            Self::Allowlist(entries) => allowlist_allows(entries, dest),
        }
    }
}

/// The trie's answer, in user space: the longest prefix containing the address decides.
fn allowlist_allows(entries: &PolicyEntries, (ip, port, protocol): &Dest) -> bool {
    let protocol = protocol_number(&protocol.to_ascii_uppercase()).unwrap_or(match protocol.as_str() {
        "icmp" => 1,
        "icmpv6" => 58,
        other => other.parse().unwrap_or(0),
    });
    let ports = match crate::policy::canonical(*ip) {
        IpAddr::V4(ip) => entries
            .v4
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, p)| *p),
        IpAddr::V6(ip) => entries
            .v6
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, p)| *p),
    };
    ports.is_some_and(|p| p.allows(protocol, *port))
}

/// New destinations remembered as raised.
const MAX_RAISED: usize = 16_384;

pub struct NewDestination {
    baseline: Baseline,
    raised: HashSet<Dest>,
}

impl NewDestination {
    pub fn new(baseline: Baseline) -> Self {
        Self {
            baseline,
            raised: HashSet::new(),
        }
    }

    /// Traffic that left for `dest`. True the first time for a destination not in the baseline.
    pub fn observe(&mut self, dest: &Dest) -> bool {
        if self.raised.contains(dest) || self.baseline.contains(dest) {
            return false;
        }
        if self.raised.len() >= MAX_RAISED {
            self.raised.clear();
        }
        self.raised.insert(dest.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(ip: &str, port: u16) -> Dest {
        (ip.parse().unwrap(), port, "tcp".into())
    }

    #[test]
    fn a_run_baseline_raises_once_per_new_destination() {
        let mut d = NewDestination::new(Baseline::Seen(HashSet::from([dest("10.0.0.1", 443)])));
        assert!(!d.observe(&dest("10.0.0.1", 443)));
        assert!(
            d.observe(&dest("10.0.0.1", 80)),
            "another port is another destination"
        );
        assert!(!d.observe(&dest("10.0.0.1", 80)), "once");
        assert!(d.observe(&dest("10.0.0.2", 443)));
    }

    #[test]
    fn a_policy_baseline_is_what_it_allows() {
        let set = crate::policy::parse_policies(
            "p.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.128/25]}}]\n    ports: [{protocol: TCP, port: 443}]\n",
        );
        let pod = crate::policy::PodIdentity {
            namespace: "ci".into(),
            name: "job".into(),
            labels: Default::default(),
        };
        let crate::policy::Egress::Isolated { rules, .. } = crate::policy::egress_for(&set, &pod, None)
        else {
            panic!("isolated");
        };
        let lpm = crate::policy::lpm_entries(&rules).unwrap();
        let mut d = NewDestination::new(Baseline::Allowlist(PolicyEntries {
            v4: lpm.v4,
            v6: lpm.v6,
            names: Vec::new(),
            ingress: None,
        }));
        assert!(!d.observe(&dest("10.0.0.5", 443)));
        assert!(!d.observe(&dest("::ffff:10.0.0.5", 443)), "v4-mapped is IPv4");
        assert!(d.observe(&dest("10.0.0.200", 443)), "the except is a hole");
        assert!(d.observe(&dest("10.0.0.5", 80)));
    }
}
