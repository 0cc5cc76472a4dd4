//! Ingress enforcement against the real kernel: a guarded pod's listeners (TCP and UDP,
//! IPv4, IPv6, v4-mapped) accept only the sources its ingress allowlist names; replies to
//! the pod's own connections and datagrams pass; its own traffic to itself passes; audit
//! mode reports without dropping. Needs root and cgroup2; fails (never skips) without them.
//!
//! The pod's sockets are created by this process while it sits in the pod's cgroup (a
//! socket belongs to the cgroup of the task that created it); every test holds `SERIAL`,
//! because moving the process moves all its threads.

mod common;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use common::{inbound, test_cgroup};
use pipeguard::{
    cgroup::OwnedCgroup,
    engine::{Engine, EngineConfig, PolicyEntries, events},
};
use pipeguard_common::{
    Hook, MODE_AUDIT, MODE_ENFORCE, POD_INGRESS_ISOLATED, PORTS_ALL, PROTO_TCP, PodEntry, PortSet,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

static SERIAL: Mutex<()> = Mutex::new(());

const EGRESS: u32 = 21;
const INGRESS: u32 = 22;
const CONNECT_WAIT: Duration = inbound::WAIT;

struct Pod {
    engine: Engine,
    cgroup: OwnedCgroup,
    cgroup_id: u64,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    _serial: MutexGuard<'static, ()>,
}

fn entries(v4: &[(&str, PortSet)], v6: &[(&str, PortSet)]) -> PolicyEntries {
    PolicyEntries {
        v4: v4.iter().map(|(n, p)| (n.parse().unwrap(), *p)).collect(),
        v6: v6.iter().map(|(n, p)| (n.parse().unwrap(), *p)).collect(),
        names: Vec::new(),
        ingress: None,
    }
}

fn all() -> PortSet {
    PortSet {
        flags: PORTS_ALL,
        ..PortSet::default()
    }
}

/// The test pod's entry: egress open (`EGRESS`), isolated for ingress by `INGRESS`.
fn isolated(mode: u32) -> PodEntry {
    PodEntry {
        policy_id: EGRESS,
        mode,
        flags: POD_INGRESS_ISOLATED,
        ingress_policy_id: INGRESS,
        ..PodEntry::default()
    }
}

/// Pod egress is open (only ingress is under test); ingress is `ingress`.
fn pod(name: &str, ingress: &PolicyEntries, mode: u32) -> Pod {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = test_cgroup(name);
    let cgroup_id = cgroup.id().unwrap();
    let mut engine = Engine::load(&EngineConfig::default()).expect("load the eBPF programs");
    engine
        .put_policy(EGRESS, &entries(&[("0.0.0.0/0", all())], &[("::/0", all())]))
        .unwrap();
    engine.put_policy(INGRESS, ingress).unwrap();
    engine.put_pod(cgroup_id, isolated(mode)).unwrap();
    engine.attach(cgroup.path()).expect("attach to the test cgroup");
    let ring = engine.take_events().unwrap();
    Pod {
        engine,
        cgroup,
        cgroup_id,
        ring,
        _serial: serial,
    }
}

impl Pod {
    /// Runs `f` with this process in the pod's cgroup: the sockets it creates are the pod's.
    fn inside<T>(&self, f: impl FnOnce() -> T) -> T {
        common::inside(self.cgroup.path(), f)
    }

    fn count(&self, verdict: u8) -> u64 {
        self.engine
            .counters(self.cgroup_id)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.hook == Hook::Ingress as u8 && k.verdict == verdict)
            .map(|(_, c)| c.packets)
            .sum()
    }

    fn events(&mut self) -> Vec<events::Violation> {
        let clock = events::Clock::now();
        let mut seen = Vec::new();
        while let Some(item) = self.ring.next() {
            seen.extend(events::decode(&item, &clock));
        }
        seen
    }

    fn set_ingress(&mut self, old: &PolicyEntries, new: &PolicyEntries) {
        self.engine.replace_policy(INGRESS, old, new).unwrap();
    }

    /// A loopback listener of the pod that has admitted `times` connections from 127.0.0.2
    /// (which the pod's ingress allowlist must admit): from the second on, its record holds
    /// the pod's entry and the admitted source.
    fn listener_admitting(&self, times: usize) -> (TcpListener, SocketAddr) {
        let listener = self.inside(|| TcpListener::bind("127.0.0.1:0").unwrap());
        let dest = listener.local_addr().unwrap();
        for _ in 0..times {
            inbound::connect_from(ip("127.0.0.2"), dest).expect("the allowed source");
            assert!(accepted(&listener));
        }
        (listener, dest)
    }
}

