//! Allow rules → LPM trie entries.
//!
//! Every distinct prefix of the rules (cidrs and excepts) becomes an entry whose value is
//! the union of the ports of the rules that cover it: the rule's cidr contains the prefix
//! and none of its excepts does. For any address, the longest matching entry P is then
//! exact: a rule covers the address iff its cidr contains P and no except contains P,
//! because every cidr and except containing the address is itself an entry no longer
//! than P. An entry with no ports is a hole.

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use pipeguard_common::{MAX_PORT_RANGES, PORTS_ALL, PortRange, PortSet};

use super::{AllowRule, Ports};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LpmEntries {
    pub v4: Vec<(Ipv4Net, PortSet)>,
    pub v6: Vec<(Ipv6Net, PortSet)>,
}

impl LpmEntries {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "{prefix} needs {needed} port ranges; one entry holds at most {MAX_PORT_RANGES} (split the policy's ports, or widen a range)"
    )]
    TooManyPortRanges { prefix: IpNet, needed: usize },
}

/// Union of port specs on one prefix, before it is packed into a `PortSet`.
#[derive(Clone, Debug, Default)]
struct Union {
    all: bool,
    ranges: Vec<(u8, u16, u16)>,
}

impl Union {
    fn add(&mut self, ports: &Ports) {
        match ports {
            Ports::All => self.all = true,
            Ports::List(list) => self.ranges.extend_from_slice(list),
        }
    }

    fn pack(mut self, prefix: IpNet) -> Result<PortSet, CompileError> {
        if self.all {
            return Ok(PortSet {
                flags: PORTS_ALL,
                ..PortSet::default()
            });
        }
        self.ranges.sort_unstable();
        let mut merged: Vec<(u8, u16, u16)> = Vec::new();
        for (proto, lo, hi) in self.ranges {
            match merged.last_mut() {
                Some((p, _, last_hi)) if *p == proto && u32::from(lo) <= u32::from(*last_hi) + 1 => {
                    *last_hi = (*last_hi).max(hi);
                }
                _ => merged.push((proto, lo, hi)),
            }
        }
        if merged.len() > MAX_PORT_RANGES {
            return Err(CompileError::TooManyPortRanges {
                prefix,
                needed: merged.len(),
            });
        }
        let mut set = PortSet {
            flags: 0,
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
}

pub fn lpm_entries(rules: &[AllowRule]) -> Result<LpmEntries, CompileError> {
    // Sorted by (network, prefix length): the prefixes inside a cidr form one contiguous run
    // starting at the cidr itself.
    let mut prefixes: BTreeMap<(IpNet, u8), Union> = BTreeMap::new();
    for rule in rules {
        for net in std::iter::once(&rule.cidr).chain(&rule.except) {
            prefixes.entry(sort_key(net)).or_default();
        }
    }
    for rule in rules {
        let start = sort_key(&rule.cidr);
        let keys: Vec<_> = prefixes
            .range(start..)
            .map(|(k, _)| *k)
            .take_while(|(net, _)| rule.cidr.contains(net))
            .filter(|(net, _)| !rule.except.iter().any(|e| e.contains(net)))
            .collect();
        for key in keys {
            prefixes.get_mut(&key).expect("collected above").add(&rule.ports);
        }
    }
    // Sized exactly: grown by doubling, 100k entries would hold 131k slots (4.5 MB) for good.
    let v4 = prefixes
        .keys()
        .filter(|(net, _)| matches!(net, IpNet::V4(_)))
        .count();
    let mut entries = LpmEntries {
        v4: Vec::with_capacity(v4),
        v6: Vec::with_capacity(prefixes.len() - v4),
    };
    for ((net, _), union) in prefixes {
        let ports = union.pack(net)?;
        match net {
            IpNet::V4(v4) => entries.v4.push((v4, ports)),
            IpNet::V6(v6) => entries.v6.push((v6, ports)),
        }
    }
    Ok(entries)
}

/// IpNet orders by address then prefix length; IPv4 before IPv6. The key is the network
/// itself (host bits cleared) so equal prefixes from different rules meet.
fn sort_key(net: &IpNet) -> (IpNet, u8) {
    (net.trunc(), net.prefix_len())
}

/// Longest-prefix match over compiled entries, as the kernel's trie answers it (for tests,
/// fuzzing and offline checks).
pub fn lookup(entries: &LpmEntries, ip: std::net::IpAddr) -> Option<PortSet> {
    match super::canonical(ip) {
        std::net::IpAddr::V4(ip) => entries
            .v4
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, p)| *p),
        std::net::IpAddr::V6(ip) => entries
            .v6
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, p)| *p),
    }
}

#[cfg(test)]
mod tests {
    use pipeguard_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::policy::evaluate;

    fn rule(cidr: &str, except: &[&str], ports: Ports) -> AllowRule {
        AllowRule {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
            ports,
        }
    }

    fn tcp(lo: u16, hi: u16) -> Ports {
        Ports::List(vec![(PROTO_TCP, lo, hi)])
    }

    fn allows(entries: &LpmEntries, ip: &str, proto: u8, port: u16) -> bool {
        lookup(entries, ip.parse().unwrap()).is_some_and(|p| p.allows(proto, port))
    }

    /// The compiled trie and the reference evaluator agree on `probes`.
    fn agree(rules: &[AllowRule], probes: &[(&str, u8, u16)]) -> LpmEntries {
        let entries = lpm_entries(rules).unwrap();
        for &(ip, proto, port) in probes {
            assert_eq!(
                allows(&entries, ip, proto, port),
                evaluate(rules, ip.parse().unwrap(), proto, port),
                "{ip} {proto}/{port} with {rules:?}"
            );
        }
        entries
    }

