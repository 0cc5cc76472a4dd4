//! Kernel event records → violation events as users see them (JSON lines).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use pipeguard_common::{
    DNS_EVENT_MALFORMED, DnsEvent, Event, Hook, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
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
    /// `egress` (the pod sends), or `ingress` (hook `ingress`: a new inbound connection or
    /// datagram to the pod).
    pub direction: &'static str,
    pub protocol: String,
    /// Absent for sock_create events, which have no destination, and for ingress events
    /// (the pod is the destination; `dst_port` is its port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    /// For ingress: the source of the inbound connection or datagram.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_port: Option<u16>,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub pod_cgroup_id: u64,
    pub policy_id: u32,
    /// For sock_create: the refused socket (`raw`, `packet` or `ping`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<&'static str>,
    /// The DNS name the destination was learned from, when the kernel knows one and its
    /// text is still in the name table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
    /// For hook `dns`: the question name as the job sent it (no trailing dot; bytes that
    /// are not printable ASCII as `\xNN`). The destination is the resolver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// For hook `dns`: the question type (`A`, `AAAA`, `TXT`, ...; the number otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    /// For hook `dns`: the query could not be parsed (refused: fail closed).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub malformed: bool,
    /// The kernel's hash of the name behind `dst_name`; resolved by [`NameTable`].
    #[serde(skip)]
    pub name_hash: u64,
}

/// Where `dst_name` comes from: the engine's name table (hash → name), or nothing.
pub trait NameTable {
    fn name(&mut self, hash: u64) -> Option<String>;
}

/// No name table (tests, tools): events keep `dst_name` absent.
impl NameTable for () {
    fn name(&mut self, _hash: u64) -> Option<String> {
        None
    }
}

impl<T: NameTable> NameTable for Option<T> {
    fn name(&mut self, hash: u64) -> Option<String> {
        self.as_mut()?.name(hash)
    }
}

impl Violation {
    /// Fills `dst_name` from the name table; a miss leaves it absent.
    pub fn resolve_name(&mut self, names: &mut impl NameTable) {
        if self.name_hash != 0 && self.dst_name.is_none() {
            self.dst_name = names.name(self.name_hash);
        }
    }
}

/// The DNS question type by name, as resolvers and `dig` print it; the number for the rest.
pub fn qtype_name(qtype: u16) -> String {
    let name = match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        39 => "DNAME",
        43 => "DS",
        46 => "RRSIG",
        47 => "NSEC",
        48 => "DNSKEY",
        50 => "NSEC3",
        64 => "SVCB",
        65 => "HTTPS",
        99 => "SPF",
        252 => "AXFR",
        255 => "ANY",
        256 => "URI",
        257 => "CAA",
        n => return n.to_string(),
    };
    name.to_string()
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

/// Decodes one ring buffer record, `Event` or the longer `DnsEvent` (hook `dns`), and puts
/// the learned name on it from `names`; `None` for a record of the wrong size (a version
/// skew between programs and agent), which the caller counts.
pub fn decode_named(bytes: &[u8], clock: &Clock, names: &mut impl NameTable) -> Option<Violation> {
    let mut v = decode(bytes, clock)?;
    v.resolve_name(names);
    Some(v)
}

/// [`decode_named`] without a name table.
pub fn decode(bytes: &[u8], clock: &Clock) -> Option<Violation> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    let dns: Option<DnsEvent> = (bytes.len() >= size_of::<DnsEvent>())
        .then(|| bytemuck::pod_read_unaligned(&bytes[..size_of::<DnsEvent>()]));
    let event: Event = bytemuck::pod_read_unaligned(&bytes[..size_of::<Event>()]);
    let hook = Hook::from_u8(event.hook)?;
    let verdict = match event.verdict {
        VERDICT_DENY => "deny",
        VERDICT_AUDIT => "audit",
        VERDICT_ALLOW => "allow",
        _ => return None,
    };
    let is_socket_refusal = hook == Hook::SockCreate;
    let is_ingress = hook == Hook::Ingress;
    if hook == Hook::Dns && dns.is_none() {
        return None;
    }
    let question = dns.as_ref().map(question);
    Some(Violation {
        time: humantime::format_rfc3339_micros(clock.wall(event.timestamp_ns)).to_string(),
        verdict,
        hook: hook.name(),
        direction: if is_ingress { "ingress" } else { "egress" },
        protocol: protocol_name(event.protocol),
        dst_ip: (!is_socket_refusal && !is_ingress).then(|| dest_ip(event.addr, event.family)),
        dst_port: (!is_socket_refusal).then_some(event.port),
        src_ip: is_ingress.then(|| dest_ip(event.addr, event.family)),
        src_port: is_ingress.then_some(event.flags as u16),
        pid: event.tgid,
        comm: comm(&event.comm),
        cgroup_id: event.cgroup_id,
        pod_cgroup_id: event.pod_cgroup_id,
        policy_id: event.policy_id,
        socket: is_socket_refusal.then_some(refused_socket(&event)),
        dst_name: None,
        query: question.as_ref().and_then(|q| q.name.clone()),
        qtype: question.as_ref().map(|q| q.qtype.clone()),
        malformed: question.as_ref().is_some_and(|q| q.malformed),
        name_hash: event.name_hash,
    })
}

