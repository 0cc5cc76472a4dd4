//! Probe actions that only a root job can even try: TUN injection and the bpf() syscall.
//! See tests/kernel_root_job.rs.

use std::{
    io::Write as _,
    mem::zeroed,
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

fn check(ret: i64) -> std::io::Result<i64> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates a TUN device, brings it up, lets it carry loopback addresses and writes one
/// IPv4/UDP packet `127.0.0.1:40000 → target` into it: the packet enters the host as
/// incoming traffic, which no egress hook sees. The device is not persistent: it goes away
/// with this process's file descriptor. `target` must be in 127.0.0.0/8.
pub fn tun_inject(target: &str, payload: &[u8]) -> std::io::Result<()> {
    let target: SocketAddrV4 = match target.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.ip().is_loopback() => a,
        other => panic!("tun-inject only sends to 127.0.0.0/8, got {other:?}"),
    };
    // SAFETY: open with a valid C string.
    let fd = check(unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) }.into())?;
    // SAFETY: the kernel returned a new fd that we own.
    let tun = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let name = format!("pgt{}", std::process::id());
    // SAFETY: all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { zeroed() };
    for (slot, byte) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
    // SAFETY: valid fd and ifreq.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut ifr) }.into())?;

    // SAFETY: a plain socket for the interface ioctl.
    let ctl = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) }.into())?;
    // SAFETY: we own the new fd.
    let ctl = unsafe { OwnedFd::from_raw_fd(ctl as i32) };
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: valid fd and ifreq naming our device.
    check(unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr) }.into())?;

    // Loopback addresses arriving on a non-loopback device are martians unless these are set.
    for (key, value) in [("route_localnet", "1"), ("accept_local", "1"), ("rp_filter", "0")] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/{key}"), value)?;
    }
    let packet = ipv4_udp(*target.ip(), target.port(), payload);
    let mut file = std::fs::File::from(tun);
    file.write_all(&packet)?;
    // Give the stack a moment before the device (and the packet) go away with the fd.
    std::thread::sleep(std::time::Duration::from_millis(100));
    Ok(())
}

fn ipv4_udp(dst: std::net::Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    p.extend_from_slice(&[127, 0, 0, 1]);
    p.extend_from_slice(&dst.octets());
    let mut sum: u32 = p
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    p.extend_from_slice(payload);
    p
}

/// Walks the ids of the loaded BPF programs (BPF_PROG_GET_NEXT_ID), the first step to
/// opening and detaching the guard's programs. Read-only: it changes nothing.
pub fn bpf_ids() -> std::io::Result<()> {
    const BPF_PROG_GET_NEXT_ID: i64 = 11;
    let mut attr = [0u32; 16];
    // SAFETY: a zeroed attr (start_id 0) large enough for the command.
    check(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_NEXT_ID,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    })
    .map(drop)
}

/// For a job that outlives its `exec`: writes its pid, then connects to `target` every
/// 50 ms and appends `denied`, `ok` or `error N` to `log` per attempt, for at most 60 s
/// (the test kills it sooner; the limit keeps a failed test from leaking it for long).
pub fn probe_loop(target: &str, log: &str) {
    let target: SocketAddr = target.parse().expect("probe-loop target");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("probe-loop log");
    writeln!(out, "pid {}", std::process::id()).unwrap();
    while std::time::Instant::now() < deadline {
        let line = match std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(1)) {
            Ok(_) => "ok".to_string(),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => "denied".to_string(),
            Err(e) => format!("error {e}"),
        };
        writeln!(out, "{line}").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Binds a TCP port below 1024 on 127.0.0.1 (the first free one from 600 up), as a job's
/// test server might: needs CAP_NET_BIND_SERVICE, which the job keeps.
pub fn bind_low_port() -> std::io::Result<()> {
    let mut last = std::io::Error::other("no port tried");
    for port in 600..1000 {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}
