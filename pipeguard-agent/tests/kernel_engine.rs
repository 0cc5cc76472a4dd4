//! The engine against the real kernel: a job whose only allowed destination is one IP and
//! port (127.0.0.1:P, TCP and UDP) must not get a byte anywhere else, by any route, while
//! the allowed destination keeps working. Needs root and cgroup2; fails (never skips)
//! without them.

mod common;

use std::{path::Path, time::Duration};

use common::{listeners, probe::Outcome, run_probe, test_cgroup};
use pipeguard::{
    cgroup::OwnedCgroup,
    engine::{Engine, EngineConfig, PolicyEntries, events},
};
use pipeguard_common::{
    Hook, MODE_AUDIT, MODE_ENFORCE, POD_DENY_RAW_SOCKETS, PROTO_TCP, PROTO_UDP, PodEntry, PortRange,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, map_names,
};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

const POLICY: u32 = 7;

fn only(port: u16) -> PolicyEntries {
    common::allow_only("127.0.0.1/32", port, &[PROTO_TCP, PROTO_UDP])
}

struct Guarded {
    engine: Engine,
    cgroup: OwnedCgroup,
    cgroup_id: u64,
}

fn guard(name: &str, entries: &PolicyEntries, mode: u32) -> Guarded {
    guard_with_flags(name, entries, mode, POD_DENY_RAW_SOCKETS)
}

fn guard_with_flags(name: &str, entries: &PolicyEntries, mode: u32, flags: u32) -> Guarded {
    guard_with_config(name, entries, mode, flags, &EngineConfig::default())
}

fn guard_with_config(
    name: &str,
    entries: &PolicyEntries,
    mode: u32,
    flags: u32,
    config: &EngineConfig,
) -> Guarded {
    let cgroup = test_cgroup(name);
    let mut engine = Engine::load(config).expect("load the eBPF programs");
    let cgroup_id = cgroup.id().unwrap();
    engine.put_policy(POLICY, entries).unwrap();
    engine.put_pod(cgroup_id, entry(mode, flags)).unwrap();
    engine.attach(cgroup.path()).expect("attach to the test cgroup");
    Guarded {
        engine,
        cgroup,
        cgroup_id,
    }
}

/// A pod entry pointing at [`POLICY`].
fn entry(mode: u32, flags: u32) -> PodEntry {
    PodEntry {
        policy_id: POLICY,
        mode,
        flags,
        ..PodEntry::default()
    }
}

impl Guarded {
    fn probe(&self, actions: &[String]) -> Vec<Outcome> {
        let outcomes = run_probe(self.cgroup.path(), actions);
        assert_eq!(
            outcomes.len(),
            actions.len(),
            "one outcome per action: {outcomes:#?}"
        );
        outcomes
    }

    fn count(&self, hook: Hook, verdict: u8) -> u64 {
        self.counter(hook, verdict).0
    }

    /// (packets, bytes)
    fn counter(&self, hook: Hook, verdict: u8) -> (u64, u64) {
        self.counter_of(self.cgroup_id, hook, verdict)
    }

    /// (packets, bytes) of pod `cgroup_id` in this engine.
    fn counter_of(&self, cgroup_id: u64, hook: Hook, verdict: u8) -> (u64, u64) {
        self.engine
            .counters(cgroup_id)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.hook == hook as u8 && k.verdict == verdict)
            .fold((0, 0), |(p, b), (_, c)| (p + c.packets, b + c.bytes))
    }

    /// Another pod under the same allowlist and engine: its cgroup and id.
    fn second_pod(&mut self, name: &str) -> (OwnedCgroup, u64) {
        let cgroup = test_cgroup(name);
        let id = cgroup.id().unwrap();
        self.engine
            .put_pod(id, entry(MODE_ENFORCE, POD_DENY_RAW_SOCKETS))
            .unwrap();
        self.engine
            .attach(cgroup.path())
            .expect("attach to the second pod's cgroup");
        (cgroup, id)
    }
}

fn assert_eperm(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(o.denied_with_eperm(), "expected an immediate EPERM for {o:?}");
    }
}

fn assert_ok(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(o.ok, "expected success for {o:?}");
    }
}

/// Time for a leaked packet to arrive before we conclude none did.
const LEAK_WAIT: Duration = Duration::from_millis(300);

