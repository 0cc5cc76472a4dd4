//! Anomaly signals of `pipeguard exec` with real traffic through the real kernel: each
//! signal raised by a job that does the unusual thing, and not by one that does not.
//! Needs root and cgroup2; fails (never skips) without them.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{dnsmasq::Dnsmasq, listeners, probe_argv, require_kernel};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Egress of the job limited to 127.0.0.1:`port`/TCP.
fn registry_only(dir: &TempDir, port: u16) -> PathBuf {
    let path = dir.path("policy.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: registry-only, namespace: ci}}
spec:
  podSelector: {{}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 127.0.0.1/32}}}}]
    ports: [{{protocol: TCP, port: {port}}}]
"
        ),
    )
    .unwrap();
    path
}

/// Runs the probe under exec with events to a file; returns the output and the anomaly
/// events (`"kind":"anomaly"` lines).
fn exec_probe(dir: &TempDir, args: &[&str], actions: &[String]) -> (Output, Vec<serde_json::Value>) {
    require_kernel();
    let events = dir.path("events.jsonl");
    let _ = std::fs::remove_file(&events);
    let out = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["exec", "--namespace", "ci", "--events"])
        .arg(&events)
        .args(args)
        .arg("--")
        .args(probe_argv())
        .env(common::probe::ACTIONS_ENV, actions.join("\n"))
        .output()
        .expect("run pipeguard exec");
    (out, anomalies(&events))
}

fn anomalies(events: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .filter(|v| v["kind"] == "anomaly")
        .collect()
}

