//! The load generators and the servers they talk to: `xtask bench-worker server|client`.
//!
//! Both are driven over stdin/stdout so the orchestrator can run them inside network
//! namespaces and inside `pipeguard exec` (which passes stdin and stdout through). A client
//! reads one command per line and answers one line: `ok OPS SECONDS BYTES` or `err TEXT`.
//! Both exit when stdin closes.

use std::{
    io::{self, BufRead, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Connect + 1-byte request + 1-byte response + close (TCP_CRR style).
pub const PORT_CRR: u16 = 18801;
/// 1-byte ping-pong on one connection (TCP_RR style).
pub const PORT_RR: u16 = 18802;
/// A sink for single-stream throughput.
pub const PORT_STREAM: u16 = 18803;
/// A UDP sink.
pub const PORT_UDP: u16 = 18804;

const STREAM_BUF: usize = 64 * 1024;

/// `server BIND_IP...`: serves all four ports on each address until stdin closes.
pub fn server(binds: &[Ipv4Addr]) -> Result<()> {
    for &bind in binds {
        serve(bind)?;
    }
    println!("ready");
    io::stdout().flush()?;
    // Serve until the orchestrator closes our stdin.
    io::copy(&mut io::stdin().lock(), &mut io::sink())?;
    Ok(())
}

/// Listens on the four ports of `bind`, each served by its own thread.
fn serve(bind: Ipv4Addr) -> Result<()> {
    let crr = listen(bind, PORT_CRR)?;
    let rr = listen(bind, PORT_RR)?;
    let stream = listen(bind, PORT_STREAM)?;
    let udp = UdpSocket::bind((bind, PORT_UDP)).context("binding the UDP sink")?;

    thread::spawn(move || {
        for conn in crr.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            let mut b = [0u8; 1];
            if conn.read_exact(&mut b).is_ok() {
                let _ = conn.write_all(&b);
            }
        }
    });
    thread::spawn(move || {
        for conn in rr.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut b = [0u8; 1];
                while conn.read_exact(&mut b).is_ok() {
                    if conn.write_all(&b).is_err() {
                        break;
                    }
                }
            });
        }
    });
    thread::spawn(move || {
        for conn in stream.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 4 * STREAM_BUF];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            let _ = udp.recv_from(&mut buf);
        }
    });
    Ok(())
}

fn listen(ip: Ipv4Addr, port: u16) -> Result<TcpListener> {
    // std's listen backlog is enough: every client waits for its answer before the next connect.
    TcpListener::bind((ip, port)).with_context(|| format!("binding {ip}:{port}"))
}

/// `client`: one command per stdin line, one answer per stdout line.
pub fn client() -> Result<()> {
    println!("ready");
    io::stdout().flush()?;
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let answer = match command(&line) {
            Ok(Sample { ops, secs, bytes }) => format!("ok {ops} {secs:.6} {bytes}"),
            Err(e) => format!("err {e:#}").replace('\n', " "),
        };
        println!("{answer}");
        io::stdout().flush()?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub ops: u64,
    pub secs: f64,
    pub bytes: u64,
}

impl Sample {
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    pub fn byte_rate(&self) -> f64 {
        self.bytes as f64 / self.secs
    }
}

fn command(line: &str) -> Result<Sample> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if let Some(sample) = super::dns_worker::command(&words) {
        return sample;
    }
    if let ["syn", addr, amount, from] = words[..] {
        let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
        return syn(
            from.parse().with_context(|| format!("source {from:?}"))?,
            addr,
            secs(amount)?,
        );
    }
    let [verb, addr, amount] = words[..] else {
        bail!("expected VERB ADDR AMOUNT, got {line:?}");
    };
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
    match verb {
        "crr" => crr(addr, secs(amount)?),
        "rr" => rr(addr, secs(amount)?),
        "stream" => stream(addr, secs(amount)?),
        "udp" => udp(addr, secs(amount)?),
        "deny" => deny(addr, amount.parse()?),
        "paced-deny" => paced_deny(addr, amount.parse()?),
        _ => bail!("unknown command {verb:?}"),
    }
}

fn secs(s: &str) -> Result<Duration> {
    Ok(Duration::from_secs_f64(s.parse()?))
}

