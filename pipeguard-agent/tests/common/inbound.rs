//! Inbound connections to a guarded pod's listener from a chosen source address, for the
//! ingress tests.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::FromRawFd,
    time::Duration,
};

/// Long enough for an allowed handshake on loopback; a refused one never completes.
pub const WAIT: Duration = Duration::from_secs(2);

/// A TCP connection from `source` (port chosen by the kernel) to `dest`, or the error;
/// a refused SYN is never answered, so the attempt ends in a timeout.
pub fn connect_from(source: IpAddr, dest: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = start_connect(source, dest)?;
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, WAIT.as_millis() as i32) };
    super::probe::check(ready as isize)?;
    if ready == 0 {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    if let Some(error) = stream.take_error()? {
        return Err(error);
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Starts a TCP connection from `source` to `dest` without waiting for it: the SYN is on
/// its way when this returns.
pub fn start_connect(source: IpAddr, dest: SocketAddr) -> std::io::Result<TcpStream> {
    let family = if dest.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        super::probe::check(fd as isize)?;
        let stream = TcpStream::from_raw_fd(fd);
        let (src, len) = super::probe::sockaddr(&SocketAddr::new(source, 0));
        super::probe::check(libc::bind(fd, (&raw const src).cast(), len) as isize)?;
        let (dst, len) = super::probe::sockaddr(&dest);
        if libc::connect(fd, (&raw const dst).cast(), len) < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(error);
            }
        }
        Ok(stream)
    }
}

/// True when a connection `start_connect` began has completed (the handshake got through).
pub fn connected(stream: &TcpStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(stream),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd; no wait.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && stream.take_error().is_ok_and(|e| e.is_none())
}