#[test]
fn allowed_destination_works_over_every_udp_and_tcp_route() {
    let (tcp, udp) = listeners::tcp_and_udp("127.0.0.1");
    let g = guard("allowed", &only(tcp.addr.port()), MODE_ENFORCE);
    let a = tcp.addr;
    let outcomes = g.probe(&[
        format!("tcp {a} tcp-ok"),
        format!("udp-connect {a} udpc-ok"),
        format!("udp-sendto {a} udpt-ok"),
        format!("udp-sendmsg {a} udpm-ok"),
        format!("udp-sendmmsg {a} udpmm-ok"),
        format!("tcp [::ffff:127.0.0.1]:{} mapped-ok", a.port()),
        format!("udp-sendto [::ffff:127.0.0.1]:{} umapped-ok", a.port()),
    ]);
    assert_ok(&outcomes);
    assert!(tcp.received.wait_for(b"tcp-ok", Duration::from_secs(3)));
    assert!(
        tcp.received.wait_for(b"mapped-ok", Duration::from_secs(3)),
        "IPv4-mapped IPv6 is IPv4: allowed"
    );
    for payload in ["udpc-ok", "udpt-ok", "udpm-ok", "udpmm-ok", "umapped-ok"] {
        assert!(
            udp.received.wait_for(payload.as_bytes(), Duration::from_secs(3)),
            "{payload} did not arrive"
        );
    }
    assert_eq!(g.count(Hook::Connect4, VERDICT_DENY), 0);
}

#[test]
fn everything_else_is_refused_with_eperm() {
    let (allowed, _) = listeners::tcp_and_udp("127.0.0.1");
    let (other_port_tcp, other_port_udp) = listeners::tcp_and_udp("127.0.0.1");
    let (other_ip_tcp, other_ip_udp) = listeners::tcp_and_udp("127.0.0.2");
    let (v6_tcp, v6_udp) = listeners::tcp_and_udp("[::1]");
    let g = guard("denied", &only(allowed.addr.port()), MODE_ENFORCE);
    let port = other_port_tcp.addr.port();
    let mut actions = Vec::new();
    for target in [other_port_tcp.addr, other_ip_tcp.addr, v6_tcp.addr] {
        actions.push(format!("tcp {target} leak-tcp"));
        actions.push(format!("udp-connect {target} leak-udpc"));
        actions.push(format!("udp-sendto {target} leak-udpt"));
        actions.push(format!("udp-sendmsg {target} leak-udpm"));
        actions.push(format!("udp-sendmmsg {target} leak-udpmm"));
        actions.push(format!("tfo {target} leak-tfo"));
    }
    // IPv4-mapped IPv6 on a dual-stack socket: still the wrong port.
    actions.push(format!("tcp [::ffff:127.0.0.1]:{port} leak-mapped"));
    actions.push(format!("udp-sendto [::ffff:127.0.0.1]:{port} leak-umapped"));
    let outcomes = g.probe(&actions);
    assert_eperm(&outcomes);
    std::thread::sleep(LEAK_WAIT);
    for received in [
        &other_port_tcp.received,
        &other_port_udp.received,
        &other_ip_tcp.received,
        &other_ip_udp.received,
        &v6_tcp.received,
        &v6_udp.received,
    ] {
        assert!(
            received.bytes().is_empty(),
            "leaked: {:?}",
            String::from_utf8_lossy(&received.bytes())
        );
    }
    assert!(
        g.count(Hook::Connect4, VERDICT_DENY) >= 4,
        "connect4 denials are counted"
    );
    assert!(
        g.count(Hook::Connect6, VERDICT_DENY) >= 2,
        "connect6 denials are counted"
    );
    assert!(
        g.count(Hook::Sendmsg4, VERDICT_DENY) >= 6,
        "sendmsg4 denials are counted"
    );
    assert!(
        g.count(Hook::Sendmsg6, VERDICT_DENY) >= 3,
        "sendmsg6 denials are counted"
    );
}

#[test]
fn tcp_fast_open_to_the_allowed_destination_still_works() {
    let allowed = listeners::tcp("127.0.0.1:0");
    let g = guard("tfo-ok", &only(allowed.addr.port()), MODE_ENFORCE);
    assert_ok(&g.probe(&[format!("tfo {} tfo-ok", allowed.addr)]));
    assert!(allowed.received.wait_for(b"tfo-ok", Duration::from_secs(3)));
}

