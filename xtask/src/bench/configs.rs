//! The configurations under test: seeded CIDR sets, their policies, labels and addresses.

use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr};

/// The CIDR sets: seeded, so every run walks the same tries.
pub(super) struct Rules {
    random: Vec<(u32, u8)>,
}

impl Rules {
    pub(super) fn generate(n: usize) -> Self {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut seen = HashSet::new();
        let mut random = Vec::with_capacity(n);
        while random.len() < n {
            let r = next();
            let len = 16 + (r % 17) as u8;
            let addr = (10u32 << 24) | ((r >> 8) as u32 & 0x00ff_ffff);
            let mask = if len == 32 { u32::MAX } else { !(u32::MAX >> len) };
            let addr = addr & mask;
            // Keep 10.203.0.0/16 (the bench's own addresses) out, so the destination is
            // matched by its own rule, last in the iptables chain.
            if (addr >> 16) & 0xff == 203 {
                continue;
            }
            if seen.insert((addr, len)) {
                random.push((addr, len));
            }
        }
        Self { random }
    }

    pub(super) fn cidrs(&self, n: usize) -> impl Iterator<Item = String> + '_ {
        self.random
            .iter()
            .take(n)
            .map(|&(a, l)| format!("{}/{l}", Ipv4Addr::from(a)))
    }
}

/// A NetworkPolicy whose one egress rule allows `cidrs` and `extra` as destinations.
pub(super) fn policy_yaml(name: &str, cidrs: impl Iterator<Item = String>, extra: &[&str]) -> String {
    ip_blocks_yaml(name, "Egress", cidrs, extra)
}

/// A NetworkPolicy whose one ingress rule admits `cidrs` and `extra` as sources, on every
/// port; it isolates the job for ingress and leaves its egress unrestricted.
pub(super) fn ingress_policy_yaml(name: &str, cidrs: impl Iterator<Item = String>, extra: &[&str]) -> String {
    ip_blocks_yaml(name, "Ingress", cidrs, extra)
}

/// One rule of `direction` ("Egress": `to`, "Ingress": `from`) with one ipBlock per CIDR.
fn ip_blocks_yaml(
    name: &str,
    direction: &str,
    cidrs: impl Iterator<Item = String>,
    extra: &[&str],
) -> String {
    let (rules, peers) = if direction == "Egress" {
        ("egress", "to")
    } else {
        ("ingress", "from")
    };
    let mut y = String::with_capacity(1 << 20);
    let _ = write!(
        y,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  podSelector: {{}}\n  policyTypes: [{direction}]\n  {rules}:\n  - {peers}:\n"
    );
    for c in cidrs.chain(extra.iter().map(|s| s.to_string())) {
        let _ = writeln!(y, "    - ipBlock: {{cidr: \"{c}\"}}");
    }
    y
}

/// Sizes of the pipeguard configurations, by key.
pub(super) const PG_CONFIGS: [(&str, usize); 4] = [
    ("pg-allow", 0),
    ("pg-1k", 1_000),
    ("pg-10k", 10_000),
    ("pg-100k", 100_000),
];

pub(super) fn label(cfg: &str) -> &'static str {
    match cfg {
        "base" => "no enforcement",
        "base-2" => "no enforcement, a second server (A/A control)",
        "pg-allow" => "pipeguard allow-all",
        "pg-1k" => "pipeguard 1k CIDRs",
        "pg-10k" => "pipeguard 10k CIDRs",
        "pg-100k" => "pipeguard 100k CIDRs",
        "ipt-10k" => "iptables chain 10k",
        "nft-10k" => "nftables set 10k",
        "empty" | "dns-empty" => "empty programs",
        "dns-ip" => "pipeguard IP rules only, dns_tunnel off",
        "dns-ip-seen" => "pipeguard IP rules only, names read for dns_tunnel",
        "dns-names" => "pipeguard 16 domain rules",
        "dns-10k" => "pipeguard 10k domain rules",
        "ing-none" => "pipeguard, not isolated for ingress",
        "ing-16" => "pipeguard ingress 16 CIDRs",
        "ing-10k" => "pipeguard ingress 10k CIDRs",
        _ => "?",
    }
}

pub(super) fn addr(path: &str, cfg: &str, port: u16) -> String {
    let ip = match (path, cfg) {
        ("loopback", _) => "127.0.0.1",
        (_, "ipt-10k") => "10.203.1.1",
        (_, "nft-10k") => "10.203.2.1",
        _ => "10.203.0.1",
    };
    format!("{ip}:{port}")
}
