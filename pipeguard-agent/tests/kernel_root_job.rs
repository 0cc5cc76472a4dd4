//! A root job under `pipeguard exec`: the routes around the guard that only root could take
//! (TUN injection, leaving the cgroup, the bpf() syscall) fail by default and work with
//! `--privileged-job`, which says so; what a root job needs for CI still works. Real
//! binary, real kernel, the probe as the job. Needs root and cgroup2.

mod common;

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use common::{listeners, parse_outcomes, probe::Outcome, probe_argv, require_kernel};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

/// A policy file allowing only 127.0.0.1:9/TCP, removed on drop.
struct Policy(PathBuf);

impl Policy {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("pg-rootjob-{name}-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: default}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 127.0.0.1/32}}]\n    ports: [{port: 9}]\n",
        )
        .unwrap();
        Self(path)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn exec(policy: &Policy, extra: &[&str], command: &[String], actions: &[String]) -> Output {
    require_kernel();
    Command::new(env!("CARGO_BIN_EXE_pipeguard"))
        .args(["exec", "--policy"])
        .arg(&policy.0)
        .args(extra)
        .arg("--")
        .args(command)
        .env(common::probe::ACTIONS_ENV, actions.join("\n"))
        .output()
        .expect("run pipeguard exec")
}

/// One probe action as the job, root, under exec with `extra` flags.
fn probe(policy: &Policy, extra: &[&str], action: String) -> (Outcome, String) {
    let out = exec(policy, extra, &probe_argv(), &[action]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let outcome = parse_outcomes(&out)
        .pop()
        .unwrap_or_else(|| panic!("no outcome; stderr:\n{err}"));
    (outcome, err)
}

const WARNING: &str = "--privileged-job: the job keeps";

fn tun_devices() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pgt"))
        .collect()
}

#[test]
fn tun_injection_fails_for_a_root_job_unless_privileged() {
    let listener = listeners::udp("127.0.0.1:0");
    let policy = Policy::new("tun");
    let action = format!("tun-inject {} tun-leak", listener.addr);

    let (outcome, err) = probe(&policy, &[], action.clone());
    assert!(
        outcome.denied_with_eperm(),
        "TUNSETIFF without CAP_NET_ADMIN: {outcome:?}\n{err}"
    );
    assert!(!err.contains(WARNING), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(listener.received.bytes().is_empty(), "a packet was injected");

    let (outcome, err) = probe(&policy, &["--privileged-job"], action);
    assert!(outcome.ok, "a privileged root job can inject: {outcome:?}\n{err}");
    assert!(err.contains(WARNING) && err.contains("TUN"), "{err}");
    assert!(
        listener.received.wait_for(b"tun-leak", Duration::from_secs(3)),
        "the injected packet should arrive as incoming traffic, past every egress hook"
    );
    assert_eq!(
        tun_devices(),
        Vec::<String>::new(),
        "the tun device went with the job"
    );
}

#[test]
fn a_root_job_cannot_write_itself_out_of_its_cgroup_unless_privileged() {
    let denied = listeners::tcp("127.0.0.1:0");
    let policy = Policy::new("cgmove");
    let root_procs = require_kernel().join("cgroup.procs");
    let action = format!("escape-cgroup {} {}", root_procs.display(), denied.addr);

    let (outcome, err) = probe(&policy, &[], action.clone());
    assert!(
        !outcome.ok && outcome.errno == libc::EROFS,
        "the cgroupfs is read-only for the job: {outcome:?}\n{err}"
    );

    // Privileged: the move works and the forbidden connect then succeeds. The probe exits
    // right after, so nothing is left in the root cgroup.
    let (outcome, err) = probe(&policy, &["--privileged-job"], action);
    assert!(outcome.ok, "{outcome:?}\n{err}");
    assert!(err.contains(WARNING), "{err}");
}

#[test]
fn a_root_job_cannot_reach_bpf_programs_unless_privileged() {
    let policy = Policy::new("bpf");
    let (outcome, err) = probe(&policy, &[], "bpf-ids".into());
    assert!(outcome.denied_with_eperm(), "{outcome:?}\n{err}");
    let (outcome, err) = probe(&policy, &["--privileged-job"], "bpf-ids".into());
    assert!(outcome.ok, "{outcome:?}\n{err}");
    assert!(err.contains(WARNING), "{err}");
}

/// What CI jobs run as root still works under the default: apt-get (its lock files and
/// the switch to the `_apt` user), writing and chowning files, a C build, a low port.
#[test]
fn a_root_job_can_still_install_write_build_and_bind_low_ports() {
    let policy = Policy::new("works");
    let dir = std::env::temp_dir().join(format!("pg-rootjob-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "set -e; cd {dir}
        apt-get check
        printf 'int main(void){{return 0;}}\\n' > hello.c
        cc -o hello hello.c && ./hello
        chown 65534:65534 hello.c
        setpriv --reuid=65534 --regid=65534 --clear-groups true
        grep NoNewPrivs /proc/self/status",
        dir = dir.display()
    );
    let out = exec(&policy, &[], &["sh".into(), "-c".into(), script], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "no_new_privs is set: {stdout}");

    let (outcome, err) = probe(&policy, &[], "bind-low".into());
    assert!(outcome.ok, "CAP_NET_BIND_SERVICE stays: {outcome:?}\n{err}");
}

#[test]
fn audit_mode_keeps_raw_sockets_working_and_reports_them() {
    let target = listeners::udp("127.0.0.1:0");
    let policy = Policy::new("audit-raw");
    let events = std::env::temp_dir().join(format!("pg-rootjob-audit-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&events);
    let out = exec(
        &policy,
        &["--mode", "audit", "--events", events.to_str().unwrap()],
        &probe_argv(),
        &[
            format!("raw-udp {}", target.addr),
            format!("packet {}", target.addr),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines = std::fs::read_to_string(&events).unwrap_or_default();
    let _ = std::fs::remove_file(&events);
    let outcomes = parse_outcomes(&out);
    assert_eq!(outcomes.len(), 2, "{stderr}");
    for o in &outcomes {
        assert!(
            o.ok,
            "audit changes nothing about what the job can do: {o:?}\n{stderr}"
        );
    }
    assert!(
        target.received.wait_for(b"raw-leak", Duration::from_secs(3)),
        "the raw datagram went out"
    );
    let reported = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .any(|e| e["hook"] == "sock_create" && e["verdict"] == "audit");
    assert!(reported, "the raw socket is reported as audit: {lines}\n{stderr}");
}

/// systemd hosts automount binfmt_misc below /proc/sys. The job still starts, and the mount
/// (root may register interpreters there, which host processes would then run) is out of
/// its reach. The mount lives in a private mount namespace of this test only.
#[test]
fn a_job_starts_on_a_host_with_a_mount_below_proc_sys_and_cannot_reach_it() {
    require_kernel();
    let policy = Policy::new("binfmt");
    let script = format!(
        "mount -t tmpfs pg-binfmt /proc/sys/fs/binfmt_misc && exec {} exec --policy {} -- sh -c 'touch /proc/sys/fs/binfmt_misc/x && echo WROTE || echo REFUSED'",
        env!("CARGO_BIN_EXE_pipeguard"),
        policy.0.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout.trim(), "REFUSED", "the job ran and could not write there");
}