#[test]
fn raw_and_packet_sockets_are_refused_at_creation() {
    let (allowed, allowed_udp) = listeners::tcp_and_udp("127.0.0.1");
    let g = guard("raw", &only(allowed.addr.port()), MODE_ENFORCE);
    let a = allowed.addr;
    // Even aimed at the allowed address: a raw socket bypasses the socket hooks entirely.
    let mut actions = vec![format!("raw-udp {a}"), format!("raw-icmp {a}")];
    match g.engine.packet_guard_unavailable() {
        None => actions.push(format!("packet {a}")),
        // The gap stays visible: without the BPF LSM, AF_PACKET sockets are not refused.
        Some(reason) => eprintln!("GAP: AF_PACKET sockets are not refused on this kernel: {reason}"),
    }
    let outcomes = g.probe(&actions);
    assert_eperm(&outcomes);
    assert_eq!(g.count(Hook::SockCreate, VERDICT_DENY), actions.len() as u64);
    std::thread::sleep(LEAK_WAIT);
    assert!(allowed_udp.received.bytes().is_empty());
}

#[test]
fn raw_sockets_when_permitted_are_still_judged_per_packet() {
    let (allowed, _) = listeners::tcp_and_udp("127.0.0.1");
    let denied = listeners::udp("127.0.0.1:0");
    let g = guard_with_flags("raw-allowed", &only(allowed.addr.port()), MODE_ENFORCE, 0);
    // Hand-built UDP to a denied port, and ICMP (no port, no socket hook): the packet hook
    // drops both, and the kernel reports the drop to the sender as EPERM.
    let outcomes = g.probe(&[
        format!("raw-udp {}", denied.addr),
        "raw-icmp 127.0.0.1:0".to_string(),
    ]);
    assert_eperm(&outcomes);
    std::thread::sleep(LEAK_WAIT);
    assert!(denied.received.bytes().is_empty(), "raw UDP leaked");
    assert!(
        g.count(Hook::Egress, VERDICT_DENY) >= 2,
        "both drops are counted at the packet hook"
    );
}

#[test]
fn children_daemons_and_threads_are_guarded() {
    let (allowed, _) = listeners::tcp_and_udp("127.0.0.1");
    let denied = listeners::tcp("127.0.0.1:0");
    let g = guard("shapes", &only(allowed.addr.port()), MODE_ENFORCE);
    let (a, d) = (allowed.addr, denied.addr);
    let outcomes = g.probe(&[
        format!("child tcp {d} leak-child"),
        format!("child child tcp {d} leak-grandchild"),
        format!("daemon tcp {d} leak-daemon"),
        format!("thread tcp {d} leak-thread"),
        format!("child tcp {a} child-ok"),
        format!("daemon tcp {a} daemon-ok"),
        format!("thread tcp {a} thread-ok"),
    ]);
    // The daemon reports whenever it gets there, so outcomes are matched by payload.
    let (refused, allowed_outcomes): (Vec<_>, Vec<_>) =
        outcomes.into_iter().partition(|o| o.action.contains("leak-"));
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert_eperm(&refused);
    assert_ok(&allowed_outcomes);
    for payload in ["child-ok", "daemon-ok", "thread-ok"] {
        assert!(
            allowed
                .received
                .wait_for(payload.as_bytes(), Duration::from_secs(3)),
            "{payload}"
        );
    }
    std::thread::sleep(LEAK_WAIT);
    assert!(
        denied.received.bytes().is_empty(),
        "leaked: {:?}",
        String::from_utf8_lossy(&denied.received.bytes())
    );
}

#[test]
fn revoking_an_allow_cuts_an_established_connection() {
    assert_change_cuts_a_connection("revoke", |engine, port| {
        // The policy changes in place while the connection is open: port 9 only.
        engine.replace_policy(POLICY, &only(port), &only(9)).unwrap();
    });
}

