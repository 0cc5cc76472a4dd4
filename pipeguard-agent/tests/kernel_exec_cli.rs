//! `pipeguard exec` end to end: the real binary, the real kernel, a probe as the job.
//! Needs root and cgroup2; fails (never skips) without them.

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::{listeners, probe_argv, require_kernel};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

fn pipeguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipeguard"))
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Egress of `app=runner` pods in `ci` limited to 127.0.0.1:`port`/TCP.
fn registry_only(port: u16) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: registry-only
  namespace: ci
spec:
  podSelector:
    matchLabels:
      app: runner
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: 127.0.0.1/32
    ports:
    - protocol: TCP
      port: {port}
"#
    )
}

fn exec_probe(policy: &Path, extra: &[&str], actions: &[String]) -> Output {
    require_kernel();
    let mut cmd = pipeguard();
    cmd.args(["exec", "--policy"])
        .arg(policy)
        .args(["--namespace", "ci", "--label", "app=runner"])
        .args(extra)
        .arg("--")
        .args(probe_argv())
        .env(common::probe::ACTIONS_ENV, actions.join("\n"));
    cmd.output().expect("run pipeguard exec")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn events_in(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")))
        .collect()
}

#[test]
fn a_guarded_job_reaches_the_registry_and_not_the_attacker() {
    let registry = listeners::tcp("127.0.0.1:0");
    let attacker = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("exec-main");
    let policy = dir.write("policy.yaml", &registry_only(registry.addr.port()));
    let events = dir.0.join("events.jsonl");
    let out = exec_probe(
        &policy,
        &["--events", events.to_str().unwrap()],
        &[
            format!("tcp {} artifact", registry.addr),
            format!("tcp {} token", attacker.addr),
        ],
    );
    let outcomes = common::parse_outcomes(&out);
    assert!(outcomes[0].ok, "{outcomes:?}");
    assert!(outcomes[1].denied_with_eperm(), "{outcomes:?}");
    assert!(registry.received.wait_for(b"artifact", Duration::from_secs(3)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        attacker.received.bytes().is_empty(),
        "exfiltration reached the attacker"
    );

    let events = events_in(&events);
    let denial = events
        .iter()
        .find(|e| e["dst_port"] == attacker.addr.port())
        .unwrap_or_else(|| panic!("no event for the attacker in {events:#?}\n{}", stderr(&out)));
    assert_eq!(denial["verdict"], "deny");
    assert_eq!(denial["hook"], "connect4");
    assert_eq!(denial["protocol"], "tcp");
    assert_eq!(denial["dst_ip"], "127.0.0.1");
    assert!(denial["pid"].as_u64().unwrap() > 0);
    assert!(!denial["comm"].as_str().unwrap().is_empty());
    assert!(denial["cgroup_id"].as_u64().unwrap() > 0);
    assert!(humantime::parse_rfc3339(denial["time"].as_str().unwrap()).is_ok());
    assert!(
        !events.iter().any(|e| e["dst_port"] == registry.addr.port()),
        "the allowed upload is not a violation"
    );

    let err = stderr(&out);
    assert!(
        err.contains(&format!("allowed  127.0.0.1:{}/tcp", registry.addr.port())),
        "{err}"
    );
    assert!(
        err.contains(&format!("DENIED   127.0.0.1:{}/tcp", attacker.addr.port())),
        "{err}"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the job succeeded; so does exec: {err}"
    );
}

#[test]
fn events_go_to_stderr_by_default_and_to_stdout_with_dash() {
    let attacker = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("exec-sinks");
    let policy = dir.write("policy.yaml", &registry_only(9));
    let action = [format!("tcp {} x", attacker.addr)];
    let default = exec_probe(&policy, &[], &action);
    assert!(
        stderr(&default).contains(r#""verdict":"deny""#),
        "{}",
        stderr(&default)
    );
    let dash = exec_probe(&policy, &["--events", "-"], &action);
    assert!(String::from_utf8_lossy(&dash.stdout).contains(r#""verdict":"deny""#));
    assert!(!stderr(&dash).contains(r#""verdict":"deny""#));
}

#[test]
fn fail_on_violation_turns_a_successful_job_into_exit_99() {
    let attacker = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("exec-fail");
    let policy = dir.write("policy.yaml", &registry_only(9));
    let action = [format!("tcp {} x", attacker.addr)];
    let out = exec_probe(&policy, &["--fail-on-violation"], &action);
    assert_eq!(out.status.code(), Some(99), "{}", stderr(&out));
    let clean = exec_probe(&policy, &["--fail-on-violation"], &[]);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "no violation, no failure: {}",
        stderr(&clean)
    );
}

#[test]
fn audit_mode_lets_the_job_through_and_reports_what_would_be_denied() {
    let attacker = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("exec-audit");
    let policy = dir.write("policy.yaml", &registry_only(9));
    let events = dir.0.join("events.jsonl");
    let out = exec_probe(
        &policy,
        &[
            "--mode",
            "audit",
            "--fail-on-violation",
            "--events",
            events.to_str().unwrap(),
        ],
        &[format!("tcp {} audited", attacker.addr)],
    );
    assert!(common::parse_outcomes(&out)[0].ok);
    assert!(attacker.received.wait_for(b"audited", Duration::from_secs(3)));
    let events = events_in(&events);
    assert!(
        events
            .iter()
            .any(|e| e["verdict"] == "audit" && e["hook"] == "connect4"),
        "{events:#?}"
    );
    assert_eq!(
        out.status.code(),
        Some(99),
        "audit violations also fail with --fail-on-violation"
    );
}

#[test]
fn raw_and_packet_sockets_are_refused_in_the_job() {
    let target = listeners::udp("127.0.0.1:0");
    let dir = TempDir::new("exec-raw");
    let policy = dir.write("policy.yaml", &registry_only(9));
    let a = target.addr;
    let out = exec_probe(
        &policy,
        &[],
        &[
            format!("raw-udp {a}"),
            format!("raw-icmp {a}"),
            format!("packet {a}"),
        ],
    );
    for o in common::parse_outcomes(&out) {
        assert!(o.denied_with_eperm(), "{o:?}\n{}", stderr(&out));
    }
    assert!(target.received.bytes().is_empty());
    // With --allow-raw-sockets the socket opens, and the packet hook still drops what the
    // policy does not allow.
    let out = exec_probe(&policy, &["--allow-raw-sockets"], &[format!("raw-udp {a}")]);
    let outcomes = common::parse_outcomes(&out);
    assert!(outcomes[0].denied_with_eperm(), "dropped at egress: {outcomes:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(target.received.bytes().is_empty(), "raw UDP leaked");
}

fn exec_shell(policy: &Path, script: &str) -> Output {
    require_kernel();
    pipeguard()
        .args(["exec", "--policy"])
        .arg(policy)
        .args(["--", "sh", "-c", script])
        .output()
        .expect("run pipeguard exec")
}

#[test]
fn exit_codes_and_signals_pass_through() {
    let dir = TempDir::new("exec-exit");
    let policy = dir.write("policy.yaml", &registry_only(9));
    assert_eq!(exec_shell(&policy, "exit 7").status.code(), Some(7));
    assert_eq!(
        exec_shell(&policy, "kill -TERM $$").status.code(),
        Some(128 + libc::SIGTERM)
    );
}

#[test]
fn stdin_and_stdout_pass_through() {
    require_kernel();
    let dir = TempDir::new("exec-stdio");
    let policy = dir.write("policy.yaml", &registry_only(9));
    let mut child = pipeguard()
        .args(["exec", "--policy"])
        .arg(&policy)
        .args(["--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "HELLO\n",
        "{}",
        stderr(&out)
    );
}

fn exec_cgroups() -> Vec<String> {
    let root = require_kernel().join("pipeguard");
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigterm_is_forwarded_and_the_cgroup_is_removed() {
    require_kernel();
    let dir = TempDir::new("exec-sigterm");
    let policy = dir.write("policy.yaml", &registry_only(9));
    let ready = dir.0.join("ready");
    let script = format!(
        "trap 'exit 42' TERM; touch {}; while true; do sleep 0.05; done",
        ready.display()
    );
    let child = pipeguard()
        .args(["exec", "--policy"])
        .arg(&policy)
        .args(["--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cgroup = format!("exec-{}", child.id());
    for _ in 0..200 {
        if ready.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(ready.exists(), "the job never started");
    assert!(
        exec_cgroups().contains(&cgroup),
        "the job runs in its own cgroup {cgroup}"
    );
    // SAFETY: signalling the pipeguard process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(42),
        "the job's own exit code after SIGTERM: {}",
        stderr(&out)
    );
    assert!(
        !exec_cgroups().contains(&cgroup),
        "cgroup {cgroup} was left behind"
    );
}

#[test]
fn an_invalid_policy_is_reported_and_the_command_never_runs() {
    require_kernel();
    let dir = TempDir::new("exec-invalid");
    let policy = dir.write(
        "bad.yaml",
        &registry_only(9).replace("127.0.0.1/32", "10.0.0.0/33"),
    );
    let marker = dir.0.join("ran");
    let out = exec_shell(&policy, &format!("touch {}", marker.display()));
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("bad.yaml"), "names the file: {err}");
    assert!(err.contains("ci/registry-only"), "names the object: {err}");
    assert!(
        err.contains("spec.egress[0].to[0].ipBlock.cidr"),
        "names the field: {err}"
    );
    assert!(!marker.exists(), "the command ran despite the invalid policy");
}

#[test]
fn a_job_no_egress_policy_selects_runs_unrestricted_with_a_warning() {
    let anywhere = listeners::tcp("127.0.0.1:0");
    let dir = TempDir::new("exec-unselected");
    let policy = dir.write("policy.yaml", &registry_only(9));
    require_kernel();
    let out = pipeguard()
        .args(["exec", "--policy"])
        .arg(&policy)
        .args(["--namespace", "other", "--"])
        .args(probe_argv())
        .env(common::probe::ACTIONS_ENV, format!("tcp {} free", anywhere.addr))
        .output()
        .unwrap();
    assert!(common::parse_outcomes(&out)[0].ok);
    assert!(
        stderr(&out).contains("egress is unrestricted"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn without_root_exec_refuses_at_once_and_says_why() {
    require_kernel();
    let dir = TempDir::new("exec-nonroot");
    let policy = dir.write("policy.yaml", &registry_only(9));
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&policy, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["exec", "--policy"])
        .arg(&policy)
        .args(["--", "true"])
        .output()
        .expect("setpriv (util-linux) runs pipeguard as nobody");
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("must run as root"), "{}", stderr(&out));
}

#[test]
fn a_domain_policy_lets_the_job_reach_its_names_and_nothing_else() {
    let web = listeners::tcp("127.0.0.1:0");
    let other = listeners::tcp("127.0.0.1:0");
    let resolver_ip = common::own_ip(55);
    let dns = common::dnsmasq::Dnsmasq::start(
        "exec-domains",
        &resolver_ip,
        "127.0.0.1 build.pg.test\n127.0.0.1 token.exfil.test\n",
        60,
    );
    let dir = TempDir::new("exec-domains");
    // DNS to the resolver by NetworkPolicy; the name by DomainPolicy, in one file.
    let policy = dir.write(
        "policy.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: dns, namespace: ci}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {resolver_ip}/32}}}}]\n    ports: [{{protocol: UDP, port: 53}}]\n---\napiVersion: pipeguard.dev/v1alpha1\nkind: DomainPolicy\nmetadata: {{name: build, namespace: ci}}\nspec:\n  podSelector: {{matchLabels: {{app: runner}}}}\n  egress:\n  - domains: [build.pg.test]\n    ports: [{{port: {}}}]\n",
            web.addr.port()
        ),
    );
    let r = dns.addr;
    let out = exec_probe(
        &policy,
        &[],
        &[
            format!("dns-connect {r} build.pg.test {} by-name", web.addr.port()),
            format!("dns-udp {r} token.exfil.test"),
            format!("tcp {} leak", other.addr),
        ],
    );
    let outcomes = common::parse_outcomes(&out);
    assert!(outcomes[0].ok, "{outcomes:?}\n{}", stderr(&out));
    assert!(outcomes[1].denied_with_eperm(), "{outcomes:?}");
    assert!(outcomes[2].denied_with_eperm(), "{outcomes:?}");
    assert!(web.received.wait_for(b"by-name", Duration::from_secs(3)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(dns.saw("build.pg.test"), "{}", dns.log());
    assert!(
        !dns.saw("token.exfil.test"),
        "a refused query reached the resolver:\n{}",
        dns.log()
    );
    assert!(other.received.bytes().is_empty());
    // The refused query is an event with its question; the summary names the learned
    // address and lists the refused query by name.
    let err = stderr(&out);
    let query: serde_json::Value = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["hook"] == "dns")
        .unwrap_or_else(|| panic!("no dns event in:\n{err}"));
    assert_eq!(query["query"], "token.exfil.test", "{query}");
    assert_eq!(query["qtype"], "A", "{query}");
    assert_eq!(query["dst_ip"], resolver_ip.as_str(), "{query}");
    assert_eq!(query["dst_port"], 53, "{query}");
    let named = format!("127.0.0.1:{}/tcp (build.pg.test)", web.addr.port());
    assert!(
        err.lines().any(|l| l.contains("allowed") && l.contains(&named)),
        "{named} missing from the summary:\n{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("DENIED   DNS query token.exfil.test (A)")),
        "the refused query missing from the summary:\n{err}"
    );
}
