//! What one job did on the network, in machine form (`exec --learn-json`): every
//! destination with its verdict, packets, bytes and the processes behind it.
//!
//! Counts and bytes come from the kernel's per-destination flow statistics; the processes
//! come from events (violations, and allowed attempts while learning), so they are known
//! for every destination a socket call reached, and for raw packets only when an event
//! named them.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::{engine::events::Violation, job::Summary};

/// Version of the `--learn-json` format; bumped only on incompatible changes.
pub const RUN_FORMAT: u32 = 1;
/// Processes remembered per destination (the first ones seen).
const MAX_PROCESSES: usize = 8;
/// Destinations whose processes are remembered (the kernel's flow table holds as many).
const MAX_DESTINATIONS: usize = pipeguard_common::MAX_FLOWS as usize;

/// One run of one job (`exec --learn-json RUN.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub format: u32,
    pub command: Vec<String>,
    /// `enforce` or `audit`.
    pub mode: String,
    /// The job's identity as a pod (`--namespace`, `--label`): what the policy selects.
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339.
    pub finished: String,
    pub destinations: Vec<Observed>,
    /// Anomaly signals raised during the run (`signal: detail`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<String>,
}

/// One destination as the job used it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The name the job resolved to reach the address, when the kernel saw the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub ip: IpAddr,
    /// 0 for protocols without ports.
    pub port: u16,
    /// tcp, udp, sctp, icmp, icmpv6, raw or the protocol number.
    pub protocol: String,
    /// `allow` (the policy allowed it), `audit` (would be denied; audit mode let it through)
    /// or `deny`.
    pub verdict: String,
    /// Packets that left, plus refused or audited socket calls.
    pub packets: u64,
    pub bytes: u64,
    /// The first processes (comm) seen sending there, first one first.
    #[serde(default)]
    pub processes: Vec<String>,
}

impl Observed {
    /// Whether the job actually reached it (allowed, or let through in audit mode).
    pub fn reached(&self) -> bool {
        self.verdict != "deny"
    }

    /// The destination regardless of verdict and name: runs are merged on it.
    pub fn key(&self) -> (IpAddr, u16, String) {
        (self.ip, self.port, self.protocol.clone())
    }
}

/// The processes behind each destination, fed by every decoded event of the job.
#[derive(Debug, Default)]
pub struct ProcessLog {
    seen: HashMap<(IpAddr, u16, String), Vec<String>>,
}

impl ProcessLog {
    pub fn record(&mut self, v: &Violation) {
        let (Some(ip), Some(port)) = (v.dst_ip, v.dst_port) else {
            return;
        };
        let key = (ip, port, v.protocol.clone());
        if !self.seen.contains_key(&key) && self.seen.len() >= MAX_DESTINATIONS {
            return;
        }
        let processes = self.seen.entry(key).or_default();
        if processes.len() < MAX_PROCESSES && !processes.contains(&v.comm) {
            processes.push(v.comm.clone());
        }
    }

    fn processes(&self, ip: IpAddr, port: u16, protocol: &str) -> Vec<String> {
        self.seen
            .get(&(ip, port, protocol.to_string()))
            .cloned()
            .unwrap_or_default()
    }
}

impl Run {
    /// The run from the exit summary (flow statistics) and the processes the events named.
    pub fn observe(summary: &Summary, processes: &ProcessLog) -> Vec<Observed> {
        let tables = [
            ("allow", &summary.allowed),
            ("audit", &summary.audited),
            ("deny", &summary.denied),
        ];
        let mut out = Vec::new();
        for (verdict, table) in tables {
            for (dest, counter) in table {
                out.push(Observed {
                    // What the kernel learned from the job's answers, or events named.
                    name: summary.names.get(&dest.ip).cloned(),
                    ip: dest.ip,
                    port: dest.port,
                    protocol: dest.protocol.clone(),
                    verdict: verdict.to_string(),
                    packets: counter.packets,
                    bytes: counter.bytes,
                    processes: processes.processes(dest.ip, dest.port, &dest.protocol),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use pipeguard_common::Counter;

    use super::*;
    use crate::job::Destination;

    fn event(comm: &str, port: u16) -> Violation {
        Violation {
            time: "t".into(),
            verdict: "allow",
            hook: "connect4",
            direction: "egress",
            protocol: "tcp".into(),
            dst_ip: Some("10.0.0.1".parse().unwrap()),
            dst_port: Some(port),
            src_ip: None,
            src_port: None,
            pid: 1,
            comm: comm.into(),
            cgroup_id: 1,
            pod_cgroup_id: 1,
            policy_id: 1,
            socket: None,
            dst_name: None,
            query: None,
            qtype: None,
            malformed: false,
            name_hash: 0,
        }
    }

    #[test]
    fn destinations_carry_counts_and_their_first_processes() {
        let mut log = ProcessLog::default();
        for comm in ["curl", "git", "curl"] {
            log.record(&event(comm, 443));
        }
        for i in 0..20 {
            log.record(&event(&format!("p{i}"), 80));
        }
        let mut summary = Summary::default();
        let dest = |port| Destination {
            ip: "10.0.0.1".parse().unwrap(),
            port,
            protocol: "tcp".into(),
        };
        summary.allowed.insert(
            dest(443),
            Counter {
                packets: 9,
                bytes: 900,
            },
        );
        summary.audited.insert(
            dest(80),
            Counter {
                packets: 3,
                bytes: 30,
            },
        );
        summary.denied.insert(dest(22), Counter { packets: 1, bytes: 0 });
        let seen = Run::observe(&summary, &log);
        assert_eq!(seen.len(), 3);
        assert_eq!(
            (
                seen[0].verdict.as_str(),
                seen[0].packets,
                seen[0].processes.clone()
            ),
            ("allow", 9, vec!["curl".to_string(), "git".to_string()])
        );
        assert_eq!(seen[1].processes.len(), MAX_PROCESSES, "bounded");
        assert_eq!(seen[1].processes[0], "p0", "first process first");
        assert!(seen[1].reached() && !seen[2].reached());
        assert!(seen[2].processes.is_empty());
    }
}
