//! DNS probe actions (`dns-*`), run inside the guarded cgroup: queries by every send route,
//! resolve-then-connect, a job's own forged resolver, and glibc's getaddrinfo.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

/// Generous: dnsmasq logs every query synchronously, and on a busy machine a log write can
/// stall it for a second or more.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A standard query with one question, recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)? as usize;
        if len == 0 {
            return Some(at + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        at += len + 1;
    }
}

/// The A/AAAA addresses of an answer to query `id`; an error for anything else.
pub fn answer_addrs(msg: &[u8], id: u16) -> std::io::Result<Vec<IpAddr>> {
    let bad = |why: &str| std::io::Error::other(format!("bad answer: {why}"));
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id {
        return Err(bad("id"));
    }
    if msg[3] & 0x0f != 0 {
        return Err(bad("rcode"));
    }
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = skip_name(msg, 12).ok_or_else(|| bad("question"))? + 4;
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(msg, at).ok_or_else(|| bad("name"))?;
        let rr = msg.get(at..at + 10).ok_or_else(|| bad("record"))?;
        let (rtype, rdlen) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        at += 10;
        let data = msg.get(at..at + rdlen).ok_or_else(|| bad("rdata"))?;
        match (rtype, rdlen) {
            (1, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(data).unwrap())),
            (28, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(data).unwrap())),
            _ => {}
        }
        at += rdlen;
    }
    if out.is_empty() {
        return Err(bad("no address"));
    }
    Ok(out)
}

fn socket_for(resolver: &SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(if resolver.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    Ok(socket)
}

/// Sends a query by `route` and waits for its answer.
pub fn resolve(route: &str, resolver: SocketAddr, name: &str) -> std::io::Result<Vec<IpAddr>> {
    let id: u16 = rand_id();
    let q = query(id, name, 1);
    let mut buf = [0u8; 1500];
    match route {
        "tcp" => {
            let mut stream = TcpStream::connect_timeout(&resolver, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            stream.write_all(&framed)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
            stream.read_exact(&mut msg)?;
            answer_addrs(&msg, id)
        }
        "udp" => {
            let socket = socket_for(&resolver)?;
            socket.connect(resolver)?;
            socket.send(&q)?;
            let n = socket.recv(&mut buf)?;
            answer_addrs(&buf[..n], id)
        }
        "sendto" => {
            let socket = socket_for(&resolver)?;
            socket.send_to(&q, resolver)?;
            let (n, _) = socket.recv_from(&mut buf)?;
            answer_addrs(&buf[..n], id)
        }
        "sendmsg" | "sendmmsg" => {
            let socket = socket_for(&resolver)?;
            let (mut name, name_len) = super::probe::sockaddr(&resolver);
            let mut iov = libc::iovec {
                iov_base: q.as_ptr() as *mut _,
                iov_len: q.len(),
            };
            // SAFETY: all-zero is a valid msghdr; the pointers outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&raw mut name).cast();
            msg.msg_namelen = name_len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            let rc = if route == "sendmsg" {
                // SAFETY: valid socket and msghdr.
                unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) as i64 }
            } else {
                let mut m = [libc::mmsghdr {
                    msg_hdr: msg,
                    msg_len: 0,
                }];
                // SAFETY: valid socket, one initialized mmsghdr.
                unsafe { libc::sendmmsg(socket.as_raw_fd(), m.as_mut_ptr(), 1, 0) as i64 }
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (n, _) = socket.recv_from(&mut buf)?;
            answer_addrs(&buf[..n], id)
        }
        other => panic!("unknown DNS route {other}"),
    }
}

fn rand_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos ^ (nanos >> 16) ^ std::process::id()) as u16
}

fn connect_send(ip: IpAddr, port: u16, payload: &[u8]) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::new(ip, port), TIMEOUT)?;
    stream.write_all(payload)?;
    Ok(stream)
}

