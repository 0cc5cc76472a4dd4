//! Property: longest-prefix match over the compiled trie entries gives exactly the
//! reference evaluator's verdict, for random rules and addresses (IPv4 and IPv6).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use pipeguard::policy::{AllowRule, Ports, evaluate, lookup, lpm_entries};
use pipeguard_common::{PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use proptest::prelude::*;

/// Addresses from a small pool so that rules overlap and probes hit their boundaries.
fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    (0u8..4, 0u8..4, any::<u8>(), any::<u8>())
        .prop_map(|(a, b, c, d)| Ipv4Addr::new(10, a, b * 64 + (c % 64), d))
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    (0u16..4, 0u16..4, any::<u16>()).prop_map(|(a, b, c)| Ipv6Addr::new(0x2001, 0xdb8, a, b, 0, 0, 0, c))
}

fn v4_net() -> impl Strategy<Value = IpNet> {
    (v4_addr(), 8u8..=32).prop_map(|(a, len)| IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc()))
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    (v6_addr(), 32u8..=128).prop_map(|(a, len)| IpNet::V6(Ipv6Net::new(a, len).unwrap().trunc()))
}

fn ports() -> impl Strategy<Value = Ports> {
    prop_oneof![
        1 => Just(Ports::All),
        4 => prop::collection::vec(
            (prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP]), 1u16..50, 0u16..20)
                .prop_map(|(p, lo, span)| (p, lo, lo + span)),
            0..4
        ).prop_map(Ports::List),
    ]
}

/// A rule with excepts strictly inside its cidr.
fn rule(net: impl Strategy<Value = IpNet>) -> impl Strategy<Value = AllowRule> {
    (
        net,
        ports(),
        prop::collection::vec((any::<u128>(), 1u8..24), 0..3),
    )
        .prop_map(|(cidr, ports, holes)| {
            let max = cidr.max_prefix_len();
            let except = holes
                .into_iter()
                .filter_map(|(bits, extra)| {
                    let len = cidr.prefix_len().checked_add(extra)?.min(max);
                    (len > cidr.prefix_len()).then(|| hole_in(&cidr, bits, len))
                })
                .collect();
            AllowRule { cidr, except, ports }
        })
}

/// A prefix of length `len` inside `cidr`, its free bits taken from `bits`.
fn hole_in(cidr: &IpNet, bits: u128, len: u8) -> IpNet {
    match cidr {
        IpNet::V4(n) => {
            let host = (bits as u32) & !u32::from(n.netmask());
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(u32::from(n.network()) | host), len)
                    .unwrap()
                    .trunc(),
            )
        }
        IpNet::V6(n) => {
            let host = bits & !u128::from(n.netmask());
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(u128::from(n.network()) | host), len)
                    .unwrap()
                    .trunc(),
            )
        }
    }
}

fn probe() -> impl Strategy<Value = (IpAddr, u8, u16)> {
    (
        prop_oneof![
            v4_addr().prop_map(IpAddr::V4),
            v6_addr().prop_map(IpAddr::V6),
            v4_addr().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
        ],
        prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP]),
        0u16..80,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn compiled_trie_equals_reference(
        rules in prop::collection::vec(prop_oneof![rule(v4_net()), rule(v6_net())], 0..8),
        probes in prop::collection::vec(probe(), 64),
    ) {
        let entries = lpm_entries(&rules).expect("at most 8 rules × 3 ranges fit an entry");
        // Probe at every rule boundary too, where off-by-one errors live.
        let mut all = probes.clone();
        for r in &rules {
            for net in std::iter::once(&r.cidr).chain(&r.except) {
                all.push((net.network(), PROTO_TCP, 10));
                all.push((net.broadcast(), PROTO_UDP, 20));
            }
        }
        for (ip, proto, port) in all {
            let kernel = lookup(&entries, ip).is_some_and(|p| p.allows(proto, port));
            prop_assert_eq!(kernel, evaluate(&rules, ip, proto, port), "{} {}/{}", ip, proto, port);
        }
    }
}
