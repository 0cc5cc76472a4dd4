//! `GET /v1/events` over real sockets: NDJSON and SSE, with and without a valid token,
//! several concurrent subscribers, a namespace filter, and a slow subscriber that is
//! dropped with a reason without stalling the others.

use std::{sync::Arc, time::Duration};

use pipeguard::{
    agent::http::{Health, serve},
    events::{
        client::{ClientError, Request, follow},
        hub::{Hub, SUBSCRIBER_QUEUE},
        record::{Kind, PodRef, Record},
        stream::{Access, StreamState},
    },
};

fn record(ns: &str, n: u64) -> Record {
    Record {
        kind: Kind::Violation,
        signal: None,
        domain: None,
        time: format!("t{n}"),
        first_seen: format!("t{n}"),
        last_seen: format!("t{n}"),
        count: 1,
        verdict: Some("deny".into()),
        hook: Some("connect4".into()),
        protocol: Some("tcp".into()),
        dst_ip: Some("127.0.0.1".parse().unwrap()),
        dst_port: Some(9999),
        dst_name: None,
        query: None,
        qtype: None,
        malformed: false,
        pid: Some(n as u32),
        comm: Some("curl".into()),
        exe: None,
        node: "node-1".into(),
        pod: Some(PodRef {
            namespace: ns.into(),
            name: "runner".into(),
            uid: "u".into(),
            container: None,
        }),
        policies: vec!["ci/egress".into()],
        // Large enough that a reader who never reads falls behind quickly.
        reason: Some("x".repeat(512)),
        ci: None,
        cgroup_id: 1,
    }
}

struct Server {
    rt: tokio::runtime::Runtime,
    endpoint: String,
    hub: Arc<Hub>,
}

fn server(access: Access) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hub = Arc::new(Hub::default());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(serve(
        listener,
        Arc::new(Health::default()),
        Some(StreamState {
            hub: hub.clone(),
            access,
        }),
    ));
    Server { rt, endpoint, hub }
}

impl Server {
    /// Waits until `n` subscribers are connected.
    fn wait_subscribers(&self, n: usize) {
        for _ in 0..500 {
            if self.hub.subscriber_count() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "only {} of {n} subscribers connected",
            self.hub.subscriber_count()
        );
    }

    /// Starts a subscriber that collects `want` lines (then stops).
    fn subscribe(
        &self,
        token: Option<&'static str>,
        namespace: Option<&'static str>,
        sse: bool,
        want: usize,
    ) -> tokio::task::JoinHandle<Result<Vec<String>, ClientError>> {
        self.subscribe_counting(token, namespace, sse, want, Arc::default())
    }

    /// Same, counting received lines in `seen` as they arrive.
    fn subscribe_counting(
        &self,
        token: Option<&'static str>,
        namespace: Option<&'static str>,
        sse: bool,
        want: usize,
        seen: Arc<std::sync::atomic::AtomicUsize>,
    ) -> tokio::task::JoinHandle<Result<Vec<String>, ClientError>> {
        let endpoint = self.endpoint.clone();
        self.rt.spawn(async move {
            let mut lines = Vec::new();
            let req = Request {
                endpoint: &endpoint,
                token,
                namespace,
                sse,
            };
            follow(&req, |line| {
                lines.push(line.to_string());
                seen.store(lines.len(), std::sync::atomic::Ordering::Relaxed);
                lines.len() < want
            })
            .await?;
            Ok(lines)
        })
    }
}

const TOKEN: &str = "s3cret-token";

#[test]
fn token_is_required_and_checked() {
    let s = server(Access::Token(Arc::new(TOKEN.as_bytes().to_vec())));
    for token in [None, Some("wrong"), Some("s3cret-tokeN")] {
        let result = s.rt.block_on(s.subscribe(token, None, false, 1)).unwrap();
        match result {
            Err(ClientError::Status { status: 401, .. }) => {}
            other => panic!("token {token:?}: expected 401, got {other:?}"),
        }
    }
    let ok = s.subscribe(Some(TOKEN), None, false, 1);
    s.wait_subscribers(1);
    s.hub.publish(record("ci", 1));
    let lines = s.rt.block_on(ok).unwrap().unwrap();
    let got: Record = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(got, record("ci", 1));
}

