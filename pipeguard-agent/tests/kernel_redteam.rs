//! The red-team suite: a guarded job tries every egress route we know, against the real
//! kernel, using loopback and network namespaces this test creates. Each route is recorded
//! as blocked, escaped or not applicable, and printed as a table. The expected verdict of
//! every route is fixed here; an escape is only ever expected when SECURITY.md explains why
//! it is out of scope, and any other escape fails the suite. Needs root and cgroup2.

mod common;

use common::{
    listeners, netns::Netns, parse_outcomes, probe::Outcome, probe_argv, probe_command, test_cgroup,
};
use pipeguard::engine::{Engine, EngineConfig, PolicyEntries};
use pipeguard_common::{MODE_ENFORCE, POD_DENY_RAW_SOCKETS, PROTO_TCP, PROTO_UDP, PodEntry};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Blocked,
    Escaped,
    NotApplicable,
}

/// How an outcome reads: refused by pipeguard (EPERM) or by the kernel's own rules
/// (ENOENT/EACCES for a cgroup move, EROFS for the job's read-only cgroupfs) is blocked; a failure for lack of support is n/a;
/// reaching the network stack (success, ECONNREFUSED, ETIMEDOUT) is an escape.
fn verdict(o: &Outcome) -> Verdict {
    match o.errno {
        libc::EPERM | libc::ENOENT | libc::EACCES | libc::EROFS => Verdict::Blocked,
        libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::ENOSYS => Verdict::NotApplicable,
        _ => Verdict::Escaped,
    }
}

struct Route {
    name: &'static str,
    outcome: Outcome,
    expected: Verdict,
    why: &'static str,
}

fn only(port: u16) -> PolicyEntries {
    common::allow_only("127.0.0.1/32", port, &[PROTO_TCP, PROTO_UDP])
}

