//! Observed destinations → the NetworkPolicy (and, for names, the DomainPolicy) that allows
//! exactly them: one egress rule per protocol and port, each peer commented with what was
//! seen. Written by hand rather than serialized, for the comments.

use std::collections::BTreeMap;

use super::observe::Observed;

/// Whom the policy selects: the job as a pod (`--namespace`, `--label`).
pub struct Target<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// One destination to allow; `runs` is (seen in, of) when several runs were merged.
pub struct Entry {
    pub observed: Observed,
    pub runs: Option<(usize, usize)>,
}

/// What one peer on one port saw, merged over entries.
#[derive(Default)]
struct Seen {
    packets: u64,
    bytes: u64,
    processes: Vec<String>,
    runs: Option<(usize, usize)>,
}

/// (NetworkPolicy protocol, port): `None` protocol means "any protocol and port" (ICMP and
/// other protocols a NetworkPolicy cannot name); port 0 means every port of the protocol.
type Group = (Option<&'static str>, u16);

/// Both documents (the DomainPolicy only when some destination has a name), `---`-separated,
/// preceded by the `header` comment lines.
pub fn policies(target: &Target, header: &[String], entries: &[Entry]) -> String {
    let mut by_ip: BTreeMap<Group, BTreeMap<String, Seen>> = BTreeMap::new();
    let mut by_name: BTreeMap<Group, BTreeMap<String, Seen>> = BTreeMap::new();
    for entry in entries {
        let o = &entry.observed;
        let group = (policy_protocol(&o.protocol), o.port);
        let (table, peer) = match &o.name {
            Some(name) => (&mut by_name, name.clone()),
            None => (&mut by_ip, cidr(o)),
        };
        let seen = table.entry(group).or_default().entry(peer).or_default();
        seen.packets += o.packets;
        seen.bytes += o.bytes;
        for p in &o.processes {
            if !seen.processes.contains(p) {
                seen.processes.push(p.clone());
            }
        }
        seen.runs = seen.runs.max(entry.runs);
    }
    let mut out = String::new();
    for line in header {
        out.push_str(&format!("# {}\n", clean(line)));
    }
    out.push_str(&network_policy(target, &by_ip));
    if !by_name.is_empty() {
        out.push_str("---\n");
        out.push_str(&domain_policy(target, &by_name));
    }
    out
}

fn network_policy(target: &Target, groups: &BTreeMap<Group, BTreeMap<String, Seen>>) -> String {
    let mut out = metadata("networking.k8s.io/v1", "NetworkPolicy", target);
    out.push_str("  policyTypes: [Egress]\n");
    if groups.is_empty() {
        out.push_str("  # no destination reached by address: all egress is refused\n  egress: []\n");
        return out;
    }
    out.push_str("  egress:\n");
    for ((protocol, port), peers) in groups {
        out.push_str(&format!("  # {}\n", group_title(*protocol, *port)));
        out.push_str("  - to:\n");
        for (cidr, seen) in peers {
            out.push_str(&format!("    - ipBlock: {{cidr: {cidr}}}  # {}\n", comment(seen)));
        }
        out.push_str(&ports_field(*protocol, *port, "    "));
    }
    out
}

fn domain_policy(target: &Target, groups: &BTreeMap<Group, BTreeMap<String, Seen>>) -> String {
    let mut out = metadata(
        crate::policy::DOMAIN_API_VERSION,
        crate::policy::DOMAIN_POLICY,
        target,
    );
    out.push_str("  egress:\n");
    for ((protocol, port), names) in groups {
        out.push_str(&format!("  # {}\n", group_title(*protocol, *port)));
        out.push_str("  - domains:\n");
        for (name, seen) in names {
            out.push_str(&format!("    - {}  # {}\n", quote(name), comment(seen)));
        }
        out.push_str(&ports_field(*protocol, *port, "    "));
    }
    out
}

fn metadata(api_version: &str, kind: &str, target: &Target) -> String {
    let mut out = format!(
        "apiVersion: {api_version}\nkind: {kind}\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n",
        quote(target.name),
        quote(target.namespace)
    );
    if target.labels.is_empty() {
        out.push_str("  podSelector: {}\n");
    } else {
        out.push_str("  podSelector:\n    matchLabels:\n");
        for (k, v) in target.labels {
            out.push_str(&format!("      {}: {}\n", quote(k), quote(v)));
        }
    }
    out
}

fn ports_field(protocol: Option<&str>, port: u16, indent: &str) -> String {
    match (protocol, port) {
        (None, _) => String::new(),
        (Some(p), 0) => format!("{indent}ports:\n{indent}- protocol: {p}\n"),
        (Some(p), port) => format!("{indent}ports:\n{indent}- protocol: {p}\n{indent}  port: {port}\n"),
    }
}

fn group_title(protocol: Option<&str>, port: u16) -> String {
    match (protocol, port) {
        (None, _) => "no ports: ICMP or another protocol a NetworkPolicy cannot name (allows every protocol to these peers)".into(),
        (Some(p), 0) => format!("{p}, every port"),
        (Some(p), port) => format!("{p} {port}"),
    }
}

fn policy_protocol(protocol: &str) -> Option<&'static str> {
    match protocol {
        "tcp" => Some("TCP"),
        "udp" => Some("UDP"),
        "sctp" => Some("SCTP"),
        _ => None,
    }
}