struct Question {
    /// `None` when the kernel could not get as far as a name.
    name: Option<String>,
    qtype: String,
    malformed: bool,
}

/// The question of a DNS event: the dotted name with its leading dot dropped.
fn question(e: &DnsEvent) -> Question {
    let len = usize::from(e.name_len).min(pipeguard_common::MAX_NAME_BYTES);
    let name = e.name.get(1..len).filter(|n| !n.is_empty());
    Question {
        name: name.map(|n| super::dns::name_from_bytes(n, n.len())),
        qtype: qtype_name(e.qtype),
        malformed: e.event.flags & DNS_EVENT_MALFORMED != 0,
    }
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

    fn dns_record(name: &[u8], qtype: u16, flags: u32) -> Vec<u8> {
        let mut record = DnsEvent::default();
        record.event = bytemuck::pod_read_unaligned(&self::tests::record(Hook::Dns, VERDICT_DENY, 4, {
            let mut addr = [0u8; 16];
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..].copy_from_slice(&[127, 0, 0, 53]);
            addr
        }));
        record.event.port = 53;
        record.event.protocol = 17;
        record.event.flags = flags;
        record.qtype = qtype;
        record.name[..name.len()].copy_from_slice(name);
        record.name_len = name.len() as u16;
        bytemuck::bytes_of(&record).to_vec()
    }

    #[test]
    fn decodes_a_refused_dns_query() {
        let v = decode(&dns_record(b".secret.Exfil.test", 1, 0), &Clock::now()).expect("decodes");
        assert_eq!(v.hook, "dns");
        assert_eq!(
            v.query.as_deref(),
            Some("secret.Exfil.test"),
            "leading dot dropped, case kept"
        );
        assert_eq!(v.qtype.as_deref(), Some("A"));
        assert_eq!(v.dst_ip, Some("127.0.0.53".parse().unwrap()), "the resolver");
        assert_eq!((v.dst_port, v.protocol.as_str()), (Some(53), "udp"));
        assert!(!v.malformed);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["hook"], "dns");
        assert_eq!(json["query"], "secret.Exfil.test");
        assert_eq!(json["qtype"], "A");
        assert!(json.get("malformed").is_none(), "only when set: {json}");
        assert!(json.get("dst_name").is_none(), "{json}");
        assert!(json.get("name_hash").is_none(), "internal: {json}");
    }

    #[test]
    fn dns_query_names_are_escaped_and_types_named_or_numbered() {
        let v = decode(&dns_record(b".a\nb\x1b.exfil.test", 16, 0), &Clock::now()).unwrap();
        assert_eq!(v.query.as_deref(), Some("a\\x0ab\\x1b.exfil.test"));
        assert_eq!(v.qtype.as_deref(), Some("TXT"));
        assert_eq!(qtype_name(28), "AAAA");
        assert_eq!(qtype_name(65), "HTTPS");
        assert_eq!(qtype_name(4242), "4242");
    }

    #[test]
    fn a_malformed_query_says_so_and_may_have_no_name() {
        let v = decode(&dns_record(b"", 0, DNS_EVENT_MALFORMED), &Clock::now()).unwrap();
        assert!(v.malformed);
        assert_eq!(v.query, None);
        assert_eq!(serde_json::to_value(&v).unwrap()["malformed"], true);
    }

    #[test]
    fn a_dns_hook_in_a_short_record_is_a_version_skew() {
        assert!(decode(&record(Hook::Dns, VERDICT_DENY, 4, [0; 16]), &Clock::now()).is_none());
    }

    struct Names(std::collections::HashMap<u64, String>, u32);

    impl NameTable for Names {
        fn name(&mut self, hash: u64) -> Option<String> {
            self.1 += 1;
            self.0.get(&hash).cloned()
        }
    }

    #[test]
    fn events_about_learned_addresses_carry_their_name() {
        let hash = pipeguard_common::name_hash(b"exfil.example.net");
        let mut names = Names([(hash, "exfil.example.net".to_string())].into(), 0);
        let mut bytes = record(Hook::Connect4, VERDICT_DENY, 4, [0; 16]);
        let mut event: Event = bytemuck::pod_read_unaligned(&bytes);
        event.name_hash = hash;
        bytes = bytemuck::bytes_of(&event).to_vec();
        let v = decode_named(&bytes, &Clock::now(), &mut names).unwrap();
        assert_eq!(v.dst_name.as_deref(), Some("exfil.example.net"));
        assert_eq!(serde_json::to_value(&v).unwrap()["dst_name"], "exfil.example.net");
        event.name_hash = 7;
        let missed = decode_named(bytemuck::bytes_of(&event), &Clock::now(), &mut names).unwrap();
        assert_eq!(missed.dst_name, None, "a miss leaves it absent");
        let plain = decode_named(
            &record(Hook::Connect4, VERDICT_DENY, 4, [0; 16]),
            &Clock::now(),
            &mut names,
        )
        .unwrap();
        assert_eq!(plain.dst_name, None);
        assert_eq!(names.1, 2, "no lookup without a hash");
    }

    #[test]
    fn wall_clock_is_rfc3339() {
        let v = decode(&record(Hook::Egress, VERDICT_DENY, 4, [0; 16]), &Clock::now()).unwrap();
        assert!(humantime::parse_rfc3339(&v.time).is_ok(), "{}", v.time);
    }
}