/// `dns-ROUTE RESOLVER NAME`, `dns-connect RESOLVER NAME PORT PAYLOAD`,
/// `dns-race RESOLVER PATTERN(with {}) PORT N`, `dns-expiry RESOLVER NAME PORT WAIT_MS`,
/// `dns-forge OWN_RESOLVER NAME FORGED_IP PORT`, `dns-getaddrinfo RESOLV_CONF NAME`,
/// `dns-ask RESOLVER NAME REPLIES`, `dns-replay RESOLVER NAME FORGED_IP FROM`,
/// `dns-floor RESOLVER NAME PORT PAST_TTL_MS PAST_FLOOR_MS`,
/// `dns-hammer RESOLVER ALLOWED REFUSED PORT STOP_FILE`, `dns-gso RESOLVER ALLOWED SMUGGLED`,
/// `dns-hold RESOLVER NAME PORT FLAG_FILE`.
pub fn run(kind: &str, target: &str, rest: &str) -> std::io::Result<()> {
    let result = run_action(kind, target, rest);
    if let Err(e) = &result {
        // The outcome carries only errno; the test shows this line when it fails.
        println!("PG_DNS_ERROR {kind} {target} {rest}: {e}");
    }
    result
}

fn run_action(kind: &str, target: &str, rest: &str) -> std::io::Result<()> {
    let resolver = || -> SocketAddr { target.parse().expect("resolver address") };
    let args: Vec<&str> = rest.split(' ').collect();
    match kind {
        "dns-connect" => {
            let addrs = resolve("udp", resolver(), args[0])?;
            connect_send(addrs[0], args[1].parse().unwrap(), args[2].as_bytes()).map(drop)
        }
        "dns-race" => {
            let (pattern, port, n): (&str, u16, usize) =
                (args[0], args[1].parse().unwrap(), args[2].parse().unwrap());
            let mut refused = 0;
            for i in 0..n {
                let name = pattern.replace("{}", &i.to_string());
                let addrs = resolve("udp", resolver(), &name)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("cycle {i}, {name}: {e}")))?;
                if connect_send(addrs[0], port, b"r").is_err() {
                    refused += 1;
                }
            }
            if refused > 0 {
                return Err(std::io::Error::other(format!(
                    "{refused} of {n} connects refused"
                )));
            }
            Ok(())
        }
        "dns-hold" => {
            // "before" on a connection to the name's address; once FLAG_FILE exists (the test
            // changed the policy meanwhile), "after" on the same connection.
            let (name, port, flag) = (args[0], args[1].parse().unwrap(), args[2]);
            let addrs = resolve("udp", resolver(), name)?;
            let mut stream = connect_send(addrs[0], port, b"before")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !std::path::Path::new(flag).exists() {
                assert!(std::time::Instant::now() < deadline, "dns-hold: no {flag}");
                std::thread::sleep(Duration::from_millis(10));
            }
            // Dropped at egress: the write itself may succeed (queued) or fail.
            let _ = stream.write_all(b"after");
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        }
        "dns-expiry" => {
            let (name, port, wait): (&str, u16, u64) =
                (args[0], args[1].parse().unwrap(), args[2].parse().unwrap());
            let addrs = resolve("udp", resolver(), name)?;
            let mut early = connect_send(addrs[0], port, b"early-")?;
            std::thread::sleep(Duration::from_millis(wait));
            early.write_all(b"still-open")?;
            match connect_send(addrs[0], port, b"late-connect") {
                Ok(_) => Err(std::io::Error::other("a new connection after expiry was allowed")),
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
                Err(e) => Err(e),
            }
        }
        "dns-forge" => forge(
            resolver(),
            args[0],
            args[1].parse().unwrap(),
            args[2].parse().unwrap(),
        ),
        "dns-getaddrinfo" => getaddrinfo(target, args[0]),
        "dns-ask" => ask(resolver(), args[0], args[1].parse().unwrap()),
        "dns-replay" => replay(
            resolver(),
            args[0],
            args[1].parse().unwrap(),
            args[2].parse().unwrap(),
        ),
        "dns-floor" => floor(
            resolver(),
            args[0],
            args[1].parse().unwrap(),
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
        ),
        "dns-gso" => gso(resolver(), args[0], args[1]),
        "dns-hammer" => hammer(resolver(), args[0], args[1], args[2].parse().unwrap(), args[3]),
        route => resolve(route.trim_start_matches("dns-"), resolver(), args[0]).map(drop),
    }
}

