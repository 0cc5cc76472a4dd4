//! The eBPF object built by build.rs, embedded in the binary.

#[cfg(not(pipeguard_no_ebpf))]
pub fn bytes() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/pipeguard"
    )))
}

/// Built with AYA_BUILD_SKIP=1: there is nothing to load.
#[cfg(pipeguard_no_ebpf)]
pub fn bytes() -> Option<&'static [u8]> {
    None
}