fn one(cgroup: &std::path::Path, action: String) -> Outcome {
    let out = probe_command(cgroup, &[action]).output().expect("probe");
    parse_outcomes(&out)
        .pop()
        .unwrap_or_else(|| panic!("no outcome: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_known_route_is_blocked_or_documented() {
    let allowed = listeners::tcp("127.0.0.1:0");
    let denied = listeners::tcp("127.0.0.1:0");
    let denied_udp = listeners::udp("127.0.0.1:0");
    let (d, du) = (denied.addr, denied_udp.addr);
    let cgroup = test_cgroup("redteam");
    let mut engine = Engine::load(&EngineConfig::default()).expect("load");
    engine.put_policy(1, &only(allowed.addr.port())).unwrap();
    engine
        .put_pod(
            cgroup.id().unwrap(),
            PodEntry {
                policy_id: 1,
                mode: MODE_ENFORCE,
                flags: POD_DENY_RAW_SOCKETS,
                ..PodEntry::default()
            },
        )
        .unwrap();
    engine.attach(cgroup.path()).unwrap();
    let c = cgroup.path();
    let netns = Netns::add("pgrt");

    let mut routes = vec![
        Route {
            name: "nested network namespace (unshare) inside the job",
            outcome: one(c, format!("netns-tcp {d}")),
            expected: Verdict::Blocked,
            why: "cgroup hooks run in every netns the job's sockets live in",
        },
        Route {
            name: "setns into another network namespace, same cgroup",
            outcome: one(c, format!("setns-tcp {} 127.0.0.1:{}", netns.path(), d.port())),
            expected: Verdict::Blocked,
            why: "the hook follows the cgroup, not the netns",
        },
        Route {
            name: "io_uring connect",
            outcome: one(c, format!("uring-tcp {d}")),
            expected: Verdict::Blocked,
            why: "io_uring's connect runs the same pre-connect hook",
        },
        Route {
            name: "io_uring sendmsg (unconnected UDP)",
            outcome: one(c, format!("uring-udp {du} uring-leak")),
            expected: Verdict::Blocked,
            why: "udp_sendmsg runs the sendmsg hook for io_uring too",
        },
        Route {
            name: "SCTP connect",
            outcome: one(c, format!("sctp {d}")),
            expected: Verdict::NotApplicable,
            why: "this kernel has no SCTP; where it has, the packet hook judges SCTP by port",
        },
    ];

    // A socket created outside the job and handed in: it belongs to the outside cgroup.
    // SAFETY: a fresh TCP socket owned by this test, inherited by the probe.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let out = probe_command(c, &[format!("fd-tcp {fd} {d}")])
        .output()
        .expect("probe");
    // SAFETY: closing our own copy.
    unsafe { libc::close(fd) };
    routes.push(Route {
        name: "socket created outside the job, inherited as an fd",
        outcome: parse_outcomes(&out).pop().expect("outcome"),
        expected: Verdict::Escaped,
        why: "out of scope: needs an accomplice outside the job (SECURITY.md)",
    });

    // The same, handed over a UNIX socket with SCM_RIGHTS by a process outside the job.
    let unix_path = std::env::temp_dir().join(format!("pg-redteam-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&unix_path);
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    let giver = std::thread::spawn(move || {
        let (conn, _) = unix.accept().unwrap();
        // SAFETY: a fresh TCP socket created outside the job, sent and then closed here.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        send_fd(&conn, fd);
        // SAFETY: closing our copy.
        unsafe { libc::close(fd) };
    });
    let scm = one(c, format!("scm-tcp {} {d}", unix_path.display()));
    giver.join().unwrap();
    let _ = std::fs::remove_file(&unix_path);
    routes.push(Route {
        name: "socket from a process outside the job, sent over a UNIX socket (SCM_RIGHTS)",
        outcome: scm,
        expected: Verdict::Escaped,
        why: "out of scope: the sender outside the job is the accomplice (SECURITY.md)",
    });

    // The job writes its pid into the root cgroup. With the engine alone root can;
    // `pipeguard exec` gives the job a read-only cgroupfs, and then the kernel refuses.
    let root_procs = common::require_kernel().join("cgroup.procs");
    let policy = std::env::temp_dir().join(format!("pg-redteam-{}.yaml", std::process::id()));
    std::fs::write(
        &policy,
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 127.0.0.1/32}}}}]\n    ports: [{{port: {}}}]\n",
            allowed.addr.port()
        ),
    )
    .unwrap();
    let exec = |prefix: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipeguard"))
            .args(["exec", "--policy"])
            .arg(&policy)
            .arg("--")
            .args(prefix)
            .args(probe_argv())
            .env(
                common::probe::ACTIONS_ENV,
                format!("escape-cgroup {} {d}", root_procs.display()),
            )
            .output()
            .expect("pipeguard exec");
        parse_outcomes(&out)
            .pop()
            .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    };
    routes.push(Route {
        name: "non-root job writes cgroup.procs to leave its cgroup (exec)",
        outcome: exec(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]),
        expected: Verdict::Blocked,
        why: "cgroup.procs outside the job belongs to root",
    });
    routes.push(Route {
        name: "root job writes cgroup.procs to leave its cgroup (exec)",
        outcome: exec(&[]),
        expected: Verdict::Blocked,
        why: "the job's mount namespace has the cgroupfs read-only; remounting needs CAP_SYS_ADMIN",
    });
    let _ = std::fs::remove_file(&policy);

    println!("\n{:<78} {:<10} {:<10} why", "route", "verdict", "expected");
    for r in &routes {
        println!(
            "{:<78} {:<10} {:<10} {}",
            r.name,
            format!("{:?}", verdict(&r.outcome)),
            format!("{:?}", r.expected),
            r.why
        );
    }
    for r in &routes {
        assert_eq!(verdict(&r.outcome), r.expected, "{}: {:?}", r.name, r.outcome);
    }
    assert!(denied_udp.received.bytes().is_empty(), "UDP leaked");
    // Only documented escapes reached the listener: the two passed-in sockets' payloads
    // (the cgroup escape connects without sending).
    let got = String::from_utf8_lossy(&denied.received.bytes()).into_owned();
    assert_eq!(
        got.replace("fd-leak", ""),
        "",
        "unexpected bytes at the denied listener: {got:?}"
    );
}

/// Sends `fd` over the connected UNIX socket `conn` as SCM_RIGHTS.
fn send_fd(conn: &std::os::unix::net::UnixStream, fd: i32) {
    use std::os::fd::AsRawFd;
    let mut byte = [b'x'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 8];
    // SAFETY: all-zero msghdr is valid; CMSG macros write inside `control`, which is large
    // enough for one fd; the buffers outlive sendmsg.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<i32>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        assert!(
            libc::sendmsg(conn.as_raw_fd(), &msg, 0) >= 0,
            "sendmsg: {}",
            std::io::Error::last_os_error()
        );
    }
}