#[test]
fn moving_the_pod_to_another_allowlist_cuts_an_established_connection() {
    assert_change_cuts_a_connection("revoke-id", |engine, port| {
        // The agent's way to change a pod's policy without a window: new id, switch, delete.
        engine.put_policy(POLICY + 1, &only(9)).unwrap();
        engine
            .put_pod(
                engine.pods().unwrap()[0].0,
                PodEntry {
                    policy_id: POLICY + 1,
                    mode: MODE_ENFORCE,
                    flags: POD_DENY_RAW_SOCKETS,
                    ..PodEntry::default()
                },
            )
            .unwrap();
        engine.delete_policy(POLICY, &only(port)).unwrap();
    });
}

/// A connection is allowed and sends (so its socket remembers the verdict, see the eBPF
/// crate's `fast`), `change` revokes the allow, and the connection's next packet is dropped.
fn assert_change_cuts_a_connection(name: &str, change: impl FnOnce(&mut Engine, u16)) {
    let allowed = listeners::tcp("127.0.0.1:0");
    let mut g = guard(name, &only(allowed.addr.port()), MODE_ENFORCE);
    hold_through_a_change(&mut g, "hold", allowed.addr, &allowed.received, change);
    assert!(
        g.count(Hook::Egress, VERDICT_DENY) >= 1,
        "the packet hook dropped the revoked connection's packets"
    );
}

#[test]
fn revoking_an_allow_refuses_the_next_datagram_of_the_same_socket() {
    let udp = listeners::udp("127.0.0.1:0");
    let mut g = guard("revoke-udp", &only(udp.addr.port()), MODE_ENFORCE);
    let outcomes = hold_through_a_change(&mut g, "udp-hold", udp.addr, &udp.received, |engine, port| {
        engine.replace_policy(POLICY, &only(port), &only(9)).unwrap();
    });
    assert_eperm(&outcomes);
    assert_eq!(g.count(Hook::Sendmsg4, VERDICT_DENY), 1);
}

/// Runs probe `action` (`hold`, `udp-hold`): "before" reaches `to`, then `change` moves the
/// policy, then "after" must not arrive. The probe's outcomes.
fn hold_through_a_change(
    g: &mut Guarded,
    action: &str,
    to: std::net::SocketAddr,
    received: &listeners::Received,
    change: impl FnOnce(&mut Engine, u16),
) -> Vec<Outcome> {
    // The cgroup's name is unique to the test (and carries the process id).
    let cgroup = g
        .cgroup
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let flag = std::env::temp_dir().join(format!("pg-{cgroup}"));
    let _ = std::fs::remove_file(&flag);
    let child = common::probe_command(g.cgroup.path(), &[format!("{action} {to} {}", flag.display())])
        .spawn()
        .expect("spawn probe");
    assert!(
        received.wait_for(b"before", Duration::from_secs(5)),
        "allowed at first"
    );
    change(&mut g.engine, to.port());
    std::fs::write(&flag, "go").unwrap();
    let output = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&flag);
    assert!(
        !received.wait_for(b"after", LEAK_WAIT),
        "a revoked allow kept sending"
    );
    common::parse_outcomes(&output)
}

/// Repeated datagrams to one destination take the fast path after the first; each one is
/// still counted, packets and bytes, by the socket hook and the packet hook.
#[test]
fn counters_equal_the_datagrams_sent_when_the_socket_remembers_its_verdict() {
    const SENT: u64 = 200;
    let udp = listeners::udp("127.0.0.1:0");
    let g = guard("fast-count", &only(udp.addr.port()), MODE_ENFORCE);
    assert_ok(&g.probe(&[format!("udp-burst {} {SENT}", udp.addr)]));
    assert!(
        udp.received
            .wait_for(&[b'x'; SENT as usize], Duration::from_secs(5)),
        "every datagram arrived"
    );
    assert_eq!(g.count(Hook::Sendmsg4, VERDICT_ALLOW), SENT);
    // IPv4 header, UDP header, one byte.
    assert_eq!(g.counter(Hook::Egress, VERDICT_ALLOW), (SENT, SENT * 29));
}

