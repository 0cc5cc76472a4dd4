//! Parity through the kernel (issue 16): for generated policies and worlds, the verdicts of
//! the real programs on real sockets, egress and ingress, equal `pipeguard check`'s
//! (`policy::reach`, the function `check` answers with). Each world is compiled exactly as
//! `pipeguard exec` compiles it (`job::allowlist::compile`) for the guarded runner pod.
//!
//! Everything runs in a network namespace of this test's own, where the world's pods are
//! addresses of 127.0.0.0/8 and ports are small numbers; about half the worlds are the same
//! kind of world in IPv6 (every address and ipBlock moved into `V6_PREFIX`, a local route
//! of the namespace), so both families' tries, sockets and hooks are compared. Egress: a socket of the runner's
//! cgroup connects (TCP) or sends (UDP) to a pod or an address outside the cluster; EPERM
//! is a refusal, anything that reached the network stack (a reset, a sent datagram) a pass.
//! Ingress: a client bound to a pod's address connects or sends to the runner's listener;
//! the connection reaching the listener (or the datagram the socket) is a pass, the
//! runner's ingress deny counter moving is a refusal. Each attempt waits for one of the two,
//! so no verdict rests on a timeout. Needs root and cgroup2; fails (never skips) without them.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use common::{
    netns::Netns,
    policy_world::{address, cluster, network_policy, pod, rule},
};
use pipeguard::{
    cgroup::OwnedCgroup,
    engine::{Engine, EngineConfig, ingress_id},
    policy::{Cluster, ClusterPod, Destination, PodIdentity, PortQuery, Side, parse_policies, reach},
};
use pipeguard_common::{Hook, MODE_ENFORCE, POD_INGRESS_ISOLATED, PodEntry, VERDICT_DENY};
use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};

/// Worlds per run: each is a few dozen real connection attempts.
const CASES: u32 = 256;
/// An attempt that neither passes nor is refused within this long is a failure.
const DECIDE_WITHIN: Duration = Duration::from_secs(10);
/// IPv6 worlds: 127.b.c.d is `fd7f::7f` followed by b.c.d (the last 32 bits), and a /n
/// ipBlock a /96+n one.
const V6_PREFIX: &str = "fd7f::/96";

#[derive(Clone, Debug)]
struct World {
    policies: String,
    cluster: Cluster,
    /// Addresses outside the cluster (egress destinations only: `check` takes pods as sources).
    strangers: Vec<IpAddr>,
    probes: Vec<Probe>,
}

/// One attempt each way: the runner to `target`, and `target` (when a pod) to the runner.
#[derive(Clone, Debug)]
struct Probe {
    target: prop::sample::Index,
    port: u16,
    udp: bool,
}

fn policy() -> impl Strategy<Value = String> {
    let selector = prop::sample::select(vec![
        "{}",
        "{matchLabels: {app: runner}}",
        "{matchLabels: {app: web}}",
    ]);
    let rules = |key| prop::option::of(prop::collection::vec(rule(127, key), 0..3));
    (selector, rules("from"), rules("to"))
        .prop_filter("a policy has a type", |(_, i, e)| i.is_some() || e.is_some())
        .prop_map(|(selector, ingress, egress)| {
            network_policy("p", selector, ingress.as_deref(), egress.as_deref())
        })
}

fn world() -> impl Strategy<Value = World> {
    let visitor = (
        address(127),
        prop::sample::select(vec!["ci", "tools", "visitors"]),
        prop::sample::select(vec!["cache", "web", "other"]),
    );
    let probe = (any::<prop::sample::Index>(), 1u16..8, any::<bool>())
        .prop_map(|(target, port, udp)| Probe { target, port, udp });
    (
        prop::collection::vec(policy(), 1..3),
        prop::collection::vec(visitor, 0..4),
        prop::collection::vec(address(127), 0..3),
        prop::collection::vec(probe, 1..12),
        any::<bool>(),
    )
        .prop_map(|(policies, visitors, strangers, probes, v6)| {
            let policies = policies
                .iter()
                .enumerate()
                .map(|(i, p)| p.replacen("name: p,", &format!("name: p{i},"), 1))
                .collect::<Vec<_>>()
                .join("---\n");
            let mut cluster = cluster(127);
            cluster.add_namespace("visitors", Default::default());
            for (ip, ns, app) in visitors {
                if usable(ip) && !cluster.pods.iter().any(|p| p.ips.contains(&IpAddr::V4(ip))) {
                    cluster.pods.push(pod(ns, app, &ip.to_string(), Vec::new()));
                }
            }
            let strangers = strangers
                .into_iter()
                .filter(|ip| usable(*ip) && !cluster.pods.iter().any(|p| p.ips.contains(&IpAddr::V4(*ip))))
                .map(IpAddr::V4)
                .collect();
            let world = World {
                policies,
                cluster,
                strangers,
                probes,
            };
            if v6 { world.in_v6() } else { world }
        })
}

