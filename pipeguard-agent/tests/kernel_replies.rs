//! Replies pass, nothing else does: a guarded job whose policy allows none of its clients
//! still answers them (TCP connections it accepted, UDP datagrams it received), and cannot
//! use that to reach anything else. The engine against the real kernel, with real sockets;
//! needs root and cgroup2, fails (never skips) without them.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use common::{listeners, probe::Outcome, probe_command, test_cgroup};
use pipeguard::{
    cgroup::OwnedCgroup,
    engine::{Engine, EngineConfig, events},
};
use pipeguard_common::{
    Hook, MODE_ENFORCE, POD_DENY_RAW_SOCKETS, PROTO_TCP, PROTO_UDP, PodEntry, VERDICT_ALLOW, VERDICT_DENY,
};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

const POLICY: u32 = 11;
/// Time for a leaked packet to arrive before we conclude none did.
const LEAK_WAIT: Duration = Duration::from_millis(300);

struct Guarded {
    engine: Engine,
    cgroup: OwnedCgroup,
    cgroup_id: u64,
    dir: PathBuf,
}

/// A job whose policy allows only 127.0.0.6 (nothing listens there): none of the clients
/// below is allowed as a destination.
fn guard(name: &str) -> Guarded {
    let cgroup = test_cgroup(name);
    let mut engine = Engine::load(&EngineConfig::default()).expect("load the eBPF programs");
    let cgroup_id = cgroup.id().unwrap();
    engine
        .put_policy(
            POLICY,
            &common::allow_only("127.0.0.6/32", 9, &[PROTO_TCP, PROTO_UDP]),
        )
        .unwrap();
    engine
        .put_pod(
            cgroup_id,
            PodEntry {
                policy_id: POLICY,
                mode: MODE_ENFORCE,
                flags: POD_DENY_RAW_SOCKETS,
                ..PodEntry::default()
            },
        )
        .unwrap();
    engine.attach(cgroup.path()).expect("attach to the test cgroup");
    let dir = std::env::temp_dir().join(format!("pg-replies-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Guarded {
        engine,
        cgroup,
        cgroup_id,
        dir,
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Guarded {
    fn serve(&self, action: String) -> Child {
        probe_command(self.cgroup.path(), &[action])
            .spawn()
            .expect("spawn probe")
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn count(&self, hook: Hook, verdict: u8) -> u64 {
        self.engine
            .counters(self.cgroup_id)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.hook == hook as u8 && k.verdict == verdict)
            .map(|(_, c)| c.packets)
            .sum()
    }
}

/// The port the probe published, once it is listening.
fn published_port(path: &str, child: &mut Child) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text.parse().expect("port file");
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the probe exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "the probe never published its port");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn finish(child: Child) -> Vec<Outcome> {
    let output = child.wait_with_output().expect("wait for probe");
    assert!(
        output.status.success(),
        "probe failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    common::parse_outcomes(&output)
}

fn outcome<'a>(outcomes: &'a [Outcome], step: &str) -> &'a Outcome {
    outcomes
        .iter()
        .find(|o| o.action.ends_with(&format!(":{step}")))
        .unwrap_or_else(|| panic!("no outcome for {step} in {outcomes:#?}"))
}

fn drain_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<events::Violation> {
    let clock = events::Clock::now();
    let mut seen = Vec::new();
    while let Some(item) = ring.next() {
        seen.extend(events::decode(&item, &clock));
    }
    seen
}

/// One UDP round: the client outside the job sends, the job answers (twice: sendto, then
/// connected), then tries the abuses `udp-serve` lists; the window is closed before the
/// last one.
fn udp_round(name: &str, bind: &str, client_bind: &str, server_ip: &str, third_bind: &str) {
    let mut g = guard(name);
    let mut ring = g.engine.take_events().unwrap();
    let third = listeners::udp(third_bind);
    let (port_file, flag) = (g.file("port"), g.file("expired"));
    let mut child = g.serve(format!("udp-serve {bind} {port_file} {} {flag}", third.addr));
    let port = published_port(&port_file, &mut child);
    let server: SocketAddr = format!("{server_ip}:{port}").parse().unwrap();

    let client = UdpSocket::bind(client_bind).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.send_to(b"ping", server).unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = client.recv_from(&mut buf).expect("the job's answer");
    assert_eq!(&buf[..n], b"reply:ping", "answer from {from}");
    let (n, _) = client.recv_from(&mut buf).expect("the job's connected answer");
    assert_eq!(&buf[..n], b"connected-reply");

    // Close the window for replies already recorded, then let the job try again.
    g.engine.set_reply_window(Duration::ZERO).unwrap();
    std::fs::write(&flag, "").unwrap();
    let outcomes = finish(child);

    assert!(outcome(&outcomes, "reply").ok, "{outcomes:#?}");
    assert!(outcome(&outcomes, "connected-reply").ok, "{outcomes:#?}");
    for refused in ["third", "other-socket", "expired"] {
        assert!(
            outcome(&outcomes, refused).denied_with_eperm(),
            "{refused} must be refused with EPERM: {outcomes:#?}"
        );
    }
    client.set_read_timeout(Some(LEAK_WAIT)).unwrap();
    assert!(
        client.recv_from(&mut buf).is_err(),
        "nothing else reached the client, got {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(third.received.bytes().is_empty(), "the third address got nothing");

    let seen = drain_events(&mut ring);
    let client_port = Some(client.local_addr().unwrap().port());
    assert!(
        !seen
            .iter()
            .any(|e| e.dst_port == client_port && e.hook == "egress"),
        "replies are no violations: {seen:#?}"
    );
    // The abuses are reported: the third address, and the client for the other socket
    // and after the window closed.
    assert!(
        seen.iter()
            .any(|e| e.dst_port == Some(third.addr.port()) && e.verdict == "deny"),
        "{seen:#?}"
    );
    let client_denials = seen
        .iter()
        .filter(|e| e.dst_port == client_port && e.verdict == "deny")
        .count();
    assert_eq!(client_denials, 2, "other socket and expired: {seen:#?}");
    // An AF_INET6 socket sending to an AF_INET address passes sendmsg4.
    let denied = g.count(Hook::Sendmsg4, VERDICT_DENY) + g.count(Hook::Sendmsg6, VERDICT_DENY);
    assert!(denied >= 3, "third, other socket, expired: {denied}");
    let replies = g.count(Hook::Egress, VERDICT_ALLOW);
    assert!(
        replies >= 2,
        "the two answers are counted as allowed packets: {replies}"
    );
}

#[test]
fn udp_replies_pass_over_ipv4() {
    udp_round("udp4", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1", "127.0.0.2:0");
}

#[test]
fn udp_replies_pass_over_ipv6() {
    udp_round("udp6", "[::1]:0", "[::1]:0", "[::1]", "[::1]:0");
}

#[test]
fn udp_replies_pass_over_v4_mapped_ipv6() {
    // An AF_INET6 socket talking to ::ffff:127.0.0.1.
    udp_round("udp-mapped", "[::]:0", "127.0.0.1:0", "127.0.0.1", "127.0.0.2:0");
}

/// A client outside the job of the job's `tcp-echo` server.
struct EchoClient {
    child: Child,
    client: TcpStream,
    reader: std::io::BufReader<TcpStream>,
}

impl EchoClient {
    /// Starts the server in the job and connects to it.
    fn start(g: &Guarded) -> Self {
        let port_file = g.file("port");
        let mut child = g.serve(format!("tcp-echo 127.0.0.1:0 {port_file}"));
        let port = published_port(&port_file, &mut child);
        let client = TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(5),
        )
        .expect("the job accepts");
        client.set_nodelay(true).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let reader = std::io::BufReader::new(client.try_clone().unwrap());
        Self {
            child,
            client,
            reader,
        }
    }

    /// Sends `line` (newline-terminated); the job's answer must be the same line.
    fn ask(&mut self, line: &str) {
        (&self.client).write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut self.reader, &mut answer)
            .unwrap_or_else(|e| panic!("the job's answer to {line:?}: {e}"));
        assert_eq!(answer, line);
    }

    /// Closes the connection and waits for the job: its outcomes.
    fn finish(self) -> Vec<Outcome> {
        drop((self.client, self.reader));
        finish(self.child)
    }
}

/// After its first reply found the pod, an accepted connection's replies are counted for
/// it without the pod walk (its record remembers the pod, `fast::remembered`): every answer
/// is still counted, none refused.
#[test]
fn every_reply_of_an_accepted_connection_is_counted() {
    const ROUNDS: u64 = 100;
    let g = guard("reply-count");
    let mut echo = EchoClient::start(&g);
    for round in 0..ROUNDS {
        echo.ask(&format!("round {round}\n"));
    }
    let outcomes = echo.finish();
    assert!(outcome(&outcomes, &ROUNDS.to_string()).ok, "{outcomes:#?}");
    // One segment per answer at least, plus the handshake and the close.
    let allowed = g.count(Hook::Egress, VERDICT_ALLOW);
    assert!(
        allowed > ROUNDS,
        "{allowed} reply packets counted for {ROUNDS} answers"
    );
    assert_eq!(g.count(Hook::Egress, VERDICT_DENY), 0);
}

/// An accepted connection's replies stay replies when the allowlist starts allowing its
/// peer too (the socket then remembers an allowlist verdict) and when it stops again.
#[test]
fn an_accepted_connection_outlives_an_allowlist_that_allowed_its_peer() {
    let mut g = guard("reply-revoked");
    let mut echo = EchoClient::start(&g);
    let client_port = echo.client.local_addr().unwrap().port();
    let peer = common::allow_only("127.0.0.1/32", client_port, &[PROTO_TCP]);
    let nothing = common::allow_only("127.0.0.6/32", 9, &[PROTO_TCP, PROTO_UDP]);
    let rounds = [
        ("reply", None),
        ("allowed too", Some((&nothing, &peer))),
        ("revoked", Some((&peer, &nothing))),
    ];
    for (round, change) in rounds {
        if let Some((old, new)) = change {
            g.engine.replace_policy(POLICY, old, new).unwrap();
        }
        // Several answers, so the socket judges and then remembers under each policy.
        for i in 0..3 {
            echo.ask(&format!("{round} {i}\n"));
        }
    }
    let outcomes = echo.finish();
    assert!(outcome(&outcomes, "9").ok, "{outcomes:#?}");
    assert_eq!(g.count(Hook::Egress, VERDICT_DENY), 0, "a reply was refused");
}

/// One TCP round: the client outside the job connects and sends a line, the job answers,
/// and tries the abuses `tcp-serve` lists.
fn tcp_round(name: &str, bind: &str, server_ip: &str, third_bind: &str) {
    let mut g = guard(name);
    let mut ring = g.engine.take_events().unwrap();
    let third = listeners::tcp(third_bind);
    let port_file = g.file("port");
    let mut child = g.serve(format!("tcp-serve {bind} {port_file} {}", third.addr));
    let port = published_port(&port_file, &mut child);
    let server: SocketAddr = format!("{server_ip}:{port}").parse().unwrap();

    let mut client = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .expect("the job's SYN-ACK reaches the client");
    let client_port = Some(client.local_addr().unwrap().port());
    client.write_all(b"ping\n").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    // The job aborts the connection after answering (accepted-reconnect): read until then.
    while !answer.ends_with(b"reply:ping\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(answer, b"reply:ping\n", "the job's answer");
    let outcomes = finish(child);

    assert!(outcome(&outcomes, "reply").ok, "{outcomes:#?}");
    assert!(!outcome(&outcomes, "listener-connect").ok, "{outcomes:#?}");
    for refused in ["unrelated", "listener-reconnect", "accepted-reconnect"] {
        assert!(
            outcome(&outcomes, refused).denied_with_eperm(),
            "{refused} must be refused with EPERM: {outcomes:#?}"
        );
    }
    std::thread::sleep(LEAK_WAIT);
    assert!(third.received.bytes().is_empty(), "the third address got nothing");

    let seen = drain_events(&mut ring);
    assert!(
        !seen.iter().any(|e| e.dst_port == client_port),
        "replies are no violations: {seen:#?}"
    );
    let third_denials = seen
        .iter()
        .filter(|e| e.dst_port == Some(third.addr.port()) && e.verdict == "deny")
        .count();
    assert_eq!(
        third_denials, 3,
        "unrelated, listener and accepted socket: {seen:#?}"
    );
    let replies = g.count(Hook::Egress, VERDICT_ALLOW);
    assert!(
        replies >= 2,
        "SYN-ACK and answer are counted as allowed packets: {replies}"
    );
    assert_eq!(g.count(Hook::Egress, VERDICT_DENY), 0, "no reply was dropped");
}

#[test]
fn tcp_accepted_connections_answer_over_ipv4() {
    tcp_round("tcp4", "127.0.0.1:0", "127.0.0.1", "127.0.0.2:0");
}

#[test]
fn tcp_accepted_connections_answer_over_ipv6() {
    tcp_round("tcp6", "[::1]:0", "[::1]", "[::1]:0");
}

#[test]
fn tcp_accepted_connections_answer_over_v4_mapped_ipv6() {
    // An AF_INET6 listener accepting from ::ffff:127.0.0.1.
    tcp_round("tcp-mapped", "[::]:0", "127.0.0.1", "127.0.0.2:0");
}

/// The issue's reproduction through the real `pipeguard exec`: egress allowed only to
/// 127.0.0.6/32, the job listens on 127.0.0.1, a client outside connects and gets its
/// answer, and the replies are no violations.
#[test]
fn pipeguard_exec_job_answers_a_client_its_policy_does_not_allow() {
    common::require_kernel();
    let third = listeners::tcp("127.0.0.2:0");
    let dir = std::env::temp_dir().join(format!("pg-replies-exec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: only-127-0-0-6
  namespace: ci
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: 127.0.0.6/32
"#,
    )
    .unwrap();
    let events = dir.join("events.jsonl");
    let run = dir.join("run.json");
    let port_file = dir.join("port").display().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["exec", "--policy"])
        .arg(&policy)
        .args(["--namespace", "ci", "--events"])
        .arg(&events)
        .arg("--learn-json")
        .arg(&run)
        .arg("--")
        .args(common::probe_argv())
        .env(
            common::probe::ACTIONS_ENV,
            format!("tcp-serve 127.0.0.1:0 {port_file} {}", third.addr),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pipeguard exec");
    let port = published_port(&port_file, &mut child);

    let mut client = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(5),
    )
    .expect("the job accepts: its SYN-ACK is a reply");
    let client_port = client.local_addr().unwrap().port();
    client.write_all(b"ping\n").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    while !answer.ends_with(b"reply:ping\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let outcomes = finish(child);
    assert_eq!(
        answer, b"reply:ping\n",
        "the client gets its answer: {outcomes:#?}"
    );
    assert!(outcome(&outcomes, "reply").ok, "{outcomes:#?}");
    assert!(
        outcome(&outcomes, "unrelated").denied_with_eperm(),
        "{outcomes:#?}"
    );

    let events: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")))
        .collect();
    assert!(
        !events.iter().any(|e| e["dst_port"] == client_port),
        "no denial for the replies: {events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["dst_port"] == third.addr.port() && e["verdict"] == "deny"),
        "the job's own connect elsewhere is still refused and reported: {events:#?}"
    );
    // What the job learned: its own refused attempt, and not the client it answered,
    // whose address and ephemeral port are no destination of the job's.
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&run).unwrap()).unwrap();
    let ports: Vec<&serde_json::Value> = run["destinations"]
        .as_array()
        .unwrap_or_else(|| panic!("{run:#}"))
        .iter()
        .map(|d| &d["port"])
        .collect();
    assert!(!ports.contains(&&serde_json::json!(client_port)), "{run:#}");
    assert!(ports.contains(&&serde_json::json!(third.addr.port())), "{run:#}");
    let _ = std::fs::remove_dir_all(&dir);
}