/// With flow statistics on (`exec`), the datagrams the fast path lets through reach the
/// per-destination statistics exactly once: read while the socket is still open (what it
/// has not moved to the table yet), after it moved to another destination and back, and
/// after it closed.
#[test]
fn flow_statistics_count_each_fast_path_datagram_once() {
    const EACH: u64 = 40;
    let a = listeners::udp("127.0.0.1:0");
    let b = listeners::udp("127.0.0.1:0");
    let mut entries = common::allow_only("127.0.0.1/32", a.addr.port(), &[PROTO_UDP]);
    let ports = &mut entries.v4[0].1;
    ports.ranges[1] = PortRange {
        start: b.addr.port(),
        end: b.addr.port(),
        protocol: PROTO_UDP,
        _pad: [0; 3],
    };
    ports.count = 2;
    let config = EngineConfig {
        flow_stats: true,
        ..EngineConfig::default()
    };
    let g = guard_with_config("flows", &entries, MODE_ENFORCE, POD_DENY_RAW_SOCKETS, &config);
    let flow = |port: u16| {
        g.engine
            .flows(g.cgroup_id)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.port == port && k.protocol == PROTO_UDP && k.verdict == VERDICT_ALLOW)
            .fold((0, 0), |(p, b), (_, c)| (p + c.packets, b + c.bytes))
    };
    let flag = std::env::temp_dir().join(format!("pg-flows-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let child = common::probe_command(
        g.cgroup.path(),
        &[format!(
            "udp-alternate {} {} {EACH} {}",
            a.addr,
            b.addr,
            flag.display()
        )],
    )
    .spawn()
    .expect("spawn probe");
    assert!(
        a.received
            .wait_for(&[b'x'; 2 * EACH as usize], Duration::from_secs(5))
            && b.received
                .wait_for(&[b'x'; EACH as usize], Duration::from_secs(5)),
        "every datagram arrived"
    );
    // IPv4 header, UDP header, one byte.
    let expected = |n: u64| (n, n * 29);
    assert_eq!(
        flow(a.addr.port()),
        expected(2 * EACH),
        "while the socket is open"
    );
    assert_eq!(flow(b.addr.port()), expected(EACH), "while the socket is open");
    std::fs::write(&flag, "go").unwrap();
    let output = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&flag);
    assert_ok(&common::parse_outcomes(&output));
    assert_eq!(flow(a.addr.port()), expected(2 * EACH), "after the socket closed");
    assert_eq!(flow(b.addr.port()), expected(EACH), "after the socket closed");
    assert_eq!(g.counter(Hook::Egress, VERDICT_ALLOW), expected(3 * EACH));
}

/// A counter slot a finished pod gave back reaches another pod zeroed: that pod's counters
/// are its own from its first packet.
#[test]
fn a_counter_slot_handed_out_again_starts_at_zero() {
    let udp = listeners::udp("127.0.0.1:0");
    let mut g = guard("slot-first", &only(udp.addr.port()), MODE_ENFORCE);
    g.probe(&[format!("udp-burst {} 5", udp.addr)]);
    assert_eq!(g.count(Hook::Sendmsg4, VERDICT_ALLOW), 5);
    g.engine.delete_pod(g.cgroup_id).unwrap();
    // Released slots come back last: take every other one (ids no cgroup has) first.
    let placeholders: Vec<u64> = (1..u64::from(pipeguard_common::COUNTER_SLOT_OVERFLOW) - 1)
        .map(|i| u64::MAX - i)
        .collect();
    for id in &placeholders {
        g.engine.put_pod(*id, entry(MODE_ENFORCE, 0)).unwrap();
    }
    let (next, next_id) = g.second_pod("slot-next");
    assert_eq!(
        g.engine.counters(next_id).unwrap(),
        vec![],
        "the first pod's counts stayed in the slot"
    );
    run_probe(next.path(), &[format!("udp-burst {} 3", udp.addr)]);
    assert_eq!(g.counter_of(next_id, Hook::Sendmsg4, VERDICT_ALLOW).0, 3);
    for id in placeholders {
        g.engine.delete_pod(id).unwrap();
    }
}

