//! The probe: egress attempts made from inside the guarded cgroup, one per action, each
//! reported as a JSON line. It runs as this test binary re-executed with only the ignored
//! `probe_main` test selected.
//!
//! Actions, one per line of `PG_PROBE_ACTIONS`: `KIND TARGET [PAYLOAD]`.

use std::{
    io::Write,
    mem::{size_of, zeroed},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub const ACTIONS_ENV: &str = "PG_PROBE_ACTIONS";
pub const MARK: &str = "PG_PROBE ";

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Outcome {
    pub action: String,
    pub ok: bool,
    /// errno of the failing call; 0 when ok.
    pub errno: i32,
    pub elapsed_ms: u64,
}

impl Outcome {
    pub fn denied_with_eperm(&self) -> bool {
        !self.ok && self.errno == libc::EPERM
    }
}

/// Entry point used by each kernel test binary's ignored `probe_main` test.
pub fn main() {
    let Ok(actions) = std::env::var(ACTIONS_ENV) else {
        panic!("probe_main is the kernel tests' probe; it only runs re-executed with {ACTIONS_ENV} set");
    };
    for action in actions.lines().filter(|l| !l.trim().is_empty()) {
        run(action);
    }
}

pub fn report(action: &str, started: Instant, result: std::io::Result<()>) {
    let outcome = Outcome {
        action: action.to_string(),
        ok: result.is_ok(),
        errno: result
            .as_ref()
            .err()
            .and_then(|e| e.raw_os_error())
            .unwrap_or(if result.is_ok() { 0 } else { -1 }),
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARK}{}", serde_json::to_string(&outcome).unwrap()).unwrap();
    out.flush().unwrap();
}

fn run(action: &str) {
    let mut parts = action.splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or("pipeguard-probe");
    let started = Instant::now();
    let result = match kind {
        // Process shapes: the nested action runs in another process or thread of the job.
        "child" => return spawn_nested(&format!("{target} {rest}"), false),
        "daemon" => return spawn_nested(&format!("{target} {rest}"), true),
        "thread" => {
            let nested = format!("{target} {rest}");
            std::thread::spawn(move || run(&nested)).join().unwrap();
            return;
        }
        "tcp" => tcp(target, rest.as_bytes()),
        "udp-connect" => udp_connect(target, rest.as_bytes()),
        "udp-sendto" => udp_sendto(target, rest.as_bytes()),
        "udp-sendmsg" => udp_sendmsg(target, rest.as_bytes(), false),
        "udp-sendmmsg" => udp_sendmsg(target, rest.as_bytes(), true),
        "tfo" => tcp_fastopen(target, rest.as_bytes()),
        "raw-udp" => raw_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP, target),
        "raw-icmp" => raw_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP, target),
        "packet" => raw_socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
            target,
        ),
        "hold" => hold(target, rest),
        "udp-burst" => udp_burst(target, rest),
        "udp-hold" => udp_hold(target, rest),
        "udp-alternate" => udp_alternate(target, rest),
        dns if dns.starts_with("dns-") => super::dns_probe::run(dns, target, rest),
        "wait-denied" => wait_for(target, true),
        "wait-allowed" => wait_for(target, false),
        "hammer" => hammer(target, rest),
        "flood" => flood(target, rest),
        "scan" => scan(target, rest),
        "comm-tcp" => comm_tcp(target, rest),
        // Red-team routes: see tests/kernel_redteam.rs.
        "netns-tcp" => in_new_netns(target),
        "setns-tcp" => in_other_netns(target, rest),
        "fd-tcp" => with_inherited_fd(target, rest),
        "scm-tcp" => with_received_fd(target, rest),
        "uring-tcp" => uring_connect(target),
        "uring-udp" => uring_sendmsg(target, rest.as_bytes()),
        "sctp" => sctp_connect(target),
        "escape-cgroup" => escape_cgroup(target, rest),
        // Root-job routes: see tests/kernel_root_job.rs.
        "tun-inject" => super::root_job::tun_inject(target, rest.as_bytes()),
        "bpf-ids" => super::root_job::bpf_ids(),
        "bind-low" => super::root_job::bind_low_port(),
        "probe-loop" => return super::root_job::probe_loop(target, rest),
        // Serving from inside the job (replies): see tests/kernel_replies.rs.
        "udp-serve" => return super::serve::udp(target, rest),
        "tcp-serve" => return super::serve::tcp(target, rest),
        // Ingress: see tests/kernel_ingress.rs.
        "tcp-accept-one" => return super::serve::accept_one(target, rest),
        "tcp-echo" => return super::serve::echo(target, rest),
        "tcp-accept-all" => return super::serve::accept_all(target, rest),
        // Send routes whose refusal must reach the caller: see tests/kernel_send_routes.rs.
        "ping" => super::routes::ping(target),
        "give-sockets" => super::routes::give_sockets(target),
        other => panic!("unknown probe action {other:?}"),
    };
    report(action, started, result);
}