#[test]
fn without_a_token_the_stream_is_off_unless_on_loopback() {
    let s = server(Access::Off);
    match s.rt.block_on(s.subscribe(None, None, false, 1)).unwrap() {
        Err(ClientError::Status { status: 404, body }) => {
            assert!(body.contains("--events-token-file"), "{body}")
        }
        other => panic!("expected 404, got {other:?}"),
    }
    let s = server(Access::Loopback);
    let sub = s.subscribe(None, None, false, 1);
    s.wait_subscribers(1);
    s.hub.publish(record("ci", 1));
    assert_eq!(s.rt.block_on(sub).unwrap().unwrap().len(), 1);
}

#[test]
fn ndjson_and_sse_to_concurrent_subscribers_with_a_namespace_filter() {
    let s = server(Access::Token(Arc::new(TOKEN.as_bytes().to_vec())));
    let n = 200;
    let subs: Vec<_> = (0..3).map(|_| s.subscribe(Some(TOKEN), None, false, n)).collect();
    let sse = s.subscribe(Some(TOKEN), None, true, n);
    let only_ci = s.subscribe(Some(TOKEN), Some("ci"), false, n / 2);
    s.wait_subscribers(5);
    for i in 0..n as u64 {
        s.hub.publish(record(if i % 2 == 0 { "ci" } else { "web" }, i));
    }
    for sub in subs {
        let lines = s.rt.block_on(sub).unwrap().unwrap();
        assert_eq!(lines.len(), n);
        let last: Record = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(last.pid, Some(n as u32 - 1), "in order, none lost");
    }
    let lines = s.rt.block_on(sse).unwrap().unwrap();
    assert_eq!(lines.len(), n);
    assert!(
        lines.iter().all(|l| l.starts_with("data: {")),
        "SSE framing: {}",
        lines[0]
    );
    let lines = s.rt.block_on(only_ci).unwrap().unwrap();
    assert_eq!(lines.len(), n / 2);
    for l in lines {
        let r: Record = serde_json::from_str(&l).unwrap();
        assert_eq!(r.pod.unwrap().namespace, "ci");
    }
}

#[test]
fn a_slow_subscriber_is_dropped_with_a_reason_and_does_not_stall_the_others() {
    use std::io::{Read, Write};
    let s = server(Access::Loopback);
    let total = SUBSCRIBER_QUEUE * 8;
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fast = s.subscribe_counting(None, None, false, total, seen.clone());
    // The slow one connects and then does not read at all.
    let addr = s.endpoint.trim_start_matches("http://").to_string();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        slow,
        "GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.wait_subscribers(2);
    for i in 0..total {
        // Publishing never blocks; keep the fast reader within its queue (a reader that
        // keeps up), while the slow one falls a whole queue behind.
        while i > seen.load(std::sync::atomic::Ordering::Relaxed) + SUBSCRIBER_QUEUE / 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        s.hub.publish(record("ci", i as u64));
    }
    let lines = s.rt.block_on(fast).unwrap().unwrap();
    assert_eq!(lines.len(), total, "the fast subscriber got everything");
    assert_eq!(
        s.hub
            .dropped_subscribers
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Reading now, the slow one finds its stream ended with the reason.
    slow.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut all = Vec::new();
    let _ = slow.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains(r#""kind":"subscriber_dropped""#),
        "no drop notice at the end of {} bytes",
        all.len()
    );
    assert!(text.contains("slow consumer"), "the reason is given");
}

#[test]
fn subscribers_that_go_away_leave_at_once_without_any_record() {
    use std::io::{Read, Write};
    let s = server(Access::Loopback);
    let addr = s.endpoint.trim_start_matches("http://").to_string();
    // Connect, see the stream start, hang up: over and over, with nothing ever published.
    for i in 0..2000 {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(c, "GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "cycle {i}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.hub.subscriber_count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} subscribers left with nobody connected",
            s.hub.subscriber_count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.hub.published.load(std::sync::atomic::Ordering::Relaxed), 0);
}
