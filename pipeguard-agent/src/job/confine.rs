//! What a job gives up so it cannot step around the guard, even as root.
//!
//! Prepared in the parent (reading /proc/self/mountinfo allocates), applied in the child
//! between fork and exec with raw syscalls only. The order inside `apply` matters: the
//! mount namespace needs CAP_SYS_ADMIN, so it comes before the capabilities go.

use std::{ffi::CString, io};

/// Capabilities taken from a job by default, each with the route around the guard it opens.
/// Everything else stays, so a root job can still install packages, write files, change
/// owners, switch users (apt's `_apt`) and bind ports below 1024.
pub const DROPPED: [(u32, &str, &str); 12] = [
    (
        12,
        "CAP_NET_ADMIN",
        "TUN/TAP injection, routes, firewall rules, interface setup",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "mounts (undoing the read-only cgroupfs), setns, BPF on old kernels",
    ),
    (
        39,
        "CAP_BPF",
        "loading BPF programs, reading and writing the guard's maps",
    ),
    (
        38,
        "CAP_PERFMON",
        "tracing BPF programs and kprobes alongside CAP_BPF",
    ),
    (16, "CAP_SYS_MODULE", "loading kernel modules"),
    (
        19,
        "CAP_SYS_PTRACE",
        "ptrace and /proc/PID/root of processes outside the job",
    ),
    (
        17,
        "CAP_SYS_RAWIO",
        "/dev/mem, /dev/port and I/O ports: rewriting kernel memory",
    ),
    (22, "CAP_SYS_BOOT", "kexec_load: booting another kernel"),
    (32, "CAP_MAC_OVERRIDE", "overriding AppArmor/SELinux/Smack policy"),
    (33, "CAP_MAC_ADMIN", "changing AppArmor/SELinux/Smack policy"),
    (
        2,
        "CAP_DAC_READ_SEARCH",
        "open_by_handle_at: opening files past the mount namespace",
    ),
    (
        40,
        "CAP_CHECKPOINT_RESTORE",
        "map_files and set_tid: reaching into other processes",
    ),
];

/// Dropped only where the BPF LSM hook is missing (so AF_PACKET would be open) and the job
/// is enforced: in audit mode raw and packet sockets must keep working.
pub const CAP_NET_RAW: u32 = 13;

/// Paths that are not mount points but must be read-only: sysctls (core_pattern,
/// route_localnet, ip_forward) are writable by uid 0 without any capability.
const BIND_READ_ONLY: [&str; 2] = ["/proc/sys", "/proc/sysrq-trigger"];

/// Filesystems that are read-only for the job wherever they are mounted: uid 0 owns
/// cgroup.procs (the cgroup move) and the pins in bpffs.
const READ_ONLY_FS: [&str; 7] = [
    "cgroup2",
    "cgroup",
    "bpf",
    "debugfs",
    "tracefs",
    "securityfs",
    "configfs",
];

#[derive(Debug)]
pub struct Confinement {
    drop_caps: Vec<u32>,
    bind_read_only: Vec<CString>,
    /// Mount point and the per-mount flags to keep (nosuid, nodev, noexec).
    read_only: Vec<(CString, libc::c_ulong)>,
}

impl Confinement {
    /// A job that keeps every capability and sees the host's mounts as they are.
    pub fn privileged() -> Self {
        Self {
            drop_caps: Vec::new(),
            bind_read_only: Vec::new(),
            read_only: Vec::new(),
        }
    }

    /// The default confinement, plus CAP_NET_RAW when `drop_net_raw`.
    pub fn default_for_job(drop_net_raw: bool) -> io::Result<Self> {
        let mut drop_caps: Vec<u32> = DROPPED.iter().map(|(cap, _, _)| *cap).collect();
        if drop_net_raw {
            drop_caps.push(CAP_NET_RAW);
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let read_only = read_only_mounts(&mountinfo)
            .into_iter()
            .map(|(path, flags)| Ok((c_path(&path)?, flags)))
            .collect::<io::Result<_>>()?;
        let bind_read_only = BIND_READ_ONLY
            .iter()
            .filter(|p| std::path::Path::new(p).exists())
            .map(|p| c_path(p))
            .collect::<io::Result<_>>()?;
        Ok(Self {
            drop_caps,
            bind_read_only,
            read_only,
        })
    }

    /// Runs in the child between fork and exec: async-signal-safe syscalls only.
    pub fn apply(&self) -> io::Result<()> {
        if self.drop_caps.is_empty() {
            return Ok(());
        }
        self.private_read_only_mounts()?;
        drop_capabilities(&self.drop_caps)?;
        // SAFETY: plain prctl calls without pointers.
        unsafe {
            // Ambient capabilities would survive exec of a non-root program.
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ))?;
            // No setuid binary or file capability gives back what was taken.
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }

