//! Shared by the kernel tests: root check, the guarded cgroup, listeners outside it, and the
//! probe that runs inside it.
#![allow(dead_code, reason = "each test binary uses a different part of this module")]

pub mod agent;
pub mod dns_probe;
pub mod dnsmasq;
pub mod inbound;
pub mod listeners;
pub mod netns;
pub mod policy_world;
pub mod probe;
pub mod root_job;
pub mod routes;
pub mod serve;
pub mod spoof;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use pipeguard::cgroup::{OwnedCgroup, cgroup2_mount};

/// Kernel tests never skip: without root or cgroup2 they fail and say why.
pub fn require_kernel() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and creates cgroups: run it as root (cargo xtask test does)"
    );
    cgroup2_mount()
        .expect("read /proc/self/mountinfo")
        .expect("this test needs a cgroup2 mount (none in /proc/self/mountinfo)")
}

/// A fresh cgroup for one test, removed (with anything left in it) when dropped.
pub fn test_cgroup(name: &str) -> OwnedCgroup {
    let root = require_kernel();
    let parent = root.join("pipeguard-test");
    let name = format!("{name}-{}", std::process::id());
    let _ = std::fs::remove_dir(parent.join(&name));
    OwnedCgroup::create(&parent, &name).expect("create test cgroup")
}

/// Runs `f` with this whole process in `cgroup` (a socket belongs to the cgroup of the task
/// that created it, so the sockets `f` creates are the pod's), then moves it back, also when
/// `f` panics. Every thread moves: callers serialize.
pub fn inside<T>(cgroup: &Path, f: impl FnOnce() -> T) -> T {
    let mount = require_kernel();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup2 entry in /proc/self/cgroup");
    let back = MoveBack(mount.join(own.trim_start_matches('/')));
    std::fs::write(cgroup.join("cgroup.procs"), "0").expect("move into the pod cgroup");
    let out = f();
    drop(back);
    out
}

/// Moves this process back to where it was when dropped, even if the test panics.
struct MoveBack(PathBuf);

impl Drop for MoveBack {
    fn drop(&mut self) {
        std::fs::write(self.0.join("cgroup.procs"), "0").expect("move back out of the pod cgroup");
    }
}

/// Runs the probe (this test binary, re-executed) inside `cgroup` with `actions`, and
/// returns its outcomes, one per action.
pub fn run_probe(cgroup: &Path, actions: &[String]) -> Vec<probe::Outcome> {
    let output = probe_command(cgroup, actions).output().expect("spawn probe");
    assert!(
        output.status.success(),
        "probe failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_outcomes(&output)
}

/// One probe action inside `cgroup`, its outcome.
pub fn once(cgroup: &Path, action: String) -> probe::Outcome {
    run_probe(cgroup, &[action]).pop().expect("one outcome")
}

/// The probe's outcomes in its output; the caller judges the exit status.
pub fn parse_outcomes(output: &std::process::Output) -> Vec<probe::Outcome> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.find(probe::MARK).map(|i| &l[i + probe::MARK.len()..]))
        .map(|l| serde_json::from_str(l).expect("probe outcome json"))
        .collect()
}

/// The probe command: this test binary running only its ignored `probe_main` test.
pub fn probe_command(cgroup: &Path, actions: &[String]) -> Command {
    let mut cmd = probe_argv_command(actions);
    start_in_cgroup(&mut cmd, cgroup);
    cmd
}

/// Makes `cmd`'s process join `cgroup` between fork and exec, so nothing it runs is outside.
pub fn start_in_cgroup(cmd: &mut Command, cgroup: &Path) {
    let procs =
        std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The probe's argv, without placing it anywhere (for `pipeguard exec -- ...`).
pub fn probe_argv() -> Vec<String> {
    let exe = std::env::current_exe().expect("current exe");
    vec![
        exe.display().to_string(),
        "probe_main".into(),
        "--exact".into(),
        "--ignored".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ]
}

fn probe_argv_command(actions: &[String]) -> Command {
    let argv = probe_argv();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env(probe::ACTIONS_ENV, actions.join("\n"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A private bpf filesystem for one test's pins, unmounted (with everything pinned in it)
/// when dropped, so no test leaves pinned links or maps behind.
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    pub fn mount(name: &str) -> Self {
        require_kernel();
        // Unique per mount: tests of one binary run in parallel, and a second mount on the
        // same directory would stack on the first, so the first test's unmount took the
        // other's pins, and with them the pinned links that keep its programs attached.
        static MOUNTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = MOUNTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pg-bpffs-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let bpf = std::ffi::CString::new("bpf").unwrap();
        // SAFETY: valid C strings; bpffs takes no data.
        let rc = unsafe { libc::mount(bpf.as_ptr(), c.as_ptr(), bpf.as_ptr(), 0, std::ptr::null()) };
        assert_eq!(
            rc,
            0,
            "mount bpffs at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Self { path }
    }

    /// The pin directory to hand to the agent.
    pub fn pin_dir(&self) -> PathBuf {
        self.path.join("pipeguard")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: unmounting the filesystem this guard mounted.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.path);
    }
}
pub mod kube_api;

/// A loopback address of this test process's own in block `block` (127.BLOCK.x.y, from
/// the pid), so parallel test binaries never share a resolver or listener address.
pub fn own_ip(block: u8) -> String {
    let pid = std::process::id();
    format!("127.{block}.{}.{}", (pid / 250) % 250, pid % 250 + 1)
}

/// An allowlist of one prefix on one port, over the given protocols.
pub fn allow_only(cidr: &str, port: u16, protocols: &[u8]) -> pipeguard::engine::PolicyEntries {
    let mut ports = pipeguard_common::PortSet {
        count: protocols.len() as u32,
        ..Default::default()
    };
    for (slot, protocol) in ports.ranges.iter_mut().zip(protocols) {
        *slot = pipeguard_common::PortRange {
            start: port,
            end: port,
            protocol: *protocol,
            _pad: [0; 3],
        };
    }
    let net: ipnet::IpNet = cidr.parse().expect("a CIDR");
    match net {
        ipnet::IpNet::V4(v4) => pipeguard::engine::PolicyEntries {
            v4: vec![(v4, ports)],
            ..Default::default()
        },
        ipnet::IpNet::V6(v6) => pipeguard::engine::PolicyEntries {
            v6: vec![(v6, ports)],
            ..Default::default()
        },
    }
}
