//! The DNS section's client verbs, run by `bench-worker client` inside (or outside) the
//! guarded cgroup: resolve names over UDP the way glibc does (a fresh connected socket per
//! lookup) and optionally connect to the answer; and BPF_PROG_TEST_RUN of `pg_egress` from
//! inside the cgroup, where the kernel's dummy socket inherits this task's cgroup so the
//! program sees a packet of this pod.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    kernel::{bpf, put_u32, put_u64},
    net::{PORT_CRR, Sample, linger_zero},
};

/// The names a DNS-filtered bench job resolves (all allowed, all answered with 127.0.0.1).
pub(super) const QUERIED_NAMES: usize = 16;
/// A name no bench rule allows (the test-run check that the pod is recognised).
pub(super) const REFUSED_NAME: &str = "refused.pgbench.test";
/// A UDP port on the resolver's address the IP rules allow, that is not DNS.
pub(super) const NON_DNS_PORT: u16 = 5300;

pub(super) fn name(i: usize) -> String {
    format!("n{i}.pgbench.test")
}

/// `Some(sample)` when `words` is one of this module's verbs.
pub(super) fn command(words: &[&str]) -> Option<Result<Sample>> {
    let run = || -> Result<Sample> {
        match words {
            ["dns-resolve", resolver, secs] => loop_for(resolver, secs, false),
            ["dns-crr", resolver, secs] => loop_for(resolver, secs, true),
            ["egress-test-run", prog_id, resolver, kind, repeat] => {
                test_run(prog_id.parse()?, resolver.parse()?, kind, repeat.parse()?)
            }
            _ => bail!("unreachable"),
        }
    };
    matches!(
        words.first(),
        Some(&("dns-resolve" | "dns-crr" | "egress-test-run"))
    )
    .then(run)
}

fn loop_for(resolver: &str, secs: &str, connect: bool) -> Result<Sample> {
    let resolver: SocketAddr = resolver
        .parse()
        .with_context(|| format!("resolver {resolver:?}"))?;
    let dur = Duration::from_secs_f64(secs.parse()?);
    let start = Instant::now();
    let mut ops = 0u64;
    let mut b = [1u8; 1];
    while start.elapsed() < dur {
        let ip = resolve(resolver, &name(ops as usize % QUERIED_NAMES), ops as u16)?;
        if connect {
            let addr = SocketAddr::from((ip, PORT_CRR));
            let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
            s.set_nodelay(true)?;
            linger_zero(&s)?;
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
        }
        ops += 1;
    }
    Ok(Sample {
        ops,
        secs: start.elapsed().as_secs_f64(),
        bytes: 0,
    })
}

/// One A lookup: a fresh UDP socket connected to the resolver, as glibc's stub does.
fn resolve(resolver: SocketAddr, name: &str, id: u16) -> Result<Ipv4Addr> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(resolver)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send(&query(id, name))?;
    let mut buf = [0u8; 512];
    let n = s
        .recv(&mut buf)
        .with_context(|| format!("no answer from {resolver} for {name}"))?;
    first_a(&buf[..n], id).with_context(|| format!("answer for {name}"))
}

/// A standard query for `name`, type A, recursion desired.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
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

fn first_a(msg: &[u8], id: u16) -> Result<Ipv4Addr> {
    if msg.len() < 12 || msg[..2] != id.to_be_bytes() || msg[3] & 0x0f != 0 {
        bail!("not a successful answer to query {id}");
    }
    let count = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = skip_name(msg, 12).context("question")? + 4;
    for _ in 0..count {
        at = skip_name(msg, at).context("record name")?;
        let rr = msg.get(at..at + 10).context("record")?;
        let len = u16::from_be_bytes([rr[8], rr[9]]) as usize;
        let data = msg.get(at + 10..at + 10 + len).context("record data")?;
        if rr[..2] == [0, 1] && len == 4 {
            return Ok(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    bail!("no A record")
}

const BPF_PROG_TEST_RUN: i32 = 10;
const BPF_PROG_GET_FD_BY_ID: i32 = 13;

/// `repeat` runs of program `prog_id` on one packet from this task's cgroup to `resolver`:
/// `kind` is `allowed` (a query for an allowed name), `refused` (a query no rule allows),
/// `other` (UDP to a non-DNS port of the same address) or `udp` (a 64-byte datagram to
/// the address and port given, the data path's test packet). Answers `ok RETVAL NS 0`: the
/// program's verdict (1 pass, 0 drop) and the kernel's mean ns per run.
pub(super) fn test_run(prog_id: u32, resolver: SocketAddr, kind: &str, repeat: u32) -> Result<Sample> {
    let SocketAddr::V4(resolver) = resolver else {
        bail!("an IPv4 resolver");
    };
    let (payload, port) = match kind {
        "allowed" => (query(0x4242, &name(0)), 53),
        "refused" => (query(0x4243, REFUSED_NAME), 53),
        "other" => (vec![0x5a; 34], NON_DNS_PORT),
        "udp" => (vec![0x5a; 64], resolver.port()),
        _ => bail!("kind {kind:?}: allowed, refused, other or udp"),
    };
    let frame = udp_frame(*resolver.ip(), port, &payload);
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, prog_id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| format!("program id {prog_id}"))?;
    // SAFETY: the kernel just returned this fd to us.
    let prog = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut attr = [0u8; 80];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, frame.len() as u32);
    put_u64(&mut attr, 16, frame.as_ptr() as u64);
    put_u32(&mut attr, 32, repeat);
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    let word = |off: usize| u32::from_ne_bytes(attr[off..off + 4].try_into().expect("4 bytes"));
    Ok(Sample {
        ops: word(4) as u64,
        secs: word(36) as f64,
        bytes: 0,
    })
}

/// Ethernet + IPv4 + UDP around `payload`, from 127.0.0.1:40000 (cgroup_skb programs see
/// it from the IP header on; the kernel strips the Ethernet header).
fn udp_frame(dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[127, 0, 0, 1]);
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = ip
        .chunks(2)
        .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}
