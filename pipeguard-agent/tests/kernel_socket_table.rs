//! The socket table (`PG_SOCKETS_V8`): a guarded pod's socket has a
//! record (its creating pod, its remembered verdict; an accepted connection's peer) from
//! socket() or accept until it is done, and none after: released at close() for UDP and
//! listeners, at TCP's CLOSE for connections (after their FIN or reset left). A record
//! that outlived its socket would fill the table. The engine against the real kernel;
//! needs root and cgroup2, fails (never skips) without them.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use common::test_cgroup;
use pipeguard::engine::{Engine, EngineConfig, UnknownPods};
use pipeguard_common::{Hook, MODE_ENFORCE, PROTO_TCP, PROTO_UDP, PodEntry, VERDICT_DENY};

const POLICY: u32 = 3;
const CONNECTIONS: usize = 12;

#[test]
fn socket_records_live_exactly_as_long_as_the_sockets() {
    common::require_kernel();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let sink = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let cgroup = test_cgroup("socket-table");
    let mut engine = Engine::load(&EngineConfig::default()).expect("load the eBPF programs");
    let cgroup_id = cgroup.id().unwrap();
    let entries = common::allow_only("127.0.0.1/32", port, &[PROTO_TCP, PROTO_UDP]);
    engine.put_policy(POLICY, &entries).unwrap();
    let pod = PodEntry {
        policy_id: POLICY,
        mode: MODE_ENFORCE,
        flags: 0,
        ..PodEntry::default()
    };
    engine.put_pod(cgroup_id, pod).unwrap();
    engine.attach(cgroup.path()).expect("attach to the test cgroup");
    let table = engine.sockets_reader().unwrap();
    let before = table.count();
    let accepted_before = table.accepted();

    // The pod's sockets: TCP clients (each sends and is answered), UDP senders, a listener.
    let (clients, senders, listener) = common::inside(cgroup.path(), || {
        let clients: Vec<TcpStream> = (0..CONNECTIONS)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("an allowed connection"))
            .collect();
        let senders: Vec<UdpSocket> = (0..CONNECTIONS)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(b"d", ("127.0.0.1", port)).expect("an allowed datagram");
                s
            })
            .collect();
        (clients, senders, TcpListener::bind("127.0.0.1:0").unwrap())
    });
    let served: Vec<TcpStream> = clients
        .iter()
        .map(|mut c| {
            c.write_all(b"q").unwrap();
            let (mut s, _) = server.accept().unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"a").unwrap();
            c.read_exact(&mut b).unwrap();
            s
        })
        .collect();
    // A connection the pod's listener accepted: its replies are marked by sock_ops (see
    // `reply`), and whatever it records goes with it too.
    let mut visitor = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    assert_eq!(
        table.accepted_pods(),
        vec![cgroup_id],
        "the accepted connection's record names its pod before any reply (handed over by the \
         ingress hook at the handshake's last ACK)"
    );
    for _ in 0..8 {
        let mut b = [0u8; 1];
        visitor.write_all(b"q").unwrap();
        accepted.read_exact(&mut b).unwrap();
        accepted.write_all(b"a").unwrap();
        visitor.read_exact(&mut b).unwrap();
    }
    let live = table.count() - before;
    let sockets = 2 * CONNECTIONS + 1;
    assert!(
        live >= sockets,
        "{live} records for {sockets} live sockets of the pod"
    );
    assert_eq!(
        table.accepted() - accepted_before,
        1,
        "the accepted connection's peer"
    );

    // The pod aborts the accepted connection (linger 0): its records go at CLOSE, and the
    // reset TCP sends after that still reaches the peer it was accepted from.
    linger_zero(&accepted);
    drop(accepted);
    visitor.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reset = visitor.read(&mut [0u8; 1]).map_err(|e| e.kind());
    assert_eq!(reset, Err(std::io::ErrorKind::ConnectionReset), "the pod's reset");
    let refused: u64 = engine
        .counters(cgroup_id)
        .unwrap()
        .iter()
        .filter(|(k, _)| k.hook == Hook::Egress as u8 && k.verdict == VERDICT_DENY)
        .map(|(_, c)| c.packets)
        .sum();
    assert_eq!(refused, 0, "nothing the pod sent was refused");

    // Half the clients close normally (FIN), half abort (linger 0: a reset after CLOSE).
    for (i, client) in clients.into_iter().enumerate() {
        if i % 2 == 1 {
            linger_zero(&client);
        }
        drop(client);
    }
    drop(served);
    drop((senders, listener, visitor));
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = || {
        (
            table.count().saturating_sub(before),
            table.accepted().saturating_sub(accepted_before),
        )
    };
    while left() != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        left(),
        (0, 0),
        "records (states, accepted peers) outlived their closed sockets"
    );
    drop(sink);
}

fn linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of_val(&linger) as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// A connection accepted in a cgroup the programs see but no pod owns gets no record (its
/// packets are never judged, so nothing asks whether they are replies), unless unknown pods
/// are denied: then its replies are judged, and the record is what lets them out.
#[test]
fn only_judged_sockets_get_records() {
    common::require_kernel();
    for unknown_pods in [UnknownPods::Allow, UnknownPods::Deny] {
        let cgroup = test_cgroup("socket-table-unowned");
        let mut engine = Engine::load(&EngineConfig {
            unknown_pods,
            ..EngineConfig::default()
        })
        .expect("load the eBPF programs");
        engine.attach(cgroup.path()).expect("attach to the test cgroup");
        let table = engine.sockets_reader().unwrap();
        let (before, accepted_before) = (table.count(), table.accepted());

        let listener = common::inside(cgroup.path(), || TcpListener::bind("127.0.0.1:0").unwrap());
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut served, _) = listener.accept().unwrap();
        let mut b = [0u8; 1];
        client.write_all(b"q").unwrap();
        served.read_exact(&mut b).unwrap();
        served.write_all(b"a").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        client
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("{unknown_pods:?}: the accepted connection's answer: {e}"));

        let deny = unknown_pods == UnknownPods::Deny;
        assert_eq!(
            table.accepted() - accepted_before,
            usize::from(deny),
            "{unknown_pods:?}: records of the accepted connection"
        );
        assert_eq!(
            table.count() - before,
            usize::from(deny),
            "{unknown_pods:?}: records of the cgroup's sockets (the listener has none: no pod created it)"
        );
        drop((client, served, listener));
    }
}
