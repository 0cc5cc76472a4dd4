//! Starting the command inside the job cgroup and passing signals through.

use std::{ffi::CString, os::unix::process::ExitStatusExt as _, process::ExitStatus};

use tokio::signal::unix::{SignalKind, signal};

use super::{JobError, confine::Confinement};
use crate::cgroup::OwnedCgroup;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    Code(i32),
    Signal(i32),
}

impl ExitReason {
    /// The shell's convention: 128 + signal number for a killed command.
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(code) => code,
            Self::Signal(sig) => 128 + sig,
        }
    }

    fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(sig)) => Self::Signal(sig),
            (None, None) => Self::Code(1),
        }
    }
}

/// Signals a supervisor sends to stop or poke a job; all are passed to the command.
const FORWARDED: [i32; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// `confinement`: what the job gives up (capabilities, a writable cgroupfs), applied after
/// it joined the cgroup and before exec.
pub async fn run(
    command: &[String],
    cgroup: &OwnedCgroup,
    confinement: Confinement,
) -> Result<ExitReason, JobError> {
    let (program, args) = command.split_first().ok_or_else(|| JobError::Spawn {
        command: String::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command given"),
    })?;
    let procs_path = CString::new(cgroup.procs_file().into_os_string().into_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;

    // Install the handlers before the child exists, so no signal slips past unforwarded.
    let mut streams = Vec::new();
    for sig in FORWARDED {
        streams.push((sig, signal(SignalKind::from_raw(sig))?));
    }

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls (open, write, close, unshare, prctl, mount,
    // capset) between fork and exec; `confinement` was prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Join the job cgroup before exec: the command's first instruction is guarded.
            let fd = libc::open(procs_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            // A cgroup namespace rooted at the job cgroup: the job sees only its own subtree
            // (and with nsdelegate the kernel refuses moves out of it). What stops a root job
            // everywhere is the read-only cgroupfs of `confinement`.
            if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If pipeguard dies, its links go with it: take the job down rather than let it
            // run on unguarded.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            confinement.apply()
        });
    }
    let mut child = cmd.spawn().map_err(|source| JobError::Spawn {
        command: program.clone(),
        source,
    })?;
    let forwarders: Vec<_> = match child.id() {
        Some(pid) => streams
            .into_iter()
            .map(|(sig, stream)| tokio::spawn(forward(stream, sig, pid as i32)))
            .collect(),
        None => Vec::new(),
    };
    let status = child.wait().await;
    for task in forwarders {
        task.abort();
    }
    Ok(ExitReason::from_status(status?))
}

/// Signals a terminal sends to its whole foreground process group (^C and ^\).
const FROM_TERMINAL: [i32; 2] = [libc::SIGINT, libc::SIGQUIT];

async fn forward(mut stream: tokio::signal::unix::Signal, sig: i32, pid: i32) {
    while stream.recv().await.is_some() {
        if FROM_TERMINAL.contains(&sig) && in_terminal_foreground(pid) {
            // The terminal sent it to the job's process group, the job included; passing
            // it on would deliver it twice.
            continue;
        }
        // SAFETY: plain syscall to the child we started (reaped only after this task ends).
        unsafe { libc::kill(pid, sig) };
    }
}

/// Whether `pid`'s process group is the foreground group of our controlling terminal.
///
/// The job stays in pipeguard's process group, as under any wrapper (`nice`, `time`): the
/// shell's job control (^Z, `fg`, `bg`) and the job's terminal reads work unchanged. A
/// SIGINT or SIGQUIT that reaches pipeguard while that group is in the foreground came
/// from the terminal (only the foreground group gets them), so the job has it already.
/// Without a terminal (CI), every signal is forwarded.
fn in_terminal_foreground(pid: i32) -> bool {
    // SAFETY: plain syscalls on a file descriptor this function opens and closes.
    unsafe {
        let tty = libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if tty < 0 {
            return false;
        }
        let foreground = libc::tcgetpgrp(tty);
        libc::close(tty);
        let group = libc::getpgid(pid);
        foreground > 0 && group == foreground
    }
}
