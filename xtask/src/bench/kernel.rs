//! Kernel-side helpers with raw syscalls (xtask links nothing from the eBPF build): empty
//! reference programs, per-program run-time statistics, map memory from fdinfo, a scratch
//! cgroup, and the bpf_stats_enabled sysctl.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};

const BPF_PROG_LOAD: i32 = 5;
const BPF_PROG_GET_FD_BY_ID: i32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i32 = 15;
const BPF_LINK_CREATE: i32 = 28;

const PROG_TYPE_CGROUP_SKB: u32 = 8;
const PROG_TYPE_CGROUP_SOCK: u32 = 9;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_TYPE_SOCK_OPS: u32 = 13;

const ATTACH_INET_INGRESS: u32 = 0;
const ATTACH_INET_EGRESS: u32 = 1;
const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
const ATTACH_INET_SOCK_CREATE: u32 = 2;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_SENDMSG: u32 = 14;
const ATTACH_INET_SOCK_RELEASE: u32 = 34;

pub(super) fn bpf(cmd: i32, attr: &mut [u8]) -> std::io::Result<i32> {
    // SAFETY: attr is a zero-initialised buffer at least as large as the union members we use.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc as i32)
}

pub(super) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
pub(super) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get_u64(buf: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"))
}

/// An empty program of each hook kind pipeguard uses (`r0 = 1; exit`: allow), attached
/// to a cgroup with bpf_link; dropping it detaches and unloads.
pub struct EmptyPrograms {
    pub progs: Vec<(&'static str, OwnedFd)>,
    _links: Vec<OwnedFd>,
}

impl EmptyPrograms {
    pub fn attach(cgroup: &Path) -> Result<Self> {
        let cg = fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut progs = Vec::new();
        let mut links = Vec::new();
        for (name, prog_type, attach) in [
            ("connect4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT),
            ("sendmsg4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_UDP4_SENDMSG),
            ("egress", PROG_TYPE_CGROUP_SKB, ATTACH_INET_EGRESS),
            ("ingress", PROG_TYPE_CGROUP_SKB, ATTACH_INET_INGRESS),
            ("sock_ops", PROG_TYPE_SOCK_OPS, ATTACH_CGROUP_SOCK_OPS),
            ("sock_create", PROG_TYPE_CGROUP_SOCK, ATTACH_INET_SOCK_CREATE),
            ("sock_release", PROG_TYPE_CGROUP_SOCK, ATTACH_INET_SOCK_RELEASE),
        ] {
            let prog = load_empty(prog_type, attach, name)?;
            let mut attr = [0u8; 64];
            put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
            put_u32(&mut attr, 4, cg.as_raw_fd() as u32);
            put_u32(&mut attr, 8, attach);
            let link = bpf(BPF_LINK_CREATE, &mut attr)
                .with_context(|| format!("attaching the empty {name} program"))?;
            // SAFETY: the kernel just returned this fd to us.
            links.push(unsafe { OwnedFd::from_raw_fd(link) });
            progs.push((name, prog));
        }
        Ok(Self { progs, _links: links })
    }

    pub fn stats(&self) -> Result<BTreeMap<String, RunStats>> {
        let mut out = BTreeMap::new();
        for (name, fd) in &self.progs {
            let info = prog_info(fd)?;
            out.insert(name.to_string(), info.1);
        }
        Ok(out)
    }
}

/// A job's cgroup with [`EmptyPrograms`] attached: what cgroup-BPF enforcement costs before
/// its first instruction (the kernel running programs at every hook pipeguard uses, and a
/// job in a cgroup of its own). Two levels deep, as `pipeguard exec`'s job is
/// (`pipeguard/exec-PID`), so the depth costs the same on both sides. Its worker must be
/// gone before this drops (a cgroup with processes cannot be removed).
pub struct EmptyJob {
    pub programs: EmptyPrograms,
    pub cgroup: ScratchCgroup,
    _parent: ScratchCgroup,
}

impl EmptyJob {
    pub fn create(name: &str) -> Result<Self> {
        let parent = ScratchCgroup::create(name)?;
        let cgroup = ScratchCgroup::create(&format!("{name}/job"))?;
        let programs = EmptyPrograms::attach(&cgroup.path)?;
        Ok(Self {
            programs,
            cgroup,
            _parent: parent,
        })
    }
}

/// An empty cgroup_skb egress program, unattached, and its id (for BPF_PROG_TEST_RUN).
pub fn empty_egress_program() -> Result<(OwnedFd, u32)> {
    let fd = load_empty(PROG_TYPE_CGROUP_SKB, ATTACH_INET_EGRESS, "egress")?;
    let info = raw_prog_info(&fd)?;
    let id = u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes"));
    Ok((fd, id))
}

fn load_empty(prog_type: u32, attach: u32, name: &str) -> Result<OwnedFd> {
    // mov64 r0, 1 ; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog_type);
    put_u32(&mut attr, 4, 2);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    let pname = format!("bench_empty_{}", &name[..name.len().min(3)]);
    attr[48..48 + pname.len()].copy_from_slice(pname.as_bytes());
    put_u32(&mut attr, 68, attach);
    let fd = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("loading an empty {name} program"))?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl RunStats {
    pub fn since(self, before: RunStats) -> RunStats {
        RunStats {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(before.run_cnt),
        }
    }
}

/// `struct bpf_prog_info` of a program (BPF_OBJ_GET_INFO_BY_FD).
fn raw_prog_info(fd: &OwnedFd) -> Result<[u8; 256]> {
    let mut info = [0u8; 256];
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(info)
}

/// (name, stats) of a program from BPF_OBJ_GET_INFO_BY_FD.
fn prog_info(fd: &OwnedFd) -> Result<(String, RunStats)> {
    let info = raw_prog_info(fd)?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok((
        String::from_utf8_lossy(&name[..end]).into_owned(),
        RunStats {
            run_time_ns: get_u64(&info, 192),
            run_cnt: get_u64(&info, 200),
        },
    ))
}

/// The BPF objects a process holds open, from /proc/PID/fd and fdinfo.
fn bpf_fdinfo(pid: u32, kind: &str, id_field: &str) -> Result<BTreeMap<u32, u64>> {
    let mut out = BTreeMap::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != format!("anon_inode:{kind}") {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = fs::read_to_string(&fdinfo) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let Some(id) = field(id_field) {
            out.insert(id as u32, field("memlock:").unwrap_or(0));
        }
    }
    Ok(out)
}

/// Run-time statistics of every program process `pid` holds, keyed by program name.
pub fn process_prog_stats(pid: u32) -> Result<BTreeMap<String, RunStats>> {
    let mut out = BTreeMap::new();
    for id in bpf_fdinfo(pid, "bpf-prog", "prog_id:")?.keys() {
        let mut attr = [0u8; 16];
        put_u32(&mut attr, 0, *id);
        let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) else {
            continue;
        };
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (name, stats) = prog_info(&fd)?;
        out.insert(name, stats);
    }
    if out.is_empty() {
        bail!("process {pid} holds no BPF programs");
    }
    Ok(out)
}

/// The id of the program called `name` that process `pid` holds.
pub fn process_prog_id(pid: u32, name: &str) -> Result<u32> {
    for id in bpf_fdinfo(pid, "bpf-prog", "prog_id:")?.keys() {
        let mut attr = [0u8; 16];
        put_u32(&mut attr, 0, *id);
        let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) else {
            continue;
        };
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if prog_info(&fd)?.0 == name {
            return Ok(*id);
        }
    }
    bail!("process {pid} holds no program {name}")
}

/// Memory the kernel charges for the maps and programs process `pid` holds (fdinfo memlock).
pub fn process_bpf_memory(pid: u32) -> Result<(u64, u64, usize)> {
    let maps = bpf_fdinfo(pid, "bpf-map", "map_id:")?;
    let progs = bpf_fdinfo(pid, "bpf-prog", "prog_id:")?;
    Ok((maps.values().sum(), progs.values().sum(), maps.len()))
}

/// (VmRSS, VmHWM) in KiB.
pub fn process_rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mp));
        }
    }
    bail!("no cgroup2 mount in /proc/self/mountinfo")
}

