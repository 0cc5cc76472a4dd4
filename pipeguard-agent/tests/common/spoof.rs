//! Answers sent from outside the job, where the kernel's answer check is the only defence:
//! a resolver that replies to each query by a script (the genuine answer, a replay, a wrong
//! id or question), and spoofers on other addresses. Stops when dropped.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::dns_probe::answer;

/// One datagram a script sends back: `from` a socket of this resolver (0: the resolver's
/// own address, else a spoofer), with this id, for this question name, carrying this address.
pub struct Reply {
    pub from: usize,
    pub id: Id,
    pub name: String,
    pub addr: Ipv4Addr,
}

pub enum Id {
    /// The query's id.
    Same,
    /// The query's id with its lowest bit flipped.
    Other,
}

pub struct ScriptedResolver {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedResolver {
    /// Listens on `ip`:53; `spoofers` are further addresses (port 53) it can send from. Each
    /// query is answered by `script(question name)`, the replies 50 ms apart, in order.
    pub fn start(ip: &str, spoofers: &[&str], script: impl Fn(&str) -> Vec<Reply> + Send + 'static) -> Self {
        let mut sockets = vec![bind(ip)];
        sockets.extend(spoofers.iter().map(|s| bind(s)));
        let addr = sockets[0].local_addr().unwrap();
        sockets[0]
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, asker)) = sockets[0].recv_from(&mut buf) else {
                    continue;
                };
                let id = super::dns_probe::message_id(&buf[..n]);
                for reply in script(&question(&buf[..n])) {
                    let id = match reply.id {
                        Id::Same => id,
                        Id::Other => id ^ 1,
                    };
                    let _ = sockets[reply.from].send_to(&answer(id, &reply.name, reply.addr), asker);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ScriptedResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn bind(ip: &str) -> UdpSocket {
    UdpSocket::bind((ip, 53)).unwrap_or_else(|e| panic!("bind {ip}:53: {e}"))
}

/// The question name of a query, dotted.
fn question(msg: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut at = 12;
    while let Some(&len) = msg.get(at)
        && len != 0
    {
        let label = msg.get(at + 1..at + 1 + len as usize).unwrap_or_default();
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + len as usize;
    }
    labels.join(".")
}
