//! Any bytes as a policy file: parsing and validation never panic, and whatever compiles,
//! the trie entries answer exactly like the reference evaluator.
#![no_main]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use libfuzzer_sys::fuzz_target;
use pipeguard::policy::{Egress, PodIdentity, egress_for, evaluate, lookup, lpm_entries, parse_policies};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let set = parse_policies("fuzz.yaml", text);
    for error in &set.errors {
        // Every error renders and names its source.
        assert!(error.to_string().starts_with("fuzz.yaml"));
    }
    let namespaces: Vec<String> = set.policies.iter().map(|p| p.namespace.clone()).collect();
    for namespace in namespaces {
        let pod = PodIdentity { namespace, name: "job".into(), labels: BTreeMap::new() };
        let Egress::Isolated { rules, .. } = egress_for(&set, &pod, None) else { continue };
        let Ok(entries) = lpm_entries(&rules) else { continue };
        // Probe at every rule boundary, plus addresses taken from the input bytes.
        let mut probes: Vec<IpAddr> = Vec::new();
        for r in &rules {
            probes.extend([r.cidr.network(), r.cidr.broadcast()]);
            for e in &r.except {
                probes.extend([e.network(), e.broadcast()]);
            }
        }
        for chunk in data.chunks(16) {
            let mut b = [0u8; 16];
            b[..chunk.len()].copy_from_slice(chunk);
            probes.push(IpAddr::V6(Ipv6Addr::from(b)));
            probes.push(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])));
        }
        for ip in probes {
            for (proto, port) in [(6u8, 80u16), (17, 53), (132, 9), (1, 0), (6, u16::from(ip.is_ipv4()) * 443)] {
                let kernel = lookup(&entries, ip).is_some_and(|p| p.allows(proto, port));
                assert_eq!(kernel, evaluate(&rules, ip, proto, port), "{ip} {proto}/{port}");
            }
        }
    }
});