/// SO_LINGER 0: close sends RST and leaves no TIME_WAIT, so the ephemeral ports never run out.
pub(super) fn linger_zero(s: &TcpStream) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn crr(addr: SocketAddr, dur: Duration) -> Result<Sample> {
    let start = Instant::now();
    let mut ops = 0;
    let mut b = [1u8; 1];
    while start.elapsed() < dur {
        let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        linger_zero(&s)?;
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        drop(s);
        ops += 1;
    }
    Ok(Sample {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes: 0,
    })
}

fn rr(addr: SocketAddr, dur: Duration) -> Result<Sample> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let mut b = [1u8; 1];
    let start = Instant::now();
    let mut ops = 0;
    while start.elapsed() < dur {
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        ops += 1;
    }
    Ok(Sample {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes: ops,
    })
}

fn stream(addr: SocketAddr, dur: Duration) -> Result<Sample> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    let buf = vec![0x5au8; STREAM_BUF];
    let start = Instant::now();
    let mut ops = 0;
    while start.elapsed() < dur {
        s.write_all(&buf)?;
        ops += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Sample {
        ops,
        secs,
        bytes: ops * STREAM_BUF as u64,
    })
}

fn udp(addr: SocketAddr, dur: Duration) -> Result<Sample> {
    // Unconnected: every datagram passes the sendmsg4 hook.
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let buf = [0x5au8; 64];
    let start = Instant::now();
    let mut ops = 0;
    while start.elapsed() < dur {
        for _ in 0..64 {
            // ENOBUFS and the like count as not sent; the rate is of accepted datagrams.
            if s.send_to(&buf, addr).is_ok() {
                ops += 1;
            }
        }
    }
    Ok(Sample {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes: ops * buf.len() as u64,
    })
}

/// `syn ADDR SECS FROM_IP`: connection attempts from `from` that send their SYN and are
/// closed at once, each from a new ephemeral port: one SYN per attempt reaches the server
/// (a server that refuses it drops it; one that admits it answers, and the closed socket's
/// RST follows). A closed socket in SYN-SENT sends nothing, so no TIME_WAIT builds up.
fn syn(from: Ipv4Addr, addr: SocketAddr, dur: Duration) -> Result<Sample> {
    let SocketAddr::V4(to) = addr else {
        bail!("syn: {addr} is not IPv4");
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (src, dst) = (sockaddr(from, 0), sockaddr(*to.ip(), to.port()));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let start = Instant::now();
    let mut ops = 0;
    while start.elapsed() < dur {
        for _ in 0..16 {
            // SAFETY: a socket of our own, addresses of the right size, closed before the next.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
                if fd < 0 {
                    bail!("socket: {}", io::Error::last_os_error());
                }
                if libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) != 0 {
                    let e = io::Error::last_os_error();
                    libc::close(fd);
                    bail!("bind {from}: {e}");
                }
                let rc = libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len);
                let e = io::Error::last_os_error();
                libc::close(fd);
                if rc != 0 && e.raw_os_error() != Some(libc::EINPROGRESS) {
                    bail!("connect {addr} from {from}: {e}");
                }
            }
            ops += 1;
        }
    }
    Ok(Sample {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes: 0,
    })
}

/// `n` connects that the policy denies, as fast as possible; each must fail with EPERM.
fn deny(addr: SocketAddr, n: u64) -> Result<Sample> {
    let start = Instant::now();
    let mut ops = 0;
    for _ in 0..n {
        if denied(addr)? {
            ops += 1;
        }
    }
    Ok(Sample {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes: 0,
    })
}

/// `n` denied connects, one per millisecond (for delivery latency).
fn paced_deny(addr: SocketAddr, n: u64) -> Result<Sample> {
    let start = Instant::now();
    let mut ops = 0;
    for i in 0..n {
        let due = start + Duration::from_millis(i);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        if denied(addr)? {
            ops += 1;
        }
    }
    Ok(Sample {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes: 0,
    })
}

fn denied(addr: SocketAddr) -> Result<bool> {
    match TcpStream::connect(addr) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(true),
        Err(e) => bail!("connect {addr}: expected EPERM, got {e}"),
        Ok(_) => bail!("connect {addr} was allowed; the bench policy should deny it"),
    }
}
