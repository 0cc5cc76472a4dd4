//! Network namespaces a test owns (named, so `ip -n` reaches them), deleted on drop.

use std::{os::fd::AsRawFd, process::Command};

pub struct Netns(String);

impl Netns {
    /// `ip netns add NAME-PID`.
    pub fn add(name: &str) -> Self {
        let name = format!("{name}-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(status.success(), "ip netns add {name}");
        Self(name)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let status = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "ip -n {} {}", self.0, args.join(" "));
    }

    /// Moves the calling thread (only it: the network namespace is per thread) into this
    /// namespace; the sockets it creates from now on live there.
    pub fn enter_this_thread(&self) {
        let file = std::fs::File::open(self.path()).expect("open the netns file");
        // SAFETY: a valid netns descriptor; affects only the calling thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {}: {}", self.0, std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}