/// True when the listener has a connection waiting (it was let through).
fn accepted(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).unwrap();
    let got = match listener.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept: {e}"),
    };
    listener.set_nonblocking(false).unwrap();
    got
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The pod listens on `bind`; clients from `allowed` and `refused` connect to `dest_ip`.
fn tcp_round(p: &mut Pod, bind: &str, dest_ip: &str, allowed: &str, refused: &str) {
    let listener = p.inside(|| TcpListener::bind(bind).unwrap());
    let dest = SocketAddr::new(ip(dest_ip), listener.local_addr().unwrap().port());

    let mut ok = inbound::connect_from(ip(allowed), dest).expect("an allowed source connects");
    ok.write_all(b"hi").unwrap();
    assert!(accepted(&listener), "the allowed connection reaches accept()");

    let error = inbound::connect_from(ip(refused), dest).expect_err("a refused source never connects");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    assert!(
        !accepted(&listener),
        "the refused connection never reaches accept()"
    );

    let seen = p.events();
    let refusal = seen
        .iter()
        .find(|e| e.hook == "ingress" && e.verdict == "deny")
        .unwrap_or_else(|| panic!("a deny event for the refused source: {seen:#?}"));
    assert_eq!(refusal.direction, "ingress");
    assert_eq!(refusal.src_ip, Some(ip(refused)), "{refusal:?}");
    assert_eq!(refusal.dst_port, Some(dest.port()), "{refusal:?}");
    assert_eq!(refusal.protocol, "tcp");
    assert_eq!(refusal.pod_cgroup_id, p.cgroup_id);
    assert_eq!(refusal.policy_id, INGRESS);
    assert!(refusal.src_port.is_some_and(|port| port != 0), "{refusal:?}");
    // The listening process: this one created the listener (the packet was judged in
    // softirq, where the current task is the client's).
    assert_eq!(refusal.pid, std::process::id(), "{refusal:?}");
    assert!(!refusal.comm.is_empty(), "{refusal:?}");
    assert!(
        !seen.iter().any(|e| e.src_ip == Some(ip(allowed))),
        "the allowed source is no violation: {seen:#?}"
    );
    assert!(p.count(VERDICT_DENY) >= 1);
    assert!(p.count(VERDICT_ALLOW) >= 1);
}

#[test]
fn tcp_listener_admits_only_allowed_sources_ipv4() {
    let rules = entries(&[("127.0.0.2/32", all())], &[]);
    let mut p = pod("ing-tcp4", &rules, MODE_ENFORCE);
    tcp_round(&mut p, "127.0.0.1:0", "127.0.0.1", "127.0.0.2", "127.0.0.3");
}

#[test]
fn tcp_listener_admits_only_allowed_sources_v4_mapped() {
    // An AF_INET6 listener on [::] accepting IPv4 clients: judged as IPv4.
    let rules = entries(&[("127.0.0.2/32", all())], &[("::/0", all())]);
    let mut p = pod("ing-tcpm", &rules, MODE_ENFORCE);
    tcp_round(&mut p, "[::]:0", "127.0.0.1", "127.0.0.2", "127.0.0.3");
}

#[test]
fn tcp_listener_ipv6_follows_the_allowlist_and_its_except() {
    // ::1 is the only IPv6 loopback source: allowed first, then cut out by an except.
    let open = entries(&[], &[("::/0", all())]);
    let mut p = pod("ing-tcp6", &open, MODE_ENFORCE);
    let listener = p.inside(|| TcpListener::bind("[::1]:0").unwrap());
    let dest = listener.local_addr().unwrap();
    inbound::connect_from(ip("::1"), dest).expect("allowed");
    assert!(accepted(&listener));
    let with_except = entries(&[], &[("::/0", all()), ("::1/128", PortSet::default())]);
    p.set_ingress(&open, &with_except);
    let error = inbound::connect_from(ip("::1"), dest).expect_err("refused by the except");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    assert!(!accepted(&listener));
    assert!(p.count(VERDICT_DENY) >= 1);
}

