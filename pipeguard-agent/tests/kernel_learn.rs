//! Audit → learn → enforce with the real binary and the real kernel: `exec --learn` writes
//! the policy of what a job reached, `check` accepts it, the same job then runs under it
//! with zero denials and a new destination is refused; `suggest` merges runs.
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

fn pipeguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipeguard"))
}

/// `pipeguard exec ARGS -- probe ACTIONS` as pod ci/runner (app=runner).
fn exec_probe(args: &[&str], actions: &[String]) -> Output {
    require_kernel();
    let mut cmd = pipeguard();
    cmd.arg("exec")
        .args(["--namespace", "ci", "--label", "app=runner"])
        .args(args)
        .arg("--")
        .args(probe_argv())
        .env(common::probe::ACTIONS_ENV, actions.join("\n"));
    cmd.output().expect("run pipeguard exec")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: ci}
---
apiVersion: v1
kind: Pod
metadata: {name: runner, namespace: ci, labels: {app: runner}}
status: {podIP: 10.0.0.1}
";

/// `pipeguard check` of the learned policy: exit code for ci/runner → 127.0.0.1:port.
fn check(policy: &Path, cluster: &Path, port: u16, protocol: &str) -> i32 {
    let out = pipeguard()
        .args(["check", "--policies"])
        .arg(policy)
        .arg("--cluster")
        .arg(cluster)
        .args(["--from", "ci/runner", "--to", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--protocol", protocol])
        .output()
        .expect("run pipeguard check");
    out.status.code().expect("check exited")
}

#[test]
fn audit_learn_enforce_round_trip() {
    let registry = listeners::tcp("127.0.0.1:0");
    let metrics = listeners::udp("127.0.0.1:0");
    let attacker = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("learn");
    let learned = dir.path("learned.yaml");
    let run_json = dir.path("run.json");
    let markdown = dir.path("summary.md");
    let job = [
        format!("tcp {} artifact", registry.addr),
        format!("udp-sendto {} metric", metrics.addr),
    ];

    // 1. Audit with no policy: nothing is blocked, everything is learned.
    let out = exec_probe(
        &[
            "--mode",
            "audit",
            "--learn",
            learned.to_str().unwrap(),
            "--learn-json",
            run_json.to_str().unwrap(),
            "--summary-markdown",
            markdown.to_str().unwrap(),
        ],
        &job,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        common::parse_outcomes(&out).iter().all(|o| o.ok),
        "{}",
        stderr(&out)
    );
    let policy = std::fs::read_to_string(&learned).expect("learned policy written");
    assert!(
        policy.contains(&format!("# TCP {}", registry.addr.port()))
            && policy.contains(&format!("# UDP {}", metrics.addr.port()))
            && policy.contains("ipBlock: {cidr: 127.0.0.1/32}"),
        "{policy}"
    );
    assert!(
        !policy.contains("process unknown"),
        "every peer names its process:\n{policy}"
    );
    let run = read_json(&run_json);
    let dests = run["destinations"].as_array().unwrap();
    let registry_seen = dests
        .iter()
        .find(|d| d["port"] == registry.addr.port() && d["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("registry missing from {run}"));
    assert_eq!(registry_seen["verdict"], "audit");
    assert!(registry_seen["bytes"].as_u64().unwrap() > 0, "{run}");
    assert!(
        !registry_seen["processes"].as_array().unwrap().is_empty(),
        "{run}"
    );
    let md = std::fs::read_to_string(&markdown).unwrap();
    assert!(
        md.contains(&format!(
            "| 127.0.0.1 | {}/tcp | **would be denied** (audit) |",
            registry.addr.port()
        )),
        "{md}"
    );

    // 2. The output passes `pipeguard check`, and only for what the job did.
    let cluster = dir.path("cluster.yaml");
    std::fs::write(&cluster, CLUSTER).unwrap();
    assert_eq!(
        check(&learned, &cluster, registry.addr.port(), "TCP"),
        0,
        "{policy}"
    );
    assert_eq!(
        check(&learned, &cluster, metrics.addr.port(), "UDP"),
        0,
        "{policy}"
    );
    assert_eq!(
        check(&learned, &cluster, attacker.addr.port(), "TCP"),
        1,
        "{policy}"
    );

    // 3. Enforced: the same job runs with zero denials...
    let events = dir.path("events.jsonl");
    let out = exec_probe(
        &[
            "--policy",
            learned.to_str().unwrap(),
            "--fail-on-violation",
            "--events",
            events.to_str().unwrap(),
        ],
        &job,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        common::parse_outcomes(&out).iter().all(|o| o.ok),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&events).unwrap_or_default(),
        "",
        "no violation events"
    );

    // ...and a new destination is refused.
    let out = exec_probe(
        &["--policy", learned.to_str().unwrap(), "--fail-on-violation"],
        &[format!("tcp {} token", attacker.addr)],
    );
    assert_eq!(out.status.code(), Some(99), "{}", stderr(&out));
    assert!(
        common::parse_outcomes(&out)[0].denied_with_eperm(),
        "{}",
        stderr(&out)
    );
}

#[test]
fn learning_in_enforce_mode_names_allowed_processes_and_leaves_refusals_out() {
    let registry = listeners::tcp("127.0.0.1:0");
    let attacker = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("learn-enforce");
    let first = dir.path("first.yaml");
    // A first policy allowing the registry only.
    let out = exec_probe(
        &["--mode", "audit", "--learn", first.to_str().unwrap()],
        &[format!("tcp {} a", registry.addr)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let learned = dir.path("learned.yaml");
    let out = exec_probe(
        &[
            "--policy",
            first.to_str().unwrap(),
            "--learn",
            learned.to_str().unwrap(),
        ],
        &[
            format!("tcp {} a", registry.addr),
            format!("tcp {} b", attacker.addr),
        ],
    );
    let outcomes = common::parse_outcomes(&out);
    assert!(outcomes[0].ok && outcomes[1].denied_with_eperm(), "{outcomes:?}");
    let policy = std::fs::read_to_string(&learned).unwrap();
    let registry_line = policy
        .lines()
        .find(|l| l.contains("cidr: 127.0.0.1/32"))
        .unwrap_or_else(|| panic!("{policy}"));
    assert!(
        !registry_line.contains("process unknown"),
        "allowed attempts are reported while learning:\n{policy}"
    );
    assert!(
        policy.contains(&format!(
            "left out, refused in enforce mode: 127.0.0.1:{}/tcp",
            attacker.addr.port()
        )),
        "{policy}"
    );
    assert_eq!(policy.matches("  - to:").count(), 1, "{policy}");
}

#[test]
fn without_a_policy_learning_needs_audit_mode() {
    let out = exec_probe(&["--learn", "/dev/null"], &["tcp 127.0.0.1:9 x".to_string()]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("--mode audit"), "{}", stderr(&out));
}

#[test]
fn suggest_merges_runs_and_lists_unstable_destinations() {
    let registry = listeners::tcp("127.0.0.1:0");
    let once = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("suggest");
    let mut runs = Vec::new();
    for i in 0..3 {
        let run = dir.path(&format!("run{i}.json"));
        let mut job = vec![format!("tcp {} a", registry.addr)];
        if i == 1 {
            job.push(format!("tcp {} b", once.addr));
        }
        let out = exec_probe(&["--mode", "audit", "--learn-json", run.to_str().unwrap()], &job);
        assert!(out.status.success(), "{}", stderr(&out));
        runs.push(run);
    }
    let suggested = dir.path("suggested.yaml");
    let mut cmd = pipeguard();
    cmd.args(["suggest", "--min-runs", "2", "--out"]).arg(&suggested);
    for run in &runs {
        cmd.arg("--from").arg(run);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "unstable, left out: 127.0.0.1:{}/tcp (seen in 1 of 3 runs)",
            once.addr.port()
        )),
        "{}",
        stderr(&out)
    );
    let policy = std::fs::read_to_string(&suggested).unwrap();
    assert!(policy.contains("seen in 3 of 3 runs"), "{policy}");
    let cluster = dir.path("cluster.yaml");
    std::fs::write(&cluster, CLUSTER).unwrap();
    assert_eq!(
        check(&suggested, &cluster, registry.addr.port(), "TCP"),
        0,
        "{policy}"
    );
    assert_eq!(
        check(&suggested, &cluster, once.addr.port(), "TCP"),
        1,
        "{policy}"
    );
    // With --min-runs 1 the one-off destination is in.
    let out = pipeguard()
        .args(["suggest", "--min-runs", "1"])
        .args(
            runs.iter()
                .flat_map(|r| ["--from".into(), r.display().to_string()]),
        )
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("seen in 1 of 3 runs"));
}

/// A first learning run has no policy, so no domain rules: the kernel still reads its
/// queries' answers (naming addresses, allowing nothing), so the learned policy asks for
/// the name the job resolved, not the address it got. Fed back, the job resolves and
/// connects with zero denials; a name it never asked for is refused at the resolver.
#[test]
fn learning_without_a_policy_names_the_hosts_the_job_resolved() {
    let registry = listeners::tcp("127.0.0.1:0");
    let resolver_ip = common::own_ip(61);
    let dns = common::dnsmasq::Dnsmasq::start(
        "learn-names",
        &resolver_ip,
        "127.0.0.1 registry.pg.test\n127.0.0.1 other.pg.test\n",
        60,
    );
    let r = dns.addr;
    let dir = TempDir::new("learn-names");
    let learned = dir.path("learned.yaml");
    let run_json = dir.path("run.json");
    let port = registry.addr.port();
    let job = [format!("dns-connect {r} registry.pg.test {port} artifact")];

    let out = exec_probe(
        &[
            "--mode",
            "audit",
            "--learn",
            learned.to_str().unwrap(),
            "--learn-json",
            run_json.to_str().unwrap(),
        ],
        &job,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::parse_outcomes(&out)[0].ok, "{}", stderr(&out));
    let policy = std::fs::read_to_string(&learned).expect("learned policy written");
    assert!(
        policy.contains("kind: DomainPolicy") && policy.contains("- \"registry.pg.test\""),
        "the name, not the address:\n{policy}"
    );
    assert!(
        !policy.contains("ipBlock: {cidr: 127.0.0.1/32}"),
        "the named host is not also an address rule:\n{policy}"
    );
    assert!(
        policy.contains(&format!("ipBlock: {{cidr: {resolver_ip}/32}}")),
        "the resolver stays an address rule:\n{policy}"
    );
    let run = read_json(&run_json);
    let named = run["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["port"] == port)
        .unwrap_or_else(|| panic!("registry missing from {run}"));
    assert_eq!(named["name"], "registry.pg.test", "{run}");

    let out = exec_probe(
        &["--policy", learned.to_str().unwrap(), "--fail-on-violation"],
        &job,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(common::parse_outcomes(&out)[0].ok, "{}", stderr(&out));
    let out = exec_probe(
        &["--policy", learned.to_str().unwrap()],
        &[format!("dns-udp {r} other.pg.test")],
    );
    assert!(
        common::parse_outcomes(&out)[0].denied_with_eperm(),
        "{}",
        stderr(&out)
    );
}
