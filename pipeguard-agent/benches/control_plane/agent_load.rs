//! The agent's own cost on a busy node (issue 12), through the real `pipeguard agent` against
//! the list/watch server, with the abuse tests' fixtures:
//!
//! - 110 pods (kubelet's default maximum) and 1,000 pods on the node: idle CPU, new pod →
//!   enforced (pod object first, as the scheduler binds before kubelet starts it; then the
//!   pod cgroup and a prober in it; lag until the prober's connect is refused), memory;
//! - a distinct-destination flood (one job trying 20,000 ports) with Kubernetes Events on:
//!   how soon a later attempt's record arrives, CPU, memory;
//! - 2,000 `/v1/events` subscribers: memory, idle CPU (keep-alives), one record's fan-out.
//!
//! CPU is the agent's utime+stime (/proc/<pid>/stat), memory VmRSS and VmHWM
//! (/proc/<pid>/status), BPF maps their memlock; reported, never asserted.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::json;

use super::{
    agent::{Owned, bpf_map_kib, spawn_prober},
    report::{Report, mib, ms, summarize},
};
use crate::common::{
    agent::{
        Agent, Node, allow_only, eventually, http_get, metric, namespace, node, pod, raise_own_fd_limit,
        start_agent, uid, wait_ready,
    },
    listeners, run_probe,
};

pub fn setup(n: &Node) -> listeners::Tcp {
    let registry = listeners::tcp("127.0.0.1:0");
    n.server.apply(namespace("ci"));
    n.server
        .apply(allow_only("ci", "registry", "127.0.0.1/32", registry.addr.port()));
    registry
}

pub fn enforced(agent: &Agent) -> Option<u32> {
    http_get(&agent.listen, "/metrics").and_then(|(_, m)| {
        m.lines()
            .find_map(|l| l.strip_prefix("pipeguard_pods{state=\"enforced\"} "))
            .and_then(|v| v.trim().parse().ok())
    })
}

pub fn cpu_ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// The agent's CPU over `secs` of doing nothing asked of it.
pub fn idle_cpu(agent: &Agent, secs: u64) -> Duration {
    let before = agent.cpu();
    std::thread::sleep(Duration::from_secs(secs));
    agent.cpu() - before
}

/// `pipeguard_syncs_total` of one path (full, new_pods, unchanged).
pub fn syncs(agent: &Agent, path: &str) -> u64 {
    metric(agent, &format!("pipeguard_syncs_total{{path=\"{path}\"}}")).unwrap_or(0.0) as u64
}

pub fn run(quick: bool, report: &mut Report) {
    raise_own_fd_limit();
    let (new_pods, idle_secs, ports, subscribers) = if quick {
        (10, 10, 5_000u16, 500)
    } else {
        (40, 30, 20_000u16, 2_000)
    };
    report.section(
        "5f. `pipeguard agent` with many pods on the node: new pod → enforced (pod cgroup created → a prober in it is refused), idle CPU, memory",
        &[
            "pods on the node",
            "new pods (prober started + moved in)",
            "new pod → enforced, prober started in it: p50",
            "p99",
            "max",
            "running prober moved in: p50",
            "p99",
            "max",
            "CPU per new pod",
            &format!("idle CPU in {idle_secs} s"),
            "syncs while idle (full / unchanged)",
            "syncs for the new pods (full / new_pods)",
            "RSS",
            "VmHWM",
            "BPF maps (memlock)",
        ],
    );
    let mut figures = Vec::new();
    for pods in [110u32, 1000] {
        figures.push(many_pods(pods, new_pods, idle_secs, report));
    }
    report.figure("agent_pods", json!(figures));
    flood(ports, report);
    many_subscribers(subscribers, idle_secs, report);
}

