//! Kernel event records → violation events as users see them (JSON lines).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use pipeguard_common::{Event, Hook, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY};
use serde::Serialize;

/// One denied (or, in audit mode, would-be-denied) attempt. Field names are a stable
/// interface: add fields, never rename them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// RFC 3339, UTC.
    pub time: String,
    /// `deny` or `audit`; `allow` only when the engine reports allowed attempts
    /// (`EngineConfig::report_allowed`, exec's learning), never in the violation stream.
    pub verdict: &'static str,
    pub hook: &'static str,
    pub protocol: String,
    /// Absent for sock_create events, which have no destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub pod_cgroup_id: u64,
    pub policy_id: u32,
    /// For sock_create: the refused socket (`raw`, `packet` or `ping`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<&'static str>,
}

/// Converts kernel timestamps (CLOCK_MONOTONIC) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    boot: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let monotonic = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        Self {
            boot: SystemTime::now() - monotonic,
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(monotonic_ns)
    }
}

pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        255 => "raw".into(),
        n => n.to_string(),
    }
}

fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// IPv4 destinations travel as IPv4-mapped IPv6 (`family` 4).
pub fn dest_ip(addr: [u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    }
}

/// What kind of socket a sock_create refusal was about.
fn refused_socket(event: &Event) -> &'static str {
    match (event.family, event.sock_type) {
        // AF_PACKET
        (17, _) => "packet",
        // SOCK_DGRAM: an IPv6 ping socket (see pipeguard-ebpf's sock_create)
        (_, 2) => "ping",
        _ => "raw",
    }
}

/// Decodes one ring buffer record; `None` for a record of the wrong size (a version skew
/// between programs and agent), which the caller counts.
pub fn decode(bytes: &[u8], clock: &Clock) -> Option<Violation> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    let event: Event = bytemuck::pod_read_unaligned(&bytes[..size_of::<Event>()]);
    let hook = Hook::from_u8(event.hook)?;
    let verdict = match event.verdict {
        VERDICT_DENY => "deny",
        VERDICT_AUDIT => "audit",
        VERDICT_ALLOW => "allow",
        _ => return None,
    };
    let is_socket_refusal = hook == Hook::SockCreate;
    Some(Violation {
        time: humantime::format_rfc3339_micros(clock.wall(event.timestamp_ns)).to_string(),
        verdict,
        hook: hook.name(),
        protocol: protocol_name(event.protocol),
        dst_ip: (!is_socket_refusal).then(|| dest_ip(event.addr, event.family)),
        dst_port: (!is_socket_refusal).then_some(event.port),
        pid: event.tgid,
        comm: comm(&event.comm),
        cgroup_id: event.cgroup_id,
        pod_cgroup_id: event.pod_cgroup_id,
        policy_id: event.policy_id,
        socket: is_socket_refusal.then_some(refused_socket(&event)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hook: Hook, verdict: u8, family: u8, addr: [u8; 16]) -> Vec<u8> {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let event = Event {
            timestamp_ns: 1_000,
            cgroup_id: 7,
            pod_cgroup_id: 5,
            addr,
            pid: 11,
            tgid: 10,
            comm,
            policy_id: 3,
            port: 9999,
            protocol: 6,
            family,
            hook: hook as u8,
            verdict,
            ..Event::default()
        };
        bytemuck::bytes_of(&event).to_vec()
    }

    #[test]
    fn decodes_an_ipv4_connect_denial() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[127, 0, 0, 1]);
        let v = decode(&record(Hook::Connect4, VERDICT_DENY, 4, addr), &Clock::now()).expect("decodes");
        assert_eq!(v.verdict, "deny");
        assert_eq!(v.hook, "connect4");
        assert_eq!(v.protocol, "tcp");
        assert_eq!(v.dst_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(v.dst_port, Some(9999));
        assert_eq!(v.pid, 10, "pid is the process (tgid), not the thread");
        assert_eq!(v.comm, "curl");
        let json = serde_json::to_value(&v).unwrap();
        for field in [
            "time",
            "verdict",
            "hook",
            "protocol",
            "dst_ip",
            "dst_port",
            "pid",
            "comm",
            "cgroup_id",
        ] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
    }

    #[test]
    fn decodes_ipv6_and_audit() {
        let addr = Ipv6Addr::LOCALHOST.octets();
        let v = decode(&record(Hook::Sendmsg6, VERDICT_AUDIT, 6, addr), &Clock::now()).expect("decodes");
        assert_eq!(v.verdict, "audit");
        assert_eq!(v.dst_ip, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn rejects_short_records_and_unknown_verdicts() {
        assert!(decode(&[0u8; 10], &Clock::now()).is_none());
        let addr = [0u8; 16];
        assert!(
            decode(&record(Hook::Egress, 7, 4, addr), &Clock::now()).is_none(),
            "unknown verdict"
        );
        let allowed = decode(&record(Hook::Connect4, VERDICT_ALLOW, 4, addr), &Clock::now());
        assert_eq!(
            allowed.map(|v| v.verdict),
            Some("allow"),
            "learning reports allowed attempts"
        );
    }

    #[test]
    fn wall_clock_is_rfc3339() {
        let v = decode(&record(Hook::Egress, VERDICT_DENY, 4, [0; 16]), &Clock::now()).unwrap();
        assert!(humantime::parse_rfc3339(&v.time).is_ok(), "{}", v.time);
    }
}