#[test]
fn ports_are_the_pods_own() {
    let listener_port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let only = |port: u16| PortSet {
        count: 1,
        ranges: {
            let mut r = [pipeguard_common::PortRange::default(); pipeguard_common::MAX_PORT_RANGES];
            r[0] = pipeguard_common::PortRange {
                start: port,
                end: port,
                protocol: PROTO_TCP,
                _pad: [0; 3],
            };
            r
        },
        ..PortSet::default()
    };
    let rules = entries(&[("127.0.0.0/8", only(listener_port))], &[]);
    let p = pod("ing-ports", &rules, MODE_ENFORCE);
    let (on_port, other) = p.inside(|| {
        (
            TcpListener::bind(("127.0.0.1", listener_port)).unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        )
    });
    inbound::connect_from(ip("127.0.0.2"), on_port.local_addr().unwrap()).expect("the allowed port");
    assert!(accepted(&on_port));
    inbound::connect_from(ip("127.0.0.2"), other.local_addr().unwrap()).expect_err("another port of the pod");
    assert!(!accepted(&other));
}

#[test]
fn replies_to_the_pods_own_connections_pass() {
    // Nothing is allowed in, yet everything the pod opened gets its answers.
    let p = pod("ing-replies", &PolicyEntries::default(), MODE_ENFORCE);
    let server = TcpListener::bind("127.0.0.4:0").unwrap();
    let peer = UdpSocket::bind("127.0.0.4:0").unwrap();
    let (mut tcp, unconnected, connected) = p.inside(|| {
        (
            TcpStream::connect_timeout(&server.local_addr().unwrap(), CONNECT_WAIT),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        )
    });
    let mut tcp = tcp
        .as_mut()
        .map(|s| s.try_clone().unwrap())
        .expect("the pod connects out");
    let (mut theirs, _) = server.accept().unwrap();
    theirs.write_all(b"answer").unwrap();
    tcp.set_read_timeout(Some(CONNECT_WAIT)).unwrap();
    let mut buf = [0u8; 16];
    let n = tcp.read(&mut buf).expect("the server's answer reaches the pod");
    assert_eq!(&buf[..n], b"answer");

    for socket in [&unconnected, &connected] {
        socket.set_read_timeout(Some(CONNECT_WAIT)).unwrap();
    }
    unconnected.send_to(b"q", peer.local_addr().unwrap()).unwrap();
    connected.connect(peer.local_addr().unwrap()).unwrap();
    connected.send(b"q").unwrap();
    for _ in 0..2 {
        let (_, from) = peer.recv_from(&mut buf).unwrap();
        peer.send_to(b"a", from).unwrap();
    }
    assert!(
        unconnected.recv_from(&mut buf).is_ok(),
        "the answer to sendto passes"
    );
    assert!(
        connected.recv(&mut buf).is_ok(),
        "the answer to a connected socket passes"
    );

    // A datagram from the same peer to a socket that never sent there is new inbound.
    let quiet = p.inside(|| UdpSocket::bind("127.0.0.1:0").unwrap());
    quiet.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    peer.send_to(b"unasked", quiet.local_addr().unwrap()).unwrap();
    assert!(
        quiet.recv_from(&mut buf).is_err(),
        "an unasked datagram is refused"
    );
    assert_eq!(p.count(VERDICT_DENY), 1, "only the unasked datagram");
}

#[test]
fn udp_admits_only_allowed_sources() {
    for (name, bind, allowed, refused) in [
        ("ing-udp4", "127.0.0.1:0", "127.0.0.2:0", "127.0.0.3:0"),
        ("ing-udpm", "[::]:0", "127.0.0.2:0", "127.0.0.3:0"),
    ] {
        let rules = entries(&[("127.0.0.2/32", all())], &[]);
        let mut p = pod(name, &rules, MODE_ENFORCE);
        let socket = p.inside(|| UdpSocket::bind(bind).unwrap());
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let to = SocketAddr::new(ip("127.0.0.1"), socket.local_addr().unwrap().port());
        let mut buf = [0u8; 16];
        UdpSocket::bind(refused).unwrap().send_to(b"no", to).unwrap();
        UdpSocket::bind(allowed).unwrap().send_to(b"yes", to).unwrap();
        let (n, from) = socket.recv_from(&mut buf).expect("the allowed datagram");
        assert_eq!(&buf[..n], b"yes", "from {from}");
        assert!(
            socket.recv_from(&mut buf).is_err(),
            "the refused datagram never arrives"
        );
        let seen = p.events();
        assert!(
            seen.iter().any(|e| e.hook == "ingress"
                && e.protocol == "udp"
                && e.src_ip == Some(ip("127.0.0.3"))
                && e.pid == std::process::id()),
            "a refusal naming the receiving process: {seen:#?}"
        );
        drop(p);
    }
}

