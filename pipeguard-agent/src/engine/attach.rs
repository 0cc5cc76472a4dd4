//! Loading the programs into the kernel and attaching them to a cgroup with bpf_link.

use std::{os::fd::BorrowedFd, path::Path};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program},
};
use pipeguard_common::program_names as names;

use super::EngineError;

/// Every program, in attach order. The packet hook goes first so that, while the socket
/// hooks are being attached, no packet leaves unjudged.
pub const PROGRAMS: [&str; 6] = [
    names::EGRESS,
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

pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), EngineError> {
    for name in PROGRAMS {
        let program = ebpf.program_mut(name).ok_or(EngineError::Program {
            program: name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let result = match program {
            Program::CgroupSkb(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        };
        result.map_err(|source| EngineError::Program {
            program: name,
            source,
        })?;
    }
    Ok(())
}

pub fn attach_all(ebpf: &mut Ebpf, cgroup: BorrowedFd<'_>, path: &Path) -> Result<(), EngineError> {
    for name in PROGRAMS {
        let error = |source| EngineError::Attach {
            program: name,
            cgroup: path.display().to_string(),
            source,
        };
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| error(aya::programs::ProgramError::UnexpectedProgramType))?;
        // Single: AllowMultiple makes bpf_link_create fail with EINVAL on these kernels,
        // and link-based attachments coexist with other programs anyway.
        let mode = CgroupAttachMode::Single;
        let result = match program {
            Program::CgroupSkb(p) => p.attach(cgroup, CgroupSkbAttachType::Egress, mode).map(drop),
            Program::CgroupSock(p) => p.attach(cgroup, mode).map(drop),
            Program::CgroupSockAddr(p) => p.attach(cgroup, mode).map(drop),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        };
        result.map_err(error)?;
    }
    Ok(())
}

pub fn attach_packet_guard(ebpf: &mut Ebpf, cgroup: BorrowedFd<'_>, path: &Path) -> Result<(), EngineError> {
    let name = names::SOCKET_CREATE_LSM;
    let error = |source| EngineError::Attach {
        program: name,
        cgroup: path.display().to_string(),
        source,
    };
    match ebpf.program_mut(name) {
        Some(Program::LsmCgroup(p)) => p.attach(cgroup).map(drop).map_err(error),
        _ => Err(error(aya::programs::ProgramError::UnexpectedProgramType)),
    }
}