/// [`exec_probe`] of a job that must succeed: its stderr and the anomaly events.
fn exec_ok(dir: &TempDir, args: &[&str], actions: &[String]) -> (String, Vec<serde_json::Value>) {
    let (out, found) = exec_probe(dir, args, actions);
    assert!(out.status.success(), "{}", stderr(&out));
    (stderr(&out), found)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn signals(found: &[serde_json::Value]) -> Vec<String> {
    found
        .iter()
        .map(|a| a["signal"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn deny_burst_is_raised_by_a_scan_and_not_by_a_few_denials() {
    let registry = listeners::tcp("127.0.0.1:0");
    let closed = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("anomaly-burst");
    let policy = registry_only(&dir, registry.addr.port());
    let policy = policy.to_str().unwrap();

    let scan = [format!("flood {} 30", closed.addr)];
    let (out, found) = exec_probe(&dir, &["--policy", policy], &scan);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(signals(&found), ["deny_burst"], "{}", stderr(&out));
    assert_eq!(found[0]["count"], 21, "raised when the 21st denial arrives");
    assert!(stderr(&out).contains("ANOMALY  deny_burst:"), "{}", stderr(&out));

    let normal = [
        format!("tcp {} artifact", registry.addr),
        format!("flood {} 3", closed.addr),
    ];
    let (out, found) = exec_probe(&dir, &["--policy", policy], &normal);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(found.is_empty(), "{found:?}");

    // Switched off, the scan raises nothing; a lower threshold catches the small one.
    let (_, found) = exec_probe(&dir, &["--policy", policy, "--anomaly", "deny_burst=off"], &scan);
    assert!(found.is_empty(), "{found:?}");
    let (_, found) = exec_probe(
        &dir,
        &["--policy", policy, "--anomaly", "deny_burst=2/10s"],
        &normal,
    );
    assert_eq!(signals(&found), ["deny_burst"]);
}

#[test]
fn upload_volume_is_raised_by_a_large_upload_to_an_allowed_host_only() {
    let registry = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("anomaly-upload");
    let policy = registry_only(&dir, registry.addr.port());
    let args = [
        "--policy",
        policy.to_str().unwrap(),
        "--anomaly",
        "upload_volume=50KiB",
    ];

    let (out, found) = exec_probe(
        &dir,
        &args,
        &[format!("tcp {} {}", registry.addr, "x".repeat(100_000))],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(signals(&found), ["upload_volume"], "{}", stderr(&out));
    assert_eq!(found[0]["dst_port"], registry.addr.port());
    assert!(found[0]["count"].as_u64().unwrap() > 100_000, "{found:?}");

    let (out, found) = exec_probe(&dir, &args, &[format!("tcp {} small", registry.addr)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn new_destination_is_raised_against_a_learned_baseline_and_a_policy() {
    let registry = listeners::tcp("127.0.0.1:0");
    let other = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("anomaly-new");
    let run = dir.path("run.json");
    let usual = [format!("tcp {} a", registry.addr)];
    let (out, _) = exec_probe(
        &dir,
        &["--mode", "audit", "--learn-json", run.to_str().unwrap()],
        &usual,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let baseline = ["--mode", "audit", "--baseline", run.to_str().unwrap()];
    let (out, found) = exec_probe(&dir, &baseline, &usual);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(found.is_empty(), "the usual job is not new: {found:?}");
    let unusual = [
        format!("tcp {} a", registry.addr),
        format!("tcp {} b", other.addr),
    ];
    let (out, found) = exec_probe(&dir, &baseline, &unusual);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(signals(&found), ["new_destination"], "{}", stderr(&out));
    assert_eq!(found[0]["dst_port"], other.addr.port());

    // A policy as the baseline: what it allows is not new, even when enforcement is open.
    let policy = registry_only(&dir, registry.addr.port());
    let by_policy = ["--mode", "audit", "--baseline", policy.to_str().unwrap()];
    let (_, found) = exec_probe(&dir, &by_policy, &unusual);
    assert_eq!(signals(&found), ["new_destination"]);
    assert_eq!(found[0]["dst_port"], other.addr.port());
    let (_, found) = exec_probe(&dir, &by_policy, &usual);
    assert!(found.is_empty(), "{found:?}");
}

/// DNS to `resolver_ip` by NetworkPolicy and, when given, `domains` (a YAML list) on 443
/// by DomainPolicy (the job is then DNS-filtered).
fn names_only(dir: &TempDir, resolver_ip: &str, domains: Option<&str>) -> PathBuf {
    let path = dir.path("dns-policy.yaml");
    let mut yaml = format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: dns, namespace: ci}}
spec:
  podSelector: {{}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {resolver_ip}/32}}}}]
    ports: [{{protocol: UDP, port: 53}}]
"
    );
    if let Some(domains) = domains {
        yaml.push_str(&format!(
            "---
apiVersion: pipeguard.dev/v1alpha1
kind: DomainPolicy
metadata: {{name: build, namespace: ci}}
spec:
  podSelector: {{}}
  egress:
  - domains: {domains}
    ports: [{{port: 443}}]
"
        ));
    }
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A base32 chunk of a secret per query, as dnscat/iodine-style tools send them.
const CHUNK: &str = "mzxw6ytboi2dkmrtgq3tqnzsgeydmobqgiztinjwg4ydembqgi3tsnzq";

/// A job allowed `domains` (none: IP rules only), its resolver (dnsmasq on an address of its own, second octet
/// `block`, knowing build.pg.test) and the tunnel it runs under `suffix`: an ordinary
/// query, then two chunks. Returns the resolver, the directory, the policy, the tunnel's
/// queries and the first chunk's name.
fn tunnel_job(
    tag: &str,
    block: u8,
    domains: Option<&str>,
    suffix: &str,
) -> (Dnsmasq, TempDir, String, Vec<String>, String) {
    let resolver_ip = common::own_ip(block);
    let dns = Dnsmasq::start(tag, &resolver_ip, "127.0.0.1 build.pg.test\n", 60);
    let dir = TempDir::new(tag);
    let policy = names_only(&dir, &resolver_ip, domains)
        .to_str()
        .unwrap()
        .to_string();
    let r = dns.addr;
    let first = format!("{CHUNK}.0.t.{suffix}");
    let tunnel = vec![
        format!("dns-udp {r} build.pg.test"),
        format!("dns-udp {r} {first}"),
        format!("dns-udp {r} {CHUNK}.1.t.{suffix}"),
    ];
    (dns, dir, policy, tunnel, first)
}

/// One dns_tunnel anomaly, for the 56-character labels under `domain`.
fn assert_long_label_tunnel(found: &[serde_json::Value], domain: &str, err: &str) {
    assert_eq!(signals(found), ["dns_tunnel"], "{err}");
    assert_eq!(found[0]["domain"], domain, "{found:?}");
    assert!(
        found[0]["detail"]
            .as_str()
            .unwrap()
            .contains("56-character label"),
        "{found:?}"
    );
}

#[test]
fn dns_tunnel_is_raised_by_long_encoded_query_names_and_not_by_a_normal_build() {
    let (dns, dir, policy, tunnel, first) =
        tunnel_job("anomaly-tunnel", 56, Some("[build.pg.test]"), "exfil.test");
    let (policy, r) = (policy.as_str(), dns.addr);

    // Enforced: the queries never leave, and the attempt is still flagged.
    let (err, found) = exec_ok(&dir, &["--policy", policy], &tunnel);
    assert_long_label_tunnel(&found, "exfil.test", &err);
    assert!(err.contains("ANOMALY  dns_tunnel:"), "{err}");
    assert!(
        !dns.saw(&first),
        "a refused query reached the resolver:\n{}",
        dns.log()
    );

    // Audited: the queries reach the resolver, and the tunnel is flagged all the same.
    let (err, found) = exec_ok(&dir, &["--policy", policy, "--mode", "audit"], &tunnel);
    assert_eq!(signals(&found), ["dns_tunnel"], "{err}");
    // dnsmasq writes its query log on its own schedule.
    common::agent::eventually(
        std::time::Duration::from_secs(5),
        "the audited query never reached dnsmasq",
        || dns.saw(&first),
    );

    // A normal build: its names, and one refused name of ordinary shape.
    let normal = [
        format!("dns-udp {r} build.pg.test"),
        format!("dns-udp {r} build.pg.test"),
        format!("dns-udp {r} telemetry.exfil.test"),
    ];
    let (err, found) = exec_ok(&dir, &["--policy", policy], &normal);
    assert!(found.is_empty(), "{found:?}");
    assert!(
        err.contains("DNS query telemetry.exfil.test"),
        "the refused query is an event all the same:\n{err}"
    );

    // Switched off, the tunnel raises nothing.
    let (_, found) = exec_ok(
        &dir,
        &["--policy", policy, "--anomaly", "dns_tunnel=off"],
        &tunnel,
    );
    assert!(found.is_empty(), "{found:?}");
}

/// Every record of the events file that is not an anomaly.
fn violation_records(events: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] != "anomaly")
        .collect()
}

/// Under `*.pg.test` the job picks the labels, and the queries leave: the kernel reports
/// them (rate-limited) and dns_tunnel judges them like refused ones, while the allowed
/// queries themselves are never violation records.
#[test]
fn dns_tunnel_is_raised_for_queries_a_wildcard_rule_allows() {
    let (dns, dir, policy, tunnel, first) =
        tunnel_job("anomaly-wildcard", 58, Some("['*.pg.test']"), "pg.test");
    let (policy, r) = (policy.as_str(), dns.addr);
    let (err, found) = exec_ok(&dir, &["--policy", policy], &tunnel);
    assert_long_label_tunnel(&found, "pg.test", &err);
    common::agent::eventually(
        std::time::Duration::from_secs(5),
        "the allowed query never reached dnsmasq",
        || dns.saw(&first),
    );
    let records = violation_records(&dir.path("events.jsonl"));
    assert!(
        records.is_empty(),
        "allowed queries are no violations: {records:?}"
    );

    // Short labels, but a new one each time: the distinct-subdomain count.
    let many: Vec<String> = (0..120).map(|i| format!("dns-udp {r} q{i}.pg.test")).collect();
    let (err, found) = exec_ok(&dir, &["--policy", policy], &many);
    assert_eq!(signals(&found), ["dns_tunnel"], "{err}");
    assert!(
        found[0]["detail"]
            .as_str()
            .unwrap()
            .contains("distinct subdomains of pg.test"),
        "{found:?}"
    );

    // A normal build asks for a few names, some more than once.
    let normal = [
        format!("dns-udp {r} build.pg.test"),
        format!("dns-udp {r} build.pg.test"),
        format!("dns-udp {r} cache.pg.test"),
        format!("dns-udp {r} build.pg.test"),
    ];
    let (err, found) = exec_ok(&dir, &["--policy", policy], &normal);
    assert!(found.is_empty(), "{err}\n{found:?}");

    // Switched off, nothing is reported and nothing raised.
    let (_, found) = exec_ok(
        &dir,
        &["--policy", policy, "--anomaly", "dns_tunnel=off"],
        &tunnel,
    );
    assert!(found.is_empty(), "{found:?}");
}

/// A job without domain rules: its DNS is judged by address only, so every name leaves,
/// and the kernel reads each for the detector. The tunnel is flagged; a normal build is not.
#[test]
fn dns_tunnel_is_raised_for_a_job_without_domain_rules() {
    let (dns, dir, policy, tunnel, first) = tunnel_job("anomaly-ip-only", 59, None, "exfil.test");
    let (policy, r) = (policy.as_str(), dns.addr);
    let (err, found) = exec_ok(&dir, &["--policy", policy], &tunnel);
    assert_long_label_tunnel(&found, "exfil.test", &err);
    common::agent::eventually(
        std::time::Duration::from_secs(5),
        "the query never reached dnsmasq",
        || dns.saw(&first),
    );
    let records = violation_records(&dir.path("events.jsonl"));
    assert!(
        records.is_empty(),
        "allowed queries are no violations: {records:?}"
    );

    let normal = [
        format!("dns-udp {r} build.pg.test"),
        format!("dns-udp {r} build.pg.test"),
        format!("dns-udp {r} registry.npmjs.org"),
    ];
    let (err, found) = exec_ok(&dir, &["--policy", policy], &normal);
    assert!(found.is_empty(), "{err}\n{found:?}");
}