fn cidr(o: &Observed) -> String {
    match o.ip {
        std::net::IpAddr::V4(ip) => format!("{ip}/32"),
        std::net::IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

fn comment(seen: &Seen) -> String {
    let mut text = format!("{} packets, {}", seen.packets, human_bytes(seen.bytes));
    match seen.processes.split_first() {
        Some((first, [])) => text.push_str(&format!(", first process {first}")),
        Some((first, rest)) => text.push_str(&format!(", first process {first} (also {})", rest.join(", "))),
        None => text.push_str(", process unknown"),
    }
    if let Some((seen_in, of)) = seen.runs {
        text.push_str(&format!(", seen in {seen_in} of {of} runs"));
    }
    clean(&text)
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Process names come from the job: nothing in them may end a YAML comment line.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A YAML scalar that stays a string whatever it contains (JSON strings are YAML).
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{self, Egress, PodIdentity};

    fn observed(ip: &str, port: u16, protocol: &str, name: Option<&str>) -> Entry {
        Entry {
            observed: Observed {
                name: name.map(str::to_string),
                ip: ip.parse().unwrap(),
                port,
                protocol: protocol.into(),
                verdict: "audit".into(),
                packets: 4,
                bytes: 2048,
                processes: vec!["curl\nkind: Evil".into(), "git".into()],
            },
            runs: None,
        }
    }

    #[test]
    fn one_rule_per_port_that_the_policy_layer_reads_back() {
        let labels = BTreeMap::from([("app".to_string(), "runner".to_string())]);
        let target = Target {
            name: "learned",
            namespace: "ci",
            labels: &labels,
        };
        let text = policies(
            &target,
            &["learned".into()],
            &[
                observed("10.0.0.1", 443, "tcp", None),
                observed("10.0.0.2", 443, "tcp", None),
                observed("fd00::1", 53, "udp", None),
                observed("10.0.0.3", 0, "icmp", None),
            ],
        );
        assert_eq!(text.matches("  - to:").count(), 3, "{text}");
        assert!(
            text.contains("first process curl?kind: Evil (also git)"),
            "{text}"
        );
        let set = policy::parse_policies("learned.yaml", &text);
        assert!(set.errors.is_empty(), "{:?}\n{text}", set.errors);
        let pod = PodIdentity {
            namespace: "ci".into(),
            name: "job".into(),
            labels: labels.clone(),
        };
        let Egress::Isolated { rules, .. } = policy::egress_for(&set, &pod, None) else {
            panic!("the learned policy must isolate the job:\n{text}");
        };
        let entries = policy::lpm_entries(&rules).unwrap();
        let allows = |ip: &str, protocol: u8, port: u16| {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            entries
                .v4
                .iter()
                .filter(|(net, _)| net.contains(&ip))
                .max_by_key(|(net, _)| net.prefix_len())
                .is_some_and(|(_, ports)| ports.allows(protocol, port))
        };
        assert!(allows("10.0.0.1", 6, 443) && allows("10.0.0.2", 6, 443));
        assert!(allows("10.0.0.3", 1, 0), "ICMP peers get a rule without ports");
        assert!(!allows("10.0.0.1", 6, 80) && !allows("10.0.0.1", 17, 443) && !allows("10.0.0.4", 6, 443));
        assert_eq!(entries.v6.len(), 1);
        assert!(
            policy::domains_for(&set, &pod, None).is_none(),
            "no names, no DomainPolicy"
        );
    }

    #[test]
    fn names_become_a_domain_policy_and_nothing_seen_refuses_everything() {
        let labels = BTreeMap::new();
        let target = Target {
            name: "learned",
            namespace: "ci",
            labels: &labels,
        };
        let text = policies(
            &target,
            &[],
            &[
                observed("10.0.0.1", 443, "tcp", Some("registry.npmjs.org")),
                observed("10.0.0.9", 53, "udp", None),
            ],
        );
        let set = policy::parse_policies("learned.yaml", &text);
        assert!(set.errors.is_empty(), "{:?}\n{text}", set.errors);
        assert_eq!(set.domains.len(), 1, "{text}");
        assert!(
            !text.contains("10.0.0.1/32"),
            "named destinations go by name:\n{text}"
        );
        let empty = policies(&target, &[], &[]);
        assert!(empty.contains("egress: []"), "{empty}");
        assert!(policy::parse_policies("e.yaml", &empty).errors.is_empty());
    }
}