/// A finished pod's counters must go with its entry, or a node running a job a minute
/// would keep counting (and reporting) every pod it ever ran.
#[test]
fn deleting_a_pod_deletes_its_counters_and_no_one_elses() {
    let (tcp, udp) = listeners::tcp_and_udp("127.0.0.1");
    let mut g = guard("counters-go", &only(tcp.addr.port()), MODE_ENFORCE);
    let (other, other_id) = g.second_pod("counters-stay");
    let routes = [
        format!("tcp {} a", tcp.addr),
        format!("udp-sendto {} b", udp.addr),
        format!("tcp [::1]:{} c", tcp.addr.port()),
    ];
    g.probe(&routes);
    run_probe(other.path(), &routes);
    // (hook, verdict, packets, bytes), sorted: the map's walk order is not a contract.
    let counters = |engine: &Engine, cgroup_id| {
        let mut all: Vec<_> = engine
            .counters(cgroup_id)
            .unwrap()
            .into_iter()
            .map(|(k, c)| (k.hook, k.verdict, c.packets, c.bytes))
            .collect();
        all.sort();
        all
    };
    let before = counters(&g.engine, g.cgroup_id);
    assert!(
        before.len() >= 4,
        "several hooks and verdicts counted: {before:?}"
    );
    let others = counters(&g.engine, other_id);
    assert_eq!(
        others.len(),
        before.len(),
        "the other pod was counted alike: {others:?}"
    );

    g.engine.delete_pod(g.cgroup_id).unwrap();
    assert_eq!(
        counters(&g.engine, g.cgroup_id),
        vec![],
        "its counters went with it"
    );
    assert_eq!(
        counters(&g.engine, other_id),
        others,
        "the other pod's are untouched"
    );
}

/// Audited attempts are never remembered: each datagram is judged, counted and reported.
#[test]
fn audit_mode_counts_every_datagram_to_a_denied_destination() {
    const SENT: u64 = 50;
    let udp = listeners::udp("127.0.0.1:0");
    let mut g = guard("fast-audit", &only(9), MODE_AUDIT);
    let mut ring = g.engine.take_events().unwrap();
    assert_ok(&g.probe(&[format!("udp-burst {} {SENT}", udp.addr)]));
    assert!(
        udp.received
            .wait_for(&[b'x'; SENT as usize], Duration::from_secs(5)),
        "audit mode lets every datagram through"
    );
    assert_eq!(g.count(Hook::Sendmsg4, VERDICT_AUDIT), SENT);
    assert_eq!(g.count(Hook::Egress, VERDICT_AUDIT), SENT);
    assert_eq!(g.count(Hook::Sendmsg4, VERDICT_ALLOW), 0);
    assert_eq!(g.count(Hook::Egress, VERDICT_ALLOW), 0);
    let clock = events::Clock::now();
    let mut sendmsg_events = 0;
    while let Some(item) = ring.next() {
        sendmsg_events += events::decode(&item, &clock)
            .iter()
            .filter(|v| v.hook == "sendmsg4" && v.verdict == "audit")
            .count();
    }
    assert_eq!(sendmsg_events as u64, SENT, "every audited sendmsg is reported");
}

#[test]
fn audit_mode_lets_traffic_through_and_reports_it() {
    let denied = listeners::tcp("127.0.0.1:0");
    let mut g = guard("audit", &only(9), MODE_AUDIT);
    let mut ring = g.engine.take_events().unwrap();
    assert_ok(&g.probe(&[format!("tcp {} audited", denied.addr)]));
    assert!(denied.received.wait_for(b"audited", Duration::from_secs(3)));
    assert!(g.count(Hook::Connect4, VERDICT_AUDIT) >= 1);
    assert_eq!(g.count(Hook::Connect4, VERDICT_DENY), 0);
    let clock = events::Clock::now();
    let mut seen = Vec::new();
    while let Some(item) = ring.next() {
        seen.extend(events::decode(&item, &clock));
    }
    let connect = seen
        .iter()
        .find(|v| v.hook == "connect4")
        .unwrap_or_else(|| panic!("no connect4 event in {seen:#?}"));
    assert_eq!(connect.verdict, "audit");
    assert_eq!(connect.dst_port, Some(denied.addr.port()));
}