/// The job's own "resolver" on `own` answers every query with `forged`; then the job
/// resolves `name` through it and connects to the forged address. Ok only if the connect
/// succeeds (the test expects an error).
fn forge(own: SocketAddr, name: &str, forged: Ipv4Addr, port: u16) -> std::io::Result<()> {
    let server = UdpSocket::bind(own)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let mut reply = buf[..n].to_vec();
            reply[2] |= 0x80;
            reply[7] = 1;
            reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            reply.extend_from_slice(&forged.octets());
            let _ = server.send_to(&reply, from);
        }
    });
    let answered = resolve("udp", own, name);
    let connected = connect_send(IpAddr::V4(forged), port, b"forged");
    match (answered, connected) {
        (_, Ok(_)) => Ok(()),
        (Ok(_), Err(e)) => Err(std::io::Error::other(format!("answered, connect refused: {e}"))),
        (Err(a), Err(e)) => Err(std::io::Error::new(
            e.kind(),
            format!("no answer ({a}); connect: {e}"),
        )),
    }
}

/// glibc's resolver through `resolv_conf`, bind-mounted over /etc/resolv.conf in a private
/// mount namespace of this probe. Prints how long it took.
fn getaddrinfo(resolv_conf: &str, name: &str) -> std::io::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    // SAFETY: plain syscalls with valid C strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(
                c("none").as_ptr(),
                c("/").as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            || libc::mount(
                c(resolv_conf).as_ptr(),
                c("/etc/resolv.conf").as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    let started = Instant::now();
    let host = c(name);
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid name, no hints, out-pointer.
    let rc = unsafe { libc::getaddrinfo(host.as_ptr(), std::ptr::null(), std::ptr::null(), &mut res) };
    println!(
        "PG_GETADDRINFO {name} rc={rc} ms={}",
        started.elapsed().as_millis()
    );
    if rc != 0 {
        return Err(std::io::Error::other(format!("getaddrinfo {name}: {rc}")));
    }
    // SAFETY: res came from a successful getaddrinfo.
    unsafe { libc::freeaddrinfo(res) };
    Ok(())
}

/// An answer to a query with `id` for `name` carrying one A record, as a resolver sends it.
pub fn answer(id: u16, name: &str, addr: Ipv4Addr) -> Vec<u8> {
    let mut a = query(id, name, 1);
    a[2] |= 0x80;
    a[7] = 1;
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    a.extend_from_slice(&addr.octets());
    a
}

/// The id of a DNS message.
pub fn message_id(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

/// An unconnected socket (it takes datagrams from anyone, as some stub resolvers' do) sends
/// one query and waits for `replies` datagrams from any source. Ok once all arrived: each
/// went through the ingress hook before it was queued here.
fn ask(resolver: SocketAddr, name: &str, replies: usize) -> std::io::Result<()> {
    let socket = socket_for(&resolver)?;
    socket.send_to(&query(rand_id(), name, 1), resolver)?;
    let mut buf = [0u8; 1500];
    for i in 0..replies {
        socket
            .recv_from(&mut buf)
            .map_err(|e| std::io::Error::new(e.kind(), format!("reply {i}: {e}")))?;
    }
    Ok(())
}

/// A UDP socket bound to `from` with SO_REUSEADDR, so it can share the port of a resolver
/// that set it too (dnsmasq does).
fn bind_shared(from: SocketAddr) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    let family = if from.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh socket this function owns from here on.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let (name, len) = super::probe::sockaddr(&from);
    // SAFETY: valid socket, option and address buffers.
    unsafe {
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of_val(&one) as libc::socklen_t,
        ) != 0
            || libc::bind(fd, (&raw const name).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(socket)
}

/// A genuine query and answer, then the job replays the answer's bytes with its address
/// replaced by `forged`, from a socket bound to `from`, to the socket that asked. Returns
/// the replaying send's result; the test then tries the forged address.
fn replay(resolver: SocketAddr, name: &str, forged: Ipv4Addr, from: SocketAddr) -> std::io::Result<()> {
    let asker = socket_for(&resolver)?;
    let id = rand_id();
    asker.send_to(&query(id, name, 1), resolver)?;
    let mut buf = [0u8; 1500];
    let (n, _) = asker.recv_from(&mut buf)?;
    let genuine = answer_addrs(&buf[..n], id)?;
    let mut forgery = buf[..n].to_vec();
    assert_eq!(
        genuine.last(),
        Some(&IpAddr::from(<[u8; 4]>::try_from(&forgery[n - 4..]).unwrap())),
        "the answer ends with its one A record"
    );
    forgery[n - 4..].copy_from_slice(&forged.octets());
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), asker.local_addr()?.port());
    let sent = bind_shared(from).and_then(|f| f.send_to(&forgery, to));
    asker.set_read_timeout(Some(Duration::from_millis(300)))?;
    println!(
        "PG_REPLAY from {from}: send {sent:?}, delivered to the asker: {}",
        asker.recv_from(&mut buf).is_ok()
    );
    sent.map(drop)
}

