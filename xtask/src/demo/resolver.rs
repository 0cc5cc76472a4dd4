//! The demo's DNS resolver: a real dnsmasq on a loopback address of its own that answers
//! every name under the demo's zone with 127.0.0.1 and logs every query it receives, the
//! ground truth of what left the job by DNS. The job reaches it through glibc like any
//! program: pipeguard exec runs in a private mount namespace where the demo's resolv.conf
//! (and a name service of files then DNS) are bound over the host's.

use std::{
    ffi::CString,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Out of the way of systemd-resolved (127.0.0.53, 127.0.0.54) and of the tests' own
/// per-process resolvers (127.53-55.x.y).
pub const RESOLVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 53, 53);
/// Every name under it resolves to 127.0.0.1, where the demo's listeners are: a name added
/// to the policy and the job needs nothing else.
pub const ZONE: &str = "pg.test";

/// How long the resolver may take to start or to log a query.
const PATIENCE: Duration = Duration::from_secs(5);

pub struct Resolver {
    child: Child,
    dir: PathBuf,
    /// Bytes of the query log written before the job ran (startup and our own probes).
    log_start: usize,
}

impl Resolver {
    pub fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("pipeguard-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--log-queries",
        ])
        .arg(format!("--listen-address={RESOLVER_IP}"))
        .arg(format!("--address=/{ZONE}/127.0.0.1"))
        // The zone is ours alone: AAAA queries get NODATA instead of REFUSED.
        .arg(format!("--local=/{ZONE}/"))
        .arg(format!("--log-facility={}", dir.join("queries.log").display()))
        .arg(format!("--pid-file={}", dir.join("pid").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // It echoes its log to stderr as well; kept in a file so startup errors can be shown.
        .stderr(std::fs::File::create(dir.join("stderr"))?);
        // SAFETY: one prctl between fork and exec, no pointers. The demo interrupted or
        // failing never leaves the resolver behind.
        unsafe {
            cmd.pre_exec(|| match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
        let child = cmd
            .spawn()
            .context("running dnsmasq (cargo xtask setup installs dnsmasq-base)")?;
        let mut resolver = Self {
            child,
            dir,
            log_start: 0,
        };
        resolver.sync("pipeguard-demo-ready.invalid")?;
        resolver.log_start = resolver.log().len();
        // One try: a refused query is refused again, and loopback loses nothing.
        std::fs::write(
            resolver.dir.join("resolv.conf"),
            format!("nameserver {RESOLVER_IP}\noptions timeout:2 attempts:1\n"),
        )?;
        Ok(resolver)
    }

    /// Asks the resolver for `marker` and waits until its log shows the query: every query
    /// that reached it before is in the log then (dnsmasq answers and logs in order).
    fn sync(&mut self, marker: &str) -> Result<()> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = Instant::now() + PATIENCE;
        let mut answered = false;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let stderr = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
                bail!(
                    "dnsmasq on {RESOLVER_IP}:53 exited with {status}: {}",
                    stderr.trim()
                );
            }
            if !answered {
                answered = socket
                    .send_to(&query(marker), SocketAddr::from((RESOLVER_IP, 53)))
                    .is_ok()
                    && socket.recv_from(&mut [0u8; 512]).is_ok();
            } else if self.log().contains(&format!(" {marker} from ")) {
                return Ok(());
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        bail!("dnsmasq on {RESOLVER_IP}:53 did not answer and log a query within {PATIENCE:?}")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("queries.log")).unwrap_or_default()
    }

    /// The queries that reached the resolver since it started ("query[A] NAME from ADDR"),
    /// complete up to this call.
    pub fn queries(&mut self) -> Result<Vec<String>> {
        self.sync("pipeguard-demo-end.invalid")?;
        let log = self.log();
        Ok(log[self.log_start.min(log.len())..]
            .lines()
            .filter_map(|l| l.split_once("]: ").map(|(_, msg)| msg))
            .filter(|msg| msg.starts_with("query[") && !msg.contains(" pipeguard-demo-"))
            .map(str::to_string)
            .collect())
    }

    /// Runs `cmd` in a private mount namespace in which glibc resolves names with files,
    /// then DNS through this resolver. The host's files stay as they are.
    pub fn route_lookups(&self, cmd: &mut Command) -> Result<()> {
        if !Path::new("/etc/resolv.conf").exists() {
            bail!("/etc/resolv.conf does not exist: the demo binds its own over it");
        }
        let mut binds = vec![(
            c_path(&self.dir.join("resolv.conf"))?,
            c"/etc/resolv.conf".to_owned(),
        )];
        // systemd-resolved's or mDNS's NSS modules would answer past the demo's resolver.
        // Without the file glibc asks DNS first anyway.
        if let Ok(host) = std::fs::read_to_string("/etc/nsswitch.conf") {
            let mut ours: Vec<&str> = host
                .lines()
                .filter(|l| !l.trim_start().starts_with("hosts:"))
                .collect();
            ours.push("hosts: files dns");
            let path = self.dir.join("nsswitch.conf");
            std::fs::write(&path, ours.join("\n") + "\n")?;
            binds.push((c_path(&path)?, c"/etc/nsswitch.conf".to_owned()));
        }
        // SAFETY: between fork and exec only async-signal-safe syscalls on C strings made
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| match rc {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // Private first, so the binds never propagate to the host's namespace.
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (ours, host) in &binds {
                    check(libc::mount(
                        ours.as_ptr(),
                        host.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                Ok(())
            });
        }
        Ok(())
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("{}", path.display()))
}

/// A recursive A query for `name`.
fn query(name: &str) -> Vec<u8> {
    // id, flags (recursion desired), one question, no other records.
    let mut q = vec![0x70, 0x67, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    // root, type A, class IN
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
