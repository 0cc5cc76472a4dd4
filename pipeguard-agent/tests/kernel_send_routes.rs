//! Every refused send route returns an error to the caller, events name the destination
//! the kernel used, and the socket hooks judge a socket by the pod that created it, like
//! the packet hook. The engine against the real kernel; needs root and cgroup2, fails
//! (never skips) without them.

mod common;

use std::{
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixListener,
    },
    time::Duration,
};

use common::{listeners, probe::Outcome, run_probe, test_cgroup};
use pipeguard::{
    cgroup::OwnedCgroup,
    engine::{Engine, EngineConfig, events},
};
use pipeguard_common::{Hook, MODE_ENFORCE, POD_DENY_RAW_SOCKETS, PROTO_TCP, PodEntry, VERDICT_DENY};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

const POLICY: u32 = 14;
/// Time for a leaked packet to arrive before we conclude none did.
const LEAK_WAIT: Duration = Duration::from_millis(300);

struct Guarded {
    engine: Engine,
    cgroup: OwnedCgroup,
    cgroup_id: u64,
}

/// A job allowed TCP to 127.0.0.1:`port` only.
fn guard(name: &str, port: u16) -> Guarded {
    let cgroup = test_cgroup(name);
    let mut engine = Engine::load(&EngineConfig::default()).expect("load the eBPF programs");
    let cgroup_id = cgroup.id().unwrap();
    engine
        .put_policy(POLICY, &common::allow_only("127.0.0.1/32", port, &[PROTO_TCP]))
        .unwrap();
    engine
        .put_pod(
            cgroup_id,
            PodEntry {
                policy_id: POLICY,
                mode: MODE_ENFORCE,
                flags: POD_DENY_RAW_SOCKETS,
                ..PodEntry::default()
            },
        )
        .unwrap();
    engine.attach(cgroup.path()).expect("attach to the test cgroup");
    Guarded {
        engine,
        cgroup,
        cgroup_id,
    }
}

impl Guarded {
    fn probe(&self, actions: &[String]) -> Vec<Outcome> {
        let outcomes = run_probe(self.cgroup.path(), actions);
        assert_eq!(
            outcomes.len(),
            actions.len(),
            "one outcome per action: {outcomes:#?}"
        );
        outcomes
    }

    fn count(&self, hook: Hook, verdict: u8) -> u64 {
        self.engine
            .counters(self.cgroup_id)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.hook == hook as u8 && k.verdict == verdict)
            .map(|(_, c)| c.packets)
            .sum()
    }
}

fn drain_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<events::Violation> {
    let clock = events::Clock::now();
    let mut seen = Vec::new();
    while let Some(item) = ring.next() {
        seen.extend(events::decode(&item, &clock));
    }
    seen
}

#[test]
fn ping_sends_that_are_refused_fail_for_the_caller_over_ipv4_and_ipv6() {
    let mut g = guard("ping", 9);
    let mut ring = g.engine.take_events().unwrap();
    let outcomes = g.probe(&["ping 127.0.0.1:0".into(), "ping [::1]:0".into()]);
    for o in &outcomes {
        // IPv4: the packet hook's drop reaches sendto. IPv6: the kernel would swallow it,
        // so the ping socket itself is refused.
        assert!(
            o.denied_with_eperm(),
            "a refused ping must fail with EPERM: {o:?}"
        );
    }
    let seen = drain_events(&mut ring);
    assert!(
        seen.iter()
            .any(|e| e.hook == "sock_create" && e.socket == Some("ping") && e.verdict == "deny"),
        "the refused IPv6 ping socket is reported: {seen:#?}"
    );
    assert!(
        seen.iter().any(|e| e.hook == "egress" && e.protocol == "icmp"),
        "the refused IPv4 echo is reported: {seen:#?}"
    );
    assert!(g.count(Hook::SockCreate, VERDICT_DENY) >= 1);
}

