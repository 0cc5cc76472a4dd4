//! Pinning under the pin directory (default /sys/fs/bpf/pipeguard), so enforcement outlives
//! the agent process: a crash, a SIGKILL or an upgrade leaves links and maps in place, and
//! the next agent adopts them.
//!
//! Layout: `maps/<MAP_NAME_V1>` and `links/<cgroup id>/<program>`.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

/// bpffs superblock magic (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

pub fn link_path(pin_dir: &Path, cgroup_id: u64, program: &str) -> PathBuf {
    pin_dir.join("links").join(cgroup_id.to_string()).join(program)
}

/// Unpins the maps under `maps/` that no current layout names, and returns their names: a
/// changed layout gets a new versioned name, and the old map would stay pinned, its memory
/// held, for good. Programs still using one keep it until they are replaced.
pub fn remove_stale_maps(pin_dir: &Path, current: &[&str]) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(maps_dir(pin_dir))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if current.contains(&name.as_str()) || !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::remove_file(entry.path())?;
        removed.push(name);
    }
    Ok(removed)
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid C string and an out-pointer to a zeroed statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` is on a bpffs, mounting one at its parent when that parent is an
/// empty, unmounted /sys/fs/bpf (as Cilium does; some hosts do not mount it).
pub fn prepare(pin_dir: &Path) -> io::Result<()> {
    // The pin directory itself on bpffs: the DaemonSet mounts only it (the rest of the
    // node's bpffs stays out of reach), so its parent need not be one.
    let own_mount = pin_dir.is_dir() && is_bpffs(pin_dir)?;
    if !own_mount {
        let parent = pin_dir.parent().unwrap_or(Path::new("/"));
        ensure_bpffs(parent)?;
    }
    std::fs::create_dir_all(maps_dir(pin_dir))?;
    std::fs::create_dir_all(pin_dir.join("links"))?;
    Ok(())
}

/// Makes sure `dir` exists on a bpffs. Under /sys/fs/bpf, bpffs is mounted there first
/// when missing; anywhere else it must already be one.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys_fs_bpf) && !is_bpffs(sys_fs_bpf)? {
        let target = c"/sys/fs/bpf";
        let fstype = c"bpf";
        // SAFETY: valid C strings; mounting bpffs has no data argument.
        if unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir)?;
    if !is_bpffs(dir)? {
        return Err(io::Error::other(format!(
            "{} is not on a bpf filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or choose a directory under it",
            dir.display()
        )));
    }
    Ok(())
}

/// Atomically replaces the program behind a link (BPF_LINK_UPDATE): no moment without a
/// program attached, so an upgrade never opens a gap.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    // The bpf() attr union is larger than this member; the kernel reads only its size.
    let mut attr = [0u64; 16];
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: attr is large enough and zeroed beyond the member; BPF_LINK_UPDATE = 29.
    unsafe {
        std::ptr::write(attr.as_mut_ptr().cast::<LinkUpdate>(), update);
        if libc::syscall(libc::SYS_bpf, 29, attr.as_mut_ptr(), size_of_val(&attr)) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Removes everything pinned under `pin_dir`, links first. Each link is detached
/// (BPF_LINK_DETACH) before it is unpinned: unpinning alone frees the link only after an RCU
/// grace period and a kernel work item, so for a moment after this returned the programs
/// would still judge traffic. Unpinning a map frees it once no program uses it.
pub fn remove_all(pin_dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let links = pin_dir.join("links");
    let detached = detach_tree(&links);
    remove_tree(pin_dir, &mut removed)?;
    detached?;
    Ok(removed)
}

/// Detaches every link pinned under `dir`, going on past failures; the first one is returned.
fn detach_tree(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mut first_error = Ok(());
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let result = if path.is_dir() {
            detach_tree(&path)
        } else {
            open_pinned(&path)
                .and_then(|link| detach_link(link.as_fd()))
                .map_err(|e| io::Error::new(e.kind(), format!("detaching {}: {e}", path.display())))
        };
        if first_error.is_ok() {
            first_error = result;
        }
    }
    first_error
}

/// Detaches a link's program now, whoever else holds the link (BPF_LINK_DETACH).
fn detach_link(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // SAFETY: attr is zeroed and its first u32 is link_fd; BPF_LINK_DETACH = 34.
    unsafe {
        attr.as_mut_ptr().cast::<u32>().write(link.as_raw_fd() as u32);
        if libc::syscall(libc::SYS_bpf, 34, attr.as_mut_ptr(), size_of_val(&attr)) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn remove_tree(dir: &Path, removed: &mut usize) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path(), removed)?;
        } else {
            std::fs::remove_file(entry.path())?;
            *removed += 1;
        }
    }
    std::fs::remove_dir(dir)
}

/// Opens a pinned BPF object (BPF_OBJ_GET).
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    // SAFETY: attr is zeroed and large enough; c outlives the call; BPF_OBJ_GET = 7.
    let fd = unsafe {
        std::ptr::write(
            attr.as_mut_ptr().cast::<ObjGet>(),
            ObjGet {
                pathname: c.as_ptr() as u64,
                bpf_fd: 0,
                file_flags: 0,
            },
        );
        libc::syscall(libc::SYS_bpf, 7, attr.as_mut_ptr(), size_of_val(&attr))
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