#[test]
fn the_pods_own_traffic_to_itself_passes() {
    // A job connecting to the server it started: no rule names loopback, yet it passes.
    let p = pod("ing-self", &PolicyEntries::default(), MODE_ENFORCE);
    let (listener, client, receiver, sender) = p.inside(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = inbound::connect_from(ip("127.0.0.3"), listener.local_addr().unwrap());
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.3:0").unwrap();
        (listener, client, receiver, sender)
    });
    client.expect("the pod reaches its own listener");
    assert!(accepted(&listener));
    receiver.set_read_timeout(Some(CONNECT_WAIT)).unwrap();
    sender.send_to(b"self", receiver.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 8];
    assert!(receiver.recv_from(&mut buf).is_ok(), "its own datagram arrives");
    assert_eq!(p.count(VERDICT_DENY), 0, "its own traffic is never refused");
    // The same source address from outside the pod is refused.
    let error = inbound::connect_from(ip("127.0.0.3"), listener.local_addr().unwrap()).expect_err("outside");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    assert!(
        p.count(VERDICT_DENY) >= 1,
        "the outside SYN (and its retransmissions)"
    );
}

#[test]
fn audit_mode_reports_without_dropping() {
    let mut p = pod("ing-audit", &PolicyEntries::default(), MODE_AUDIT);
    let listener = p.inside(|| TcpListener::bind("127.0.0.1:0").unwrap());
    inbound::connect_from(ip("127.0.0.3"), listener.local_addr().unwrap()).expect("audit never drops");
    assert!(accepted(&listener));
    let seen = p.events();
    assert!(
        seen.iter()
            .any(|e| e.hook == "ingress" && e.verdict == "audit" && e.src_ip == Some(ip("127.0.0.3"))),
        "{seen:#?}"
    );
    assert!(p.count(VERDICT_AUDIT) >= 1);
    assert_eq!(p.count(VERDICT_DENY), 0);
}

#[test]
fn pods_not_isolated_for_ingress_are_unaffected() {
    let mut p = pod("ing-open", &PolicyEntries::default(), MODE_ENFORCE);
    let cgroup_id = p.cgroup_id;
    p.engine
        .put_pod(
            cgroup_id,
            PodEntry {
                policy_id: EGRESS,
                mode: MODE_ENFORCE,
                flags: 0,
                ingress_policy_id: INGRESS,
                ..PodEntry::default()
            },
        )
        .unwrap();
    let listener = p.inside(|| TcpListener::bind("127.0.0.1:0").unwrap());
    inbound::connect_from(ip("127.0.0.3"), listener.local_addr().unwrap()).expect("not isolated");
    assert!(accepted(&listener));
    assert_eq!(
        p.count(VERDICT_DENY) + p.count(VERDICT_ALLOW),
        0,
        "not even judged"
    );
}

/// A listener's record keeps its pod's entry once a handshake walked to the pod, and the
/// source it admitted last (its next handshakes skip the walk and the trie): a change of the
/// pod's entry, or of its allowlist, after that still reaches the listener's next
/// connection.
#[test]
fn a_listener_follows_changes_made_after_it_accepted() {
    let first = entries(&[("127.0.0.2/32", all())], &[]);
    let mut p = pod("ing-change", &first, MODE_ENFORCE);
    let (listener, dest) = p.listener_admitting(3);

    // The record also remembers the source it admitted last (127.0.0.2): a second attempt
    // finds the entry written again by the first, and the remembered source must not count.
    let second = entries(&[("127.0.0.3/32", all())], &[]);
    p.set_ingress(&first, &second);
    for _ in 0..2 {
        inbound::connect_from(ip("127.0.0.2"), dest).expect_err("revoked by the change");
        assert!(!accepted(&listener));
    }
    inbound::connect_from(ip("127.0.0.3"), dest).expect("allowed since the change");
    assert!(accepted(&listener));

    let cgroup_id = p.cgroup_id;
    p.engine.put_pod(cgroup_id, isolated(MODE_AUDIT)).unwrap();
    inbound::connect_from(ip("127.0.0.2"), dest).expect("audit mode refuses nothing");
    assert!(accepted(&listener));
    assert!(
        p.count(VERDICT_AUDIT) >= 1,
        "the audited handshake is counted as such"
    );

    p.engine.put_pod(cgroup_id, isolated(MODE_ENFORCE)).unwrap();
    inbound::connect_from(ip("127.0.0.2"), dest).expect_err("enforced again");
    assert!(!accepted(&listener));
}

