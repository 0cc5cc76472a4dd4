//! The human summary `exec` prints at exit: where the job sent traffic, and what was refused.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use pipeguard_common::{
    Counter, CounterKey, FlowKey, Hook, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, VERDICT_ERROR,
};

use crate::engine::events::{dest_ip, protocol_name};

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
                "  allowed  {dest:<40} {:>7} packets {:>10}",
                c.packets,
                bytes(c.bytes)
            )?;
        }
        for (dest, c) in &self.denied {
            writeln!(f, "  DENIED   {dest:<40} {:>7} attempts", c.packets)?;
        }
        for (dest, c) in &self.audited {
            writeln!(
                f,
                "  audit    {dest:<40} {:>7} attempts (would be denied)",
                c.packets
            )?;
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