fn many_pods(pods: u32, new_pods: u32, idle_secs: u64, report: &mut Report) -> serde_json::Value {
    let n = node(&format!("bench-pods-{pods}"));
    let _registry = setup(&n);
    for i in 0..pods {
        let id = uid(0x1000_0000 + i);
        n.server.apply(pod(
            "ci",
            &format!("runner-{i}"),
            &id,
            &format!("10.1.{}.{}", i / 250, i % 250 + 1),
        ));
        std::fs::create_dir_all(n.root.join(format!("kubepods/besteffort/pod{id}"))).expect("a pod cgroup");
    }
    let agent = start_agent(&n, &["--no-events-stdout"], None);
    wait_ready(&agent, Duration::from_secs(120));
    eventually(
        Duration::from_secs(120),
        "the pods were never all enforced",
        || enforced(&agent) == Some(pods),
    );
    std::thread::sleep(Duration::from_secs(2));
    let idle_syncs = (syncs(&agent, "full"), syncs(&agent, "unchanged"));
    let idle = idle_cpu(&agent, idle_secs);
    let idle_syncs = (
        syncs(&agent, "full") - idle_syncs.0,
        syncs(&agent, "unchanged") - idle_syncs.1,
    );
    let pod_syncs = (syncs(&agent, "full"), syncs(&agent, "new_pods"));

    let mut lags = Vec::new();
    let mut moved_lags = Vec::new();
    let mut refused_at_first_try = 0;
    let cpu_before = agent.cpu();
    // Outside kubepods: unguarded. A running prober waits here to be moved into a new pod.
    let staging = n.root.join("bench-staging");
    std::fs::create_dir_all(&staging).expect("a staging cgroup");
    for i in 0..2 * new_pods {
        let id = uid(0x2000_0000 + i);
        // The first half starts a prober in the new pod cgroup (its fork and exec count);
        // the second moves one that already runs, so only the agent's part counts.
        let moved = (i >= new_pods).then(|| staged_prober(&staging));
        n.server.apply(pod(
            "ci",
            &format!("new-{i}"),
            &id,
            &format!("10.2.{}.{}", i / 250, i % 250 + 1),
        ));
        std::thread::sleep(Duration::from_millis(300));
        let created = Instant::now();
        let cg = n.pod_cgroup(&id);
        let (prober, verdicts) = match moved {
            Some((prober, verdicts)) => {
                move_prober(&prober, &cg);
                (prober, verdicts)
            }
            None => spawn_prober(&cg),
        };
        let (first, denied_at) = first_denial(&verdicts, &agent);
        let lag = denied_at.saturating_duration_since(created);
        if i < new_pods {
            refused_at_first_try += u32::from(first);
            lags.push(lag);
        } else {
            moved_lags.push(lag);
        }
        drop(prober);
    }
    let _ = std::fs::remove_dir(&staging);
    let per_pod = (agent.cpu() - cpu_before) / (2 * new_pods);
    let pod_syncs = (
        syncs(&agent, "full") - pod_syncs.0,
        syncs(&agent, "new_pods") - pod_syncs.1,
    );
    let s = summarize(&lags);
    let m = summarize(&moved_lags);
    let (rss, hwm, maps) = (agent.rss_kib(), agent.hwm_kib(), bpf_map_kib(agent.pid()));
    report.row(vec![
        format!("{pods}"),
        format!("{new_pods} + {new_pods} ({refused_at_first_try} refused at the started prober's first try)"),
        ms(s.p50),
        ms(s.p99),
        ms(s.max),
        ms(m.p50),
        ms(m.p99),
        ms(m.max),
        cpu_ms(per_pod),
        cpu_ms(idle),
        format!("{} / {}", idle_syncs.0, idle_syncs.1),
        format!("{} / {}", pod_syncs.0, pod_syncs.1),
        mib(rss),
        mib(hwm),
        mib(maps),
    ]);
    json!({
        "pods": pods,
        "new_pod_to_enforced": s.json(),
        "new_pod_to_enforced_prober_moved_in": m.json(),
        "refused_at_first_try": refused_at_first_try,
        "cpu_ms_per_new_pod": per_pod.as_secs_f64() * 1e3,
        "idle_seconds": idle_secs,
        "idle_cpu_ms": idle.as_secs_f64() * 1e3,
        "idle_syncs": {"full": idle_syncs.0, "unchanged": idle_syncs.1},
        "new_pod_syncs": {"full": pod_syncs.0, "new_pods": pod_syncs.1},
        "rss_kib": rss,
        "hwm_kib": hwm,
        "bpf_map_memlock_kib": maps,
    })
}