/// The source a listener's record remembers carries only the generation's low 16 bits:
/// rewriting the record's pod entry forgets it, so 65,536 writes later (or any multiple)
/// it still admits nothing.
#[test]
fn a_remembered_source_does_not_outlive_its_generation() {
    let allowing = entries(&[("127.0.0.2/32", all())], &[]);
    let mut p = pod("ing-wrap", &allowing, MODE_ENFORCE);
    let (listener, dest) = p.listener_admitting(2);
    let admitted_under = p.engine.policy_generation().unwrap();

    p.set_ingress(&allowing, &entries(&[("127.0.0.3/32", all())], &[]));
    let cgroup_id = p.cgroup_id;
    let moved = p.engine.policy_generation().unwrap() - admitted_under;
    // Each write moves the generation by one.
    for _ in 0..(65_536 - moved % 65_536) % 65_536 {
        p.engine.put_pod(cgroup_id, isolated(MODE_ENFORCE)).unwrap();
    }
    let now = p.engine.policy_generation().unwrap();
    assert_eq!((now - admitted_under) % 65_536, 0, "{now} vs {admitted_under}");
    assert_ne!(now, admitted_under);

    // The first attempt finds the entry outdated and writes it again; the second reads it.
    for _ in 0..2 {
        inbound::connect_from(ip("127.0.0.2"), dest).expect_err("refused since the change");
        assert!(!accepted(&listener));
    }
}