fn spawn_nested(action: &str, daemonize: bool) {
    let argv = super::probe_argv();
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env(ACTIONS_ENV, action);
    if daemonize {
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        // Not waited for: it outlives this process and reports on the inherited stdout.
        #[expect(clippy::zombie_processes, reason = "a daemon: it outlives this process")]
        cmd.spawn().expect("spawn daemon");
    } else {
        let status = cmd.status().expect("spawn child");
        assert!(status.success(), "nested probe failed: {status}");
    }
}

pub fn addr(target: &str) -> SocketAddr {
    target
        .parse()
        .unwrap_or_else(|e| panic!("probe target {target:?}: {e}"))
}

fn tcp(target: &str, payload: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr(target), Duration::from_secs(3))?;
    stream.write_all(payload)?;
    stream.flush()
}

fn udp_socket(target: &SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
}

fn udp_connect(target: &str, payload: &[u8]) -> std::io::Result<()> {
    let target = addr(target);
    let socket = udp_socket(&target)?;
    socket.connect(target)?;
    socket.send(payload).map(drop)
}

fn udp_sendto(target: &str, payload: &[u8]) -> std::io::Result<()> {
    let target = addr(target);
    udp_socket(&target)?.send_to(payload, target).map(drop)
}

/// A socket address as the C API wants it.
pub fn sockaddr(target: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match target {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

pub fn check(ret: isize) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A msghdr naming `name` and carrying `iov`; both must outlive its use.
fn msghdr(
    name: &mut libc::sockaddr_storage,
    name_len: libc::socklen_t,
    iov: &mut libc::iovec,
) -> libc::msghdr {
    // SAFETY: all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = name_len;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg
}

/// sendmsg, or sendmmsg with two messages, on an unconnected UDP socket.
fn udp_sendmsg(target: &str, payload: &[u8], multiple: bool) -> std::io::Result<()> {
    let target = addr(target);
    let socket = udp_socket(&target)?;
    let (mut name, name_len) = sockaddr(&target);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    let msg = msghdr(&mut name, name_len, &mut iov);
    if multiple {
        let mut msgs = [
            libc::mmsghdr {
                msg_hdr: msg,
                msg_len: 0,
            },
            libc::mmsghdr {
                msg_hdr: msg,
                msg_len: 0,
            },
        ];
        // SAFETY: valid socket, two initialized mmsghdr.
        check(unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), 2, 0) } as isize)
    } else {
        // SAFETY: valid socket and msghdr.
        check(unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) })
    }
}

fn new_socket(family: i32, ty: i32, protocol: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// TCP Fast Open: the SYN carries data and no connect() call is made.
fn tcp_fastopen(target: &str, payload: &[u8]) -> std::io::Result<()> {
    let target = addr(target);
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let socket = new_socket(family, libc::SOCK_STREAM, 0)?;
    let (name, len) = sockaddr(&target);
    // SAFETY: valid socket, payload and address.
    check(unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_FASTOPEN,
            (&raw const name).cast(),
            len,
        )
    })?;
    // Give the handshake a moment, so a leak would reach the listener.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

/// Creating the socket is the attempt; if creation is allowed, try to send through it so a
/// gap would show as received bytes.
fn raw_socket(family: i32, ty: i32, protocol: i32, target: &str) -> std::io::Result<()> {
    let socket = new_socket(family, ty, protocol)?;
    if family == libc::AF_INET {
        let target = addr(target);
        let (name, len) = sockaddr(&target);
        let packet = if protocol == libc::IPPROTO_ICMP {
            ICMP_ECHO.to_vec()
        } else {
            udp_datagram(&target, b"raw-leak")
        };
        // SAFETY: valid socket, buffer and address.
        check(unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const name).cast(),
                len,
            )
        })?;
    }
    Ok(())
}

/// A UDP header + payload for a raw IPPROTO_UDP socket (the kernel adds the IP header).
fn udp_datagram(target: &SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut d = Vec::new();
    d.extend_from_slice(&40000u16.to_be_bytes());
    d.extend_from_slice(&target.port().to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&0u16.to_be_bytes()); // no checksum (allowed for IPv4)
    d.extend_from_slice(payload);
    d
}

/// ICMP echo request, id 1 seq 1, checksum precomputed.
const ICMP_ECHO: [u8; 8] = [8, 0, 0xf7, 0xfd, 0, 1, 0, 1];

