//! Property: longest-prefix match over the compiled trie entries gives exactly the
//! reference evaluator's verdict, for random rules and addresses (IPv4 and IPv6).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use pipeguard::policy::{AllowRule, CompileError, Ports, evaluate, lookup, lpm_entries};
use pipeguard_common::{MAX_PORT_RANGES, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use proptest::prelude::*;

/// Addresses from a small pool so that rules overlap and probes hit their boundaries.
fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    (0u8..4, 0u8..4, any::<u8>(), any::<u8>())
        .prop_map(|(a, b, c, d)| Ipv4Addr::new(10, a, b * 64 + (c % 64), d))
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    (0u16..4, 0u16..4, any::<u16>()).prop_map(|(a, b, c)| Ipv6Addr::new(0x2001, 0xdb8, a, b, 0, 0, 0, c))
}

/// Mostly prefixes around the address pool, sometimes the whole family (/0 edges).
fn v4_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        8 => (v4_addr(), 8u8..=32).prop_map(|(a, len)| IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc())),
        1 => (v4_addr(), 0u8..8).prop_map(|(a, len)| IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc())),
    ]
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        8 => (v6_addr(), 32u8..=128).prop_map(|(a, len)| IpNet::V6(Ipv6Net::new(a, len).unwrap().trunc())),
        1 => (v6_addr(), 0u8..32).prop_map(|(a, len)| IpNet::V6(Ipv6Net::new(a, len).unwrap().trunc())),
    ]
}

fn ports() -> impl Strategy<Value = Ports> {
    prop_oneof![
        1 => Just(Ports::All),
        4 => prop::collection::vec(
            prop_oneof![
                6 => (protocol(), 1u16..50, 0u16..20).prop_map(|(p, lo, span)| (p, lo, lo + span)),
                // A protocol without a port, and ranges that end at the top of the port space.
                1 => protocol().prop_map(|p| (p, 0, u16::MAX)),
                1 => (protocol(), 65500u16..=u16::MAX).prop_map(|(p, lo)| (p, lo, u16::MAX)),
            ],
            0..4
        ).prop_map(Ports::List),
    ]
}

fn protocol() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP])
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
        prop_oneof![4 => 0u16..80, 1 => 65490u16..=u16::MAX],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn compiled_trie_equals_reference(
        rules in prop::collection::vec(prop_oneof![rule(v4_net()), rule(v6_net())], 0..8),
        probes in prop::collection::vec(probe(), 64),
    ) {
        let entries = match lpm_entries(&rules) {
            Ok(entries) => entries,
            // Refusing is right only when the merged ranges really do not fit.
            Err(CompileError::TooManyPortRanges { needed, .. }) => {
                prop_assert!(needed > MAX_PORT_RANGES);
                return Ok(());
            }
        };
        // Every value is packed as the kernel expects: per protocol sorted, disjoint and
        // not adjacent (merged), within the fixed array.
        for set in entries.v4.iter().map(|e| e.1).chain(entries.v6.iter().map(|e| e.1)) {
            prop_assert!(set.count as usize <= MAX_PORT_RANGES);
            let used = &set.ranges[..set.count as usize];
            for pair in used.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                prop_assert!(a.start <= a.end);
                prop_assert!(
                    a.protocol < b.protocol || (a.protocol == b.protocol && u32::from(a.end) + 1 < u32::from(b.start)),
                    "{:?} then {:?}", a, b
                );
            }
        }
        // Probe at every rule boundary too, where off-by-one errors live.
        let mut all = probes.clone();
        for r in &rules {
            for net in std::iter::once(&r.cidr).chain(&r.except) {
                all.push((net.network(), PROTO_TCP, 10));
                all.push((net.broadcast(), PROTO_UDP, 20));
                if let Some(before) = u128_of(net.network()).checked_sub(1) {
                    all.push((ip_like(net.network(), before), PROTO_TCP, 10));
                }
                if let Some(after) = u128_of(net.broadcast()).checked_add(1) {
                    all.push((ip_like(net.network(), after), PROTO_SCTP, 30));
                }
            }
        }
        for (ip, proto, port) in all {
            let kernel = lookup(&entries, ip).is_some_and(|p| p.allows(proto, port));
            prop_assert_eq!(kernel, evaluate(&rules, ip, proto, port), "{} {}/{}", ip, proto, port);
        }
    }
}

fn u128_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address just outside a prefix, in the prefix's family (none past the family's end).
fn ip_like(family: IpAddr, bits: u128) -> IpAddr {
    match family {
        IpAddr::V4(_) => u32::try_from(bits).map_or(family, |b| IpAddr::V4(Ipv4Addr::from(b))),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
    }
}
