//! cgroup2: finding the mount, and the job cgroup `exec` runs a command in.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The cgroup2 mount point, read from /proc/self/mountinfo (never assumed: hybrid hosts
/// mount it at /sys/fs/cgroup/unified, most nodes at /sys/fs/cgroup).
pub fn cgroup2_mount() -> io::Result<Option<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_cgroup2_mount(&mountinfo))
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mountpoint options [optional...] - fstype source ...
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|c| u8::from_str_radix(c, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup id the kernel reports (bpf_get_current_cgroup_id): the directory's inode.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// A cgroup pipeguard created; removed on drop, killing whatever is still inside (the
/// job's leftover daemons), so nothing outlives the guarded job unguarded.
#[derive(Debug)]
pub struct OwnedCgroup {
    path: PathBuf,
}

impl OwnedCgroup {
    /// Creates `parent/name` (and `parent` if needed).
    pub fn create(parent: &Path, name: &str) -> io::Result<Self> {
        fs::create_dir_all(parent)?;
        let path = parent.join(name);
        fs::create_dir(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> io::Result<u64> {
        cgroup_id(&self.path)
    }

    /// cgroup.procs of this cgroup, for moving a process in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    pub fn move_pid(&self, pid: u32) -> io::Result<()> {
        fs::write(self.procs_file(), pid.to_string())
    }

    /// Pids still inside, including nested cgroups.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let mut pids = Vec::new();
        collect_pids(&self.path, &mut pids)?;
        Ok(pids)
    }

    /// Kills everything inside and removes the cgroup tree.
    pub fn remove(&self) -> io::Result<()> {
        kill_all(&self.path)?;
        remove_tree(&self.path)
    }
}

/// Kills everything inside the cgroup at `path` and removes it: the leftovers of a job
/// whose `pipeguard exec` died. A missing cgroup is not an error.
pub fn remove_leftover(path: &Path) -> io::Result<()> {
    kill_all(path)?;
    remove_tree(path)
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        if let Err(error) = self.remove() {
            tracing::warn!(cgroup = %self.path.display(), %error, "could not remove cgroup");
        }
        // The parent is pipeguard's own (`pipeguard/`, `pipeguard-test/`): it goes with its
        // last child. While another job still uses it, rmdir fails and it stays.
        if let Some(parent) = self.path.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) -> io::Result<()> {
    let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

fn kill_all(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (5.14+) kills the whole subtree atomically, racing no fork.
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        fs::write(&kill, "1")?;
    } else {
        let mut pids = Vec::new();
        collect_pids(dir, &mut pids)?;
        for pid in pids {
            // SAFETY: plain syscall; these pids are inside the cgroup we created.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    // The kernel empties the cgroup asynchronously; wait briefly for it.
    for _ in 0..200 {
        let mut pids = Vec::new();
        collect_pids(dir, &mut pids)?;
        if pids.is_empty() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(io::Error::other(format!("processes remain in {}", dir.display())))
}

fn remove_tree(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // Killed tasks leave cgroup.procs before the cgroup stops counting as populated: rmdir
    // says EBUSY for that moment, so retry briefly.
    for _ in 0..400 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            other => return other,
        }
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 25 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_cgroup2_mount("22 1 0:5 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mountinfo(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
    }
}
