//! The demo's servers on loopback: an "artifact registry" that speaks enough HTTP/1.0 to
//! take an upload, and an "attacker" that records whatever reaches it over TCP or UDP.
//! Each reads what a client sends as a real server would (headers, then Content-Length
//! bytes of body), so a request arriving in several writes is still read whole.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

/// What one listener received from one client.
#[derive(Clone, Debug)]
pub struct Received {
    /// Which listener: "registry", "attacker (tcp)", "attacker (udp)", ...
    pub listener: &'static str,
    /// For HTTP the request line and the Host it named; otherwise the bytes as text.
    pub summary: String,
    /// HTTP body (empty for raw TCP/UDP).
    pub body: Vec<u8>,
}

/// Everything the listeners received, shared with their threads.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Received>>>);

impl Log {
    fn push(&self, r: Received) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    }

    pub fn all(&self) -> Vec<Received> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn from(&self, listener: &str) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| r.listener == listener)
            .collect()
    }
}

/// A slow or silent client must not hang the demo.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn bind_tcp(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("the demo needs tcp {addr} free"))
}

/// An HTTP/1.0 server that answers every complete request with 201 Created.
pub fn registry(addr: &str, log: Log) -> Result<()> {
    let listener = bind_tcp(addr)?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let log = log.clone();
            thread::spawn(move || {
                let received = match read_request(&stream) {
                    Ok((request_line, body)) => {
                        let _ = (&stream).write_all(b"HTTP/1.0 201 Created\r\nContent-Length: 0\r\n\r\n");
                        Received {
                            listener: "registry",
                            summary: request_line,
                            body,
                        }
                    }
                    Err(error) => Received {
                        listener: "registry",
                        summary: format!("incomplete request: {error:#}"),
                        body: Vec::new(),
                    },
                };
                log.push(received);
            });
        }
    });
    Ok(())
}

/// Request line, then headers up to the empty line, then exactly Content-Length bytes.
/// The summary is the request line, followed by " (Host: NAME)" when the client sent one.
fn read_request(stream: &TcpStream) -> Result<(String, Vec<u8>)> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader
        .read_line(&mut request_line)
        .context("reading the request line")?;
    let mut content_length = 0usize;
    let mut host = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).context("reading headers")? == 0 {
            anyhow::bail!("connection closed inside the headers");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        match header.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("content-length") => {
                content_length = value.trim().parse().context("Content-Length")?;
            }
            Some((name, value)) if name.eq_ignore_ascii_case("host") => {
                host = Some(value.trim().to_string());
            }
            _ => {}
        }
    }
    let mut body = vec![0u8; content_length];
    reader
        .read_exact(&mut body)
        .with_context(|| format!("reading a {content_length}-byte body"))?;
    let summary = match host {
        Some(host) => format!("{} (Host: {host})", request_line.trim_end()),
        None => request_line.trim_end().to_string(),
    };
    Ok((summary, body))
}

/// Records anything that reaches `addr`, over TCP (until the client closes) or UDP.
pub fn attacker(addr: &str, log: Log) -> Result<()> {
    let tcp = bind_tcp(addr)?;
    let udp = UdpSocket::bind(addr).with_context(|| format!("the demo needs udp {addr} free"))?;
    let tcp_log = log.clone();
    thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
            let mut got = Vec::new();
            let _ = (&stream).read_to_end(&mut got);
            tcp_log.push(Received {
                listener: "attacker (tcp)",
                summary: String::from_utf8_lossy(&got).into_owned(),
                body: Vec::new(),
            });
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = udp.recv_from(&mut buf) {
            log.push(Received {
                listener: "attacker (udp)",
                summary: String::from_utf8_lossy(&buf[..n]).into_owned(),
                body: Vec::new(),
            });
        }
    });
    Ok(())
}
