//! What must be true before `exec` can guard anything, each failure with the missing piece
//! named, so the user is not left with a bare EPERM or EINVAL.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "pipeguard must run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load eBPF programs and create cgroups"
    )]
    NotRoot,
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); mount one with: mount -t cgroup2 none /sys/fs/cgroup"
    )]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
    #[error(
        "the kernel does not support {what}; pipeguard needs Linux 5.7+ with CONFIG_CGROUP_BPF=y and BPF ring buffers (5.8+)"
    )]
    KernelFeature { what: &'static str },
}

/// Returns the cgroup2 mount point.
pub fn check() -> Result<PathBuf, PreflightError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(PreflightError::NotRoot);
    }
    let mount = crate::cgroup::cgroup2_mount()
        .map_err(PreflightError::Mountinfo)?
        .ok_or(PreflightError::NoCgroup2)?;
    check_kernel()?;
    Ok(mount)
}

fn check_kernel() -> Result<(), PreflightError> {
    use aya::{
        maps::MapType,
        programs::ProgramType,
        sys::{is_map_supported, is_program_supported},
    };
    for (program, what) in [
        (
            ProgramType::CgroupSockAddr,
            "cgroup sock_addr programs (connect/sendmsg hooks)",
        ),
        (ProgramType::CgroupSkb, "cgroup_skb programs (packet hook)"),
        (
            ProgramType::CgroupSock,
            "cgroup sock programs (socket creation hook)",
        ),
    ] {
        if !is_program_supported(program).unwrap_or(false) {
            return Err(PreflightError::KernelFeature { what });
        }
    }
    for (map, what) in [
        (MapType::LpmTrie, "LPM trie maps"),
        (MapType::RingBuf, "BPF ring buffers"),
    ] {
        if !is_map_supported(map).unwrap_or(false) {
            return Err(PreflightError::KernelFeature { what });
        }
    }
    Ok(())
}
