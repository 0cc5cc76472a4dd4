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

#[test]
fn slowloris_clients_do_not_stall_others() {
    let (addr, _health, _rt) = start();
    // Many clients that send half a request header and then nothing.
    let slow: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    for _ in 0..5 {
        assert_eq!(
            get(addr, "/healthz").0,
            200,
            "served while {} slow clients hang",
            slow.len()
        );
    }
    drop(slow);
}
