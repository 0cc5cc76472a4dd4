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
