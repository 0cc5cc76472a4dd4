//! A job's pinned programs, so enforcement outlives a `pipeguard exec` killed with SIGKILL,
//! and `gc`, which collects what such a job left behind.
//!
//! Each job pins its maps and links under `<state dir>/<job name>` on a bpffs; the job
//! name is also its cgroup's name under `<cgroup2>/pipeguard/`. A live `exec` holds an
//! exclusive flock on its directory; the kernel drops it when the process dies, however it
//! dies. A directory nobody holds belongs to a dead `exec`: its cgroup is killed through
//! cgroup.kill first, and only then are the pins removed, so no process of the job ever
//! runs unguarded.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::engine::pins;

/// Where jobs pin their programs unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/sys/fs/bpf/pipeguard-exec";

/// Suffix of a directory still being set up (created, not yet locked and renamed). No dot:
/// bpffs refuses names with dots (EPERM).
const NEW_SUFFIX: &str = "-new";

/// The pin directory of a running job, locked for as long as this value lives. Dropping it
/// unpins everything: drop it after the job's cgroup is gone.
#[derive(Debug)]
pub struct JobState {
    dir: PathBuf,
    _lock: File,
}

impl JobState {
    /// Creates and locks `<state_dir>/<name>`. The directory is created under a temporary
    /// name and renamed once locked, so `gc` never sees it unlocked.
    pub fn create(state_dir: &Path, name: &str) -> io::Result<Self> {
        pins::ensure_bpffs(state_dir)?;
        let dir = state_dir.join(name);
        let staging = state_dir.join(format!("{name}{NEW_SUFFIX}"));
        std::fs::create_dir(&staging)?;
        let lock = File::open(&staging)?;
        try_lock(&lock)?
            .then_some(())
            .ok_or_else(|| io::Error::other(format!("{} is locked by another job", staging.display())))?;
        std::fs::rename(&staging, &dir)?;
        Ok(Self { dir, _lock: lock })
    }

    /// The pin directory to hand to the engine.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for JobState {
    fn drop(&mut self) {
        if let Err(error) = pins::remove_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %error, "could not remove the job's pins");
        }
    }
}

/// `Ok(true)` when this process now holds the exclusive lock, `Ok(false)` when another does.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(error),
    }
}

/// One dead job `gc` cleaned up.
#[derive(Debug, PartialEq, Eq)]
pub struct Collected {
    pub name: String,
    /// Its cgroup still existed (and whatever ran in it was killed).
    pub cgroup_removed: bool,
}

/// Collects every job under `state_dir` whose `exec` is gone: kills what still runs in its
/// cgroup under `cgroup_parent`, removes the cgroup, then its pins. Jobs whose `exec` is
/// alive are left alone. A missing `state_dir` means nothing to collect.
pub fn gc(state_dir: &Path, cgroup_parent: &Path) -> io::Result<Vec<Collected>> {
    let entries = match std::fs::read_dir(state_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut collected = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let dir = entry.path();
        let lock = File::open(&dir)?;
        if !try_lock(&lock)? {
            continue;
        }
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let name = file_name
            .strip_suffix(NEW_SUFFIX)
            .unwrap_or(&file_name)
            .to_string();
        let cgroup = cgroup_parent.join(&name);
        let cgroup_removed = cgroup.exists();
        if cgroup_removed {
            crate::cgroup::remove_leftover(&cgroup).map_err(|e| {
                io::Error::other(format!("killing the leftovers in {}: {e}", cgroup.display()))
            })?;
        }
        pins::remove_all(&dir)?;
        collected.push(Collected { name, cgroup_removed });
    }
    // pipeguard's own parent cgroup goes with its last job; it stays while others run.
    let _ = std::fs::remove_dir(cgroup_parent);
    Ok(collected)
}
