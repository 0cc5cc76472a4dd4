//! The human summary `exec` prints at exit: where the job sent traffic, and what was refused.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
};

use pipeguard_common::{
    Counter, CounterKey, FlowKey, Hook, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, VERDICT_ERROR,
};

use crate::{
    engine::events::{dest_ip, protocol_name},
    escape::printable,
};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Destination {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Debug, Default)]
pub struct Summary {
    /// Packets and bytes that left, per destination.
    pub allowed: BTreeMap<Destination, Counter>,
    /// Refused attempts (connect/sendmsg calls and dropped packets), per destination.
    pub denied: BTreeMap<Destination, Counter>,
    /// Would-be refusals in audit mode.
    pub audited: BTreeMap<Destination, Counter>,
    pub raw_sockets_refused: u64,
    /// DNS name each destination was learned from, when known.
    pub names: HashMap<IpAddr, String>,
    /// Refused (or audited) DNS queries: (verdict, name, qtype) → attempts.
    pub queries: BTreeMap<(&'static str, String, String), u64>,
    pub errors: u64,
    pub events_delivered: u64,
    pub events_dropped: u64,
}

impl Summary {
    pub fn new(
        flows: Vec<(FlowKey, Counter)>,
        counters: &[(CounterKey, Counter)],
        delivered: u64,
        dropped: u64,
    ) -> Self {
        let mut summary = Self {
            events_delivered: delivered,
            events_dropped: dropped,
            ..Self::default()
        };
        for (key, counter) in flows {
            let family = if key.addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
                4
            } else {
                6
            };
            let dest = Destination {
                ip: dest_ip(key.addr, family),
                port: key.port,
                protocol: protocol_name(key.protocol),
            };
            let table = match key.verdict {
                VERDICT_ALLOW => &mut summary.allowed,
                VERDICT_DENY => &mut summary.denied,
                VERDICT_AUDIT => &mut summary.audited,
                _ => continue,
            };
            let entry = table.entry(dest).or_default();
            entry.packets += counter.packets;
            entry.bytes += counter.bytes;
        }
        for (key, counter) in counters {
            if key.hook == Hook::SockCreate as u8 && key.verdict != VERDICT_ALLOW {
                summary.raw_sockets_refused += counter.packets;
            }
            if key.verdict == VERDICT_ERROR {
                summary.errors += counter.packets;
            }
        }
        summary
    }
}

impl Summary {
    pub fn add_names(
        &mut self,
        names: HashMap<IpAddr, String>,
        queries: BTreeMap<(&'static str, String, String), u64>,
    ) {
        self.names = names;
        self.queries = queries;
    }

    /// `203.0.113.7:443/tcp (exfil.example.net)`, escaped.
    fn labelled(&self, dest: &Destination) -> String {
        match self.names.get(&dest.ip) {
            Some(name) => format!("{dest} ({})", printable(name)),
            None => dest.to_string(),
        }
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pipeguard: egress summary")?;
        if self.allowed.is_empty() && self.denied.is_empty() && self.audited.is_empty() {
            writeln!(f, "  no egress")?;
        }
        for (dest, c) in &self.allowed {
            writeln!(
                f,
                "  allowed  {:<40} {:>7} packets {:>10}",
                self.labelled(dest),
                c.packets,
                bytes(c.bytes)
            )?;
        }
        for (dest, c) in &self.denied {
            writeln!(
                f,
                "  DENIED   {:<40} {:>7} attempts",
                self.labelled(dest),
                c.packets
            )?;
        }
        for (dest, c) in &self.audited {
            writeln!(
                f,
                "  audit    {:<40} {:>7} attempts (would be denied)",
                self.labelled(dest),
                c.packets
            )?;
        }
        for ((verdict, name, qtype), n) in &self.queries {
            let question = if qtype.is_empty() {
                printable(name).into_owned()
            } else {
                format!("{} ({})", printable(name), printable(qtype))
            };
            if *verdict == "audit" {
                writeln!(
                    f,
                    "  audit    DNS query {question:<30} {n:>7} queries (would be refused)"
                )?;
            } else {
                writeln!(f, "  DENIED   DNS query {question:<30} {n:>7} queries")?;
            }
        }
        if self.raw_sockets_refused > 0 {
            writeln!(
                f,
                "  DENIED   raw/packet socket creation     {:>7} attempts",
                self.raw_sockets_refused
            )?;
        }
        if self.errors > 0 {
            writeln!(f, "  dropped  {} unparseable packets", self.errors)?;
        }
        write!(
            f,
            "  events: {} delivered, {} lost (ring buffer full)",
            self.events_delivered, self.events_dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stand_next_to_addresses_and_refused_queries_are_listed() {
        let mut summary = Summary::default();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let dest = |port| Destination {
            ip,
            port,
            protocol: "tcp".into(),
        };
        summary.allowed.insert(
            dest(443),
            Counter {
                packets: 3,
                bytes: 900,
            },
        );
        summary.denied.insert(dest(22), Counter { packets: 1, bytes: 0 });
        summary.add_names(
            [(ip, "build.example.net".to_string())].into(),
            [
                (
                    ("deny", "secret\\x0a.exfil.test".to_string(), "TXT".to_string()),
                    2,
                ),
                (("audit", "other.test".to_string(), "A".to_string()), 1),
            ]
            .into(),
        );
        let text = summary.to_string();
        assert!(
            text.contains("allowed  203.0.113.7:443/tcp (build.example.net)"),
            "{text}"
        );
        assert!(
            text.contains("DENIED   203.0.113.7:22/tcp (build.example.net)"),
            "{text}"
        );
        assert!(
            text.contains("DENIED   DNS query secret\\\\x0a.exfil.test (TXT)"),
            "escaped: {text}"
        );
        assert!(text.contains("audit    DNS query other.test (A)"), "{text}");
    }
}