/// `pipeguard exec` with an ingress policy: the job's listener admits 127.0.0.0/8 except
/// 127.0.0.3; the refused client never reaches accept(), the allowed one does, and the
/// refusal is an ingress event in the job's stream.
#[test]
fn pipeguard_exec_judges_the_jobs_listeners() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::require_kernel();
    let dir = std::env::temp_dir().join(format!("pg-ingress-exec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 127.0.0.0/8, except: [127.0.0.3/32]}}]\n",
    )
    .unwrap();
    let events = dir.join("events.jsonl");
    let port_file = dir.join("port");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["exec", "--policy"])
        .arg(&policy)
        .args(["--namespace", "ci", "--events"])
        .arg(&events)
        .arg("--")
        .args(common::probe_argv())
        .env(
            common::probe::ACTIONS_ENV,
            format!("tcp-accept-one 127.0.0.1:0 {}", port_file.display()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pipeguard exec");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let port: u16 = loop {
        if let Ok(text) = std::fs::read_to_string(&port_file) {
            break text.parse().expect("port file");
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the job exited before listening: {status}");
        }
        assert!(std::time::Instant::now() < deadline, "the job never listened");
        std::thread::sleep(Duration::from_millis(10));
    };
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let error = inbound::connect_from(ip("127.0.0.3"), server).expect_err("the except is refused");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    let mut ok = inbound::connect_from(ip("127.0.0.2"), server).expect("an allowed source connects");
    ok.write_all(b"allowed\n").unwrap();
    let output = child.wait_with_output().unwrap();
    let outcomes = common::parse_outcomes(&output);
    assert!(
        outcomes.iter().any(|o| o.action == "accepted:allowed"),
        "the job accepted the allowed client first: {outcomes:#?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refusal = events
        .iter()
        .find(|e| {
            e["direction"] == "ingress"
                && e["verdict"] == "deny"
                && e["src_ip"] == "127.0.0.3"
                && e["dst_port"] == port
        })
        .unwrap_or_else(|| panic!("{events:#?}"));
    // The job's listening process: the probe, whose listener was created by the thread
    // libtest runs `probe_main` in (named after the test), and its pid, none of ours.
    assert_eq!(refusal["comm"], "probe_main", "{refusal}");
    let pid = refusal["pid"].as_u64().expect("a pid");
    assert!(pid != 0 && pid != u64::from(std::process::id()), "{refusal}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a restarted agent adopts from pinned maps: the ingress half is read back into its
/// allowlist (same id, top bit), so the first sync changes it in the hole-free order.
#[test]
fn the_ingress_half_is_read_back_with_its_allowlist() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::require_kernel();
    let mut engine = Engine::load(&EngineConfig::default()).expect("load the eBPF programs");
    let mut written = entries(&[("10.0.0.0/8", all())], &[]);
    written.ingress = Some(pipeguard::engine::IngressEntries {
        v4: vec![
            ("127.0.0.0/8".parse().unwrap(), all()),
            ("127.0.0.3/32".parse().unwrap(), PortSet::default()),
        ],
        v6: vec![("::1/128".parse().unwrap(), all())],
    });
    engine.put_policy(7, &written).unwrap();
    let read = engine.policies().unwrap();
    assert_eq!(read.len(), 1, "one allowlist, not two: {read:?}");
    assert_eq!(read[&7], written);
    // Only-ingress changes are applied in place, and deleting removes both halves.
    let mut changed = written.clone();
    changed.ingress.as_mut().unwrap().v4.pop();
    engine.replace_policy(7, &written, &changed).unwrap();
    assert_eq!(engine.policies().unwrap()[&7], changed);
    engine.delete_policy(7, &changed).unwrap();
    assert!(engine.policies().unwrap().is_empty());
}

/// `pipeguard exec FLAGS... -- probe tcp-accept-all` listening on 127.0.0.1:`port`, with
/// `policy`; returns the running exec and the file that stops the job's listener.
fn exec_listener(
    dir: &std::path::Path,
    policy: &str,
    flags: &[String],
    port: u16,
) -> (std::process::Child, std::path::PathBuf) {
    let policy_file = dir.join("policy.yaml");
    std::fs::write(&policy_file, policy).unwrap();
    let (port_file, stop_file) = (dir.join(format!("port-{port}")), dir.join(format!("stop-{port}")));
    let _ = std::fs::remove_file(&port_file);
    let _ = std::fs::remove_file(&stop_file);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["exec", "--namespace", "ci", "--policy"])
        .arg(&policy_file)
        .args(flags)
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--")
        .args(common::probe_argv())
        .env(
            common::probe::ACTIONS_ENV,
            format!(
                "tcp-accept-all 127.0.0.1:{port} {} {}",
                port_file.display(),
                stop_file.display()
            ),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pipeguard exec");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !port_file.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the job exited before listening: {status}");
        }
        assert!(std::time::Instant::now() < deadline, "the job never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, stop_file)
}

/// Stops the job's listener; how many connections it accepted from `source`.
fn accepted_from(child: std::process::Child, stop_file: &std::path::Path, source: &str) -> u32 {
    std::fs::write(stop_file, "").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    common::parse_outcomes(&output)
        .iter()
        .find_map(|o| o.action.strip_prefix(&format!("accepted-from:{source}:")))
        .map_or(0, |n| n.parse().unwrap())
}

/// Named ports in `exec` are the job's declared container ports (`--port NAME=PORT`): the
/// policy's `{port: cache}` admits the allowed source on the port `cache` names and on no
/// other; a name no `--port` declares stops the command from running, naming policy and
/// field.
#[test]
fn pipeguard_exec_named_ports_are_the_jobs_declared_ports() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::require_kernel();
    let dir = std::env::temp_dir().join(format!("pg-ingress-named-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 127.0.0.2/32}}]\n    ports: [{port: cache}]\n";
    let free = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, other) = (free(), free());
    let at = SocketAddr::new(ip("127.0.0.1"), port);

    // `cache` is the port the job listens on: the allowed source gets in.
    let flags = ["--port".to_string(), format!("cache={port}")];
    let (child, stop) = exec_listener(&dir, policy, &flags, port);
    inbound::connect_from(ip("127.0.0.2"), at).expect("the named port admits the allowed source");
    assert_eq!(accepted_from(child, &stop, "127.0.0.2"), 1);

    // `cache` names another port (and UDP's would not count): the listener is closed to it.
    let flags = [
        "--port".to_string(),
        format!("cache={other}"),
        "--port".to_string(),
        format!("cache-udp={port}/UDP"),
    ];
    let (child, stop) = exec_listener(&dir, policy, &flags, port);
    let error = inbound::connect_from(ip("127.0.0.2"), at).expect_err("not the named port");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    assert_eq!(accepted_from(child, &stop, "127.0.0.2"), 0);

    // Undeclared: fail closed before running anything.
    let policy_file = dir.join("policy.yaml");
    let ran = dir.join("ran");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["exec", "--namespace", "ci", "--policy"])
        .arg(&policy_file)
        .args(["--", "touch"])
        .arg(&ran)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains(
            "policy ci/in: spec.ingress[0].ports[0].port: named port \"cache\" (TCP) is not a port of the job"
        ),
        "{stderr}"
    );
    assert!(!ran.exists(), "the command ran");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pipeguard exec --mode audit`: the job's listener is reached by the source its policy
/// refuses, and the attempt is reported as an ingress event with verdict `audit`.
#[test]
fn pipeguard_exec_audits_ingress_without_refusing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::require_kernel();
    let dir = std::env::temp_dir().join(format!("pg-ingress-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 127.0.0.2/32}}]\n";
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let flags = ["--mode".to_string(), "audit".to_string()];
    let (child, stop) = exec_listener(&dir, policy, &flags, port);
    inbound::connect_from(ip("127.0.0.3"), SocketAddr::new(ip("127.0.0.1"), port))
        .expect("audit never refuses");
    assert_eq!(accepted_from(child, &stop, "127.0.0.3"), 1);
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap_or_default();
    let audited: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["direction"] == "ingress")
        .collect();
    assert!(
        audited
            .iter()
            .any(|e| e["verdict"] == "audit" && e["src_ip"] == "127.0.0.3" && e["dst_port"] == port),
        "{events}"
    );
    assert!(!audited.iter().any(|e| e["verdict"] == "deny"), "{events}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw IPv4 socket for IPPROTO_SCTP (this kernel has no SCTP module, so no SCTP socket).
fn raw_sctp() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    assert!(fd >= 0, "raw SCTP socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// An SCTP packet (common header and an INIT chunk) from `source` to 127.0.0.1:`port`,
/// sent through a raw socket outside the pod (the kernel adds the IP header).
fn send_sctp(source: &str, src_port: u16, port: u16) {
    use std::os::fd::AsRawFd;
    let socket = raw_sctp();
    let (from, len) = common::probe::sockaddr(&SocketAddr::new(ip(source), 0));
    // SAFETY: a valid socket and address.
    assert_eq!(
        unsafe { libc::bind(socket.as_raw_fd(), (&raw const from).cast(), len) },
        0
    );
    let mut packet = Vec::new();
    packet.extend_from_slice(&src_port.to_be_bytes());
    packet.extend_from_slice(&port.to_be_bytes());
    packet.extend_from_slice(&[0; 8]); // verification tag 0 (INIT), checksum
    // INIT: type 1, flags, length 20, initiate tag, a_rwnd, streams out/in, initial TSN.
    packet.extend_from_slice(&[1, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]);
    let (to, len) = common::probe::sockaddr(&SocketAddr::new(ip("127.0.0.1"), 0));
    // SAFETY: a valid socket, buffer and address.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const to).cast(),
            len,
        )
    };
    assert_eq!(sent, packet.len() as isize, "{}", std::io::Error::last_os_error());
}

/// The destination ports of the SCTP packets `socket` receives within a short wait.
fn sctp_ports_received(socket: &std::os::fd::OwnedFd) -> Vec<u16> {
    use std::os::fd::AsRawFd;
    let mut ports = Vec::new();
    loop {
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 500) } <= 0 {
            return ports;
        }
        let mut buf = [0u8; 256];
        // SAFETY: a valid socket and buffer.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n > 0, "{}", std::io::Error::last_os_error());
        // A raw IPv4 socket receives the IP header too.
        let at = usize::from(buf[0] & 0xf) * 4;
        ports.push(u16::from_be_bytes([buf[at + 2], buf[at + 3]]));
    }
}

/// SCTP is judged by port. This kernel has no SCTP module, so the pod's receiver is a raw
/// IPPROTO_SCTP socket: the kernel hands it every inbound SCTP packet, through the same
/// cgroup_skb ingress hook an SCTP socket's receive path (sctp_rcv → sk_filter) runs.
/// Crafted SCTP packets from outside the pod: to the allowed port from the allowed source
/// it arrives; to another port, or from another source, it is refused and reported as sctp.
#[test]
fn sctp_is_judged_by_port() {
    let (allowed, other) = (3868, 3869);
    let only = PortSet {
        count: 1,
        ranges: {
            let mut r = [pipeguard_common::PortRange::default(); pipeguard_common::MAX_PORT_RANGES];
            r[0] = pipeguard_common::PortRange {
                start: allowed,
                end: allowed,
                protocol: pipeguard_common::PROTO_SCTP,
                _pad: [0; 3],
            };
            r
        },
        ..PortSet::default()
    };
    let rules = entries(&[("127.0.0.2/32", only)], &[]);
    let mut p = pod("ing-sctp", &rules, MODE_ENFORCE);
    let receiver = p.inside(raw_sctp);
    send_sctp("127.0.0.2", 5000, other);
    send_sctp("127.0.0.3", 5000, allowed);
    send_sctp("127.0.0.2", 5000, allowed);
    assert_eq!(
        sctp_ports_received(&receiver),
        [allowed],
        "only the allowed source on the allowed port"
    );
    let seen = p.events();
    for (source, port) in [("127.0.0.2", other), ("127.0.0.3", allowed)] {
        assert!(
            seen.iter().any(|e| e.hook == "ingress"
                && e.verdict == "deny"
                && e.protocol == "sctp"
                && e.src_ip == Some(ip(source))
                && e.dst_port == Some(port)
                && e.src_port == Some(5000)),
            "a refusal of {source} on {port}/sctp: {seen:#?}"
        );
    }
    assert_eq!(p.count(VERDICT_DENY), 2);
}

/// Restart without a gap, for ingress: the pinned programs and maps keep refusing and
/// admitting inbound connections while no engine runs, and a second engine adopts the pod
/// and its ingress allowlist; removing the pins opens the listener again.
#[test]
fn pinned_ingress_enforcement_outlives_the_engine_and_is_adopted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bpffs = common::Bpffs::mount("ingress-pins");
    let cgroup = test_cgroup("ing-pins");
    let cgroup_id = cgroup.id().unwrap();
    let config = EngineConfig {
        pin_dir: Some(bpffs.pin_dir()),
        ..EngineConfig::default()
    };
    let rules = entries(&[("127.0.0.2/32", all())], &[]);
    let entry = isolated(MODE_ENFORCE);
    {
        let mut engine = Engine::load(&config).expect("load with pins");
        engine
            .put_policy(EGRESS, &entries(&[("0.0.0.0/0", all())], &[("::/0", all())]))
            .unwrap();
        engine.put_policy(INGRESS, &rules).unwrap();
        engine.put_pod(cgroup_id, entry).unwrap();
        engine.attach(cgroup.path()).unwrap();
    }
    // No engine now: only the pins hold the programs and maps.
    let listener = common::inside(cgroup.path(), || TcpListener::bind("127.0.0.1:0").unwrap());
    let dest = listener.local_addr().unwrap();
    let admitted_and_refused = |when: &str| {
        inbound::connect_from(ip("127.0.0.2"), dest)
            .unwrap_or_else(|e| panic!("{when}: the allowed source connects: {e}"));
        assert!(
            accepted(&listener),
            "{when}: the allowed connection reaches accept()"
        );
        let error =
            inbound::connect_from(ip("127.0.0.3"), dest).expect_err("a refused source never connects");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{when}: {error}");
        assert!(
            !accepted(&listener),
            "{when}: the refused connection never reaches accept()"
        );
    };
    admitted_and_refused("without an engine");

    let mut engine = Engine::load(&config).expect("a second engine reuses the pinned maps");
    assert!(
        engine.pods().unwrap().contains(&(cgroup_id, entry)),
        "the pod and its ingress isolation survived"
    );
    assert_eq!(
        engine.policies().unwrap().get(&INGRESS),
        Some(&rules),
        "the ingress allowlist survived"
    );
    engine.attach(cgroup.path()).expect("update the pinned links");
    admitted_and_refused("adopted");
    drop(engine);

    pipeguard::engine::pins::remove_all(&bpffs.pin_dir()).unwrap();
    inbound::connect_from(ip("127.0.0.3"), dest).expect("programs are detached after removal");
    assert!(accepted(&listener));
}