impl World {
    /// The same world with every address and ipBlock in `V6_PREFIX`.
    fn in_v6(mut self) -> Self {
        for pod in &mut self.cluster.pods {
            for ip in &mut pod.ips {
                *ip = v6(*ip);
            }
        }
        for ip in &mut self.strangers {
            *ip = v6(*ip);
        }
        self.policies = v6_cidrs(&self.policies);
        self
    }
}

fn v6(ip: IpAddr) -> IpAddr {
    let IpAddr::V4(ip) = ip else { return ip };
    let [a, b, c, d] = ip.octets();
    let prefix = V6_PREFIX
        .split('/')
        .next()
        .unwrap()
        .parse::<Ipv6Addr>()
        .unwrap()
        .octets();
    let mut octets = prefix;
    octets[12..].copy_from_slice(&[a, b, c, d]);
    IpAddr::V6(Ipv6Addr::from(octets))
}

/// Every IPv4 CIDR of the policy text (ipBlock `cidr` and `except`) as its IPv6 image.
fn v6_cidrs(policies: &str) -> String {
    let mut out = String::with_capacity(policies.len() * 2);
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        match token.parse::<ipnet::Ipv4Net>() {
            Ok(net) => {
                let IpAddr::V6(addr) = v6(IpAddr::V4(net.addr())) else {
                    unreachable!()
                };
                *out += &ipnet::Ipv6Net::new(addr, net.prefix_len() + 96)
                    .unwrap()
                    .to_string();
            }
            Err(_) => *out += token,
        }
        token.clear();
    };
    for ch in policies.chars() {
        if ch.is_ascii_digit() || ch == '.' || ch == '/' {
            token.push(ch);
        } else {
            flush(&mut token, &mut out);
            out.push(ch);
        }
    }
    flush(&mut token, &mut out);
    out
}

#[test]
fn ipv6_worlds_are_the_ipv4_worlds_moved() {
    let IpAddr::V6(runner) = v6("127.0.0.1".parse().unwrap()) else {
        panic!()
    };
    assert_eq!(runner, "fd7f::7f00:1".parse::<Ipv6Addr>().unwrap());
    let policy = "  - {to: [{ipBlock: {cidr: 127.1.2.0/23, except: [127.1.2.8/29]}}], ports: [{port: 3, endPort: 5}]}\n";
    assert_eq!(
        v6_cidrs(policy),
        "  - {to: [{ipBlock: {cidr: fd7f::7f01:200/119, except: [fd7f::7f01:208/125]}}], ports: [{port: 3, endPort: 5}]}\n"
    );
}

/// The network address of 127.0.0.0/8 is no host's.
fn usable(ip: Ipv4Addr) -> bool {
    ip.octets()[1..] != [0, 0, 0]
}

/// The engine attached to the runner's cgroup; each world is a policy of its own.
struct Kernel {
    engine: Engine,
    cgroup: OwnedCgroup,
    worlds: u32,
    /// Verdicts seen, [IPv4, IPv6] × [egress, ingress] × [refused, passed]: all must occur.
    seen: [[[u32; 2]; 2]; 2],
}

