//! Probe actions that serve from inside the guarded cgroup, for the reply tests: the job
//! receives first, answers, then tries to abuse what it learned. Each step is reported as
//! its own outcome, named `<action>:<step>`.
//!
//! The bound port is written to `PORTFILE` (atomically), so the test's client outside the
//! job knows where to connect.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use super::probe::{addr, check, report, sockaddr};

const WAIT: Duration = Duration::from_secs(10);

fn publish_port(path: &str, port: u16) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, port.to_string()).expect("write port file");
    std::fs::rename(&tmp, path).expect("publish port file");
}

fn wait_for_file(path: &str) {
    let deadline = Instant::now() + WAIT;
    while !Path::new(path).exists() {
        assert!(Instant::now() < deadline, "serve: the test never created {path}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `udp-serve BIND PORTFILE THIRD EXPIRED_FLAG`: receives one datagram from a peer, then
/// - `reply`: answers the peer with sendto (a reply: must pass);
/// - `connected-reply`: connects the same socket to the peer and sends (must pass), then
///   disconnects it again;
/// - `third`: sends from the same socket to THIRD, which never sent anything (refused);
/// - `other-socket`: a fresh socket sends to the peer (refused: the state is per socket);
/// - waits for EXPIRED_FLAG (the test closes the reply window), then `expired`: answers the
///   peer again (refused).
pub fn udp(bind: &str, rest: &str) {
    let args: Vec<&str> = rest.split_whitespace().collect();
    let [port_file, third, expired_flag] = args[..] else {
        panic!("udp-serve BIND PORTFILE THIRD EXPIRED_FLAG, got {rest:?}");
    };
    let socket = UdpSocket::bind(addr(bind)).expect("bind");
    socket.set_read_timeout(Some(WAIT)).unwrap();
    publish_port(port_file, socket.local_addr().unwrap().port());
    let mut buf = [0u8; 512];
    let (n, peer) = socket
        .recv_from(&mut buf)
        .expect("a datagram from the test's client");
    let answer = [b"reply:", &buf[..n]].concat();

    let step = |name: &str, f: &dyn Fn() -> std::io::Result<()>| {
        let started = Instant::now();
        report(&format!("udp-serve:{name}"), started, f());
    };
    step("reply", &|| socket.send_to(&answer, peer).map(drop));
    step("connected-reply", &|| {
        socket.connect(peer)?;
        let sent = socket.send(b"connected-reply").map(drop);
        disconnect(socket.as_raw_fd())?;
        sent
    });
    step("third", &|| socket.send_to(b"third-leak", addr(third)).map(drop));
    step("other-socket", &|| {
        let other = UdpSocket::bind(if peer.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        other.send_to(b"other-leak", peer).map(drop)
    });
    wait_for_file(expired_flag);
    step("expired", &|| socket.send_to(b"expired-leak", peer).map(drop));
}

/// `tcp-serve BIND PORTFILE THIRD`: accepts one connection, then
/// - `unrelated`: a new socket of the job connects to THIRD while the accepted connection
///   is open (refused);
/// - `reply`: reads a line from the client and answers it (must pass);
/// - `listener-connect`: connect() on the listening socket to THIRD (must fail);
/// - `listener-reconnect`: stops the listener with connect(AF_UNSPEC) and connects it to
///   THIRD (refused);
/// - `accepted-reconnect`: disconnects the accepted socket and connects it to THIRD
///   (refused: an accepted socket gains nothing once it is no longer that connection).
pub fn tcp(bind: &str, rest: &str) {
    let args: Vec<&str> = rest.split_whitespace().collect();
    let [port_file, third] = args[..] else {
        panic!("tcp-serve BIND PORTFILE THIRD, got {rest:?}");
    };
    let bind = addr(bind);
    // The job's AF_INET6 sockets name an IPv4 third address as ::ffff:a.b.c.d.
    let third = match (bind, addr(third)) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        (_, third) => third,
    };
    let listener = TcpListener::bind(bind).expect("bind");
    publish_port(port_file, listener.local_addr().unwrap().port());
    let (mut stream, _) = listener.accept().expect("a connection from the test's client");
    stream.set_read_timeout(Some(WAIT)).unwrap();

    let started = Instant::now();
    report("tcp-serve:unrelated", started, connect_fd(None, third));

    let started = Instant::now();
    let result = (|| {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\n") {
            if stream.read(&mut byte)? == 0 {
                break;
            }
            request.push(byte[0]);
        }
        stream.write_all(&[b"reply:", &request[..]].concat())?;
        stream.flush()
    })();
    report("tcp-serve:reply", started, result);

    let started = Instant::now();
    report(
        "tcp-serve:listener-connect",
        started,
        connect_fd(Some(listener.as_raw_fd()), third),
    );

    let started = Instant::now();
    let result =
        disconnect(listener.as_raw_fd()).and_then(|()| connect_fd(Some(listener.as_raw_fd()), third));
    report("tcp-serve:listener-reconnect", started, result);

    let started = Instant::now();
    let result = disconnect(stream.as_raw_fd()).and_then(|()| connect_fd(Some(stream.as_raw_fd()), third));
    report("tcp-serve:accepted-reconnect", started, result);
}

/// connect(AF_UNSPEC): dissolves a UDP association, or aborts a TCP connection and leaves
/// the socket reusable.
fn disconnect(fd: i32) -> std::io::Result<()> {
    // SAFETY: all-zero sockaddr is valid; only the family is read.
    let mut unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
    unspec.sa_family = libc::AF_UNSPEC as u16;
    // SAFETY: valid fd and address.
    check(unsafe { libc::connect(fd, &unspec, size_of::<libc::sockaddr>() as u32) } as isize)
}

/// connect() on `fd`, or on a fresh TCP socket of the target's family.
fn connect_fd(fd: Option<i32>, target: SocketAddr) -> std::io::Result<()> {
    let (name, len) = sockaddr(&target);
    match fd {
        Some(fd) => {
            // SAFETY: valid fd and address.
            check(unsafe { libc::connect(fd, (&raw const name).cast(), len) } as isize)
        }
        None => std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).map(|mut s| {
            let _ = s.write_all(b"unrelated-leak");
        }),
    }
}

/// `tcp-accept-one BIND PORTFILE`, for the ingress tests: listens, publishes its port,
/// accepts one connection and reports its first line as the outcome `accepted:<line>`
/// (the test connects from a refused source first: its connection must never be the one).
pub fn accept_one(bind: &str, port_file: &str) {
    let started = Instant::now();
    let listener = TcpListener::bind(addr(bind)).expect("bind");
    publish_port(port_file, listener.local_addr().unwrap().port());
    let (mut stream, _) = listener.accept().expect("accept");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    report(
        &format!("accepted:{}", String::from_utf8_lossy(&line)),
        started,
        Ok(()),
    );
}

/// `tcp-echo BIND PORTFILE`: listens, publishes its port, accepts one connection and
/// answers every line with itself until the peer closes, then reports `echo:<lines>`.
pub fn echo(bind: &str, port_file: &str) {
    let started = Instant::now();
    let listener = TcpListener::bind(addr(bind)).expect("bind");
    publish_port(port_file, listener.local_addr().unwrap().port());
    let (mut stream, _) = listener.accept().expect("accept");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone the stream"));
    let (mut line, mut lines) = (String::new(), 0);
    while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
        stream.write_all(line.as_bytes()).expect("answer");
        line.clear();
        lines += 1;
    }
    report(&format!("echo:{lines}"), started, Ok(()));
}

/// `tcp-accept-all BIND PORTFILE STOPFILE`, for the ingress restart test: listens, publishes
/// its port and accepts until STOPFILE exists, then reports how many connections came from
/// each source as outcomes `accepted-from:<ip>:<count>` (once at the end: the test reads
/// the output only then, and a full pipe would stop the accepting).
pub fn accept_all(bind: &str, rest: &str) {
    let args: Vec<&str> = rest.split_whitespace().collect();
    let [port_file, stop_file] = args[..] else {
        panic!("tcp-accept-all BIND PORTFILE STOPFILE, got {rest:?}");
    };
    let started = Instant::now();
    let listener = TcpListener::bind(addr(bind)).expect("bind");
    listener.set_nonblocking(true).unwrap();
    publish_port(port_file, listener.local_addr().unwrap().port());
    let mut sources = std::collections::BTreeMap::<IpAddr, u32>::new();
    loop {
        // Read before draining: connections completed before the test wrote it are all
        // in the queue, and are counted.
        let stop = Path::new(stop_file).exists();
        match listener.accept() {
            Ok((_, peer)) => *sources.entry(peer.ip()).or_default() += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    for (ip, count) in sources {
        report(&format!("accepted-from:{ip}:{count}"), started, Ok(()));
    }
}
