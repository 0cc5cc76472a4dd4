//! Probe actions for send routes whose refusal must reach the caller, and for sockets used
//! by a task outside the job: see tests/kernel_send_routes.rs.

use std::{
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
};

use super::probe::{addr, check, sockaddr};

/// `ping ADDR`: an ICMP echo through a ping socket (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6), in a
/// network namespace of its own where ping sockets are enabled for every group (the
/// sysctl is per namespace; the host's is left alone). The cgroup hooks do not care which
/// namespace. The error, if any, is the socket()'s or the sendto()'s.
pub fn ping(target: &str) -> std::io::Result<()> {
    // SAFETY: plain syscall; affects only this (probe) process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")?;
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    assert!(up.success(), "ip link set lo up");
    let target = addr(target);
    let (family, protocol, echo_type) = if target.is_ipv4() {
        (libc::AF_INET, libc::IPPROTO_ICMP, 8u8)
    } else {
        (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8)
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh socket we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Type, code, checksum (the kernel fills it for ping sockets), id, sequence.
    let echo = [echo_type, 0, 0, 0, 0, 1, 0, 1];
    let (name, len) = sockaddr(&target);
    // SAFETY: valid socket, buffer and address.
    check(unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            echo.as_ptr().cast(),
            echo.len(),
            0,
            (&raw const name).cast(),
            len,
        )
    })
}

/// `give-sockets PATH`: creates a TCP socket and a UDP socket (IPv4) inside the job and
/// hands both to the process listening on the UNIX socket at PATH (SCM_RIGHTS), then waits
/// until that process hangs up. The receiver, outside the job, then uses them.
pub fn give_sockets(path: &str) -> std::io::Result<()> {
    let fds = [new_socket(libc::SOCK_STREAM)?, new_socket(libc::SOCK_DGRAM)?];
    let mut unix = UnixStream::connect(path)?;
    let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd()];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one control message carrying two fds.
    let mut control = [0u64; 8];
    // SAFETY: all-zero msghdr is valid; the buffers outlive sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure computations; CMSG_FIRSTHDR/CMSG_DATA walk the
    // control buffer sized above.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(size_of_val(&raw) as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(&raw) as u32) as usize;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast::<i32>(), 2);
    }
    // SAFETY: valid socket and msghdr.
    check(unsafe { libc::sendmsg(unix.as_raw_fd(), &msg, 0) })?;
    // Keep our copies open until the receiver is done with them.
    let mut rest = Vec::new();
    let _ = unix.read_to_end(&mut rest);
    Ok(())
}

fn new_socket(ty: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