    #[test]
    fn except_is_a_hole_and_a_nested_allow_refills_it() {
        let rules = [
            rule("10.0.0.0/8", &["10.1.0.0/16"], tcp(443, 443)),
            rule("10.1.2.0/24", &[], tcp(443, 443)),
        ];
        let e = agree(
            &rules,
            &[
                ("10.2.0.1", PROTO_TCP, 443),
                ("10.1.0.1", PROTO_TCP, 443),
                ("10.1.2.3", PROTO_TCP, 443),
            ],
        );
        assert!(allows(&e, "10.2.0.1", PROTO_TCP, 443));
        assert!(!allows(&e, "10.1.0.1", PROTO_TCP, 443), "inside the except");
        assert!(
            allows(&e, "10.1.2.3", PROTO_TCP, 443),
            "another rule allows it again"
        );
        assert!(!allows(&e, "10.2.0.1", PROTO_TCP, 80), "port not allowed");
        assert_eq!(e.v4.len(), 3);
    }

    #[test]
    fn overlapping_blocks_union_their_ports() {
        let rules = [
            rule("10.0.0.0/8", &[], tcp(80, 80)),
            rule("10.0.0.0/16", &[], tcp(443, 443)),
        ];
        let e = agree(
            &rules,
            &[
                ("10.0.0.1", PROTO_TCP, 80),
                ("10.0.0.1", PROTO_TCP, 443),
                ("10.9.0.1", PROTO_TCP, 443),
            ],
        );
        assert!(
            allows(&e, "10.0.0.1", PROTO_TCP, 80),
            "the /16 inherits the /8's port"
        );
        assert!(allows(&e, "10.0.0.1", PROTO_TCP, 443));
        assert!(!allows(&e, "10.9.0.1", PROTO_TCP, 443));
    }

    #[test]
    fn an_except_of_one_rule_does_not_hide_another_rules_allow() {
        let rules = [
            rule("10.0.0.0/8", &["10.0.0.0/24"], tcp(1, 1000)),
            rule("10.0.0.0/8", &[], tcp(22, 22)),
        ];
        let e = agree(
            &rules,
            &[("10.0.0.5", PROTO_TCP, 22), ("10.0.0.5", PROTO_TCP, 80)],
        );
        assert!(allows(&e, "10.0.0.5", PROTO_TCP, 22));
        assert!(!allows(&e, "10.0.0.5", PROTO_TCP, 80));
    }

    #[test]
    fn edges_slash_zero_32_and_128() {
        let rules = [
            rule("0.0.0.0/0", &["192.168.1.1/32"], Ports::All),
            rule("::/0", &["2001:db8::1/128"], tcp(53, 53)),
        ];
        let e = agree(
            &rules,
            &[
                ("8.8.8.8", PROTO_ICMP, 0),
                ("192.168.1.1", PROTO_TCP, 1),
                ("2001:db8::1", PROTO_TCP, 53),
                ("2001:db8::2", PROTO_TCP, 53),
                ("2001:db8::2", PROTO_UDP, 53),
            ],
        );
        assert!(
            allows(&e, "8.8.8.8", PROTO_ICMP, 0),
            "a rule without ports allows every protocol"
        );
        assert!(!allows(&e, "192.168.1.1", PROTO_TCP, 1));
        assert!(!allows(&e, "2001:db8::1", PROTO_TCP, 53));
        assert!(allows(&e, "2001:db8::2", PROTO_TCP, 53));
    }

    #[test]
    fn ipv4_mapped_destinations_use_ipv4_rules_only() {
        let rules = [rule("::/0", &[], Ports::All)];
        let e = agree(&rules, &[("::ffff:10.0.0.1", PROTO_TCP, 80)]);
        assert!(!allows(&e, "::ffff:10.0.0.1", PROTO_TCP, 80));
        let rules = [rule("10.0.0.0/8", &[], Ports::All)];
        let e = agree(&rules, &[("::ffff:10.0.0.1", PROTO_TCP, 80)]);
        assert!(allows(&e, "::ffff:10.0.0.1", PROTO_TCP, 80));
    }

    #[test]
    fn ranges_merge_per_protocol() {
        let ports = Ports::List(vec![
            (PROTO_TCP, 10, 20),
            (PROTO_TCP, 21, 30),
            (PROTO_TCP, 25, 40),
            (PROTO_UDP, 10, 20),
        ]);
        let e = lpm_entries(&[rule("10.0.0.0/8", &[], ports)]).unwrap();
        let set = e.v4[0].1;
        assert_eq!(set.count, 2);
        assert_eq!(
            (set.ranges[0].start, set.ranges[0].end, set.ranges[0].protocol),
            (10, 40, PROTO_TCP)
        );
        assert_eq!(
            (set.ranges[1].start, set.ranges[1].end, set.ranges[1].protocol),
            (10, 20, PROTO_UDP)
        );
    }

    #[test]
    fn too_many_ranges_is_an_error_not_a_truncation() {
        let ports = Ports::List((0..17).map(|i| (PROTO_TCP, i * 10, i * 10)).collect());
        let err = lpm_entries(&[rule("10.0.0.0/8", &[], ports)]).unwrap_err();
        assert_eq!(
            err,
            CompileError::TooManyPortRanges {
                prefix: "10.0.0.0/8".parse().unwrap(),
                needed: 17
            }
        );
        assert!(err.to_string().contains("10.0.0.0/8 needs 17 port ranges"));
    }

    #[test]
    fn no_rules_no_entries() {
        assert!(lpm_entries(&[]).unwrap().is_empty());
    }
}