/// A child cgroup of the cgroup2 root, removed on drop (once its processes are gone).
pub struct ScratchCgroup {
    pub path: PathBuf,
}

impl ScratchCgroup {
    pub fn create(name: &str) -> Result<Self> {
        let path = cgroup2_mount()?.join(name);
        if path.exists() {
            let _ = fs::remove_dir(&path);
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("bench: could not remove {}", self.path.display());
    }
}

/// Makes `cmd`'s process join `cgroup` between fork and exec, so it starts inside it.
pub fn join_on_exec(cmd: &mut std::process::Command, cgroup: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
    // SAFETY: open/write/close only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Sets kernel.bpf_stats_enabled=1 and restores the previous value on drop.
pub struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<Self> {
        let previous = fs::read_to_string(BPF_STATS)?.trim().to_string();
        fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.previous);
    }
}

/// Program names as the kernel keeps them (15 characters), for matching hooks.
pub fn hook_of(prog_name: &str) -> Option<&'static str> {
    const HOOKS: [(&str, &str); 10] = [
        ("pg_connect4", "connect4"),
        ("pg_connect6", "connect6"),
        ("pg_sendmsg4", "sendmsg4"),
        ("pg_sendmsg6", "sendmsg6"),
        ("pg_egress", "egress"),
        ("pg_ingress", "ingress"),
        ("pg_sock_ops", "sock_ops"),
        ("pg_sock_create", "sock_create"),
        ("pg_sock_release", "sock_release"),
        ("pg_socket_creat", "socket_create_lsm"),
    ];
    HOOKS.iter().find(|(p, _)| prog_name == *p).map(|(_, h)| *h)
}
