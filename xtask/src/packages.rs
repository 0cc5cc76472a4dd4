//! Debian packages the tests and the demo run for real (never assumed present).

use std::process::Command;

use anyhow::Result;

/// (command that must exist, package that provides it). dnsmasq-base is the dnsmasq binary
/// without the system service, so installing it never starts a resolver on port 53.
const TEST_PACKAGES: [(&str, &str); 1] = [("dnsmasq", "dnsmasq-base")];

fn have(cmd: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(cmd).exists())
}

pub fn ensure_test_packages() -> Result<()> {
    ensure(&TEST_PACKAGES)
}

/// Installs from Debian the package of each (command, package) whose command is missing.
pub fn ensure(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} from Debian", missing.join(" "));
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    // A fresh machine's package lists may be missing or stale: update once and retry.
    if crate::status(install()).is_err() {
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        crate::status(update)?;
        crate::status(install())?;
    }
    Ok(())
}
