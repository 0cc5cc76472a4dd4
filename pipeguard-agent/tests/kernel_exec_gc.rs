//! `pipeguard exec` killed with SIGKILL: the job's daemonized grandchild stays denied, from
//! its pinned programs, until `pipeguard gc` kills it and removes the pins and the cgroup.
//! Real binary, real kernel, a private bpffs. Needs root and cgroup2.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Bpffs, listeners, probe_argv, require_kernel};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

fn pipeguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipeguard"))
}

/// Everything this test starts or leaves, cleaned up even when an assertion fails: `gc`
/// on the private state dir (kills the job's leftovers), then the daemon by pid if it
/// still runs, then the files; the bpffs unmounts last.
struct Cleanup {
    state_dir: PathBuf,
    files: Vec<PathBuf>,
    daemon: Option<i32>,
    _bpffs: Bpffs,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = pipeguard()
            .args(["gc", "--state-dir"])
            .arg(&self.state_dir)
            .output();
        if let Some(pid) = self.daemon.filter(|pid| is_probe(*pid)) {
            // SAFETY: the probe daemon this test started, checked by its command line.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

fn is_probe(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("probe_main"))
        .unwrap_or(false)
}

fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn a_daemon_of_a_sigkilled_exec_stays_denied_until_gc_kills_it() {
    sigkilled_exec_then_collect(Collector::Gc);
}

#[test]
fn the_next_exec_collects_the_leftovers_of_a_sigkilled_one() {
    sigkilled_exec_then_collect(Collector::NextExec);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Collector {
    Gc,
    NextExec,
}

fn sigkilled_exec_then_collect(collector: Collector) {
    let cgroup_root = require_kernel();
    let denied = listeners::tcp("127.0.0.1:0");
    let tmp = std::env::temp_dir();
    let pid = std::process::id();
    let name = match collector {
        Collector::Gc => "exec-gc",
        Collector::NextExec => "exec-next",
    };
    let bpffs = Bpffs::mount(name);
    let mut cleanup = Cleanup {
        state_dir: bpffs.pin_dir(),
        files: ["policy.yaml", "daemon.log", "exec.out", "exec.err"]
            .iter()
            // Per test: the two run in one process, in parallel under plain `cargo test`.
            .map(|f| tmp.join(format!("pg-{name}-{pid}-{f}")))
            .collect(),
        daemon: None,
        _bpffs: bpffs,
    };
    let [policy, log, out, err] = [0, 1, 2, 3].map(|i| cleanup.files[i].clone());
    std::fs::write(
        &policy,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: default}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 127.0.0.1/32}}]\n    ports: [{port: 9}]\n",
    )
    .unwrap();

    // The job: the probe starts a daemon (setsid, so it is the job's grandchild) that
    // connects to the denied listener every 50 ms, then the shell waits to be killed.
    let mut script_argv = vec![
        "sh".to_string(),
        "-c".into(),
        "\"$@\"; exec sleep 60".into(),
        "sh".into(),
    ];
    script_argv.extend(probe_argv());
    let mut exec = pipeguard()
        .args(["exec", "--state-dir"])
        .arg(&cleanup.state_dir)
        .arg("--policy")
        .arg(&policy)
        .arg("--")
        .args(&script_argv)
        .env(
            common::probe::ACTIONS_ENV,
            format!("daemon probe-loop {} {}", denied.addr, log.display()),
        )
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start pipeguard exec");
    let job_name = format!("exec-{}", exec.id());
    let job_cgroup = cgroup_root.join("pipeguard").join(&job_name);
    let diagnostics = || std::fs::read_to_string(&err).unwrap_or_default();

    wait_until("the daemon's first attempt", || {
        log_lines(&log)
            .iter()
            .any(|l| l == "denied" || l == "ok" || l.starts_with("error"))
    });
    let daemon: i32 = log_lines(&log)[0]
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid line in the daemon log: {:?}", log_lines(&log)));
    cleanup.daemon = Some(daemon);

    exec.kill().expect("SIGKILL pipeguard exec");
    exec.wait().unwrap();
    let at_kill = log_lines(&log).len();
    std::thread::sleep(Duration::from_secs(1));
    let lines = log_lines(&log);
    assert!(
        lines.len() >= at_kill + 5,
        "the daemon keeps running after exec died: {lines:?}\n{}",
        diagnostics()
    );
    assert!(
        lines[1..].iter().all(|l| l == "denied"),
        "every attempt, before and after exec died, is denied: {lines:?}\n{}",
        diagnostics()
    );
    assert!(denied.received.bytes().is_empty());
    assert!(
        job_cgroup.exists(),
        "the job's cgroup stays while the daemon runs"
    );
    assert!(cleanup.state_dir.join(&job_name).exists(), "the job's pins stay");

    match collector {
        Collector::Gc => {
            let gc = pipeguard()
                .args(["gc", "--state-dir"])
                .arg(&cleanup.state_dir)
                .output()
                .unwrap();
            let gc_out = String::from_utf8_lossy(&gc.stdout);
            assert!(
                gc.status.success(),
                "{gc_out}{}",
                String::from_utf8_lossy(&gc.stderr)
            );
            assert!(gc_out.contains(&format!("collected {job_name}")), "{gc_out}");
        }
        Collector::NextExec => {
            let next = pipeguard()
                .args(["exec", "--state-dir"])
                .arg(&cleanup.state_dir)
                .arg("--policy")
                .arg(&policy)
                .args(["--", "true"])
                .output()
                .unwrap();
            let next_err = String::from_utf8_lossy(&next.stderr);
            assert_eq!(next.status.code(), Some(0), "{next_err}");
            assert!(
                next_err.contains("collected the leftovers") && next_err.contains(&job_name),
                "{next_err}"
            );
        }
    }
    wait_until("the daemon to be gone", || {
        !Path::new(&format!("/proc/{daemon}")).exists() || !is_probe(daemon)
    });
    assert!(!job_cgroup.exists(), "gc removed the cgroup");
    let left: Vec<_> = std::fs::read_dir(&cleanup.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "every pin is gone: {left:?}");

    let again = pipeguard()
        .args(["gc", "--state-dir"])
        .arg(&cleanup.state_dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to collect"));
}

#[test]
fn gc_leaves_a_running_exec_alone() {
    require_kernel();
    let bpffs = Bpffs::mount("exec-gc-live");
    let state_dir = bpffs.pin_dir();
    let mut exec = pipeguard()
        .args(["exec", "--state-dir"])
        .arg(&state_dir)
        .args(["--policy", "/dev/null", "--", "sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let job = state_dir.join(format!("exec-{}", exec.id()));
    wait_until("the job's pins", || job.join("links").exists());
    let gc = pipeguard()
        .args(["gc", "--state-dir"])
        .arg(&state_dir)
        .output()
        .unwrap();
    let still_there = job.exists();
    exec.kill().unwrap();
    exec.wait().unwrap();
    let _ = pipeguard().args(["gc", "--state-dir"]).arg(&state_dir).output();
    assert!(String::from_utf8_lossy(&gc.stdout).contains("nothing to collect"));
    assert!(still_there, "gc must not touch a live job");
}
