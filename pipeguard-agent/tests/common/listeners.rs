//! Listeners outside the guarded cgroup that record what reached them.

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

/// Bytes received per listener, shared with its thread.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<u8>>>);

impl Received {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
    /// Waits up to `within` for `needle`; false if it never arrives.
    pub fn wait_for(&self, needle: &[u8], within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.bytes().windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

pub struct Tcp {
    pub addr: SocketAddr,
    pub received: Received,
}

/// Accepts forever (the thread dies with the test process) and appends what arrives.
pub fn tcp(bind: &str) -> Tcp {
    let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let sink = received.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let sink = sink.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.0.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    Tcp { addr, received }
}

pub struct Udp {
    pub addr: SocketAddr,
    pub received: Received,
}

pub fn udp(bind: &str) -> Udp {
    udp_on(UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}")))
}

fn udp_on(socket: UdpSocket) -> Udp {
    let addr = socket.local_addr().unwrap();
    let received = Received::default();
    let sink = received.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            sink.0.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    Udp { addr, received }
}

/// TCP and UDP on the same free port of `ip` (`127.0.0.1` or `[::1]`), so one address is
/// reachable over both.
pub fn tcp_and_udp(ip: &str) -> (Tcp, Udp) {
    for _ in 0..50 {
        let t = tcp(&format!("{ip}:0"));
        if let Ok(socket) = UdpSocket::bind(t.addr) {
            return (t, udp_on(socket));
        }
    }
    panic!("no port free for both TCP and UDP on {ip}");
}