#[test]
fn kernel_verdicts_equal_check_for_generated_worlds() {
    common::require_kernel();
    let netns = Netns::add("pg-ingress-kernel-parity");
    netns.ip(&["link", "set", "lo", "up"]);
    // The IPv6 worlds: the runner's address is the namespace's own (the source of its
    // connections); the rest of the prefix is local, bound by the test's clients.
    let IpAddr::V6(runner) = v6(cluster(127).pods[0].ips[0]) else {
        unreachable!()
    };
    netns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{runner}/128"),
        "dev",
        "lo",
        "nodad",
    ]);
    netns.ip(&["-6", "route", "add", "local", V6_PREFIX, "dev", "lo"]);
    // One thread of our own, in the namespace: its sockets live there, nobody else's do.
    std::thread::scope(|s| {
        s.spawn(|| {
            netns.enter_this_thread();
            // Opened by this thread, so the namespace's own sysctl: clients bind addresses
            // the local route holds, which IPv6 (unlike 127.0.0.0/8) does not count as local.
            std::fs::write("/proc/sys/net/ipv6/ip_nonlocal_bind", "1").expect("ip_nonlocal_bind");
            let cgroup = common::test_cgroup("parity");
            let mut engine = Engine::load(&EngineConfig::default()).expect("load the eBPF programs");
            engine.attach(cgroup.path()).expect("attach to the test cgroup");
            let kernel = std::cell::RefCell::new(Kernel {
                engine,
                cgroup,
                worlds: 0,
                seen: [[[0; 2]; 2]; 2],
            });
            let config = Config {
                cases: CASES,
                failure_persistence: None,
                ..Config::default()
            };
            // Seeded: every run tries the same worlds.
            let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
            let mut runner = TestRunner::new_with_rng(config, rng);
            if let Err(failure) = runner.run(&world(), |w| kernel.borrow_mut().judge(&w)) {
                panic!("{failure}");
            }
            let seen = kernel.borrow().seen;
            eprintln!("verdicts [refused, passed] by [IPv4, IPv6] × [egress, ingress]: {seen:?}");
            assert!(
                seen.iter().flatten().flatten().all(|&n| n > 0),
                "the worlds never produced some verdict: {seen:?}"
            );
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
}

impl Kernel {
    fn judge(&mut self, world: &World) -> Result<(), TestCaseError> {
        let set = parse_policies("world.yaml", &world.policies);
        prop_assert!(set.errors.is_empty(), "{:?}\n{}", set.errors, world.policies);
        let runner = &world.cluster.pods[0];
        let identity = PodIdentity {
            namespace: runner.namespace.clone(),
            name: runner.name.clone(),
            labels: runner.labels.clone(),
        };
        let (allowlist, _) =
            pipeguard::job::allowlist::compile(&set, &identity, &runner.named_ports, Some(&world.cluster))
                .map_err(TestCaseError::fail)?;

        self.worlds += 1;
        let policy_id = self.worlds;
        let cgroup_id = self.cgroup.id().unwrap();
        self.engine.put_policy(policy_id, &allowlist).unwrap();
        self.engine
            .put_pod(
                cgroup_id,
                PodEntry {
                    policy_id,
                    mode: MODE_ENFORCE,
                    flags: if allowlist.ingress.is_some() {
                        POD_INGRESS_ISOLATED
                    } else {
                        0
                    },
                    ingress_policy_id: ingress_id(policy_id),
                    ..PodEntry::default()
                },
            )
            .unwrap();
        let pod = PodCgroup {
            engine: &self.engine,
            cgroup: &self.cgroup,
            cgroup_id,
            address: runner.ips[0],
        };
        let seen = &mut self.seen[usize::from(runner.ips[0].is_ipv6())];
        let result = (|| {
            let others: Vec<&ClusterPod> = world.cluster.pods[1..].iter().collect();
            let targets = others.len() + world.strangers.len();
            for probe in &world.probes {
                let (protocol, what) = if probe.udp { (17, "UDP") } else { (6, "TCP") };
                let port = PortQuery::Number(probe.port);
                let i = probe.target.index(targets);
                let (ip, destination) = match others.get(i) {
                    Some(p) => (p.ips[0], Destination::Pod(p)),
                    None => {
                        let ip = world.strangers[i - others.len()];
                        (ip, Destination::Ip(ip))
                    }
                };
                let check = reach(&set, &world.cluster, runner, &destination, &port, protocol).unwrap();
                let kernel = pod.egress(SocketAddr::new(ip, probe.port), probe.udp);
                seen[0][usize::from(kernel)] += 1;
                prop_assert_eq!(
                    kernel,
                    check.egress == Side::Allow,
                    "egress runner -> {}:{}/{} (check: {})\n{}",
                    ip,
                    probe.port,
                    what,
                    check.reason,
                    world.policies
                );
                let Destination::Pod(source) = destination else {
                    continue;
                };
                let check = reach(
                    &set,
                    &world.cluster,
                    source,
                    &Destination::Pod(runner),
                    &port,
                    protocol,
                )
                .unwrap();
                let kernel = pod.ingress(ip, probe.port, probe.udp);
                seen[1][usize::from(kernel)] += 1;
                prop_assert_eq!(
                    kernel,
                    check.ingress == Side::Allow,
                    "ingress {} -> runner:{}/{} (check: {})\n{}",
                    ip,
                    probe.port,
                    what,
                    check.reason,
                    world.policies
                );
            }
            Ok(())
        })();
        self.engine.delete_pod(cgroup_id).unwrap();
        self.engine.delete_policy(policy_id, &allowlist).unwrap();
        result
    }
}

struct PodCgroup<'a> {
    engine: &'a Engine,
    cgroup: &'a OwnedCgroup,
    cgroup_id: u64,
    /// The runner's address; its family is the world's.
    address: IpAddr,
}

impl PodCgroup<'_> {
    /// The runner's attempt to `dest`: true when it passed the hooks.
    fn egress(&self, dest: SocketAddr, udp: bool) -> bool {
        let socket = common::inside(self.cgroup.path(), || new_socket(udp, dest.is_ipv6()));
        let (addr, len) = common::probe::sockaddr(&dest);
        if udp {
            // SAFETY: a valid socket, buffer and address.
            let sent = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    b"p".as_ptr().cast(),
                    1,
                    0,
                    (&raw const addr).cast(),
                    len,
                )
            };
            return match sent {
                1 => true,
                _ => refused(std::io::Error::last_os_error(), dest),
            };
        }
        // SAFETY: a valid socket and address.
        if unsafe { libc::connect(socket.as_raw_fd(), (&raw const addr).cast(), len) } == 0 {
            return true;
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINPROGRESS) {
            return refused(error, dest);
        }
        // Nothing listens in the namespace: a pass ends in a reset (or, if something did
        // listen, a connection); a SYN the packet hook dropped would never end.
        let deadline = Instant::now() + DECIDE_WITHIN;
        while Instant::now() < deadline {
            if writable(&socket, 20) {
                return true;
            }
        }
        panic!("egress to {dest}: connect passed the socket hook but never completed");
    }

    /// An attempt from `source` to the runner's listener on `port`: true when it got through.
    fn ingress(&self, source: IpAddr, port: u16, udp: bool) -> bool {
        let listener = common::inside(self.cgroup.path(), || Listener::bind(port, udp, source.is_ipv6()));
        let before = self.denied();
        let dest = SocketAddr::new(self.address, port);
        let client = new_socket(udp, source.is_ipv6());
        let (from, len) = common::probe::sockaddr(&SocketAddr::new(source, 0));
        // SAFETY: a valid socket and address.
        let bound = unsafe { libc::bind(client.as_raw_fd(), (&raw const from).cast(), len) };
        assert_eq!(bound, 0, "bind {source}: {}", std::io::Error::last_os_error());
        let (to, len) = common::probe::sockaddr(&dest);
        // SAFETY: a valid socket, buffer and address.
        let started = unsafe {
            if udp {
                libc::sendto(
                    client.as_raw_fd(),
                    b"p".as_ptr().cast(),
                    1,
                    0,
                    (&raw const to).cast(),
                    len,
                ) as i32
            } else {
                libc::connect(client.as_raw_fd(), (&raw const to).cast(), len)
            }
        };
        let error = std::io::Error::last_os_error();
        assert!(
            started >= 0 || error.raw_os_error() == Some(libc::EINPROGRESS),
            "{source} -> {dest}: {error}"
        );
        let deadline = Instant::now() + DECIDE_WITHIN;
        while Instant::now() < deadline {
            if listener.got_one() {
                return true;
            }
            if self.denied() > before {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("ingress {source} -> {dest}: neither reached the listener nor was refused");
    }

    /// The pod's ingress refusals so far.
    fn denied(&self) -> u64 {
        self.engine
            .counters(self.cgroup_id)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.hook == Hook::Ingress as u8 && k.verdict == VERDICT_DENY)
            .map(|(_, c)| c.packets)
            .sum()
    }
}