/// Resolves `name` (an answer with a TTL below the floor), connects anew once the TTL has
/// passed (must work: the floor), and again once the floor has passed (must be refused).
fn floor(resolver: SocketAddr, name: &str, port: u16, past_ttl: u64, past_floor: u64) -> std::io::Result<()> {
    let started = Instant::now();
    let addrs = resolve("udp", resolver, name)?;
    std::thread::sleep(Duration::from_millis(past_ttl).saturating_sub(started.elapsed()));
    connect_send(addrs[0], port, b"within-floor")
        .map_err(|e| std::io::Error::new(e.kind(), format!("after the TTL, within the floor: {e}")))?;
    std::thread::sleep(Duration::from_millis(past_floor).saturating_sub(started.elapsed()));
    match connect_send(addrs[0], port, b"past-floor") {
        Ok(_) => Err(std::io::Error::other(
            "a new connection after the floor was allowed",
        )),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Until `stop` exists: resolve `allowed` anew and connect to it (must work), and query
/// `refused` with a fresh label each time (the send must fail with EPERM). Fails at the
/// first cycle that breaks either; prints how many cycles ran.
fn hammer(resolver: SocketAddr, allowed: &str, refused: &str, port: u16, stop: &str) -> std::io::Result<()> {
    let mut cycle = 0u64;
    while !std::path::Path::new(stop).exists() {
        cycle += 1;
        let at = |what: &str, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cycle {cycle}, {what}: {e}"))
        };
        let addrs = resolve("udp", resolver, allowed).map_err(|e| at("resolve", e))?;
        connect_send(addrs[0], port, b"h").map_err(|e| at("connect", e))?;
        let socket = socket_for(&resolver)?;
        match socket.send_to(&query(rand_id(), &format!("c{cycle}.{refused}"), 1), resolver) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            other => return Err(at("refused query", std::io::Error::other(format!("{other:?}")))),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("PG_HAMMER cycles={cycle}");
    Ok(())
}

/// Linux's UDP_SEGMENT socket option (UDP GSO), which the libc crate does not name.
const UDP_SEGMENT: libc::c_int = 103;

/// One send with UDP GSO: the kernel splits the buffer into datagrams of `gso_size` bytes
/// after the egress hook saw it whole. The first datagram asks for `allowed`, the second for
/// `smuggled`; the egress hook must judge every datagram, not only the first.
fn gso(resolver: SocketAddr, allowed: &str, smuggled: &str) -> std::io::Result<()> {
    let socket = socket_for(&resolver)?;
    let (mut first, second) = (query(rand_id(), allowed, 1), query(rand_id(), smuggled, 1));
    let size = first.len().max(second.len());
    // Trailing bytes after the question: resolvers ignore them.
    first.resize(size, 0);
    let segment = size as libc::c_int;
    // SAFETY: valid socket and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&raw const segment).cast(),
            size_of_val(&segment) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buffer = first;
    buffer.extend_from_slice(&second);
    socket.send_to(&buffer, resolver).map(drop)
}