#[test]
fn the_unspecified_address_is_judged_and_reported_as_the_loopback_the_kernel_uses() {
    let allowed = listeners::tcp("127.0.0.1:0");
    let denied = listeners::tcp("127.0.0.1:0");
    let denied6 = listeners::tcp("[::1]:0");
    let mut g = guard("unspecified", allowed.addr.port());
    let mut ring = g.engine.take_events().unwrap();
    let outcomes = g.probe(&[
        format!("tcp 0.0.0.0:{} unspecified-ok", allowed.addr.port()),
        format!("tcp 0.0.0.0:{} leak4", denied.addr.port()),
        format!("tcp [::]:{} leak6", denied6.addr.port()),
    ]);
    assert!(
        outcomes[0].ok,
        "0.0.0.0 is 127.0.0.1, which is allowed: {outcomes:#?}"
    );
    assert!(
        allowed
            .received
            .wait_for(b"unspecified-ok", Duration::from_secs(3))
    );
    assert!(outcomes[1].denied_with_eperm(), "{outcomes:#?}");
    assert!(outcomes[2].denied_with_eperm(), "{outcomes:#?}");
    std::thread::sleep(LEAK_WAIT);
    assert!(denied.received.bytes().is_empty());
    assert!(denied6.received.bytes().is_empty());

    let seen = drain_events(&mut ring);
    let v4 = seen
        .iter()
        .find(|e| e.dst_port == Some(denied.addr.port()))
        .unwrap_or_else(|| panic!("no event for 0.0.0.0: {seen:#?}"));
    assert_eq!(v4.dst_ip, Some("127.0.0.1".parse().unwrap()));
    let v6 = seen
        .iter()
        .find(|e| e.dst_port == Some(denied6.addr.port()))
        .unwrap_or_else(|| panic!("no event for [::]: {seen:#?}"));
    assert_eq!(v6.dst_ip, Some("::1".parse().unwrap()));
}

/// Receives the two fds `give-sockets` sends.
fn receive_fds(stream: &std::os::unix::net::UnixStream) -> [OwnedFd; 2] {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 8];
    // SAFETY: all-zero msghdr is valid; the buffers outlive recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: valid socket and msghdr.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
    assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel filled `control`; CMSG_FIRSTHDR/CMSG_DATA walk it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(
            !cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS,
            "no SCM_RIGHTS"
        );
        let data = libc::CMSG_DATA(cmsg).cast::<i32>();
        [
            OwnedFd::from_raw_fd(std::ptr::read_unaligned(data)),
            OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(1))),
        ]
    }
}

fn errno_of(ret: isize) -> Option<i32> {
    (ret < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
}

/// This test process is outside the guarded cgroup, in no pod: before, the socket hooks
/// asked who calls (nobody guarded: allowed) while the packet hook asked whose socket it
/// is (the job's: dropped), so connect() hung. Now both ask the socket.
#[test]
fn a_process_outside_the_job_using_the_jobs_sockets_is_judged_as_the_job() {
    let (denied, denied_udp) = listeners::tcp_and_udp("127.0.0.1");
    let mut g = guard("owner", 9);
    let mut ring = g.engine.take_events().unwrap();
    let dir = std::env::temp_dir().join(format!("pg-owner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("give.sock");
    let unix = UnixListener::bind(&path).unwrap();
    let child = common::probe_command(g.cgroup.path(), &[format!("give-sockets {}", path.display())])
        .spawn()
        .expect("spawn probe");
    let (stream, _) = unix.accept().expect("the job hands over its sockets");
    let [tcp, udp] = receive_fds(&stream);

    // A connect the packet hook would drop must not hang: a 2 s send timeout bounds it.
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: valid socket and option.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            size_of_val(&timeout) as u32,
        )
    };
    let (name, len) = common::probe::sockaddr(&denied.addr);
    // SAFETY: valid socket and address.
    let connect = errno_of(unsafe { libc::connect(tcp.as_raw_fd(), (&raw const name).cast(), len) } as isize);
    let (name, len) = common::probe::sockaddr(&denied_udp.addr);
    // SAFETY: valid socket, buffer and address.
    let sendto = errno_of(unsafe {
        libc::sendto(
            udp.as_raw_fd(),
            b"udp-leak".as_ptr().cast(),
            8,
            0,
            (&raw const name).cast(),
            len,
        )
    });
    drop(stream);
    let output = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        connect,
        Some(libc::EPERM),
        "connect on the job's TCP socket is refused at once"
    );
    assert_eq!(
        sendto,
        Some(libc::EPERM),
        "sendto on the job's UDP socket is refused"
    );
    std::thread::sleep(LEAK_WAIT);
    assert!(denied.received.bytes().is_empty());
    assert!(denied_udp.received.bytes().is_empty());

    let seen = drain_events(&mut ring);
    for hook in ["connect4", "sendmsg4"] {
        let event = seen
            .iter()
            .find(|e| e.hook == hook)
            .unwrap_or_else(|| panic!("no {hook} event: {seen:#?}"));
        assert_eq!(event.pod_cgroup_id, g.cgroup_id, "judged as the job: {event:?}");
        assert_eq!(
            event.cgroup_id, g.cgroup_id,
            "the socket's cgroup is reported: {event:?}"
        );
    }
}
