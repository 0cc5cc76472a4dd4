//! Loading the programs into the kernel and attaching them to a cgroup with bpf_link.

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError, links::FdLink},
};
use pipeguard_common::{map_names, program_names as names};

use super::{EngineError, pins};

/// Every program, in attach order. The packet hook goes first so that, while the socket
/// hooks are being attached, no packet leaves unjudged. The ingress hook only learns (reply
/// state), and so does sock_ops (accepted connections); until they are attached, replies
/// are judged as egress, which never opens anything.
pub const PROGRAMS: [&str; 9] = [
    names::EGRESS,
    names::INGRESS,
    names::SOCK_OPS,
    // Before sock_create: no socket recorded while attaching outlives its record.
    names::SOCK_RELEASE,
    names::SOCK_CREATE,
    names::CONNECT4,
    names::CONNECT6,
    names::SENDMSG4,
    names::SENDMSG6,
];

/// Loads the optional BPF LSM program that refuses AF_PACKET sockets. `Err` says why it is
/// unavailable (no BPF LSM in the active LSMs, kernel before 6.0, no BTF); the caller warns.
pub fn load_packet_guard(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF unavailable: {e}"))?;
    let Some(Program::LsmCgroup(program)) = ebpf.program_mut(names::SOCKET_CREATE_LSM) else {
        return Err("program missing from the eBPF object".into());
    };
    program.load("socket_create", &btf).map_err(|e| format!("{e}"))
}

/// Programs reached only by tail calls (each with its own stack), and the one-slot program
/// array their caller jumps through. A missing entry fails closed: the caller drops the
/// query, or learns nothing from the answer.
const TAIL_CALLS: [(&str, &str); 2] = [
    (names::DNS_QUERY, map_names::DNS_EGRESS),
    (names::DNS_ANSWER, map_names::DNS_INGRESS),
];

pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), EngineError> {
    load_named(ebpf, &PROGRAMS)
}

fn load_named(ebpf: &mut Ebpf, programs: &[&'static str]) -> Result<(), EngineError> {
    for &name in programs {
        let program = ebpf.program_mut(name).ok_or(EngineError::Program {
            program: name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let result = match program {
            Program::CgroupSkb(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            Program::SockOps(p) => p.load(),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        };
        result.map_err(|source| EngineError::Program {
            program: name,
            source,
        })?;
    }
    Ok(())
}

/// Loads the DNS programs and points each tail-call slot at its program (in a pinned array,
/// the new agent's program replaces the old one's in one write). Their verification takes
/// seconds, so the engine does this only once a pod is DNS-filtered.
pub fn load_tail_calls(ebpf: &mut Ebpf) -> Result<(), EngineError> {
    load_named(ebpf, &TAIL_CALLS.map(|(program, _)| program))?;
    for (program, map) in TAIL_CALLS {
        let error = |source| EngineError::Program { program, source };
        let fd = ebpf
            .program(program)
            .ok_or(error(ProgramError::UnexpectedProgramType))?
            .fd()
            .map_err(error)?
            .try_clone()
            .map_err(|e| error(ProgramError::IOError(e)))?;
        let mut array: aya::maps::ProgramArray<&mut aya::maps::MapData> = ebpf
            .map_mut(map)
            .ok_or(EngineError::MissingMap { map })?
            .try_into()
            .map_err(|source| EngineError::Map { map, source })?;
        array
            .set(0, &fd, 0)
            .map_err(|source| EngineError::Map { map, source })?;
    }
    Ok(())
}

/// Where to pin the links of one cgroup (agent mode).
pub struct LinkPins {
    pub dir: PathBuf,
    pub cgroup_id: u64,
}

/// Attaches with bpf_link, and pins the link when asked. A link already pinned for this
/// cgroup and program is kept and switched atomically to the new program (BPF_LINK_UPDATE):
/// an agent upgrade never leaves the cgroup without a program.
macro_rules! attach_link {
    ($program:expr, $attach:expr, $pin:expr) => {{
        let id = $attach?;
        if let Some(path) = $pin {
            let link = $program.take_link(id)?;
            let fd_link = FdLink::try_from(link)
                .map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string())))?;
            fd_link
                .pin(path)
                .map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string())))?;
        }
        Ok::<(), ProgramError>(())
    }};
}

fn attach_one(
    program: &mut Program,
    cgroup: BorrowedFd<'_>,
    pin: Option<PathBuf>,
) -> Result<(), ProgramError> {
    if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
        let link = pins::open_pinned(path)?;
        return pins::update_link(link.as_fd(), program.fd()?.as_fd()).map_err(ProgramError::IOError);
    }
    if let Some(dir) = pin.as_ref().and_then(|p| p.parent()) {
        std::fs::create_dir_all(dir)?;
    }
    // Single: AllowMultiple makes bpf_link_create fail with EINVAL on these kernels, and
    // link-based attachments coexist with other programs anyway.
    let mode = CgroupAttachMode::Single;
    match program {
        Program::CgroupSkb(p) => {
            // The section name (cgroup_skb/ingress or /egress) says which direction.
            let direction = p.expected_attach_type().unwrap_or(CgroupSkbAttachType::Egress);
            attach_link!(p, p.attach(cgroup, direction, mode), pin)
        }
        Program::CgroupSock(p) => attach_link!(p, p.attach(cgroup, mode), pin),
        Program::CgroupSockAddr(p) => attach_link!(p, p.attach(cgroup, mode), pin),
        Program::LsmCgroup(p) => attach_link!(p, p.attach(cgroup), pin),
        Program::SockOps(p) => attach_link!(p, p.attach(cgroup, mode), pin),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}

pub fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: BorrowedFd<'_>,
    path: &Path,
    pins: Option<&LinkPins>,
) -> Result<(), EngineError> {
    for name in PROGRAMS {
        attach_named(ebpf, name, cgroup, path, pins)?;
    }
    Ok(())
}

pub fn attach_packet_guard(
    ebpf: &mut Ebpf,
    cgroup: BorrowedFd<'_>,
    path: &Path,
    pins: Option<&LinkPins>,
) -> Result<(), EngineError> {
    attach_named(ebpf, names::SOCKET_CREATE_LSM, cgroup, path, pins)
}

fn attach_named(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: BorrowedFd<'_>,
    path: &Path,
    pins: Option<&LinkPins>,
) -> Result<(), EngineError> {
    let error = |source| EngineError::Attach {
        program: name,
        cgroup: path.display().to_string(),
        source,
    };
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| error(ProgramError::UnexpectedProgramType))?;
    let pin = pins.map(|p| pins::link_path(&p.dir, p.cgroup_id, name));
    attach_one(program, cgroup, pin).map_err(error)
}
