//! Giving freed heap back to the system. glibc keeps freed memory in its arenas; after
//! loading the object (the parsed kernel BTF alone is tens of MiB) or replacing a large
//! allowlist, that is most of the process's RSS unless trimmed.

/// Returns free heap pages to the kernel. Cheap when there is nothing to return.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// For the agent, before its threads start. Measured with `cargo xtask bench` (10k CIDRs,
/// after policy changes): about 60 MiB RSS with glibc's defaults, about 40 MiB with these.
/// - One arena: the agent's threads are mostly idle, and each extra arena keeps its own
///   freed memory.
/// - A fixed mmap threshold: buffers over 128 KiB (allowlists, watch events) are mapped and
///   unmapped on their own instead of raising the threshold and settling in the heap.
pub fn tune_for_long_running() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