/// Waits for the prober's first `denied`: (whether it was its first report, when).
/// A prober running in `staging` (unguarded), once it has said so: moved into a new pod
/// cgroup (`move_prober`), it probes from there within microseconds, so the time to its
/// first refusal is the agent's alone, without a fork and exec.
pub fn staged_prober(staging: &Path) -> (Owned, mpsc::Receiver<(Instant, bool)>) {
    let (prober, verdicts) = spawn_prober(staging);
    match verdicts.recv_timeout(Duration::from_secs(60)) {
        Ok((_, true)) => (prober, verdicts),
        other => panic!("the staged prober said {other:?}"),
    }
}

pub fn move_prober(prober: &Owned, cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), prober.pid().to_string()).expect("move the prober");
}

pub fn first_denial(verdicts: &mpsc::Receiver<(Instant, bool)>, agent: &Agent) -> (bool, Instant) {
    let mut first = true;
    loop {
        match verdicts.recv_timeout(Duration::from_secs(60)) {
            Ok((at, false)) => return (first, at),
            Ok((_, true)) => first = false,
            Err(_) => panic!("a new pod was never enforced; agent log:\n{}", agent.log()),
        }
    }
}

fn flood(ports: u16, report: &mut Report) {
    let n = node("bench-flood");
    let _registry = setup(&n);
    let runner = uid(0x5ca0);
    n.server.apply(pod("ci", "runner-scan", &runner, "10.0.0.30"));
    let cg = n.pod_cgroup(&runner);
    let file = n.dir.join("events.jsonl");
    let file_arg = file.display().to_string();
    // Kubernetes Events on (the default), records to a file.
    let agent = start_agent(&n, &["--no-events-stdout", "--events-file", &file_arg], None);
    wait_ready(&agent, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, rss0) = (agent.cpu(), agent.rss_kib());
    let started = Instant::now();
    let scan = run_probe(&cg, &[format!("scan 127.0.0.9:20000 {ports}")]);
    assert!(scan.iter().all(|o| o.ok), "{scan:?}");
    let scanned = started.elapsed();
    let marker = listeners::tcp("127.0.0.1:0");
    let sent = Instant::now();
    let o = run_probe(&cg, &[format!("tcp {} marker", marker.addr)]);
    assert!(o[0].denied_with_eperm(), "{o:?}");
    let needle = format!("\"dst_port\":{}", marker.addr.port());
    let mut lag = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains(&needle)
        {
            lag = Some(sent.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs(5));
    let cpu = agent.cpu() - cpu0;
    let lines = std::fs::read_to_string(&file).unwrap_or_default().lines().count();
    let events = n.server.events().len();
    let dropped = metric(&agent, "pipeguard_event_sink_dropped_total{sink=\"file\"}").unwrap_or(0.0);
    let (rss, hwm) = (agent.rss_kib(), agent.hwm_kib());
    report.section(
        "5g. `pipeguard agent` under a distinct-destination flood, Kubernetes Events on (one job tries N ports; then one more attempt: its record in the events file)",
        &[
            "distinct ports",
            "scan took",
            "later record arrived after",
            "records in the file",
            "file sink dropped",
            "Kubernetes Events posted",
            "agent CPU (scan + 5 s)",
            "RSS before → after",
            "VmHWM",
        ],
    );
    report.row(vec![
        format!("{ports}"),
        ms(scanned.as_secs_f64() * 1e3),
        lag.map_or("not within 120 s".into(), |l| ms(l.as_secs_f64() * 1e3)),
        format!("{lines}"),
        format!("{dropped}"),
        format!("{events}"),
        cpu_ms(cpu),
        format!("{} → {}", mib(rss0), mib(rss)),
        mib(hwm),
    ]);
    report.figure(
        "agent_flood",
        json!({
            "ports": ports,
            "scan_ms": scanned.as_secs_f64() * 1e3,
            "later_record_ms": lag.map(|l| l.as_secs_f64() * 1e3),
            "records_in_file": lines,
            "file_sink_dropped": dropped,
            "kubernetes_events": events,
            "cpu_ms": cpu.as_secs_f64() * 1e3,
            "rss_kib_before": rss0,
            "rss_kib_after": rss,
            "hwm_kib": hwm,
        }),
    );
}

/// Sources for the subscribers: the listener admits 32 connections per address.
const PER_SOURCE: usize = 30;

fn many_subscribers(count: usize, idle_secs: u64, report: &mut Report) {
    let n = node("bench-subscribers");
    let _registry = setup(&n);
    let runner = uid(0x5b5b);
    n.server.apply(pod("ci", "runner-subs", &runner, "10.0.0.31"));
    let cg = n.pod_cgroup(&runner);
    let agent = start_agent(&n, &["--no-events-stdout"], None);
    wait_ready(&agent, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, rss0) = (agent.cpu(), agent.rss_kib());
    let addr: SocketAddr = agent.listen.parse().expect("the agent's address");
    let marker = listeners::tcp("127.0.0.1:0");
    let needle = format!("\"dst_port\":{}", marker.addr.port()).into_bytes();
    let (tx, rx) = mpsc::channel::<Instant>();
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let source = Ipv4Addr::new(127, 0, 4, 1 + (i / PER_SOURCE) as u8);
            let (tx, needle) = (tx.clone(), needle.clone());
            n.runtime.spawn(subscriber(source, addr, needle, tx))
        })
        .collect();
    eventually(
        Duration::from_secs(60),
        "the subscribers never all connected",
        || metric(&agent, "pipeguard_event_subscribers") == Some(count as f64),
    );
    let connected = agent.cpu() - cpu0;
    let rss_connected = agent.rss_kib();
    let idle = idle_cpu(&agent, idle_secs);
    let cpu1 = agent.cpu();
    let sent = Instant::now();
    let o = run_probe(&cg, &[format!("tcp {} marker", marker.addr)]);
    assert!(o[0].denied_with_eperm(), "{o:?}");
    let mut arrivals = Vec::with_capacity(count);
    while arrivals.len() < count {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(at) => arrivals.push(at.saturating_duration_since(sent)),
            Err(_) => break,
        }
    }
    let fanout_cpu = agent.cpu() - cpu1;
    let (rss, hwm) = (agent.rss_kib(), agent.hwm_kib());
    let got = arrivals.len();
    assert!(
        got > 0,
        "no subscriber got the record; agent log:\n{}",
        agent.log()
    );
    let s = summarize(&arrivals);
    for t in tasks {
        t.abort();
    }
    report.section(
        "5h. `pipeguard agent` with many `/v1/events` subscribers: memory, idle CPU (keep-alives), one record to all of them",
        &[
            "subscribers",
            "CPU to connect them",
            "RSS before → connected",
            &format!("idle CPU in {idle_secs} s"),
            "record reached all, p50",
            "max",
            "CPU for that record",
            "VmHWM",
        ],
    );
    report.row(vec![
        format!("{count} ({got} got the record)"),
        cpu_ms(connected),
        format!("{} → {}", mib(rss0), mib(rss_connected)),
        cpu_ms(idle),
        ms(s.p50),
        ms(s.max),
        cpu_ms(fanout_cpu),
        mib(hwm),
    ]);
    report.figure(
        "agent_subscribers",
        json!({
            "subscribers": count,
            "received": got,
            "cpu_ms_connect": connected.as_secs_f64() * 1e3,
            "rss_kib_before": rss0,
            "rss_kib_connected": rss_connected,
            "rss_kib_after": rss,
            "hwm_kib": hwm,
            "idle_seconds": idle_secs,
            "idle_cpu_ms": idle.as_secs_f64() * 1e3,
            "record_to_all": s.json(),
            "cpu_ms_fanout": fanout_cpu.as_secs_f64() * 1e3,
        }),
    );
}

/// One subscriber: GET /v1/events from `source`, then reads until the marker's record.
async fn subscriber(source: Ipv4Addr, agent: SocketAddr, needle: Vec<u8>, seen: mpsc::Sender<Instant>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::new(source.into(), 0))
        .expect("bind a loopback source");
    let mut stream = socket.connect(agent).await.expect("connect to the agent");
    stream
        .write_all(b"GET /v1/events HTTP/1.1\r\nHost: agent\r\n\r\n")
        .await
        .expect("send the request");
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let Ok(k) = stream.read(&mut buf).await else {
            return;
        };
        if k == 0 {
            return;
        }
        tail.extend_from_slice(&buf[..k]);
        if tail.windows(needle.len()).any(|w| w == needle.as_slice()) {
            let _ = seen.send(Instant::now());
            return;
        }
        // Only a needle split across reads matters; keep what could start one.
        let keep = tail.len().saturating_sub(needle.len());
        tail.drain(..keep);
    }
}
