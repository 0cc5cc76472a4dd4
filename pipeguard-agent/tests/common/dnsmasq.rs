//! A real DNS server for the DNS tests: dnsmasq (Debian's, installed by `cargo xtask setup`)
//! as a child on a loopback address of its own, port 53, logging every query to a file:
//! the ground truth of what reached the resolver. Killed and cleaned up on drop.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Dnsmasq {
    /// Listens on `ip`:53 and answers from `hosts` (lines of "IP NAME") with `ttl` seconds;
    /// every other name gets NXDOMAIN.
    pub fn start(tag: &str, ip: &str, hosts: &str, ttl: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("pg-dnsmasq-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), hosts).unwrap();
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--port=53",
                "--log-queries",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--log-facility={}", dir.join("queries.log").display()))
            .arg(format!("--addn-hosts={}", dir.join("hosts").display()))
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // In the foreground dnsmasq echoes its log to stderr too: a pipe nobody reads
            // would fill up and stall it.
            .stderr(Stdio::null())
            .spawn()
            .expect("run dnsmasq (cargo xtask setup installs it)");
        let addr = SocketAddr::new(ip.parse().expect("an IP"), 53);
        let server = Self { child, addr, dir };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let probe = std::net::UdpSocket::bind(if self.addr.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        })
        .unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        while Instant::now() < deadline {
            let q = super::dns_probe::query(7, "ready.invalid", 1);
            if probe.send_to(&q, self.addr).is_ok() && probe.recv_from(&mut [0u8; 512]).is_ok() {
                return;
            }
        }
        panic!("dnsmasq on {} did not answer within 5 s", self.addr);
    }

    /// The query log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("queries.log")).unwrap_or_default()
    }

    /// Whether the server saw a query for `name`.
    pub fn saw(&self, name: &str) -> bool {
        self.log()
            .lines()
            .any(|l| l.contains("query[") && l.contains(&format!(" {name} from")))
    }

    /// A resolv.conf pointing glibc at this server.
    pub fn resolv_conf(&self) -> PathBuf {
        let path = self.dir.join("resolv.conf");
        std::fs::write(
            &path,
            format!("nameserver {}\noptions timeout:5 attempts:2\n", self.addr.ip()),
        )
        .unwrap();
        path
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