/// Connects to `target` every millisecond until the verdict flips (`denied`: until EPERM;
/// otherwise until a connection succeeds), for at most 10 s. `elapsed_ms` is the time it
/// took: how long enforcement lagged behind the change the test made just before.
fn wait_for(target: &str, denied: bool) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let result = TcpStream::connect_timeout(&addr(target), Duration::from_secs(1));
        match (&result, denied) {
            (Err(e), true) if e.raw_os_error() == Some(libc::EPERM) => return Ok(()),
            (Ok(_), false) => return Ok(()),
            _ if Instant::now() >= deadline => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "verdict never changed",
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// `count` connect attempts as fast as possible; all must be refused with EPERM.
fn flood(target: &str, count: &str) -> std::io::Result<()> {
    let target = addr(target);
    let (name, len) = sockaddr(&target);
    let count: u64 = count.parse().expect("flood count");
    for i in 0..count {
        let socket = new_socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
        // SAFETY: valid socket and address.
        let rc = unsafe { libc::connect(socket.as_raw_fd(), (&raw const name).cast(), len) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        if rc == 0 || errno != Some(libc::EPERM) {
            return Err(std::io::Error::other(format!(
                "attempt {i} was not refused with EPERM: rc {rc}, errno {errno:?}"
            )));
        }
    }
    Ok(())
}

/// Connects to `count` distinct ports from `target`'s port upwards (a port scan); all must
/// be refused with EPERM.
fn scan(target: &str, count: &str) -> std::io::Result<()> {
    let first = addr(target);
    let count: u16 = count.parse().expect("scan count");
    for i in 0..count {
        let mut to = first;
        to.set_port(first.port().wrapping_add(i));
        let (name, len) = sockaddr(&to);
        let socket = new_socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
        // SAFETY: valid socket and address.
        let rc = unsafe { libc::connect(socket.as_raw_fd(), (&raw const name).cast(), len) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        if rc == 0 || errno != Some(libc::EPERM) {
            return Err(std::io::Error::other(format!(
                "port {} was not refused with EPERM: rc {rc}, errno {errno:?}",
                to.port()
            )));
        }
    }
    Ok(())
}

/// Renames this thread (`PR_SET_NAME`, what the kernel reports as `comm`) to the bytes
/// `hex` encodes, then connects to `target` (which must be refused).
fn comm_tcp(target: &str, hex: &str) -> std::io::Result<()> {
    let mut name: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex name"))
        .collect();
    name.truncate(15);
    name.push(0);
    // SAFETY: a NUL-terminated buffer of at most 16 bytes, as PR_SET_NAME reads.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match TcpStream::connect_timeout(&addr(target), Duration::from_secs(2)) {
        Ok(_) => Err(std::io::Error::other("connected")),
        Err(e) => Err(e),
    }
}

/// Connects to `target` in a loop until `until` says stop: a number of milliseconds, or a
/// path that the test creates when it is done. Fails if any connection succeeds.
fn hammer(target: &str, until: &str) -> std::io::Result<()> {
    let deadline = until
        .parse()
        .ok()
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let done = || match deadline {
        Some(d) => Instant::now() >= d,
        None => std::path::Path::new(until).exists(),
    };
    let mut attempts = 0u64;
    while !done() {
        attempts += 1;
        if let Ok(mut s) = TcpStream::connect_timeout(&addr(target), Duration::from_secs(1)) {
            let _ = s.write_all(b"leak");
            return Err(std::io::Error::other(format!("connected on attempt {attempts}")));
        }
    }
    Ok(())
}

/// Connects and sends "before", waits until the file `flag` exists (the test changes the
/// policy meanwhile), then sends "after".
fn hold(target: &str, flag: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr(target), Duration::from_secs(3))?;
    stream.write_all(b"before")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(flag).exists() {
        assert!(Instant::now() < deadline, "hold: the test never created {flag}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Packets are dropped at egress, so the write itself may succeed (queued) or fail.
    let _ = stream.write_all(b"after");
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// `count` one-byte datagrams from one unconnected socket to `target` (the fast path's
/// repeated datagrams); the first refused send is the outcome.
fn udp_burst(target: &str, count: &str) -> std::io::Result<()> {
    let target = addr(target);
    let count: u64 = count.parse().expect("udp-burst count");
    let socket = udp_socket(&target)?;
    for _ in 0..count {
        socket.send_to(b"x", target)?;
    }
    Ok(())
}

/// From one unconnected socket: `count` one-byte datagrams to `target`, `count` to `other`,
/// `count` to `target` again; then, with a `flag` path, keep the socket open until that file
/// exists. `rest` is "OTHER COUNT [FLAG]".
fn udp_alternate(target: &str, rest: &str) -> std::io::Result<()> {
    let target = addr(target);
    let mut args = rest.split(' ');
    let other = addr(args.next().expect("udp-alternate: other destination"));
    let count: u64 = args
        .next()
        .and_then(|c| c.parse().ok())
        .expect("udp-alternate count");
    let socket = udp_socket(&target)?;
    for to in [target, other, target] {
        for _ in 0..count {
            socket.send_to(b"x", to)?;
        }
    }
    if let Some(flag) = args.next() {
        wait_for_file(flag);
    }
    Ok(())
}

fn wait_for_file(flag: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(flag).exists() {
        assert!(Instant::now() < deadline, "the test never created {flag}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// sendto "before" from one unconnected socket, wait until the file `flag` exists (the test
/// changes the policy meanwhile), then sendto "after" from the same socket: its outcome.
fn udp_hold(target: &str, flag: &str) -> std::io::Result<()> {
    let target = addr(target);
    let socket = udp_socket(&target)?;
    socket.send_to(b"before", target)?;
    wait_for_file(flag);
    socket.send_to(b"after", target).map(drop)
}

/// unshare(CLONE_NEWNET), bring up lo, connect: the cgroup hooks do not care which netns.
fn in_new_netns(target: &str) -> std::io::Result<()> {
    // SAFETY: plain syscall; affects only this (probe) process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    TcpStream::connect_timeout(&addr(target), Duration::from_secs(2)).map(drop)
}

/// setns into a network namespace the test made, staying in the cgroup, then connect.
fn in_other_netns(ns_path: &str, target: &str) -> std::io::Result<()> {
    let ns = std::fs::File::open(ns_path)?;
    // SAFETY: valid fd of a netns file.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    TcpStream::connect_timeout(&addr(target), Duration::from_secs(2)).map(drop)
}

/// Connects with a socket created outside the job and inherited as fd `fd`.
fn with_inherited_fd(fd: &str, target: &str) -> std::io::Result<()> {
    let fd: i32 = fd.parse().expect("fd number");
    let (name, len) = sockaddr(&addr(target));
    // SAFETY: the test passed this fd open; connect reads `name` only.
    check(unsafe { libc::connect(fd, (&raw const name).cast(), len) } as isize)?;
    // SAFETY: as above; write the payload through the inherited socket.
    check(unsafe { libc::write(fd, b"fd-leak".as_ptr().cast(), 7) })
}

fn uring_connect(target: &str) -> std::io::Result<()> {
    let target = addr(target);
    let socket = new_socket(
        if target.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        },
        libc::SOCK_STREAM,
        0,
    )?;
    let (name, len) = sockaddr(&target);
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(socket.as_raw_fd()),
        (&raw const name).cast(),
        len,
    )
    .build();
    uring_submit(op)
}

fn uring_sendmsg(target: &str, payload: &[u8]) -> std::io::Result<()> {
    let target = addr(target);
    let socket = udp_socket(&target)?;
    let (mut name, name_len) = sockaddr(&target);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    // `name` and `iov` outlive the submission below.
    let msg = msghdr(&mut name, name_len, &mut iov);
    let op = io_uring::opcode::SendMsg::new(io_uring::types::Fd(socket.as_raw_fd()), &raw const msg).build();
    uring_submit(op)
}

/// Submits one operation and returns its result as an io::Result.
fn uring_submit(op: io_uring::squeue::Entry) -> std::io::Result<()> {
    let mut ring = io_uring::IoUring::new(4)?;
    // SAFETY: every buffer the operation points at outlives submit_and_wait below.
    unsafe { ring.submission().push(&op).map_err(std::io::Error::other)? };
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        Err(std::io::Error::from_raw_os_error(-cqe.result()))
    } else {
        Ok(())
    }
}

fn sctp_connect(target: &str) -> std::io::Result<()> {
    let target = addr(target);
    let socket = new_socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP)?;
    let (name, len) = sockaddr(&target);
    // SAFETY: valid socket and address.
    check(unsafe { libc::connect(socket.as_raw_fd(), (&raw const name).cast(), len) } as isize)
}

/// Moves this process into the cgroup whose cgroup.procs is `procs`, then connects.
fn escape_cgroup(procs: &str, target: &str) -> std::io::Result<()> {
    std::fs::write(procs, "0")?;
    TcpStream::connect_timeout(&addr(target), Duration::from_secs(2)).map(drop)
}

/// Receives a socket over the UNIX socket at `path` (SCM_RIGHTS) from a process outside the
/// job, then connects with it.
fn with_received_fd(path: &str, target: &str) -> std::io::Result<()> {
    let unix = std::os::unix::net::UnixStream::connect(path)?;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one control message carrying one fd.
    let mut control = [0u64; 8];
    // SAFETY: all-zero msghdr is valid; the buffers outlive recvmsg.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: valid socket and msghdr.
    check(unsafe { libc::recvmsg(unix.as_raw_fd(), &mut msg, 0) })?;
    // SAFETY: the kernel filled `control`; CMSG_FIRSTHDR/CMSG_DATA walk it.
    let fd = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(std::io::Error::other("no SCM_RIGHTS message"));
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())
    };
    with_inherited_fd(&fd.to_string(), target)
}