#[test]
fn a_denial_becomes_an_event_with_process_and_destination() {
    let denied = listeners::tcp("127.0.0.1:0");
    let mut g = guard("events", &only(9), MODE_ENFORCE);
    let mut ring = g.engine.take_events().unwrap();
    assert_eperm(&g.probe(&[format!("tcp {} x", denied.addr)]));
    let clock = events::Clock::now();
    let mut seen = Vec::new();
    while let Some(item) = ring.next() {
        seen.extend(events::decode(&item, &clock));
    }
    let event = seen
        .iter()
        .find(|v| v.hook == "connect4")
        .unwrap_or_else(|| panic!("no event in {seen:#?}"));
    assert_eq!(event.verdict, "deny");
    assert_eq!(event.protocol, "tcp");
    assert_eq!(event.dst_ip, Some(denied.addr.ip()));
    assert_eq!(event.dst_port, Some(denied.addr.port()));
    assert_eq!(event.pod_cgroup_id, g.cgroup_id);
    assert_eq!(event.cgroup_id, g.cgroup_id);
    assert_eq!(event.policy_id, POLICY);
    assert!(event.pid > 0);
    assert!(!event.comm.is_empty());
    assert_eq!(g.engine.event_drops().unwrap(), 0);
}

#[test]
fn nested_cgroups_inside_the_job_stay_under_its_policy() {
    let denied = listeners::tcp("127.0.0.1:0");
    let g = guard("nested", &only(9), MODE_ENFORCE);
    let nested = g.cgroup.path().join("inner");
    std::fs::create_dir(&nested).unwrap();
    let outcomes = run_probe(Path::new(&nested), &[format!("tcp {} leak-nested", denied.addr)]);
    assert_eperm(&outcomes);
    assert!(
        g.count(Hook::Connect4, VERDICT_DENY) >= 1,
        "counted against the job's pod cgroup"
    );
}

#[test]
fn pinned_enforcement_outlives_the_engine_and_is_adopted_then_removed() {
    let (allowed, _) = listeners::tcp_and_udp("127.0.0.1");
    let denied = listeners::tcp("127.0.0.1:0");
    let bpffs = common::Bpffs::mount("engine-pins");
    let cgroup = test_cgroup("pins");
    let config = EngineConfig {
        pin_dir: Some(bpffs.pin_dir()),
        ..EngineConfig::default()
    };
    let cgroup_id = cgroup.id().unwrap();
    {
        let mut engine = Engine::load(&config).expect("load with pins");
        engine.put_policy(POLICY, &only(allowed.addr.port())).unwrap();
        engine.put_pod(cgroup_id, entry(MODE_ENFORCE, 0)).unwrap();
        engine.attach(cgroup.path()).unwrap();
        assert_eperm(&run_probe(cgroup.path(), &[format!("tcp {} x", denied.addr)]));
    }
    // The process's engine is gone; the pinned links and maps are not.
    assert_eperm(&run_probe(cgroup.path(), &[format!("tcp {} x", denied.addr)]));
    assert_ok(&run_probe(cgroup.path(), &[format!("tcp {} y", allowed.addr)]));

    // A map an older agent pinned under a layout name this one no longer has.
    let maps = bpffs.pin_dir().join("maps");
    aya::maps::MapData::from_pin(maps.join(map_names::PODS))
        .unwrap()
        .pin(maps.join("PG_PODS_V1"))
        .unwrap();
    let mut engine = Engine::load(&config).expect("a second engine reuses the pinned maps");
    assert!(
        !maps.join("PG_PODS_V1").exists() && maps.join(map_names::PODS).exists(),
        "the older layout's map is unpinned, the current one kept"
    );
    assert!(
        engine
            .pods()
            .unwrap()
            .contains(&(cgroup_id, entry(MODE_ENFORCE, 0))),
        "the pod table survived"
    );
    assert_eq!(
        engine.policies().unwrap().get(&POLICY),
        Some(&only(allowed.addr.port())),
        "the allowlist survived"
    );
    let before = engine.counters(cgroup_id).unwrap();
    assert!(
        before
            .iter()
            .any(|(k, c)| k.verdict == VERDICT_DENY && c.packets >= 2),
        "counters survived: {before:?}"
    );
    // Re-attaching switches the pinned links to this engine's programs.
    engine.attach(cgroup.path()).expect("update the pinned links");
    assert_eperm(&run_probe(cgroup.path(), &[format!("tcp {} x", denied.addr)]));
    drop(engine);

    let removed = pipeguard::engine::pins::remove_all(&bpffs.pin_dir()).unwrap();
    assert!(removed >= 9 + 6, "maps and links were pinned: {removed}");
    assert_ok(&run_probe(cgroup.path(), &[format!("tcp {} z", denied.addr)]));
    assert!(
        denied.received.wait_for(b"z", Duration::from_secs(3)),
        "programs are detached after removal"
    );
}
