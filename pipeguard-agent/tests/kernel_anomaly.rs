//! Anomaly signals of `pipeguard exec` with real traffic through the real kernel: each
//! signal raised by a job that does the unusual thing, and not by one that does not.
//! Needs root and cgroup2; fails (never skips) without them.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{listeners, probe_argv, require_kernel};

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