    /// A private mount namespace in which the cgroup and bpf filesystems, /sys and the
    /// sysctls are read-only. Without CAP_SYS_ADMIN the job can neither remount nor
    /// unmount them, on hosts with or without cgroup2 `nsdelegate`.
    fn private_read_only_mounts(&self) -> io::Result<()> {
        let root = c"/";
        // SAFETY: mount/unshare with valid C strings or nulls where the kernel takes none.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Private, so nothing done here propagates back to the host, and no mount the
            // host makes later shows up writable in here.
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            // Mounts first: binding /proc/sys afterwards hides the mounts below it (an
            // automounted binfmt_misc), which a later remount could then not find.
            for (path, keep) in &self.read_only {
                match remount_read_only(path, *keep) {
                    // Covered by a later mount on the same or a parent path: nothing can
                    // reach it by that path, in here or anywhere, so there is nothing to do.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {}
                    other => other?,
                }
            }
            for path in &self.bind_read_only {
                check(libc::mount(
                    path.as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                remount_read_only(path, libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC)?;
            }
        }
        Ok(())
    }
}

/// SAFETY: `path` is a valid C string; async-signal-safe.
unsafe fn remount_read_only(path: &CString, keep: libc::c_ulong) -> io::Result<()> {
    let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | keep;
    // SAFETY: as promised by the caller.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(path: &str) -> io::Result<CString> {
    CString::new(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Mounts to make read-only: everything under /sys and /proc/sys, and the filesystems in
/// `READ_ONLY_FS` wherever they are mounted. Each with the flags a remount must keep.
fn read_only_mounts(mountinfo: &str) -> Vec<(String, libc::c_ulong)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(mount_point), Some(options)) = (fields.get(4), fields.get(5)) else {
            continue;
        };
        let fstype = right.split_whitespace().next().unwrap_or_default();
        let mount_point = crate::cgroup::unescape_mountinfo(mount_point);
        let under = |dir: &str| mount_point == dir || mount_point.starts_with(&format!("{dir}/"));
        if !(under("/sys") || under("/proc/sys") || READ_ONLY_FS.contains(&fstype)) {
            continue;
        }
        let mut keep = 0;
        for option in options.split(',') {
            keep |= match option {
                "nosuid" => libc::MS_NOSUID,
                "nodev" => libc::MS_NODEV,
                "noexec" => libc::MS_NOEXEC,
                _ => 0,
            };
        }
        if !out.iter().any(|(p, _)| *p == mount_point) {
            out.push((mount_point, keep));
        }
    }
    out
}

/// Takes `caps` out of the bounding set (so no exec regains them) and out of the effective,
/// permitted and inheritable sets. A capability this kernel does not know (EINVAL from
/// PR_CAPBSET_DROP) is skipped: its powers belong to CAP_SYS_ADMIN there, which goes too.
fn drop_capabilities(caps: &[u32]) -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: prctl without pointers; capget/capset with valid pointers to correctly laid
    // out structs.
    unsafe {
        for &cap in caps {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::EINVAL) {
                    return Err(error);
                }
            }
        }
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        for &cap in caps {
            let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
            data[word].effective &= !bit;
            data[word].permitted &= !bit;
            data[word].inheritable &= !bit;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What `--privileged-job` leaves the job able to do, for the warning.
pub fn privileged_warning() -> String {
    let caps: Vec<&str> = DROPPED.iter().map(|(_, name, _)| *name).collect();
    format!(
        "--privileged-job: the job keeps {} and a writable cgroupfs, bpffs and /proc/sys. \
         A root job can then step around the guard: inject packets through a TUN device, \
         move itself out of the guarded cgroup, detach or rewrite the guard's BPF programs \
         and maps, load kernel modules. Use it only for jobs you trust.",
        caps.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_sys_proc_sys_and_cgroup_bpf_mounts_wherever_they_are() {
        let mountinfo = "\
22 1 0:5 / /proc rw,nosuid,nodev,noexec - proc proc rw
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 22 0:40 / /proc/sys/fs/binfmt_misc rw,relatime - binfmt_misc binfmt_misc rw
60 1 0:41 / /mnt/my\\040bpf rw,relatime - bpf bpf rw
61 1 0:42 / /home rw,relatime - ext4 /dev/sda2 rw
62 1 0:43 / /system rw,relatime - ext4 /dev/sda3 rw
";
        let picked = read_only_mounts(mountinfo);
        let paths: Vec<&str> = picked.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/sys",
                "/sys/fs/cgroup/unified",
                "/proc/sys/fs/binfmt_misc",
                "/mnt/my bpf"
            ]
        );
        assert_eq!(
            picked[0].1,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "a remount keeps nosuid, nodev, noexec"
        );
        assert_eq!(picked[1].1, 0);
    }

    #[test]
    fn the_dropped_set_covers_what_the_issue_names() {
        for name in [
            "CAP_NET_ADMIN",
            "CAP_SYS_ADMIN",
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_SYS_MODULE",
            "CAP_SYS_PTRACE",
        ] {
            assert!(DROPPED.iter().any(|(_, n, _)| *n == name), "{name}");
        }
        // CAP_NET_BIND_SERVICE (10) stays: servers in tests bind low ports.
        assert!(!DROPPED.iter().any(|(cap, _, _)| *cap == 10));
    }
}
