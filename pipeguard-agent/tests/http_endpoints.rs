//! The agent's HTTP endpoints over real sockets: health, readiness with its reason, metrics,
//! and hostile clients (garbage, oversized headers, slowloris) that must not stall others.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use pipeguard::agent::http::{Health, serve};

fn start() -> (SocketAddr, Arc<Health>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let health = Arc::new(Health::default());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(serve(listener, health.clone(), None));
    (addr, health, rt)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_string(), body.to_string())
}

#[test]
fn health_readiness_and_metrics() {
    let (addr, health, _rt) = start();
    assert_eq!(get(addr, "/healthz").0, 200);
    health.set_not_ready("caches not synced");
    let (status, _, body) = get(addr, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("caches not synced"), "readyz says why: {body}");
    health.set_ready();
    assert_eq!(get(addr, "/readyz").0, 200);
    let (status, head, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    for name in [
        "pipeguard_ready 1",
        "pipeguard_build_info{version=",
        "# TYPE pipeguard_sync_duration_seconds histogram",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    assert_eq!(get(addr, "/nope").0, 404);
}

#[test]
fn garbage_and_oversized_requests_are_refused_and_the_server_keeps_serving() {
    let (addr, _health, _rt) = start();
    for garbage in [
        &b"\x00\x01\x02 not http\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 4"),
            "garbage got: {text}"
        );
    }
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let _ = s.write_all(big.as_bytes());
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(!text.starts_with("HTTP/1.1 200"), "a 1 MiB header was accepted");
    // An oversized body is not read into memory: the request is refused.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n");
    let _ = s.write_all(&vec![b'x'; 1 << 16]);
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(get(addr, "/healthz").0, 200, "still serving");
}

/// A connection from `source` (any 127/8 address), as a blocking std stream.
fn connect_from(rt: &tokio::runtime::Runtime, source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{source}:0").parse().unwrap())?;
        let stream = socket.connect(addr).await?;
        let std = stream.into_std()?;
        std.set_nonblocking(false)?;
        Ok(std)
    })
}

fn get_from(rt: &tokio::runtime::Runtime, source: &str, addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = connect_from(rt, source, addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// True when the server closed the connection (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slowloris_clients_do_not_stall_others() {
    let (addr, health, rt) = start();
    // Many clients on one address that send half a request header and then nothing: the
    // per-source cap closes most at once, the head deadline the rest.
    let slow: Vec<TcpStream> = (0..300)
        .filter_map(|_| {
            let mut s = connect_from(&rt, "127.0.0.1", addr).ok()?;
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            Some(s)
        })
        .collect();
    for _ in 0..5 {
        assert_eq!(
            get_from(&rt, "127.0.0.2", addr, "/healthz"),
            Some(200),
            "served while {} slow clients hang",
            slow.len()
        );
    }
    assert!(
        health.connections.open() <= 32 + 1,
        "one source holds at most its cap: {} open",
        health.connections.open()
    );
    drop(slow);
}

#[test]
fn connections_are_capped_in_total_and_per_source_and_slots_come_back() {
    use pipeguard::agent::{http::serve_with, listener::Limits};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let health = Arc::new(Health::default());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        max_connections: 6,
        per_source: 4,
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    rt.spawn(serve_with(listener, health.clone(), None, limits));
    // Six from one source: four held, two closed at once.
    let mut a: Vec<TcpStream> = (0..6)
        .map(|_| connect_from(&rt, "127.0.0.1", addr).unwrap())
        .collect();
    let mut closed = 0;
    for s in a.iter_mut() {
        closed += closed_within(s, Duration::from_millis(500)) as usize;
    }
    assert_eq!(closed, 2, "the per-source cap closes what is over it");
    // Two more from a second source fill the total; a third source gets nothing.
    let _b: Vec<TcpStream> = (0..2)
        .map(|_| connect_from(&rt, "127.0.0.2", addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(health.connections.open(), 6);
    let mut c = connect_from(&rt, "127.0.0.3", addr).unwrap();
    assert!(
        closed_within(&mut c, Duration::from_secs(2)),
        "the total cap holds"
    );
    assert_eq!(get_from(&rt, "127.0.0.3", addr, "/healthz"), None);
    // Slots come back when clients leave.
    a.clear();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get_from(&rt, "127.0.0.3", addr, "/healthz") != Some(200) {
        assert!(std::time::Instant::now() < deadline, "slots never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, _, metrics) = get_with(&rt, addr, "/metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pipeguard_http_connections_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refused counter:\n{metrics}"));
    assert!(refused >= 3, "{refused}");
}

fn get_with(rt: &tokio::runtime::Runtime, addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = connect_from(rt, "127.0.0.9", addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_string(), body.to_string())
}

#[test]
fn slow_heads_silent_clients_and_idle_keepalives_are_closed() {
    use pipeguard::agent::{http::serve_with, listener::Limits};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let health = Arc::new(Health::default());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    rt.spawn(serve_with(listener, health.clone(), None, limits));

    // One header byte every 200 ms: the head deadline still applies to the whole head.
    let mut drip = TcpStream::connect(addr).unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        if drip.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    assert!(
        closed || closed_within(&mut drip, Duration::from_secs(3)),
        "a dripping head was not cut off"
    );

    // A client that connects and says nothing.
    let mut silent = TcpStream::connect(addr).unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(6)),
        "a silent client was kept"
    );

    // A keep-alive connection after a complete exchange, then nothing.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 256];
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = idle.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut idle, Duration::from_secs(6)),
        "an idle keep-alive was kept"
    );

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(health.connections.open(), 0, "every slot given back");
    assert!(
        health
            .connections
            .timed_out
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}