/// The runner's listener on every address of the namespace.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listener {
    fn bind(port: u16, udp: bool, v6: bool) -> Self {
        let any = if v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let at = SocketAddr::new(any, port);
        let listener = if udp {
            Self::Udp(UdpSocket::bind(at).unwrap_or_else(|e| panic!("bind udp {port}: {e}")))
        } else {
            Self::Tcp(TcpListener::bind(at).unwrap_or_else(|e| panic!("listen tcp {port}: {e}")))
        };
        match &listener {
            Self::Tcp(l) => l.set_nonblocking(true).unwrap(),
            Self::Udp(s) => s.set_nonblocking(true).unwrap(),
        }
        listener
    }

    /// A connection reached accept(), or a datagram the socket.
    fn got_one(&self) -> bool {
        let result = match self {
            Self::Tcp(l) => l.accept().map(drop),
            Self::Udp(s) => s.recv_from(&mut [0u8; 8]).map(drop),
        };
        match result {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("the runner's listener: {e}"),
        }
    }
}

fn new_socket(udp: bool, v6: bool) -> OwnedFd {
    let kind = if udp {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK
    };
    // SAFETY: plain syscall.
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// EPERM is the programs' refusal; any other error is not a verdict.
fn refused(error: std::io::Error, dest: SocketAddr) -> bool {
    match error.raw_os_error() {
        Some(libc::EPERM) => false,
        // The reset that answers a connection to a port nobody listens on.
        Some(libc::ECONNREFUSED) => true,
        _ => panic!("egress to {dest}: {error}"),
    }
}

/// Waits up to `ms` for a pending connect to finish (connected or reset).
fn writable(socket: &OwnedFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}
