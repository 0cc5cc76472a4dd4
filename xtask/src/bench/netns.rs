//! The bench's network namespaces and veth pairs (pgb-*), and the firewall tools.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{CLIENT_NETNS, NS_CLIENT, NS_IPT, NS_NFT, NS_SERVER};

pub(super) fn have(cmd: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists())
}

pub(super) fn ensure_firewall_tools() -> Result<()> {
    if have("iptables-legacy-restore") && have("nft") {
        return Ok(());
    }
    eprintln!("bench: installing iptables and nftables from Debian");
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "iptables", "nftables"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if crate::status(cmd).is_err() {
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        crate::status(update)?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "iptables", "nftables"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        crate::status(cmd)?;
    }
    Ok(())
}

pub(super) fn run_quiet(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The bench's network namespaces; deleting them removes their veths and firewall rules.
pub(super) struct Netns {
    names: Vec<&'static str>,
}

impl Netns {
    pub(super) fn setup() -> Result<Self> {
        let all = [NS_SERVER, NS_CLIENT, NS_IPT, NS_NFT];
        for ns in all {
            // Left over from an interrupted run.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let mut me = Self { names: Vec::new() };
        for ns in all {
            run_quiet(&["ip", "netns", "add", ns])?;
            me.names.push(ns);
            run_quiet(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        for (ns, i) in CLIENT_NETNS {
            veth_pair(
                (NS_SERVER, &format!("pgb{i}s"), &format!("10.203.{i}.1/24")),
                (ns, &format!("pgb{i}c"), &format!("10.203.{i}.2/24")),
            )?;
        }
        Ok(me)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.names.drain(..).rev() {
            if let Err(e) = run_quiet(&["ip", "netns", "del", ns]) {
                eprintln!("bench: cleanup: {e:#}");
            }
        }
    }
}

/// A veth pair between two namespaces: (namespace, interface, address/prefix) of each end,
/// both up.
pub(super) fn veth_pair(a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<()> {
    run_quiet(&[
        "ip", "-n", a.0, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", b.0,
    ])?;
    for (ns, dev, addr) in [a, b] {
        run_quiet(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
        run_quiet(&["ip", "-n", ns, "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// A network namespace of this run's own (loopback up), deleted on drop.
pub(super) struct OwnNetns {
    name: String,
}

impl OwnNetns {
    pub(super) fn create(name: &str) -> Result<Self> {
        run_quiet(&["ip", "netns", "add", name])?;
        let me = Self {
            name: name.to_string(),
        };
        run_quiet(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(me)
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        if let Err(e) = run_quiet(&["ip", "netns", "del", &self.name]) {
            eprintln!("bench: cleanup: {e:#}");
        }
    }
}
